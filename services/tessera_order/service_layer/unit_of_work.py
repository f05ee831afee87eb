"""Units of work of the order service: SQLAlchemy for the service, in-memory for unit tests."""

from __future__ import annotations

from google.protobuf.message import Message
from sqlalchemy.ext.asyncio import AsyncSession

from tessera_order.adapters.orm import outbox
from tessera_order.adapters.repository import InMemoryOrderRepository, OrderRepository, SqlAlchemyOrderRepository
from tessera_runtime.db import Database
from tessera_runtime.unit_of_work import SqlAlchemyUnitOfWork


class OrderUnitOfWork(SqlAlchemyUnitOfWork):
    orders: OrderRepository

    def __init__(self, db: Database) -> None:
        super().__init__(db, outbox)

    def _open(self, session: AsyncSession) -> None:
        self.orders = SqlAlchemyOrderRepository(session)


class FakeOrderUnitOfWork:
    """Same interface as OrderUnitOfWork over one shared in-memory repository; committed events are kept in
    `published` for assertions. Create one and pass `factory` wherever a unit-of-work factory is expected."""

    def __init__(self) -> None:
        self.orders = InMemoryOrderRepository()
        self.events: list[tuple[str, str, Message]] = []
        self.published: list[tuple[str, str, Message]] = []
        self.commits = 0

    def factory(self) -> FakeOrderUnitOfWork:
        return self

    async def __aenter__(self) -> FakeOrderUnitOfWork:
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
