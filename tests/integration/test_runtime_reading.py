"""The unit of work's read mode (`async with uow.reading():`): one round trip per read on PostgreSQL, no commit."""

from __future__ import annotations

import pytest
from sqlalchemy import MetaData, func, select, text
from tessera.user.v1 import user_events_pb2

from tessera_runtime.db import Database
from tessera_runtime.migrations import upgrade_async
from tessera_runtime.outbox import outbox_table
from tessera_runtime.unit_of_work import SqlAlchemyUnitOfWork
from tessera_user import bootstrap

OUTBOX = outbox_table(MetaData())
# The id of the transaction the statement runs in: two statements of one transaction see the same one.
TRANSACTION_ID = text("SELECT txid_current()")


@pytest.fixture
async def database(db_url):
    await upgrade_async(bootstrap.MIGRATIONS, db_url)
    db = Database(db_url)
    yield db
    await db.dispose()


async def test_each_read_on_postgresql_is_its_own_transaction_without_begin(pg_database):
    _, url = pg_database
    db = Database(url)
    try:
        uow = SqlAlchemyUnitOfWork(db, OUTBOX)
        async with uow.reading():
            first = (await uow.session.execute(TRANSACTION_ID)).scalar()
            second = (await uow.session.execute(TRANSACTION_ID)).scalar()
        assert first != second  # each statement was a transaction of its own: no BEGIN, no ROLLBACK
        # The same unit of work, opened normally afterwards, is one transaction again.
        async with uow:
            first = (await uow.session.execute(TRANSACTION_ID)).scalar()
            second = (await uow.session.execute(TRANSACTION_ID)).scalar()
        assert first == second
    finally:
        await db.dispose()


async def test_a_reading_unit_of_work_refuses_to_commit_and_writes_no_event(database):
    uow = SqlAlchemyUnitOfWork(database, OUTBOX)
    with pytest.raises(RuntimeError, match="reading"):
        async with uow.reading():
            uow.add_event("user", "u-1", user_events_pb2.UserDeleted(user_id="u-1"))
            await uow.commit()
    async with database.engine.connect() as conn:
        assert (await conn.execute(select(func.count()).select_from(OUTBOX))).scalar() == 0
    # Reading mode ends with its block: a normal unit of work commits its events.
    async with uow:
        uow.add_event("user", "u-2", user_events_pb2.UserDeleted(user_id="u-2"))
        await uow.commit()
    async with database.engine.connect() as conn:
        assert (await conn.execute(select(OUTBOX.c.aggregate_id))).scalars().all() == ["u-2"]
