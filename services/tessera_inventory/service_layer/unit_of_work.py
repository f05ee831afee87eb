"""Units of work of the inventory service: SQLAlchemy for the service, in-memory for unit tests."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from tessera_inventory.adapters.orm import outbox
from tessera_inventory.adapters.repository import (
    InMemoryProductRepository,
    InMemoryReservationRepository,
    InventoryState,
    ProductRepository,
    ReservationRepository,
    SqlAlchemyProductRepository,
    SqlAlchemyReservationRepository,
)
from tessera_runtime.db import Database
from tessera_runtime.unit_of_work import FakeUnitOfWork, SqlAlchemyUnitOfWork


class InventoryUnitOfWork(SqlAlchemyUnitOfWork):
    products: ProductRepository
    reservations: ReservationRepository

    def __init__(self, db: Database) -> None:
        super().__init__(db, outbox)

    def _open(self, session: AsyncSession) -> None:
        self.products = SqlAlchemyProductRepository(session)
        self.reservations = SqlAlchemyReservationRepository(session)


class FakeInventoryUnitOfWork(FakeUnitOfWork):
    """Same interface as InventoryUnitOfWork. Like a transaction, everything done inside `async with` is undone
    unless committed; committed events are kept in `published` for assertions."""

    def __init__(self) -> None:
        super().__init__()
        self.state = InventoryState()
        self.products = InMemoryProductRepository(self.state)
        self.reservations = InMemoryReservationRepository(self.state)
        self._before: InventoryState | None = None

    async def __aenter__(self) -> FakeInventoryUnitOfWork:
        await super().__aenter__()
        self._before = self.state.copy()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._before is not None:
            self._restore(self._before)
        await super().__aexit__(*exc)

    def _restore(self, saved: InventoryState) -> None:
        # The repositories keep a reference to self.state, so restore it in place.
        for field in vars(saved):
            setattr(self.state, field, getattr(saved, field))
        self._before = None

    async def commit(self) -> None:
        await super().commit()
        self._before = None

    async def rollback(self) -> None:
        if self._before is not None:
            self._restore(self._before)
        await super().rollback()
