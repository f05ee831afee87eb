"""How a domain event travels over AMQP: properties and headers out of an outbox row, metadata back in."""

from __future__ import annotations

import dataclasses
import datetime as dt
import importlib
import json
import pkgutil
from collections.abc import Mapping
from typing import Any

import pika
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.message import Message

from tessera_runtime.outbox import PROTOBUF_CONTENT_TYPE

# Headers every event carries (the W3C trace context keys are the standard lower-case ones).
AGGREGATE_TYPE = "x-aggregate-type"
AGGREGATE_ID = "x-aggregate-id"
CORRELATION_ID = "x-correlation-id"
REQUEST_ID = "x-request-id"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
CREATED_AT = "x-created-at"
PRODUCER = "x-producer"
# Headers the consumer framework adds when it retries or dead-letters a message.
ATTEMPT = "x-tessera-attempt"
LAST_ERROR = "x-tessera-last-error"
ORIGIN_QUEUE = "x-tessera-queue"
DEAD_LETTERED_AT = "x-tessera-dead-lettered-at"
REPLAYS = "x-tessera-replays"
FORWARD_ID = "x-tessera-forward-id"

PERSISTENT = pika.DeliveryMode.Persistent.value
MAX_ERROR_LENGTH = 1000
# AMQP's short strings (the correlation_id property among them) hold at most 255 bytes.
_SHORT_STRING_BYTES = 255


@dataclasses.dataclass(frozen=True)
class OutgoingEvent:
    """One outbox row ready to publish."""

    seq: int
    event_id: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties


def outgoing_event(row: Mapping[str, Any], producer: str) -> OutgoingEvent:
    """Builds the AMQP message of an outbox row: routing key and `type` are the event's full protobuf name."""
    stored = json.loads(row["headers"] or "{}")
    created_at: dt.datetime = row["created_at"]
    headers: dict[str, Any] = {
        AGGREGATE_TYPE: row["aggregate_type"],
        AGGREGATE_ID: row["aggregate_id"],
        CREATED_AT: created_at.isoformat(timespec="microseconds"),
        PRODUCER: producer,
    }
    for key in (TRACEPARENT, TRACESTATE, REQUEST_ID, CORRELATION_ID):
        if stored.get(key):
            headers[key] = str(stored[key])
    properties = pika.BasicProperties(
        content_type=PROTOBUF_CONTENT_TYPE,
        delivery_mode=PERSISTENT,
        type=row["event_type"],
        message_id=row["event_id"],
        timestamp=int(created_at.timestamp()),
        correlation_id=_short_string(headers.get(CORRELATION_ID)),
        app_id=producer,
        headers=headers,
    )
    return OutgoingEvent(seq=row["seq"], event_id=row["event_id"], routing_key=row["event_type"],
                         body=bytes(row["payload"]), properties=properties)


def _short_string(value: str | None) -> str | None:
    """`value` when it fits an AMQP short string, else None: the x-correlation-id header carries it whole. A consumer
    restores whatever correlation id a message came with, and a property too long for its frame would make the
    event, and every event behind it, unpublishable."""
    return value if value is None or len(value.encode()) <= _SHORT_STRING_BYTES else None


def header_str(headers: Mapping[str, Any] | None, key: str) -> str | None:
    value = (headers or {}).get(key)
    if value is None:
        return None
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def header_int(headers: Mapping[str, Any] | None, key: str, default: int) -> int:
    value = (headers or {}).get(key)
    try:
        return int(value) if value is not None else default
    except (TypeError, ValueError, OverflowError):  # OverflowError: an AMQP double or decimal that is infinite
        return default


def event_type_of(properties: pika.BasicProperties, routing_key: str) -> str:
    """The event's full protobuf name: the `type` property, else the routing key it was published with."""
    return properties.type or routing_key


def forwarded_properties(properties: pika.BasicProperties, updates: Mapping[str, Any], *,
                         expiration_ms: int | None = None) -> pika.BasicProperties:
    """A copy of a delivered message's properties for a retry or dead-letter copy, with headers updated."""
    headers = dict(properties.headers or {})
    headers.update(updates)
    return pika.BasicProperties(
        content_type=properties.content_type, content_encoding=properties.content_encoding,
        delivery_mode=PERSISTENT, type=properties.type, message_id=properties.message_id,
        timestamp=properties.timestamp, correlation_id=properties.correlation_id, app_id=properties.app_id,
        headers=headers, expiration=None if expiration_ms is None else str(expiration_ms),
    )


def truncate_error(text: str) -> str:
    return text if len(text) <= MAX_ERROR_LENGTH else text[:MAX_ERROR_LENGTH - 1] + "…"


def _import_event_modules() -> None:
    """Imports every generated *_events_pb2 module so the descriptor pool knows every Tessera event."""
    try:
        package = importlib.import_module("tessera")
    except ModuleNotFoundError:
        return
    for info in pkgutil.walk_packages(package.__path__, "tessera."):
        if info.name.endswith("_events_pb2"):
            importlib.import_module(info.name)


def event_class(full_name: str) -> type[Message] | None:
    """The generated class of an event by its full protobuf name, or None when it is unknown here."""
    pool = descriptor_pool.Default()
    try:
        descriptor = pool.FindMessageTypeByName(full_name)
    except KeyError:
        _import_event_modules()
        try:
            descriptor = pool.FindMessageTypeByName(full_name)
        except KeyError:
            return None
    return message_factory.GetMessageClass(descriptor)
