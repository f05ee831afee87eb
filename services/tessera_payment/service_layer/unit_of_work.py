"""Units of work of the payment service: SQLAlchemy for the service, in-memory for unit tests."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from tessera_payment.adapters.orm import outbox
from tessera_payment.adapters.repository import (
    InMemoryPaymentRepository,
    PaymentRepository,
    SqlAlchemyPaymentRepository,
)
from tessera_runtime.db import Database
from tessera_runtime.unit_of_work import FakeUnitOfWork, SqlAlchemyUnitOfWork


class PaymentUnitOfWork(SqlAlchemyUnitOfWork):
    payments: PaymentRepository

    def __init__(self, db: Database) -> None:
        super().__init__(db, outbox)

    def _open(self, session: AsyncSession) -> None:
        self.payments = SqlAlchemyPaymentRepository(session)


class FakePaymentUnitOfWork(FakeUnitOfWork):
    """Same interface as PaymentUnitOfWork; committed events are kept in `published` for assertions."""

    def __init__(self) -> None:
        super().__init__()
        self.payments = InMemoryPaymentRepository()
