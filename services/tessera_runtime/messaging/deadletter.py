"""Dead-letter queues: browse, show and replay the messages consumers gave up on (used by `tessera dlq`).

Browsing takes the messages with basic.get without acknowledging them and then closes the channel, which puts
them back where they were: the queue is unchanged. Replay republishes a message to its consumer's queue (through
the default exchange, so that only that consumer sees it again) with its attempt count reset, waits for the
broker's confirm, and only then removes it from the dead-letter queue.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
from collections.abc import Iterable, Iterator
from typing import Any

import pika
import pika.exceptions
from google.protobuf import json_format

from tessera_runtime.messaging import envelope
from tessera_runtime.messaging.amqp import connection_parameters
from tessera_runtime.messaging.topology import DLQ_SUFFIX, dead_letter_queue

# Headers that describe one trip through the dead-letter queue and are dropped when the message is replayed.
_TRIP_HEADERS = (envelope.LAST_ERROR, envelope.DEAD_LETTERED_AT, envelope.ORIGIN_QUEUE, envelope.FORWARD_ID,
                 "x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason")


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


def _read(channel: Any, queue: str, limit: int) -> Iterator[tuple[int, Any, DeadLetter]]:
    name = dead_letter_queue(queue)
    try:
        channel.queue_declare(name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            raise QueueMissing(f"{name} does not exist on this broker and vhost") from None
        raise
    for position in range(1, limit + 1):
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
    with _channel(url) as channel:
        return [letter for _, _, letter in _read(channel, consumer_queue(queue), limit)]


def find(url: str, queue: str, message_id: str, limit: int = 10_000) -> DeadLetter | None:
    with _channel(url) as channel:
        for _, _, letter in _read(channel, consumer_queue(queue), limit):
            if letter.message_id == message_id:
                return letter
    return None


def replay(url: str, queue: str, message_ids: Iterable[str] | None, limit: int = 10_000) -> list[str]:
    """Moves dead-lettered messages back to their consumer queue (all of them when message_ids is None);
    returns the ids moved, in queue order. Each is removed from the dead-letter queue only after the broker
    confirmed its copy."""
    queue = consumer_queue(queue)
    wanted = None if message_ids is None else set(message_ids)
    moved: list[str] = []
    with _channel(url) as channel:
        channel.confirm_delivery()
        for tag, props, letter in list(_read(channel, queue, limit)):
            if wanted is not None and letter.message_id not in wanted:
                continue  # left unacknowledged: back in its place when the channel closes
            headers = {k: v for k, v in (props.headers or {}).items() if k not in _TRIP_HEADERS}
            headers[envelope.ATTEMPT] = 1
            headers[envelope.REPLAYS] = letter.replays + 1
            copy = envelope.forwarded_properties(props, {})
            copy.headers = headers
            channel.basic_publish("", queue, letter.body, copy, mandatory=True)
            channel.basic_ack(tag)
            moved.append(letter.message_id)
    return moved


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=str)
