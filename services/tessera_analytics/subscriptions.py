"""What the analytics service consumes: its queue and the events bound to it.

Kept apart from the handlers and light to import, because every Tessera publisher declares the consumer queues of
the services installed beside it (tessera_runtime.messaging.topology.installed_consumer_routes) before publishing:
an event published before this service ever started then waits in its queue instead of being unroutable.
"""

from __future__ import annotations

from tessera.order.v1 import order_events_pb2
from tessera.payment.v1 import payment_events_pb2
from tessera.user.v1 import user_events_pb2

SERVICE = "analytics"
PURPOSE = "metrics"
QUEUE = f"{SERVICE}.{PURPOSE}"

EVENTS = (
    user_events_pb2.UserCreated,
    order_events_pb2.OrderConfirmed,
    order_events_pb2.OrderFailed,
    order_events_pb2.OrderCancelled,
    payment_events_pb2.PaymentRefunded,
)

# Consumer queue -> the routing keys (events' full names) bound to it.
ROUTES: dict[str, tuple[str, ...]] = {QUEUE: tuple(event.DESCRIPTOR.full_name for event in EVENTS)}
