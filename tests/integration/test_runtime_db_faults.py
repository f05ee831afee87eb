"""The database under faults. On SQLite, a call that goes away while its statement runs must not leave the database
locked: found by the order crash tests, where an order process killed in the middle of its calls left the user
service's SQLite database locked, and every later write failed as "database is locked" until the garbage collector
ran. And which errors mean "the database cannot be used just now" (UNAVAILABLE) rather than a wrong statement."""

from __future__ import annotations

import asyncio
import sqlite3

import asyncpg
import pytest
from sqlalchemy import MetaData, create_engine, select, text
from sqlalchemy.exc import OperationalError

from tessera_runtime.db import Database, database_unavailable
from tessera_runtime.migrations import upgrade_async
from tessera_runtime.outbox import outbox_table
from tessera_runtime.unit_of_work import SqlAlchemyUnitOfWork
from tessera_user import bootstrap
from tessera_user.adapters.orm import users
from tests.support.tcp_proxy import TcpProxy
from tests.support.user_rows import user_row

OUTBOX = outbox_table(MetaData())


@pytest.fixture
async def sqlite_db(tmp_path):
    url = f"sqlite+aiosqlite:///{tmp_path / 'user.db'}"
    await upgrade_async(bootstrap.MIGRATIONS, url)
    database = Database(url)
    yield database
    await database.dispose()


async def insert_user(database: Database, user_id: str) -> None:
    uow = SqlAlchemyUnitOfWork(database, OUTBOX)
    async with uow:
        await uow.session.execute(users.insert().values(user_row(user_id)))
        await uow.commit()


# Slow to its first row: every row is made and sorted before the first comes back.
SLOW_READ = text("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 2000000) "
                 "SELECT i FROM n ORDER BY i DESC")


@pytest.mark.parametrize("reading", [True, False], ids=["read", "write"])
async def test_a_call_cancelled_during_a_statement_leaves_the_database_writable(sqlite_db, reading):
    async def slow_read() -> None:
        uow = SqlAlchemyUnitOfWork(sqlite_db, OUTBOX)
        async with uow.reading() if reading else uow:
            await uow.session.execute(SLOW_READ)

    call = asyncio.ensure_future(slow_read())
    await asyncio.sleep(0.3)  # the statement now runs on aiosqlite's thread, inside the unit of work's transaction
    call.cancel()  # as gRPC does when the caller goes away
    with pytest.raises(asyncio.CancelledError) as cancelled:
        await call

    # The cancelled call's traceback is still referenced here (a caller's frames or a log record may keep one)
    # and, through it, the statement its connection was running: that alone must not keep the write lock.
    await insert_user(sqlite_db, "after")
    async with sqlite_db.engine.connect() as conn:
        assert set((await conn.execute(select(users.c.id))).scalars()) == {"after"}
    assert cancelled.value.__traceback__ is not None


async def test_reads_neither_wait_for_a_writer_nor_hold_one_up(sqlite_db):
    await insert_user(sqlite_db, "before")
    writer = SqlAlchemyUnitOfWork(sqlite_db, OUTBOX)
    async with writer:  # BEGIN IMMEDIATE: the write lock, held until the commit
        await writer.session.execute(users.insert().values(user_row("pending")))
        reader = SqlAlchemyUnitOfWork(sqlite_db, OUTBOX)
        async with reader.reading():
            # Read at once, without the writer's uncommitted row; and while this read is open, the writer commits.
            seen = set((await reader.session.execute(select(users.c.id))).scalars())
            await writer.commit()
    assert seen == {"before"}
    async with sqlite_db.engine.connect() as conn:
        assert set((await conn.execute(select(users.c.id))).scalars()) == {"before", "pending"}


def test_a_write_lock_held_past_the_busy_timeout_is_an_unavailable_database_and_a_bad_statement_is_not(tmp_path):
    path = tmp_path / "locked.db"
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("CREATE TABLE t (x INTEGER)")
    holder.execute("BEGIN IMMEDIATE")  # the write lock, held
    engine = create_engine(f"sqlite:///{path}", connect_args={"timeout": 0})
    try:
        with engine.connect() as conn, pytest.raises(OperationalError) as locked:
            conn.exec_driver_sql("INSERT INTO t VALUES (1)")
        with engine.connect() as conn, pytest.raises(OperationalError) as missing:
            conn.exec_driver_sql("SELECT * FROM no_such_table")
    finally:
        engine.dispose()
        holder.rollback()
        holder.close()
    assert "locked" in str(locked.value) and database_unavailable(locked.value)
    assert "no such table" in str(missing.value) and not database_unavailable(missing.value)


async def test_a_closed_postgresql_connection_is_an_unavailable_database_and_wrong_arguments_are_not(pg_database):
    _, url = pg_database
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    with pytest.raises(asyncpg.exceptions.InterfaceError) as wrong_arguments:
        await conn.fetchval("SELECT $1::int", 1, 2)
    await conn.close()
    with pytest.raises(asyncpg.exceptions.InterfaceError) as closed:
        await conn.fetchval("SELECT 1")
    assert database_unavailable(closed.value)
    assert not database_unavailable(wrong_arguments.value)


async def test_pooled_connections_the_server_closed_while_idle_are_not_handed_out(pg_database):
    """After a restart or failover the pool holds connections whose sockets are gone: the first units of work after
    the database is back get fresh ones instead of failing on them (asyncpg already knows; no pre-ping)."""
    _, url = pg_database
    proxy = TcpProxy("127.0.0.1", 5432).start()
    database = Database(url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"), pool_size=3)
    try:
        async def one_statement() -> int:
            uow = SqlAlchemyUnitOfWork(database, OUTBOX)
            async with uow:
                return (await uow.session.execute(text("SELECT 1"))).scalar()

        await asyncio.gather(*(one_statement() for _ in range(3)))  # three connections, now idle in the pool
        assert database.engine.sync_engine.pool.checkedin() == 3
        proxy.cut()
        proxy.restore()
        await asyncio.sleep(0.2)  # the sockets' ends reach the event loop
        assert await asyncio.gather(*(one_statement() for _ in range(3))) == [1, 1, 1]
    finally:
        await database.dispose()
        proxy.close()
