"""Unit of work over an AsyncSession: one transaction for the state change and its outbox events."""

from __future__ import annotations

from types import TracebackType

from google.protobuf.message import Message
from sqlalchemy import Table
from sqlalchemy.ext.asyncio import AsyncSession

from tessera_runtime.db import Database, insert_staged, stage_inserts
from tessera_runtime.outbox import PendingEvent, notify_committed, write_events

_WRITE, _READ, _INSERT = "write", "read", "insert"


class SqlAlchemyUnitOfWork:
    """Base unit of work. Services subclass it and create their repositories in `_open`."""

    def __init__(self, db: Database, outbox: Table) -> None:
        self.db = db
        self.outbox = outbox
        self.session: AsyncSession
        self.events: list[PendingEvent] = []
        self._committed = False
        self._mode = _WRITE

    def reading(self):
        """This unit of work for one block of reads that changes nothing (`async with uow.reading():`). On
        PostgreSQL each statement runs in autocommit, without BEGIN and ROLLBACK round trips, so use it where one
        statement reads what the block needs (a read across statements would not see one snapshot). commit()
        refuses."""
        self._mode = _READ
        return self

    def inserting(self):
        """This unit of work for a block whose change is only new rows (`async with uow.inserting():`).
        Repositories add them with tessera_runtime.db.insert_row, which stages them, and commit() writes them with
        the outbox events. On PostgreSQL, when the block ran nothing else on its session, that is one statement in
        autocommit: atomic, and one round trip instead of BEGIN, an INSERT per row and COMMIT. Otherwise (SQLite,
        or a block that also read) they are inserted in the session's transaction before it commits. A clash on a
        unique or foreign key is raised by commit(), as the repository translated it. Reads in the block do not
        see the staged rows."""
        self._mode = _INSERT
        return self

    def one_statement(self):
        """This unit of work for a block whose change is one guarded update, the new rows that go with it and its
        outbox events (`async with uow.one_statement():`): a save fenced by a version or a lease. Repositories write
        the update with tessera_runtime.db.update_guarded and the rows with insert_row; commit() writes them all, on
        PostgreSQL as one statement in autocommit (when the block ran nothing else on its session), the rows and
        events only if the guard matched, and raises the repository's error when it did not. It is inserting()'s
        mode, with room for the update."""
        return self.inserting()

    def _open(self, session: AsyncSession) -> None:
        """Hook for subclasses: build repositories on the session."""

    async def __aenter__(self):
        self.events = []
        self._committed = False
        if self._mode == _READ:
            self.session = self.db.read_sessionmaker()
        elif self._mode == _INSERT:
            self.session = self.db.sessionmaker()  # it begins only if something runs on it (SQLAlchemy's autobegin)
            stage_inserts(self.session)
        else:
            self.session = self.db.sessionmaker()
            await self.session.begin()
        self._open(self.session)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._mode != _WRITE and not self.session.in_transaction():
            # Nothing ran on the session (its reads were direct, see tessera_runtime.db.read_first, or its inserts
            # were, see insert_staged): it holds no connection, so there is nothing to roll back or close, and two
            # rounds through the greenlet bridge are saved.
            self._mode = _WRITE
            return
        try:
            if not self._committed:
                await self.session.rollback()
        finally:
            self._mode = _WRITE
            await self.session.close()

    def add_event(self, aggregate_type: str, aggregate_id: str, message: Message) -> PendingEvent:
        event = PendingEvent(aggregate_type, aggregate_id, message)
        self.events.append(event)
        return event

    async def commit(self) -> None:
        if self._mode == _READ:
            raise RuntimeError("a unit of work opened with reading() cannot commit")
        if self._mode == _INSERT:
            direct = await insert_staged(self.session, [(self.outbox, e.row()) for e in self.events])
            if not direct:
                await self.session.commit()
        else:
            await write_events(self.session, self.outbox, self.events)
            await self.session.commit()
        self._committed = True
        if self.events:
            notify_committed(self.outbox)

    async def rollback(self) -> None:
        await self.session.rollback()
        self.events = []


class FakeUnitOfWork:
    """The in-memory unit of work the services' unit tests share: subclasses add their in-memory repositories in
    `__init__`. Committed events are kept in `published` for assertions. One instance stands for the whole
    database, so `factory` can be passed wherever a unit-of-work factory is expected."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Message]] = []
        self.published: list[tuple[str, str, Message]] = []
        self.commits = 0

    def factory(self):
        return self

    def reading(self):
        return self

    def inserting(self):
        return self

    def one_statement(self):
        return self

    async def __aenter__(self):
        self.events = []
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.events = []

    def add_event(self, aggregate_type: str, aggregate_id: str, message: Message) -> None:
        self.events.append((aggregate_type, aggregate_id, message))

    async def commit(self) -> None:
        self.published.extend(self.events)
        self.events = []
        self.commits += 1

    async def rollback(self) -> None:
        self.events = []
