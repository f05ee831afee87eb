"""Units of work of the user service: SQLAlchemy for the service, in-memory for unit tests."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from tessera_runtime.db import Database
from tessera_runtime.unit_of_work import FakeUnitOfWork, SqlAlchemyUnitOfWork
from tessera_user.adapters.orm import outbox
from tessera_user.adapters.repository import InMemoryUserRepository, SqlAlchemyUserRepository, UserRepository


class UserUnitOfWork(SqlAlchemyUnitOfWork):
    users: UserRepository

    def __init__(self, db: Database) -> None:
        super().__init__(db, outbox)

    def _open(self, session: AsyncSession) -> None:
        self.users = SqlAlchemyUserRepository(session)


class FakeUserUnitOfWork(FakeUnitOfWork):
    """Same interface as UserUnitOfWork; committed events are kept in `published` for assertions."""

    def __init__(self) -> None:
        super().__init__()
        self.users = InMemoryUserRepository()
