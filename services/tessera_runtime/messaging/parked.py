"""Parked outbox events: list them, and put them back in line for the relay (used by `tessera outbox`).

The relay parks an event the broker refuses for good (see relay.OutboxRelay._pass): the row stays in the outbox,
unpublished, with `parked_at` and `parked_reason`, and the relay passes over it. Putting it back clears both: the
relay's next pass (within TESSERA_OUTBOX_POLL_SECONDS) publishes it first, as the oldest unpublished row, and parks
it again, with a new ERROR line, if the broker still refuses it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Sequence
from typing import Any

from sqlalchemy import MetaData, Table, func, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from tessera_runtime.db import Database
from tessera_runtime.outbox import outbox_table

_PARKING_COLUMNS = {"parked_at", "parked_reason"}


class OutboxMissing(Exception):
    """The database has no outbox table with the parking columns: not a service that publishes events, or not
    migrated to this version."""


@dataclasses.dataclass(frozen=True)
class ParkedEvent:
    seq: int
    event_id: str
    event_type: str
    aggregate_type: str
    aggregate_id: str
    size_bytes: int
    created_at: dt.datetime
    parked_at: dt.datetime
    reason: str
    attempts: int

    def summary(self) -> dict[str, Any]:
        return {"outbox_seq": self.seq, "event_id": self.event_id, "event_type": self.event_type,
                "aggregate_type": self.aggregate_type, "aggregate_id": self.aggregate_id,
                "size_bytes": self.size_bytes, "created_at": self.created_at.isoformat(),
                "parked_at": self.parked_at.isoformat(), "reason": self.reason, "attempts": self.attempts}


def _table() -> Table:
    return outbox_table(MetaData())


async def _check_schema(conn: AsyncConnection) -> None:
    def columns(sync_conn: Any) -> set[str] | None:
        inspector = inspect(sync_conn)
        if not inspector.has_table("outbox"):
            return None
        return {column["name"] for column in inspector.get_columns("outbox")}

    found = await conn.run_sync(columns)
    if found is None:
        raise OutboxMissing("it has no outbox table (the service publishes no events, or its migrations were never "
                            "applied: tessera migrate SERVICE)")
    if not _PARKING_COLUMNS <= found:
        raise OutboxMissing("its outbox has no parking columns: apply the service's migrations first "
                            "(tessera migrate SERVICE)")


async def parked_events(db: Database, limit: int) -> list[ParkedEvent]:
    """The parked events, oldest first (by outbox seq), at most `limit`."""
    c = _table().c
    async with db.engine.connect() as conn:
        await _check_schema(conn)
        rows = (await conn.execute(
            select(c.seq, c.event_id, c.event_type, c.aggregate_type, c.aggregate_id,
                   func.length(c.payload).label("size_bytes"), c.created_at, c.parked_at, c.parked_reason,
                   c.attempts)
            .where(c.published_at.is_(None), c.parked_at.is_not(None)).order_by(c.seq).limit(limit))).all()
    return [ParkedEvent(seq=r.seq, event_id=r.event_id, event_type=r.event_type, aggregate_type=r.aggregate_type,
                        aggregate_id=r.aggregate_id, size_bytes=int(r.size_bytes), created_at=r.created_at,
                        parked_at=r.parked_at, reason=r.parked_reason or "", attempts=r.attempts) for r in rows]


async def retry(db: Database, event_ids: Sequence[str] | None) -> list[str]:
    """Puts parked events back in line (all of them when `event_ids` is None); returns the ids put back, in outbox
    order. Ids that are not parked events of this outbox (unknown, published, or not parked) are left out."""
    table = _table()
    c = table.c
    parked = (c.published_at.is_(None), c.parked_at.is_not(None))
    chosen = parked if event_ids is None else (*parked, c.event_id.in_(list(event_ids)))
    async with db.engine.begin() as conn:
        await _check_schema(conn)
        ids = list((await conn.execute(select(c.event_id).where(*chosen).order_by(c.seq))).scalars())
        if ids:
            await conn.execute(update(table).where(*parked, c.event_id.in_(ids))
                               .values(parked_at=None, parked_reason=None))
    return ids
