"""Unit of work over an AsyncSession: one transaction for the state change and its outbox events."""

from __future__ import annotations

from types import TracebackType

from google.protobuf.message import Message
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession

from tessera_runtime.db import Database
from tessera_runtime.outbox import PendingEvent, write_events


class SqlAlchemyUnitOfWork:
    """Base unit of work. Services subclass it and create their repositories in `_open`."""

    def __init__(self, db: Database, outbox: Table) -> None:
        self.db = db
        self.outbox = outbox
        self.session: AsyncSession
        self.events: list[PendingEvent] = []
        self._committed = False

    def _open(self, session: AsyncSession) -> None:
        """Hook for subclasses: build repositories on the session."""

    async def __aenter__(self):
        self.session = self.db.sessionmaker()
        self.events = []
        self._committed = False
        await self.session.begin()
        self._open(self.session)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        try:
            if not self._committed:
                await self.session.rollback()
        finally:
            await self.session.close()

    def add_event(self, aggregate_type: str, aggregate_id: str, message: Message) -> PendingEvent:
        event = PendingEvent(aggregate_type, aggregate_id, message)
        self.events.append(event)
        return event

    async def commit(self) -> None:
        await write_events(self.session, self.outbox, self.events)
        await self.session.commit()
        self._committed = True

    async def rollback(self) -> None:
        await self.session.rollback()
        self.events = []
