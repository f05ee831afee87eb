"""Exchanges, queues and bindings of Tessera's events, declared by code at start and idempotently.

For a consumer queue Q (named "<service>.<purpose>") on events exchange E:

    E            topic, durable       every event, routing key = the event's full protobuf name
    Q            durable              bound to E by the routing keys of the events it handles; messages it rejects
                                      go to E.dead-letter with routing key Q
    Q.retry.Nms  durable, no readers  a failed message waits here N ms (its per-message TTL, the same for every
                                      message of the queue, so expiry is first in first out), then the broker
                                      dead-letters it back to Q through the default exchange
    E.dead-letter  direct, durable    where messages go after their last attempt
    Q.dlq        durable              bound to E.dead-letter by Q; inspected and replayed with `tessera dlq`

The queues are classic queues unless TESSERA_QUEUE_TYPE is quorum (QueueTopology.queue_type). Classic queues
dead-letter at most once: a broker crash while a message moves between two queues, or a target queue missing at
that moment, loses it. Quorum queues (durable by nature: messages are written to disk and confirmed only once
stored) that dead-letter (Q and its retry queues) do it at least once (x-dead-letter-strategy at-least-once, which
RabbitMQ requires with x-overflow reject-publish): the broker keeps the message in the source queue until the
target queue confirmed its copy (and sends it again about every three minutes while the target is missing).

RabbitMQ cannot change the type of an existing queue: declaring it as the other type fails with 406
PRECONDITION_FAILED. `tessera queues migrate` (queues.py) converts the queues, messages included, to the configured
type; a consumer that finds a queue declared otherwise stops with QueueNotMigrated instead of reconnecting to the
same refusal.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from collections.abc import Callable
from typing import Any

import pika.exceptions
from pika.channel import Channel

DEAD_LETTER_SUFFIX = ".dead-letter"
DLQ_SUFFIX = ".dlq"
MIGRATE_COMMAND = "tessera queues migrate"

CLASSIC = "classic"
QUORUM_TYPE = "quorum"
QUEUE_TYPES = (CLASSIC, QUORUM_TYPE)
QUEUE_TYPE_VARIABLE = "TESSERA_QUEUE_TYPE"

QUORUM: dict[str, Any] = {"x-queue-type": "quorum"}
# The arguments in which Tessera's classic and quorum declarations of a queue differ: a refusal naming one of them
# means the queue exists as the other type.
_TYPE_ARGUMENTS = ("x-queue-type", "x-overflow", "x-dead-letter-strategy")


def dead_lettering_to(exchange: str, routing_key: str, queue_type: str = CLASSIC) -> dict[str, Any]:
    """The arguments of a queue that dead-letters to exchange with routing_key: at most once for a classic queue,
    at least once for a quorum queue."""
    arguments = {"x-dead-letter-exchange": exchange, "x-dead-letter-routing-key": routing_key}
    if queue_type == QUORUM_TYPE:
        return {**QUORUM, **arguments, "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    return arguments


def other_queue_type(queue_type: str) -> str:
    return CLASSIC if queue_type == QUORUM_TYPE else QUORUM_TYPE


class QueueNotMigrated(Exception):
    """A queue of the topology exists with other arguments than the configured queue type declares (a classic
    queue while TESSERA_QUEUE_TYPE is quorum, or the other way round, above all): declaring it was refused (406
    PRECONDITION_FAILED), and would be on every reconnection, until `tessera queues migrate` converted it or the
    setting matched the queue."""

    def __init__(self, queue: str, configured: str = CLASSIC, found: str | None = None, detail: str = "") -> None:
        because = f" (it differs in {detail})" if detail else ""
        if found is not None:
            what = (f"the queue {queue} is a {found} queue but {QUEUE_TYPE_VARIABLE} is {configured}{because}; "
                    f"stop the consumers of {queue} and run `{MIGRATE_COMMAND}` with {QUEUE_TYPE_VARIABLE}="
                    f"{configured} to convert it, or set {QUEUE_TYPE_VARIABLE}={found} on every service of the "
                    "exchange")
        else:
            what = (f"the queue {queue} exists with other arguments than a {configured} queue of this version"
                    f"{because}; stop the consumers of {queue} and run `{MIGRATE_COMMAND}` with "
                    f"{QUEUE_TYPE_VARIABLE}={configured} to declare it again")
        super().__init__(what)
        self.queue = queue
        self.configured = configured
        self.found = found
        self.detail = detail


_INEQUIVALENT = re.compile(r"inequivalent arg '(?P<arg>[^']*)' for queue '(?P<queue>.*?)' in vhost")


def queue_not_migrated(reason: object, configured: str = CLASSIC) -> QueueNotMigrated | None:
    """The channel-close reason of a queue declaration refused because the queue exists with other arguments, as
    the error naming that queue (and the type it was found to be); None for any other reason. RabbitMQ names the
    first argument it finds different: between Tessera's classic and quorum declarations that is x-queue-type,
    x-overflow or x-dead-letter-strategy, depending on the other arguments."""
    if not isinstance(reason, pika.exceptions.ChannelClosedByBroker) or reason.reply_code != 406:
        return None
    match = _INEQUIVALENT.search(reason.reply_text or "")
    if match is None:
        return None
    arg = match.group("arg")
    found = other_queue_type(configured) if arg in _TYPE_ARGUMENTS else None
    return QueueNotMigrated(match.group("queue"), configured, found, arg)


@dataclasses.dataclass(frozen=True)
class Declaration:
    kind: str  # "exchange", "queue" or "bind"
    name: str
    exchange_type: str = ""
    arguments: dict[str, Any] | None = None
    exchange: str = ""
    routing_key: str = ""


def dead_letter_exchange(events_exchange: str) -> str:
    return events_exchange + DEAD_LETTER_SUFFIX


def dead_letter_queue(queue: str) -> str:
    return queue + DLQ_SUFFIX


def retry_queue(queue: str, delay_seconds: float) -> str:
    return f"{queue}.retry.{round(delay_seconds * 1000)}ms"


def exchange_declarations(events_exchange: str) -> list[Declaration]:
    return [Declaration("exchange", events_exchange, exchange_type="topic")]


@dataclasses.dataclass(frozen=True)
class QueueTopology:
    """The queues and bindings of one consumer queue."""

    events_exchange: str
    queue: str
    routing_keys: tuple[str, ...]
    retry_delays: tuple[float, ...]
    queue_type: str = CLASSIC  # or QUORUM_TYPE (TESSERA_QUEUE_TYPE)

    @property
    def dead_letter_exchange(self) -> str:
        return dead_letter_exchange(self.events_exchange)

    @property
    def dead_letter_queue(self) -> str:
        return dead_letter_queue(self.queue)

    def retry_queue(self, delay_seconds: float) -> str:
        return retry_queue(self.queue, delay_seconds)

    def routing_declarations(self) -> list[Declaration]:
        """The queue and its bindings: what routes events into it (publishers declare this much too)."""
        return [
            Declaration("queue", self.queue,
                        arguments=dead_lettering_to(self.dead_letter_exchange, self.queue, self.queue_type)),
            *(Declaration("bind", self.queue, exchange=self.events_exchange, routing_key=key)
              for key in self.routing_keys),
        ]

    def declarations(self) -> list[Declaration]:
        back_to_queue = dead_lettering_to("", self.queue, self.queue_type)
        queue, *bindings = self.routing_declarations()
        items = [
            *exchange_declarations(self.events_exchange),
            Declaration("exchange", self.dead_letter_exchange, exchange_type="direct"),
            queue,
            Declaration("queue", self.dead_letter_queue,
                        arguments=dict(QUORUM) if self.queue_type == QUORUM_TYPE else None),
            Declaration("bind", self.dead_letter_queue, exchange=self.dead_letter_exchange, routing_key=self.queue),
        ]
        for delay in sorted(set(self.retry_delays)):
            items.append(Declaration("queue", self.retry_queue(delay), arguments=back_to_queue))
        return items + bindings


def installed_consumer_routes() -> dict[str, tuple[str, ...]]:
    """Consumer queue -> its routing keys, for every service installed here that consumes events (the ROUTES of
    its light `<package>.subscriptions` module, beside its composition root)."""
    from tessera_runtime import app

    routes: dict[str, tuple[str, ...]] = {}
    for root in app.SERVICES.values():
        name = root.rsplit(".", 1)[0] + ".subscriptions"
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # the service consumes nothing, or is not installed here
            raise
        routes.update(getattr(module, "ROUTES", {}))
    return routes


def publisher_declarations(events_exchange: str, routes: dict[str, tuple[str, ...]],
                           queue_type: str = CLASSIC) -> list[Declaration]:
    """What a publisher declares before its first publish: the events exchange, and every known consumer queue with
    its bindings. An event published before its consumer ever started then waits in the consumer's durable queue
    instead of being unroutable (a first deploy starts every service at once). The declarations are the
    consumer's own, so either side may come first; only events no installed service consumes stay unroutable."""
    return [*exchange_declarations(events_exchange),
            *(d for queue, keys in sorted(routes.items())
              for d in QueueTopology(events_exchange, queue, keys, (), queue_type).routing_declarations())]


def declare_async(channel: Channel, declarations: list[Declaration], done: Callable[[], None]) -> None:
    """Declares on a SelectConnection channel one after the other, then calls done(). A mismatch closes the
    channel (406 PRECONDITION_FAILED), which the link reports and recovers from by reconnecting."""
    pending = iter(declarations)

    def next_step(_frame: object = None) -> None:
        item = next(pending, None)
        if item is None:
            done()
        elif item.kind == "exchange":
            channel.exchange_declare(item.name, exchange_type=item.exchange_type, durable=True, callback=next_step)
        elif item.kind == "queue":
            channel.queue_declare(item.name, durable=True, arguments=item.arguments, callback=next_step)
        else:
            channel.queue_bind(item.name, item.exchange, routing_key=item.routing_key, callback=next_step)

    next_step()


def declare_blocking(channel: Any, declarations: list[Declaration]) -> None:
    """The same declarations on a pika BlockingChannel (tools and tests)."""
    for item in declarations:
        if item.kind == "exchange":
            channel.exchange_declare(item.name, exchange_type=item.exchange_type, durable=True)
        elif item.kind == "queue":
            channel.queue_declare(item.name, durable=True, arguments=item.arguments)
        else:
            channel.queue_bind(item.name, item.exchange, routing_key=item.routing_key)
