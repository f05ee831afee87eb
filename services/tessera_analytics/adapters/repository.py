"""Where the daily counters live: SQLAlchemy for the service, in memory for unit tests."""

from __future__ import annotations

import datetime as dt
from typing import Protocol

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from tessera_analytics.adapters.orm import daily_counters
from tessera_analytics.domain.model import MAX_COUNTER, Counter, Metric, Tally, overflow


class CounterRepository(Protocol):
    async def add(self, tally: Tally) -> None: ...
    async def between(self, start: dt.date, end: dt.date) -> list[Counter]: ...


class SqlAlchemyCounterRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, tally: Tally) -> None:
        """Adds the tally's increments in one upsert: a missing counter starts at the increment, an existing one
        grows by it (PostgreSQL locks the row, SQLite has one writer, so concurrent events both count). A counter
        the increment would take past MAX_COUNTER is left as it is and InvalidEvent raised, so that the caller rolls
        the whole tally back (PostgreSQL would refuse the sum, and SQLite would store it as an inexact REAL)."""
        merged: dict[tuple[str, str], int] = {}
        for inc in tally.increments:
            key = (inc.metric.value, inc.key)
            merged[key] = merged.get(key, 0) + inc.amount
        rows = [{"day": tally.day.isoformat(), "metric": metric, "key": key, "value": amount}
                for (metric, key), amount in merged.items()]
        dialect = postgresql if self.session.bind.dialect.name == "postgresql" else sqlite
        statement = dialect.insert(daily_counters).values(rows)
        statement = statement.on_conflict_do_update(
            index_elements=[daily_counters.c.day, daily_counters.c.metric, daily_counters.c.key],
            set_={"value": daily_counters.c.value + statement.excluded.value},
            where=daily_counters.c.value <= MAX_COUNTER - statement.excluded.value)
        written = {(r.metric, r.key) for r in await self.session.execute(
            statement.returning(daily_counters.c.metric, daily_counters.c.key))}
        for metric, key in merged:
            if (metric, key) not in written:
                raise overflow(tally.day, Metric(metric), key)

    async def between(self, start: dt.date, end: dt.date) -> list[Counter]:
        rows = await self.session.execute(
            select(daily_counters).where(daily_counters.c.day >= start.isoformat(),
                                         daily_counters.c.day <= end.isoformat()))
        return [Counter(dt.date.fromisoformat(r.day), Metric(r.metric), r.key, r.value) for r in rows]


class InMemoryCounterRepository:
    def __init__(self) -> None:
        self.values: dict[tuple[dt.date, Metric, str], int] = {}

    async def add(self, tally: Tally) -> None:
        for inc in tally.increments:
            if self.values.get((tally.day, inc.metric, inc.key), 0) + inc.amount > MAX_COUNTER:
                raise overflow(tally.day, inc.metric, inc.key)
        for inc in tally.increments:
            key = (tally.day, inc.metric, inc.key)
            self.values[key] = self.values.get(key, 0) + inc.amount

    async def between(self, start: dt.date, end: dt.date) -> list[Counter]:
        return [Counter(day, metric, key, value) for (day, metric, key), value in sorted(
            self.values.items(), key=lambda item: (item[0][0], item[0][1].value, item[0][2])) if start <= day <= end]
