"""Transactional outbox: domain events written in the same transaction as the state change they describe."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable
from typing import Any

from google.protobuf.message import Message
from opentelemetry import propagate
from sqlalchemy import BigInteger, Column, Index, Integer, LargeBinary, MetaData, String, Table, Text, insert
from sqlalchemy.ext.asyncio import AsyncSession

from tessera_runtime.db import UtcDateTime, utcnow
from tessera_runtime.logs import correlation_id_var, request_id_var

PROTOBUF_CONTENT_TYPE = "application/x-protobuf"


def outbox_table(metadata: MetaData) -> Table:
    """The outbox table, added to a service's metadata so that its migrations create it."""
    return Table(
        "outbox",
        metadata,
        # seq orders events as they were committed per aggregate; the relay publishes in seq order.
        Column("seq", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
        Column("event_id", String(36), nullable=False, unique=True),
        Column("aggregate_type", String(64), nullable=False),
        Column("aggregate_id", String(64), nullable=False),
        Column("event_type", String(200), nullable=False),
        Column("payload", LargeBinary, nullable=False),
        Column("headers", Text, nullable=False),
        Column("created_at", UtcDateTime(), nullable=False),
        Column("published_at", UtcDateTime(), nullable=True),
        Column("attempts", Integer, nullable=False, default=0),
        # An event the broker refuses for good (larger than its max_message_size, say) is parked: kept here, with
        # the broker's reason, and passed over by the relay until an operator puts it back (`tessera outbox retry`).
        Column("parked_at", UtcDateTime(), nullable=True),
        Column("parked_reason", Text, nullable=True),
        Index("ix_outbox_unpublished", "published_at", "seq"),
    )


class PendingEvent:
    """An event recorded by a handler, written to the outbox when the unit of work commits."""

    __slots__ = ("aggregate_id", "aggregate_type", "created_at", "event_id", "headers", "message")

    def __init__(self, aggregate_type: str, aggregate_id: str, message: Message) -> None:
        self.event_id = str(uuid.uuid4())
        self.aggregate_type = aggregate_type
        self.aggregate_id = aggregate_id
        self.message = message
        self.created_at = utcnow()
        headers: dict[str, Any] = {}
        propagate.inject(headers)  # W3C traceparent/tracestate of the producing span
        if (rid := request_id_var.get()) is not None:
            headers["x-request-id"] = rid
        if (cid := correlation_id_var.get()) is not None:
            headers["x-correlation-id"] = cid
        self.headers = headers

    def row(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "aggregate_type": self.aggregate_type,
            "aggregate_id": self.aggregate_id,
            "event_type": self.message.DESCRIPTOR.full_name,
            "payload": self.message.SerializeToString(),
            "headers": json.dumps(self.headers, sort_keys=True),
            "created_at": self.created_at,
            "published_at": None,
            "attempts": 0,
        }


async def write_events(session: AsyncSession, table: Table, events: list[PendingEvent]) -> None:
    if len(events) == 1:  # the usual case: a plain INSERT, not the executemany path
        await session.execute(insert(table), events[0].row())
    elif events:
        await session.execute(insert(table), [e.row() for e in events])


# In-process wake-ups: a relay in this process hears of a commit with events at once instead of at its next poll.
_commit_listeners: dict[Table, list[Callable[[], None]]] = {}


def add_commit_listener(table: Table, callback: Callable[[], None]) -> Callable[[], None]:
    """Calls callback (on the committing event loop) after each commit that wrote events to table; returns the
    function that removes it."""
    _commit_listeners.setdefault(table, []).append(callback)

    def remove() -> None:
        listeners = _commit_listeners.get(table, [])
        if callback in listeners:
            listeners.remove(callback)

    return remove


def notify_committed(table: Table) -> None:
    for callback in list(_commit_listeners.get(table, ())):
        callback()
