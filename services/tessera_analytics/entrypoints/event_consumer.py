"""The analytics service's event entrypoint: each consumed event → its tally → counted once."""

from __future__ import annotations

from collections.abc import Callable

from tessera.order.v1 import order_events_pb2
from tessera.payment.v1 import payment_events_pb2
from tessera.user.v1 import user_events_pb2

from tessera_analytics import mapping
from tessera_analytics.domain.model import InvalidEvent, Tally
from tessera_analytics.service_layer import handlers
from tessera_analytics.subscriptions import EVENTS, PURPOSE, QUEUE, SERVICE
from tessera_runtime.messaging import EventMeta, HandlerResult, PermanentFailure, Subscription


def subscription(uow_factory: Callable[[], handlers.UnitOfWork]) -> Subscription:
    def counted(tally_of: Callable[[object, EventMeta], Tally]) -> Callable:
        async def handle(event, meta: EventMeta) -> HandlerResult:
            try:
                tally = tally_of(event, meta)
            except InvalidEvent as exc:  # retrying cannot help: to the dead-letter queue at once
                raise PermanentFailure(str(exc)) from None
            return await handlers.count(tally, meta, uow_factory)

        return handle

    subscription = Subscription(SERVICE, PURPOSE, {
        user_events_pb2.UserCreated: counted(mapping.user_created),
        order_events_pb2.OrderConfirmed: counted(mapping.order_confirmed),
        order_events_pb2.OrderFailed: counted(mapping.order_failed),
        order_events_pb2.OrderCancelled: counted(mapping.order_cancelled),
        payment_events_pb2.PaymentRefunded: counted(mapping.payment_refunded),
    })
    if set(subscription.handlers) != set(EVENTS):  # the queue's bindings come from EVENTS: keep them equal
        raise RuntimeError(f"{QUEUE} handles {sorted(c.DESCRIPTOR.full_name for c in subscription.handlers)} "
                           f"but subscriptions.EVENTS lists {sorted(c.DESCRIPTOR.full_name for c in EVENTS)}")
    return subscription
