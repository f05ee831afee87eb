"""Processed events: a consumer records each event id it applied in the same transaction as the effect, so a
redelivered event (a relay re-publish, a redelivery after a crash before the ack) has no second effect."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from google.protobuf.message import Message
from sqlalchemy import Column, Index, MetaData, String, Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from tessera_runtime.db import UtcDateTime, utcnow
from tessera_runtime.messaging.handling import DUPLICATE, EventMeta, HandlerResult

log = logging.getLogger("tessera.consumer")


def processed_events_table(metadata: MetaData) -> Table:
    """The processed_events table, added to a consuming service's metadata; its migration calls
    tessera_runtime.migrations.create_processed_events."""
    return Table(
        "processed_events",
        metadata,
        # The consumer queue: two queues of one service may each apply the same event once.
        Column("consumer", String(200), primary_key=True),
        Column("event_id", String(64), primary_key=True),
        Column("event_type", String(200), nullable=False),
        Column("processed_at", UtcDateTime(), nullable=False),
        Index("ix_processed_events_processed_at", "processed_at"),
    )


async def claim_event(session: AsyncSession, table: Table, meta: EventMeta) -> bool:
    """Records the event as applied by meta.consumer in the session's transaction. False when it already was:
    the caller must then apply nothing. A concurrent claim of the same event waits for the first transaction
    (PostgreSQL's unique index, SQLite's single writer) and then sees it."""
    values = {"consumer": meta.consumer, "event_id": meta.event_id, "event_type": meta.event_type,
              "processed_at": utcnow()}
    dialect = session.bind.dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    result = await session.execute(insert(table).values(**values).on_conflict_do_nothing())
    return result.rowcount == 1


async def event_processed(session: AsyncSession, table: Table, consumer: str, event_id: str) -> bool:
    row = (await session.execute(select(table.c.event_id).where(
        table.c.consumer == consumer, table.c.event_id == event_id))).first()
    return row is not None


async def prune_processed_events(conn: AsyncConnection | AsyncSession, table: Table,
                                 older_than: dt.timedelta) -> int:
    """Forgets events applied longer ago than any redelivery can come (relay re-publishes come within minutes;
    a dead-lettered event was never recorded, so replaying it later still applies it)."""
    result = await conn.execute(delete(table).where(table.c.processed_at < utcnow() - older_than))
    return result.rowcount or 0


class TransactionalUnitOfWork(Protocol):
    session: AsyncSession

    async def __aenter__(self) -> Any: ...
    async def __aexit__(self, *exc: object) -> None: ...
    async def commit(self) -> None: ...


def applied_once(uow_factory: Callable[[], TransactionalUnitOfWork], processed: Table,
                 apply: Callable[[Any, EventMeta, Any], Awaitable[None]]) -> Callable[[Any, EventMeta],
                                                                                   Awaitable[HandlerResult]]:
    """Wraps `apply(event, meta, uow)` into a consumer handler that runs it in one unit of work together with the
    claim of the event id, and commits both; a duplicate returns DUPLICATE without calling apply."""

    async def handle(event: Message, meta: EventMeta) -> HandlerResult:
        async with uow_factory() as uow:
            if not await claim_event(uow.session, processed, meta):
                return DUPLICATE
            await apply(event, meta, uow)
            await uow.commit()
        return None

    return handle
