"""Converts the consumer queues to the configured type (TESSERA_QUEUE_TYPE), messages included: classic queues of
an earlier deployment to quorum queues, or quorum queues back to classic queues.

RabbitMQ cannot change a queue's type or arguments in place, and declaring a queue as the other type is refused
(406 PRECONDITION_FAILED). For each queue N of a consumer topology (its retry queues first, while the consumer
queue they dead-letter to still exists, then the consumer queue, then its dead-letter queue), `migrate`:

1. declares N as the configured type declares it. Accepted: N is of that type already (or did not exist and is
   now), and only step 5 may remain. Refused because N exists with other arguments (the other type, or arguments
   an earlier version declared), and then it
2. refuses to go on while N has consumers (stop the consumers of N first: deleting a queue drops the deliveries
   they have not acknowledged);
3. declares the durable queue N.migrating (of the configured type), with N's bindings, so that events published
   meanwhile land there, and moves every message of N to it: each copy is confirmed by the broker before its
   original is acknowledged;
4. deletes N only if it is empty and unused (a message that arrived meanwhile is moved first), and declares it
   again as the configured type with its bindings;
5. unbinds N.migrating, moves its messages back to N, and deletes it once empty.

A message with a per-message TTL (one waiting in a retry queue) keeps it in a header while in N.migrating, which
has no dead-letter exchange, and gets it back in N (its wait starts again). The x-delivery-count header a quorum
queue adds to a message it delivered before is not carried over. Every step is idempotent and the state of an
interrupted run is on the broker (N of the old type or missing or of the new one, N.migrating present or not), so
running `migrate` again with the same TESSERA_QUEUE_TYPE finishes the job. Nothing is lost; a run interrupted
between a copy's confirm and its original's acknowledgement leaves that message twice, which the consumer applies
once (it deduplicates by event id). An event published while both N and N.migrating are bound (during step 5, for
a moment) reaches both and is also applied once.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pika
import pika.exceptions

from tessera_runtime.messaging.amqp import connection_parameters
from tessera_runtime.messaging.topology import QUORUM, QUORUM_TYPE, Declaration, QueueTopology, queue_not_migrated

TEMP_SUFFIX = ".migrating"
# Where a moved message keeps its per-message TTL while it waits in the temporary queue.
EXPIRATION_HEADER = "x-tessera-migrated-expiration"
_DRAIN_ROUNDS = 50


class MigrationRefused(Exception):
    """The migration cannot go on safely (consumers still attached, or a queue declared in an unexpected way)."""


@dataclasses.dataclass
class QueueMigration:
    """What `migrate` did to one queue: `converted` to `queue_type` (from the other type, or one declared
    otherwise) or not, and how many messages it moved out of the old queue and back into the new one (both include
    those of an interrupted run)."""

    queue: str
    queue_type: str = QUORUM_TYPE
    converted: bool = False
    moved_out: int = 0
    moved_back: int = 0

    def describe(self) -> str:
        if self.converted:
            return (f"{self.queue}: converted to a {self.queue_type} queue, {self.moved_out} message(s) moved out "
                    f"and {self.moved_back} back")
        if self.moved_back:
            return (f"{self.queue}: {self.queue_type} queue; {self.moved_back} message(s) of an interrupted run "
                    "moved back")
        return f"{self.queue}: {self.queue_type} queue already"


def temporary_queue(queue: str) -> str:
    return queue + TEMP_SUFFIX


def queue_plan(topology: QueueTopology) -> list[tuple[Declaration, list[Declaration]]]:
    """The queues of a topology in migration order (retry queues, consumer queue, dead-letter queue), each with
    its bindings."""
    declarations = topology.declarations()
    queues = {d.name: d for d in declarations if d.kind == "queue"}
    bindings = [d for d in declarations if d.kind == "bind"]
    order = [*(topology.retry_queue(delay) for delay in sorted(set(topology.retry_delays))), topology.queue,
             topology.dead_letter_queue]
    return [(queues[name], [b for b in bindings if b.name == name]) for name in order]


def migrate(url: str, topologies: Iterable[QueueTopology],
            on_queue: Callable[[QueueMigration], None] | None = None) -> list[QueueMigration]:
    """Converts every queue of the topologies to its topology's queue type as described above; returns what was
    done."""
    results = []
    topologies = list(topologies)
    with _connection(url) as connection:
        for topology in topologies:
            channel = connection.channel()
            for declaration in topology.declarations():
                if declaration.kind == "exchange":
                    channel.exchange_declare(declaration.name, exchange_type=declaration.exchange_type,
                                             durable=True)
            channel.close()
        plans = [queue_plan(topology) for topology in topologies]
        for plan in plans:  # nothing is touched while a queue to convert still has consumers
            for queue, _ in plan:
                if not _declare(connection, queue):
                    _refuse_if_consumed(connection, queue.name)
        for topology, plan in zip(topologies, plans, strict=True):
            for queue, bindings in plan:
                result = migrate_queue(connection, queue, bindings, topology.queue_type)
                results.append(result)
                if on_queue is not None:
                    on_queue(result)
    return results


def migrate_queue(connection: pika.BlockingConnection, queue: Declaration,
                  bindings: list[Declaration], queue_type: str = QUORUM_TYPE) -> QueueMigration:
    """Converts one queue (steps 1 to 5 above) to queue_type, the type its declaration asks for."""
    result = QueueMigration(queue.name, queue_type)
    temp = temporary_queue(queue.name)
    if not _declare(connection, queue):
        result.converted = True
        _refuse_if_consumed(connection, queue.name)
        channel = connection.channel()
        channel.confirm_delivery()
        if not _exists(connection, temp):  # one an interrupted run left stays as it is
            channel.queue_declare(temp, durable=True, arguments=dict(QUORUM) if queue_type == QUORUM_TYPE else None)
        for binding in bindings:  # the temporary queue first: an event published meanwhile always has a queue
            channel.queue_bind(temp, binding.exchange, routing_key=binding.routing_key)
        for binding in bindings:
            channel.queue_unbind(queue.name, binding.exchange, routing_key=binding.routing_key)
        result.moved_out += _drain(connection, channel, queue.name, temp, _stash_expiration)
        # Empty, unbound and unused. Quorum queues refuse the if-empty flag, and the old queue may be one.
        channel.queue_delete(queue.name)
        channel.close()
        if not _declare(connection, queue):
            raise MigrationRefused(f"{queue.name} was declared again otherwise during its migration (by a service of "
                                   "the earlier version?); stop it and run the migration again")
    channel = connection.channel()
    for binding in bindings:
        channel.queue_bind(queue.name, binding.exchange, routing_key=binding.routing_key)
    if _exists(connection, temp):
        channel.confirm_delivery()
        for binding in bindings:  # bound, the queue takes the events from now on (an event routed to both queues
            channel.queue_unbind(temp, binding.exchange, routing_key=binding.routing_key)  # in between: twice)
        result.moved_back += _drain(connection, channel, temp, queue.name, _restore_expiration)
        channel.queue_delete(temp)
    channel.close()
    return result


def _refuse_if_consumed(connection: pika.BlockingConnection, name: str) -> None:
    consumers = _consumers(connection, name)
    if consumers:
        raise MigrationRefused(f"{name} has {consumers} consumer(s): stop the services of the earlier version that "
                               "consume it, then run the migration again")


def _drain(connection: pika.BlockingConnection, channel: Any, source: str, target: str,
           transform: Callable[[pika.BasicProperties], pika.BasicProperties]) -> int:
    """Moves messages from source to target until source, unbound by now, is seen empty and unused."""
    moved = 0
    for _ in range(_DRAIN_ROUNDS):
        moved += _move(channel, source, target, transform)
        state = _passive(connection, source)
        if state is None or state.message_count == 0:
            _refuse_if_consumed(connection, source)
            return moved
    raise MigrationRefused(f"{source} kept receiving messages; run the migration again")


@contextlib.contextmanager
def _connection(url: str) -> Iterator[pika.BlockingConnection]:
    connection = pika.BlockingConnection(connection_parameters(url, "tessera-queues"))
    try:
        yield connection
    finally:
        if connection.is_open:
            connection.close()


def _declare(connection: pika.BlockingConnection, queue: Declaration) -> bool:
    """Declares the queue as this version does; False when it exists with other arguments (a classic queue)."""
    channel = connection.channel()
    try:
        channel.queue_declare(queue.name, durable=True, arguments=queue.arguments)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if queue_not_migrated(exc) is not None:
            return False
        raise MigrationRefused(f"{queue.name} cannot be declared as this version declares it: {exc.reply_text}") \
            from None
    channel.close()
    return True


def _passive(connection: pika.BlockingConnection, name: str) -> Any | None:
    channel = connection.channel()
    try:
        ok = channel.queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            return None
        raise
    channel.close()
    return ok.method


def _exists(connection: pika.BlockingConnection, name: str) -> bool:
    return _passive(connection, name) is not None


def _consumers(connection: pika.BlockingConnection, name: str) -> int:
    method = _passive(connection, name)
    return 0 if method is None else method.consumer_count


def _move(channel: Any, source: str, target: str,
          transform: Callable[[pika.BasicProperties], pika.BasicProperties]) -> int:
    """Moves every message of source to target through the default exchange; each original is acknowledged only
    after the broker confirmed its copy (the channel is in confirm mode, so a refused copy raises and its original
    goes back to source when the channel closes)."""
    moved = 0
    while True:
        method, properties, body = channel.basic_get(source, auto_ack=False)
        if method is None:
            return moved
        channel.basic_publish("", target, body, transform(properties), mandatory=True)
        channel.basic_ack(method.delivery_tag)
        moved += 1


def _copy(properties: pika.BasicProperties, headers: dict[str, Any], expiration: str | None) -> pika.BasicProperties:
    return pika.BasicProperties(
        content_type=properties.content_type, content_encoding=properties.content_encoding, headers=headers,
        delivery_mode=pika.DeliveryMode.Persistent, priority=properties.priority,
        correlation_id=properties.correlation_id, reply_to=properties.reply_to, expiration=expiration,
        message_id=properties.message_id, timestamp=properties.timestamp, type=properties.type,
        app_id=properties.app_id, cluster_id=properties.cluster_id)  # no user_id: the broker checks it


def _stash_expiration(properties: pika.BasicProperties) -> pika.BasicProperties:
    headers = {k: v for k, v in (properties.headers or {}).items() if k != "x-delivery-count"}
    if properties.expiration is not None:
        headers[EXPIRATION_HEADER] = properties.expiration
    return _copy(properties, headers, None)


def _restore_expiration(properties: pika.BasicProperties) -> pika.BasicProperties:
    headers = dict(properties.headers or {})
    expiration = headers.pop(EXPIRATION_HEADER, None)
    if isinstance(expiration, bytes):
        expiration = expiration.decode()
    return _copy(properties, headers, expiration if expiration is not None else properties.expiration)
