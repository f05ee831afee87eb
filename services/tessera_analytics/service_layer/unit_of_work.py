"""Units of work of the analytics service: SQLAlchemy for the service, in memory for unit tests."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from tessera_analytics.adapters.orm import processed_events
from tessera_analytics.adapters.repository import (
    CounterRepository,
    InMemoryCounterRepository,
    SqlAlchemyCounterRepository,
)
from tessera_runtime.db import Database
from tessera_runtime.messaging import EventMeta
from tessera_runtime.messaging.idempotency import claim_event
from tessera_runtime.unit_of_work import FakeUnitOfWork, SqlAlchemyUnitOfWork


class AnalyticsUnitOfWork(SqlAlchemyUnitOfWork):
    """The analytics service publishes no events: it has no outbox, and add_event refuses."""

    counters: CounterRepository

    def __init__(self, db: Database) -> None:
        super().__init__(db, outbox=None)  # type: ignore[arg-type]  # commit writes no events, so needs none

    def _open(self, session: AsyncSession) -> None:
        self.counters = SqlAlchemyCounterRepository(session)

    def add_event(self, aggregate_type: str, aggregate_id: str, message: object):
        raise RuntimeError("the analytics service publishes no events")

    async def claim(self, meta: EventMeta) -> bool:
        """Records the event as applied, in this transaction; False when it already was."""
        return await claim_event(self.session, processed_events, meta)


class FakeAnalyticsUnitOfWork(FakeUnitOfWork):
    """Same interface as AnalyticsUnitOfWork. One instance is the whole database: every `async with` is a
    transaction whose changes (counters, claims) are kept only if it commits."""

    def __init__(self) -> None:
        super().__init__()
        self.counters = InMemoryCounterRepository()
        self.claimed: set[tuple[str, str]] = set()
        self._snapshot: tuple[dict, set] | None = None

    async def __aenter__(self) -> FakeAnalyticsUnitOfWork:
        await super().__aenter__()
        self._snapshot = (dict(self.counters.values), set(self.claimed))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._snapshot is not None:  # not committed: roll back
            self.counters.values, self.claimed = self._snapshot
        self._snapshot = None
        await super().__aexit__(*exc)

    async def claim(self, meta: EventMeta) -> bool:
        key = (meta.consumer, meta.event_id)
        if key in self.claimed:
            return False
        self.claimed.add(key)
        return True

    async def commit(self) -> None:
        await super().commit()
        self._snapshot = None
