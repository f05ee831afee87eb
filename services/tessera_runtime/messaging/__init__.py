"""Domain events over RabbitMQ: the outbox relay, the consumer framework, topology and dead-letter tooling.

Producing (every service with an outbox), in the composition root:

    relay = attach_outbox_relay(module, db, outbox, settings)

Consuming:

    attach_consumer(module, settings, Subscription(service, purpose, {EventClass: handler, ...}))

with handlers that apply each event once (`applied_once`, or `claim_event` in the handler's own transaction).
"""

from tessera_runtime.messaging.consumer import Consumer, Subscription, attach_consumer
from tessera_runtime.messaging.handling import (
    DUPLICATE,
    EventHandler,
    EventMeta,
    HandlerResult,
    PermanentFailure,
    RetryLater,
)
from tessera_runtime.messaging.idempotency import applied_once, claim_event, processed_events_table
from tessera_runtime.messaging.relay import OutboxRelay, attach_outbox_relay
from tessera_runtime.messaging.settings import MessagingServiceSettings, MessagingSettings

__all__ = [
    "DUPLICATE",
    "Consumer",
    "EventHandler",
    "EventMeta",
    "HandlerResult",
    "MessagingServiceSettings",
    "MessagingSettings",
    "OutboxRelay",
    "PermanentFailure",
    "RetryLater",
    "Subscription",
    "applied_once",
    "attach_consumer",
    "attach_outbox_relay",
    "claim_event",
    "processed_events_table",
]
