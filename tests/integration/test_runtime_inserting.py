"""A unit of work's inserting() block (tessera_runtime.db.insert_row / insert_staged): its rows and outbox events are
written together at commit, on PostgreSQL as one statement on the direct pool, elsewhere in a transaction; a clash
writes nothing and raises the repository's own error."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, select, text
from sqlalchemy.exc import IntegrityError
from tessera.user.v1 import user_events_pb2

from tessera_runtime import db as db_module
from tessera_runtime.db import Database, insert_row
from tessera_runtime.migrations import upgrade_async
from tessera_runtime.outbox import add_commit_listener
from tessera_runtime.unit_of_work import SqlAlchemyUnitOfWork
from tessera_user import bootstrap
from tessera_user.adapters.orm import outbox, users
from tests.support.user_rows import user_row


class Clash(Exception):
    """What the test's repository makes of a clash on the users' e-mail index."""


def email_clash(exc: IntegrityError) -> Exception | None:
    return Clash(str(exc.orig)) if "email" in str(exc.orig).lower() else None


@pytest.fixture
def database(user_database):
    return user_database


async def rows(database: Database) -> tuple[list[str], list[str]]:
    async with database.engine.connect() as conn:
        ids = (await conn.execute(select(users.c.id).order_by(users.c.id))).scalars().all()
        events = (await conn.execute(select(outbox.c.aggregate_id).order_by(outbox.c.seq))).scalars().all()
    return list(ids), list(events)


async def create(database: Database, *user_ids: str, email: str | None = None) -> None:
    uow = SqlAlchemyUnitOfWork(database, outbox)
    async with uow.inserting():
        for user_id in user_ids:
            row = user_row(user_id)
            if email is not None:
                row = {**row, "email": email, "email_key": email}
            await insert_row(uow.session, users, row, email_clash)
            uow.add_event("user", user_id, user_events_pb2.UserDeleted(user_id=user_id))
        await uow.commit()


async def test_rows_and_events_are_written_at_commit_and_not_before(database):
    row = user_row("u-1")
    uow = SqlAlchemyUnitOfWork(database, outbox)
    async with uow.inserting():
        await insert_row(uow.session, users, row, email_clash)
        uow.add_event("user", "u-1", user_events_pb2.UserDeleted(user_id="u-1"))
        assert await rows(database) == ([], [])  # staged only
        await uow.commit()
    assert await rows(database) == (["u-1"], ["u-1"])
    async with database.engine.connect() as conn:
        event = (await conn.execute(select(outbox))).one()._mapping
        stored = dict((await conn.execute(select(users))).one()._mapping)
    assert event["event_type"] == "tessera.user.v1.UserDeleted" and event["attempts"] == 0
    assert event["published_at"] is None and user_events_pb2.UserDeleted.FromString(event["payload"]).user_id == "u-1"
    # Every value as it went in, through the columns' types (UtcDateTime gives back an aware UTC datetime).
    assert {k: stored[k] for k in row} == row


async def test_a_block_left_without_commit_writes_nothing(database):
    uow = SqlAlchemyUnitOfWork(database, outbox)
    with pytest.raises(RuntimeError, match="handler failed"):
        async with uow.inserting():
            await insert_row(uow.session, users, user_row("u-1"), email_clash)
            uow.add_event("user", "u-1", user_events_pb2.UserDeleted(user_id="u-1"))
            raise RuntimeError("handler failed")
    assert await rows(database) == ([], [])
    # The same unit of work is an ordinary one again afterwards.
    async with uow:
        await insert_row(uow.session, users, user_row("u-2"), email_clash)  # at once, in the transaction
        assert (await uow.session.execute(select(func.count()).select_from(users))).scalar() == 1
        await uow.commit()
    assert await rows(database) == (["u-2"], [])


async def test_several_rows_and_events_go_together(database):
    statements: list[str] = []

    def count(_conn, _cursor, statement, _params, _context, _executemany) -> None:
        statements.append(statement.split()[0])

    event.listen(database.engine.sync_engine, "before_cursor_execute", count)
    try:
        await create(database, "u-1", "u-2", "u-3")
    finally:
        event.remove(database.engine.sync_engine, "before_cursor_execute", count)
    assert await rows(database) == (["u-1", "u-2", "u-3"], ["u-1", "u-2", "u-3"])
    # On PostgreSQL one statement on the direct pool, none through the engine; elsewhere one INSERT per table.
    assert [s for s in statements if s == "INSERT"] == ([] if database.dialect == "postgresql" else ["INSERT"] * 2)


async def test_a_clash_raises_the_repositorys_error_and_writes_nothing_of_the_block(database):
    await create(database, "u-1", email="taken@example.com")
    with pytest.raises(Clash):
        # The first row is fine, the second clashes: neither is written, nor any of the events.
        uow = SqlAlchemyUnitOfWork(database, outbox)
        async with uow.inserting():
            await insert_row(uow.session, users, user_row("u-2"), email_clash)
            uow.add_event("user", "u-2", user_events_pb2.UserDeleted(user_id="u-2"))
            await insert_row(uow.session, users, {**user_row("u-3"), "email": "taken@example.com",
                                                  "email_key": "taken@example.com"}, email_clash)
            uow.add_event("user", "u-3", user_events_pb2.UserDeleted(user_id="u-3"))
            await uow.commit()
    assert await rows(database) == (["u-1"], ["u-1"])
    await create(database, "u-4")  # the database is fine for the next one
    assert await rows(database) == (["u-1", "u-4"], ["u-1", "u-4"])


async def test_a_clash_no_repository_translates_is_raised_as_it_is(database):
    await create(database, "u-1")
    uow = SqlAlchemyUnitOfWork(database, outbox)
    with pytest.raises(IntegrityError):
        async with uow.inserting():
            await insert_row(uow.session, users, user_row("u-1"))  # the same primary key, no translation
            await uow.commit()
    assert await rows(database) == (["u-1"], ["u-1"])


async def test_outside_inserting_a_row_is_inserted_at_once_and_a_clash_translated_there(database):
    await create(database, "u-1", email="taken@example.com")
    uow = SqlAlchemyUnitOfWork(database, outbox)
    async with uow:
        with pytest.raises(Clash):
            await insert_row(uow.session, users, {**user_row("u-2"), "email": "taken@example.com",
                                                  "email_key": "taken@example.com"}, email_clash)
    assert await rows(database) == (["u-1"], ["u-1"])


async def test_a_block_that_read_first_commits_in_one_transaction(database):
    await create(database, "u-1")
    uow = SqlAlchemyUnitOfWork(database, outbox)
    async with uow.inserting():
        assert (await uow.session.execute(select(func.count()).select_from(users))).scalar() == 1
        await insert_row(uow.session, users, user_row("u-2"), email_clash)
        uow.add_event("user", "u-2", user_events_pb2.UserDeleted(user_id="u-2"))
        await uow.commit()
    assert await rows(database) == (["u-1", "u-2"], ["u-1", "u-2"])


async def test_a_commit_wakes_the_relay_of_its_outbox(database):
    woken: list[str] = []
    remove = add_commit_listener(outbox, lambda: woken.append("now"))
    try:
        await create(database, "u-1")
    finally:
        remove()
    assert woken == ["now"]


# PostgreSQL: one statement on the direct pool ----------------------------------------------------------------------


@pytest.fixture
async def pg(pg_database):
    _, url = pg_database
    await upgrade_async(bootstrap.MIGRATIONS, url)
    db = Database(url, pool_size=2)
    yield db, url
    await db.dispose()


async def test_on_postgresql_the_block_is_one_statement_and_never_touches_the_engines_pool(pg):
    database, url = pg
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        await create(database, "u-1", "u-2")
        assert database.engine.sync_engine.pool.checkedin() == 0  # the engine never opened a connection
        # Both rows and both events were written by one transaction: the one statement's.
        xmins = await admin.fetch("SELECT xmin::text AS x FROM users UNION ALL SELECT xmin::text FROM outbox")
        assert len({r["x"] for r in xmins}) == 1 and len(xmins) == 4
    finally:
        await admin.close()


async def test_on_postgresql_the_statement_has_a_database_span_under_the_callers_span(pg):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    database, url = pg
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    previous = db_module._tracer
    db_module._tracer = provider.get_tracer(db_module.SQLALCHEMY_SCOPE)
    try:
        with provider.get_tracer("tests").start_as_current_span("CreateUser"):
            await create(database, "u-1")
    finally:
        db_module._tracer = previous
    spans = {s.name.split()[0]: s for s in exporter.get_finished_spans()}
    write, parent = spans["INSERT"], spans["CreateUser"]
    assert write.parent.span_id == parent.context.span_id and write.kind.name == "CLIENT"
    assert write.attributes["db.name"] == url.rsplit("/", 1)[1]
    statement = write.attributes["db.statement"]
    assert statement.startswith("WITH") and "INSERT INTO users" in statement and "INSERT INTO outbox" in statement


PID = select(func.pg_backend_pid().label("pid"))
ACTIVE = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid() "
          "AND state <> 'idle'")


async def test_on_postgresql_a_cancelled_commit_ends_its_connection_and_is_all_or_nothing(pg):
    database, url = pg
    database._direct.size = 1
    uow = SqlAlchemyUnitOfWork(database, outbox)
    async with uow.reading():
        before = (await db_module.read_first(uow.session, PID, {}))["pid"]
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        # The outbox is locked: the statement waits, and the caller goes away meanwhile.
        lock = admin.transaction()
        await lock.start()
        await admin.execute("LOCK TABLE outbox IN EXCLUSIVE MODE")
        call = asyncio.ensure_future(create(database, "u-1"))
        await asyncio.sleep(0.5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await lock.rollback()
        for _ in range(100):  # the server finishes the orphaned statement on its own
            if await admin.fetchval(ACTIVE) == 0:
                break
            await asyncio.sleep(0.05)
    finally:
        await admin.close()
    async with uow.reading():
        after = (await db_module.read_first(uow.session, PID, {}))["pid"]
    assert after != before  # the connection was ended, not handed out again mid-statement
    # Like any commit the caller stopped waiting for, it may have happened; it is never half done.
    assert await rows(database) in ((["u-1"], ["u-1"]), ([], []))
    await create(database, "u-2")


async def test_a_staged_row_must_give_a_column_whose_default_python_computes(pg):
    database, _ = pg
    table = Table("computed", MetaData(), Column("id", String, primary_key=True),
                  Column("n", Integer, default=lambda: 7), Column("k", Integer, default=3))
    async with database.engine.begin() as conn:
        await conn.run_sync(table.metadata.create_all)
    uow = SqlAlchemyUnitOfWork(database, outbox)
    with pytest.raises(ValueError, match="must give n"):
        async with uow.inserting():
            await insert_row(uow.session, table, {"id": "a"})
            await uow.commit()
    async with uow.inserting():  # given: the scalar default of k is filled in as SQLAlchemy would
        await insert_row(uow.session, table, {"id": "b", "n": 1})
        await uow.commit()
    async with database.engine.connect() as conn:
        assert (await conn.execute(text("SELECT id, n, k FROM computed"))).all() == [("b", 1, 3)]
