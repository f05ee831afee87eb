"""The notification service's event entrypoint: each consumed event → a command → its handler."""

from __future__ import annotations

from collections.abc import Callable

from tessera.order.v1 import order_events_pb2
from tessera.payment.v1 import payment_events_pb2
from tessera.user.v1 import user_events_pb2

from tessera_notification import mapping
from tessera_notification.service_layer import handlers
from tessera_notification.subscriptions import EVENTS, PURPOSE, QUEUE, SERVICE
from tessera_runtime.messaging import EventMeta, HandlerResult, Subscription


def subscription(uow_factory: Callable[[], handlers.UnitOfWork], dispatch: handlers.Dispatch) -> Subscription:
    def send(translate: Callable) -> Callable:
        async def handle(event, meta: EventMeta) -> HandlerResult:
            return await handlers.notify(translate(event), meta, dispatch)

        return handle

    async def user_updated(event: user_events_pb2.UserUpdated, meta: EventMeta) -> HandlerResult:
        return await handlers.record_user(mapping.record_user(event), meta, uow_factory)

    async def user_deleted(event: user_events_pb2.UserDeleted, meta: EventMeta) -> HandlerResult:
        return await handlers.forget_user(mapping.forget_user(event), meta, uow_factory)

    subscription = Subscription(SERVICE, PURPOSE, {
        user_events_pb2.UserCreated: send(mapping.welcome),
        user_events_pb2.UserUpdated: user_updated,
        user_events_pb2.UserDeleted: user_deleted,
        order_events_pb2.OrderConfirmed: send(mapping.receipt),
        order_events_pb2.OrderFailed: send(mapping.placement_failure),
        order_events_pb2.OrderCancelled: send(mapping.cancellation),
        payment_events_pb2.PaymentRefunded: send(mapping.refund),
    })
    if set(subscription.handlers) != set(EVENTS):  # the queue's bindings come from EVENTS: keep them equal
        raise RuntimeError(f"{QUEUE} handles {sorted(c.DESCRIPTOR.full_name for c in subscription.handlers)} "
                           f"but subscriptions.EVENTS lists {sorted(c.DESCRIPTOR.full_name for c in EVENTS)}")
    return subscription
