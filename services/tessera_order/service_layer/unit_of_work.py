"""Units of work of the order service: SQLAlchemy for the service, in-memory for unit tests."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from tessera_order.adapters.orm import outbox
from tessera_order.adapters.repository import InMemoryOrderRepository, OrderRepository, SqlAlchemyOrderRepository
from tessera_runtime.db import Database
from tessera_runtime.unit_of_work import FakeUnitOfWork, SqlAlchemyUnitOfWork


class OrderUnitOfWork(SqlAlchemyUnitOfWork):
    orders: OrderRepository

    def __init__(self, db: Database) -> None:
        super().__init__(db, outbox)

    def _open(self, session: AsyncSession) -> None:
        self.orders = SqlAlchemyOrderRepository(session)


class FakeOrderUnitOfWork(FakeUnitOfWork):
    """Same interface as OrderUnitOfWork over one shared in-memory repository; committed events are kept in
    `published` for assertions. Create one and pass `factory` wherever a unit-of-work factory is expected."""

    def __init__(self) -> None:
        super().__init__()
        self.orders = InMemoryOrderRepository()
