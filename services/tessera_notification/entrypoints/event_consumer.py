"""The notification service's event entrypoint: each consumed event → a command → its handler."""

from __future__ import annotations

from collections.abc import Callable

from tessera.order.v1 import order_events_pb2
from tessera.payment.v1 import payment_events_pb2
from tessera.user.v1 import user_events_pb2

from tessera_notification import mapping
from tessera_notification.service_layer import handlers
from tessera_runtime.messaging import EventMeta, HandlerResult, Subscription

SERVICE = "notification"
# One queue: keeping the recipient copy and sending e-mails are one purpose, so a user's UserCreated is usually
# applied before the first order event that needs its address.
PURPOSE = "email"
QUEUE = f"{SERVICE}.{PURPOSE}"


def subscription(uow_factory: Callable[[], handlers.UnitOfWork], dispatch: handlers.Dispatch) -> Subscription:
    def send(translate: Callable) -> Callable:
        async def handle(event, meta: EventMeta) -> HandlerResult:
            return await handlers.notify(translate(event), meta, dispatch)

        return handle

    async def user_updated(event: user_events_pb2.UserUpdated, meta: EventMeta) -> HandlerResult:
        return await handlers.record_user(mapping.record_user(event), meta, uow_factory)

    async def user_deleted(event: user_events_pb2.UserDeleted, meta: EventMeta) -> HandlerResult:
        return await handlers.forget_user(mapping.forget_user(event), meta, uow_factory)

    return Subscription(SERVICE, PURPOSE, {
        user_events_pb2.UserCreated: send(mapping.welcome),
        user_events_pb2.UserUpdated: user_updated,
        user_events_pb2.UserDeleted: user_deleted,
        order_events_pb2.OrderConfirmed: send(mapping.receipt),
        order_events_pb2.OrderFailed: send(mapping.placement_failure),
        order_events_pb2.OrderCancelled: send(mapping.cancellation),
        payment_events_pb2.PaymentRefunded: send(mapping.refund),
    })
