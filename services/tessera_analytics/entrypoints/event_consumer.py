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
            try:  # retrying cannot help either failure: to the dead-letter queue at once
                return await handlers.count(tally_of(event, meta), meta, uow_factory)
            except InvalidEvent as exc:  # a counter it would overflow was rolled back with the event's claim
                raise PermanentFailure(str(exc)) from None

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
