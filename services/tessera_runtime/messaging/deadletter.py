"""Dead-letter queues: browse, show and replay the messages consumers gave up on (used by `tessera dlq`).

Browsing takes the messages with basic.get without acknowledging them and then closes the channel, which puts
them back: no message leaves the queue. A classic dead-letter queue puts them back in their places; a quorum one
(TESSERA_QUEUE_TYPE=quorum, topology.py) puts returned messages behind the ones it still holds, in no set order
(RabbitMQ 3.10), so a listing, a `show` or a replay of some ids changes the order of the queue, never its contents;
each read adds one to a message's x-delivery-count, which Tessera does not use (it counts attempts in its own
header, reset by a replay).

Replay republishes a message to its consumer's queue (through the default exchange, so that only that consumer
sees it again) with its attempt count reset, waits for the broker's confirm, and only then removes it from the
dead-letter queue; a copy the broker does not take stops the replay with that message and the ones after it still
in the dead-letter queue.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pika
import pika.exceptions
from google.protobuf import json_format

from tessera_runtime.messaging import envelope
from tessera_runtime.messaging.amqp import connection_parameters
from tessera_runtime.messaging.topology import DLQ_SUFFIX, dead_letter_queue

# Headers that describe one trip through the dead-letter queue and are dropped when the message is replayed.
_TRIP_HEADERS = (envelope.LAST_ERROR, envelope.DEAD_LETTERED_AT, envelope.ORIGIN_QUEUE, envelope.FORWARD_ID,
                 "x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
                 "x-delivery-count")


class QueueMissing(Exception):
    """The dead-letter queue does not exist: the consumer never started against this broker and vhost."""


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    position: int
    message_id: str
    event_type: str
    attempts: int
    error: str
    dead_lettered_at: str
    replays: int
    properties: pika.BasicProperties
    body: bytes

    def summary(self) -> dict[str, Any]:
        return {"position": self.position, "message_id": self.message_id, "event_type": self.event_type,
                "attempts": self.attempts, "replays": self.replays, "dead_lettered_at": self.dead_lettered_at,
                "error": self.error}

    def details(self) -> dict[str, Any]:
        props = self.properties
        headers = {k: _plain(v) for k, v in (props.headers or {}).items()}
        payload: Any
        cls = envelope.event_class(self.event_type)
        if cls is None:
            payload = {"undecoded_base64": _b64(self.body), "reason": f"unknown event type {self.event_type!r}"}
        else:
            try:
                payload = json_format.MessageToDict(cls.FromString(self.body), preserving_proto_field_name=True)
            except Exception as exc:  # the body is what made it poison, perhaps
                payload = {"undecoded_base64": _b64(self.body), "reason": f"{type(exc).__name__}: {exc}"}
        return {**self.summary(), "properties": {
            "content_type": props.content_type, "type": props.type, "message_id": props.message_id,
            "timestamp": props.timestamp, "correlation_id": props.correlation_id, "app_id": props.app_id,
            "headers": headers}, "payload": payload}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value if isinstance(value, str | int | float | bool) or value is None else str(value)


def consumer_queue(name: str) -> str:
    """The consumer queue a name refers to: accepts "notification.email" and "notification.email.dlq"."""
    return name[: -len(DLQ_SUFFIX)] if name.endswith(DLQ_SUFFIX) else name


@contextlib.contextmanager
def _channel(url: str) -> Iterator[Any]:
    connection = pika.BlockingConnection(connection_parameters(url, "tessera-dlq"))
    try:
        yield connection.channel()
    finally:
        if connection.is_open:
            connection.close()


def depth(url: str, queues: Iterable[str]) -> dict[str, int | None]:
    """Messages in the dead-letter queue of each consumer queue; None for a queue that does not exist."""
    result: dict[str, int | None] = {}
    connection = pika.BlockingConnection(connection_parameters(url, "tessera-dlq"))
    try:
        for queue in queues:
            channel = connection.channel()
            try:
                ok = channel.queue_declare(dead_letter_queue(queue), passive=True)
                result[queue] = ok.method.message_count
            except pika.exceptions.ChannelClosedByBroker as exc:
                if exc.reply_code != 404:
                    raise
                result[queue] = None
                continue
            channel.close()
    finally:
        if connection.is_open:
            connection.close()
    return result


def _open(channel: Any, queue: str) -> int:
    """Checks that the dead-letter queue of a consumer queue exists; returns how many messages it holds."""
    name = dead_letter_queue(queue)
    try:
        return channel.queue_declare(name, passive=True).method.message_count
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            raise QueueMissing(f"{name} does not exist on this broker and vhost") from None
        raise


def _read(channel: Any, queue: str, limit: int | None) -> Iterator[tuple[int, Any, DeadLetter]]:
    """The dead-letter queue's messages, oldest first, taken without acknowledging them: at most `limit`, or (with
    None) the messages it held when the reading began, so that messages dead-lettered again meanwhile (a replayed
    one that failed again) are not read a second time."""
    name = dead_letter_queue(queue)
    held = _open(channel, queue)
    count = held if limit is None else limit
    for position in range(1, count + 1):
        method, props, body = channel.basic_get(name, auto_ack=False)
        if method is None:
            return
        headers = props.headers or {}
        yield method.delivery_tag, props, DeadLetter(
            position=position, message_id=props.message_id or "", event_type=props.type or method.routing_key,
            attempts=envelope.header_int(headers, envelope.ATTEMPT, 1),
            error=envelope.header_str(headers, envelope.LAST_ERROR) or "",
            dead_lettered_at=envelope.header_str(headers, envelope.DEAD_LETTERED_AT) or "",
            replays=envelope.header_int(headers, envelope.REPLAYS, 0), properties=props, body=body)


def browse(url: str, queue: str, limit: int = 100) -> list[DeadLetter]:
    """The first `limit` dead-lettered messages of a consumer queue, oldest first; the queue is left as it was."""
    if limit < 1:
        raise ValueError("limit must be at least 1")
    with _channel(url) as channel:
        return [letter for _, _, letter in _read(channel, consumer_queue(queue), limit)]


def find(url: str, queue: str, message_id: str) -> DeadLetter | None:
    """One dead-lettered message by its id, searched through the whole dead-letter queue."""
    with _channel(url) as channel:
        for _, _, letter in _read(channel, consumer_queue(queue), None):
            if letter.message_id == message_id:
                return letter
    return None


@dataclasses.dataclass
class ReplayResult:
    """What a replay did: the ids moved (in queue order), why it stopped early if it did, and how many messages
    the dead-letter queue still holds once it ended."""

    moved: list[str] = dataclasses.field(default_factory=list)
    stopped: str | None = None
    left: int = 0


def replay(url: str, queue: str, message_ids: Iterable[str] | None,
           on_moved: Callable[[str], None] | None = None) -> ReplayResult:
    """Moves dead-lettered messages back to their consumer queue: the given ids, or (message_ids None) every
    message the dead-letter queue held when the replay began. Each is removed from the dead-letter queue only
    after the broker confirmed its copy, and `on_moved` is called with its id right then.

    The first copy the broker does not take (the consumer queue is gone, or it refuses the message) stops the
    replay: that message and every one not yet moved stay in the dead-letter queue (in their order in a classic
    one), and `stopped` says why. Nothing is lost; a connection lost between a confirm and the removal leaves a
    message in both queues, which the consumer's deduplication applies once."""
    queue = consumer_queue(queue)
    wanted = None if message_ids is None else set(message_ids)
    result = ReplayResult()
    # What was read and not moved goes back to the dead-letter queue (in its place in a classic one).
    with _channel(url) as channel:
        channel.confirm_delivery()
        for tag, props, letter in _read(channel, queue, None):
            if wanted is not None and letter.message_id not in wanted:
                continue  # left unacknowledged: back in the queue when the channel closes
            headers = {k: v for k, v in (props.headers or {}).items() if k not in _TRIP_HEADERS}
            headers[envelope.ATTEMPT] = 1
            headers[envelope.REPLAYS] = letter.replays + 1
            copy = envelope.forwarded_properties(props, {})
            copy.headers = headers
            try:
                channel.basic_publish("", queue, letter.body, copy, mandatory=True)
            except pika.exceptions.UnroutableError:
                result.stopped = (f"{letter.message_id} could not be routed to {queue}: the queue does not exist "
                                  f"(start its consumer once to declare it)")
                break
            except pika.exceptions.NackError:
                result.stopped = f"{queue} refused {letter.message_id} (is it full?)"
                break
            channel.basic_ack(tag)
            result.moved.append(letter.message_id)
            if on_moved is not None:
                on_moved(letter.message_id)
            if wanted is not None:
                wanted.discard(letter.message_id)
                if not wanted:
                    break
    result.left = depth(url, [queue])[queue] or 0
    return result


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
