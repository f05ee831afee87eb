"""The unit of work's read mode (`async with uow.reading():`): one round trip per read on PostgreSQL, no commit."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import JSON, Float, Integer, MetaData, String, bindparam, cast, func, insert, select, text
from sqlalchemy.dialects.postgresql import JSONB
from tessera.user.v1 import user_events_pb2

from tessera_runtime.db import Database, read_first
from tessera_runtime.migrations import upgrade_async
from tessera_runtime.outbox import outbox_table
from tessera_runtime.unit_of_work import SqlAlchemyUnitOfWork
from tessera_user import bootstrap
from tessera_user.adapters.orm import users
from tests.support.user_rows import user_row

OUTBOX = outbox_table(MetaData())
# The id of the transaction the statement runs in: two statements of one transaction see the same one.
TRANSACTION_ID = text("SELECT txid_current()")


@pytest.fixture
def database(user_database):
    return user_database


@pytest.fixture
async def pg_db(pg_database):
    """A Database on a throwaway PostgreSQL database, disposed at the end."""
    database = Database(pg_database[1])
    yield database
    await database.dispose()


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



# Direct reads (tessera_runtime.db.read_first) ---------------------------------------------------------------------

USER_BY_ID = select(users).where(users.c.id == bindparam("user_id"))
BACKEND = select(func.pg_backend_pid().label("pid"))
SLOW = select(func.pg_sleep(bindparam("s", type_=Float)).label("slept"))


async def test_a_direct_read_gives_what_the_session_gives(database):
    async with database.engine.begin() as conn:
        await conn.execute(insert(users).values(user_row("u-1")))
    uow = SqlAlchemyUnitOfWork(database, OUTBOX)
    async with uow.reading():
        direct = await read_first(uow.session, USER_BY_ID, {"user_id": "u-1"})
        missing = await read_first(uow.session, USER_BY_ID, {"user_id": "u-2"})
        through_session = (await uow.session.execute(USER_BY_ID, {"user_id": "u-1"})).one()._mapping
    assert missing is None
    assert dict(direct) == dict(through_session)
    assert {k: type(v) for k, v in direct.items()} == {k: type(v) for k, v in through_session.items()}
    assert direct["create_time"].tzinfo is not None and direct["create_time"].utcoffset().total_seconds() == 0


JSON_VALUES = select(
    func.json_build_object("n", bindparam("n", type_=Integer), type_=JSON).label("j"),
    func.jsonb_build_object("s", bindparam("s", type_=String), type_=JSONB).label("jb"),
    cast(bindparam("doc", type_=JSONB), JSONB).label("doc"),
)


async def test_direct_reads_decode_and_encode_json_as_the_engine_does(pg_database):
    _, url = pg_database
    database = Database(url)
    params = {"n": 7, "s": "é", "doc": {"a": [1, None, "x"]}}
    try:
        uow = SqlAlchemyUnitOfWork(database, OUTBOX)
        async with uow.reading():
            direct = await read_first(uow.session, JSON_VALUES, params)
        async with uow:  # inside a transaction: SQLAlchemy's own read
            through_session = await read_first(uow.session, JSON_VALUES, params)
        assert dict(direct) == dict(through_session) == {"j": {"n": 7}, "jb": {"s": "é"}, "doc": params["doc"]}
    finally:
        await database.dispose()


SLEEPING_BACKENDS = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                         "AND query LIKE '%pg_sleep%' AND pid <> pg_backend_pid()")
OTHER_BACKENDS = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND pid <> pg_backend_pid()")


async def test_direct_reads_keep_to_their_pool_size_and_dispose_closes_their_connections(pg_database):
    _, url = pg_database
    database = Database(url, pool_size=4, direct_size=2)
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
    try:
        async def read_slowly():
            async with SqlAlchemyUnitOfWork(database, OUTBOX).reading() as uow:
                await read_first(uow.session, SLOW, {"s": 0.6})

        reads = [asyncio.ensure_future(read_slowly()) for _ in range(5)]
        await asyncio.sleep(0.3)
        assert await admin.fetchval(SLEEPING_BACKENDS.text) == 2  # the other three wait for a connection
        await asyncio.gather(*reads)
        # The engine's pool is not the direct reads': a transaction still gets a connection of its own.
        async with SqlAlchemyUnitOfWork(database, OUTBOX) as uow:
            assert (await uow.session.execute(text("SELECT 1"))).scalar() == 1
        assert await admin.fetchval(OTHER_BACKENDS.text) == 3  # two direct connections, one of the engine
        await database.dispose()
        assert await admin.fetchval(OTHER_BACKENDS.text) == 0
        # As after the engine's dispose(), the next read opens the pool again.
        async with SqlAlchemyUnitOfWork(database, OUTBOX).reading() as uow:
            assert (await read_first(uow.session, BACKEND, {}))["pid"] > 0
    finally:
        await admin.close()
        await database.dispose()


async def test_direct_reads_wait_for_a_connection_in_their_order_and_no_longer_than_the_pool_timeout(
        pg_database, monkeypatch):
    from tessera_runtime import db as db_module

    database = Database(pg_database[1], pool_size=4, direct_size=1)
    done: list[str] = []

    async def read(name: str, seconds: float) -> None:
        async with SqlAlchemyUnitOfWork(database, OUTBOX).reading() as uow:
            await read_first(uow.session, SLOW, {"s": seconds})
        done.append(name)

    try:
        first = asyncio.ensure_future(read("first", 0.4))
        await asyncio.sleep(0.1)
        waiting = []
        for name in ("second", "third", "fourth"):  # each starts waiting after the one before
            waiting.append(asyncio.ensure_future(read(name, 0.0)))
            await asyncio.sleep(0.02)
        await asyncio.gather(first, *waiting)
        assert done == ["first", "second", "third", "fourth"]

        monkeypatch.setattr(db_module, "_POOL_TIMEOUT", 0.2)
        slow = asyncio.ensure_future(read("slow", 0.6))
        await asyncio.sleep(0.1)
        with pytest.raises(TimeoutError):
            await read("gave up", 0.0)
        await slow
        await read("after", 0.0)  # the connection of the slow read, not a second one
        pool = database._direct.ready
        assert (pool.get_size(), pool.get_idle_size()) == (1, 1)
    finally:
        await database.dispose()


async def test_direct_reads_cancelled_anywhere_leave_the_pool_with_its_connections_and_no_more(pg_database):
    """Reads cancelled while they wait for a connection, while one opens for them, or during their statement: the
    pool afterwards lends every connection it holds, never more than its size, and serves reads at once."""
    import random

    database = Database(pg_database[1], pool_size=4, direct_size=2)
    rng = random.Random(7)

    async def read(seconds: float) -> int:
        async with SqlAlchemyUnitOfWork(database, OUTBOX).reading() as uow:
            await read_first(uow.session, SLOW, {"s": seconds})
            return (await read_first(uow.session, BACKEND, {}))["pid"]

    try:
        for _ in range(3):
            tasks = [asyncio.ensure_future(read(rng.uniform(0, 0.03))) for _ in range(40)]
            for task in rng.sample(tasks, 20):
                asyncio.get_running_loop().call_later(rng.uniform(0, 0.15), task.cancel)
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(o, int | asyncio.CancelledError) for o in outcomes), outcomes
            pool = database._direct.ready
            assert not pool.lent and not pool.waiters
            assert pool.slots == pool.get_size() == pool.get_idle_size() <= 2
        pids = await asyncio.wait_for(asyncio.gather(*(read(0.05) for _ in range(6))), 5)
        assert len(set(pids)) <= 2
    finally:
        await database.dispose()
    assert database._direct.ready is None


async def test_a_connection_handed_to_a_read_cancelled_at_that_moment_goes_to_the_next_read(pg_database):
    database = Database(pg_database[1], pool_size=4, direct_size=1)
    pool = database._direct.pool()
    try:
        held = await pool.acquire()
        waiting = asyncio.ensure_future(pool.acquire())
        await asyncio.sleep(0.05)  # it waits for the one connection
        pool.release(held)  # handed to the waiting read...
        waiting.cancel()  # ...which is cancelled before it runs again
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert (pool.get_size(), pool.get_idle_size(), pool.slots) == (1, 1, 1)
        again = await asyncio.wait_for(pool.acquire(), 1)
        assert again is held
        pool.release(again)
    finally:
        await database.dispose()


async def test_connections_ended_by_terminate_are_not_taken_back(pg_database):
    database = Database(pg_database[1], pool_size=4, direct_size=2)
    pool = database._direct.pool()
    lent = await pool.acquire()
    await pool.acquire()
    pool.release(lent)
    lent = await pool.acquire()
    pool.terminate()  # what dispose() does when statements outlast its wait
    pool.release(lent)
    assert lent.is_closed() and (pool.get_size(), pool.slots) == (0, 0)
    with pytest.raises(asyncpg.InterfaceError):
        await pool.acquire()
    await database.dispose()


async def test_a_read_inside_a_transaction_sees_the_transaction(database):
    # Only reads outside a transaction go straight to asyncpg: inside one, read_first is the session's own read
    # and sees what the transaction wrote before it commits.
    uow = SqlAlchemyUnitOfWork(database, OUTBOX)
    async with uow:
        await uow.session.execute(insert(users).values(user_row("u-in-tx")))
        seen = await read_first(uow.session, USER_BY_ID, {"user_id": "u-in-tx"})
        assert seen is not None and seen["display_name"] == "Ada"
    async with uow.reading():  # rolled back: gone
        assert await read_first(uow.session, USER_BY_ID, {"user_id": "u-in-tx"}) is None


async def test_a_direct_read_has_a_database_span_under_the_callers_span(pg_database):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from tessera_runtime import db as db_module

    _, url = pg_database
    await upgrade_async(bootstrap.MIGRATIONS, url)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    database = Database(url)
    previous = db_module._tracer
    db_module._tracer = provider.get_tracer(db_module.SQLALCHEMY_SCOPE)
    try:
        uow = SqlAlchemyUnitOfWork(database, OUTBOX)
        with provider.get_tracer("tests").start_as_current_span("GetUser"):
            async with uow.reading():
                await read_first(uow.session, USER_BY_ID, {"user_id": "nobody"})
    finally:
        db_module._tracer = previous
        await database.dispose()
    spans = {s.name.split()[0]: s for s in exporter.get_finished_spans()}
    read, parent = spans["SELECT"], spans["GetUser"]
    assert read.parent.span_id == parent.context.span_id
    assert read.kind.name == "CLIENT"
    assert read.attributes["db.system"] == "postgresql"
    assert read.attributes["db.name"] == url.rsplit("/", 1)[1]
    assert "FROM users" in read.attributes["db.statement"] and "$1" in read.attributes["db.statement"]


RATIO = select(func.mod(bindparam("a", type_=Integer), bindparam("b", type_=Integer)).label("q"))


@pytest.fixture
async def one_connection(pg_database):
    """A read unit of work on a pool of one connection, and the server session (backend pid) it reads on."""
    _, url = pg_database
    database = Database(url, pool_size=1)
    uow = SqlAlchemyUnitOfWork(database, OUTBOX)
    async with uow.reading():
        pid = (await read_first(uow.session, BACKEND, {}))["pid"]
    yield uow, pid
    await database.dispose()


# What a read may get from a connection the server ended, depending on how far asyncpg got with the server's
# notice: the notice itself, a closed connection, or a refusal of the statement while the notice is being consumed.
SERVER_ENDED = (asyncpg.InterfaceError, asyncpg.exceptions.ConnectionDoesNotExistError,
                asyncpg.exceptions.AdminShutdownError, asyncpg.exceptions.InternalClientError, ConnectionError)


async def test_a_connection_that_died_under_a_direct_read_is_not_handed_out_again(one_connection, pg_database):
    uow, first = one_connection  # a pool of one: every read after this one needs that connection or its successor
    admin = await asyncpg.connect(pg_database[1].replace("postgresql+asyncpg", "postgresql"))

    async def read_slowly():
        async with uow.reading():
            await read_first(uow.session, SLOW, {"s": 5.0})

    try:
        # The server ends the session while a read waits on it (a PostgreSQL restart or failover does the same).
        task = asyncio.ensure_future(read_slowly())
        await asyncio.sleep(0.3)
        await admin.execute("SELECT pg_terminate_backend($1)", first)
        with pytest.raises(SERVER_ENDED):
            await task
        async with uow.reading():  # a new connection, not the dead one
            second = (await asyncio.wait_for(read_first(uow.session, BACKEND, {}), 3))["pid"]
        assert second != first
        # The server ends it while it is idle in the pool: at worst the next read fails, and the one after works.
        await admin.execute("SELECT pg_terminate_backend($1)", second)
        try:
            async with uow.reading():
                await read_first(uow.session, BACKEND, {})
        except SERVER_ENDED:
            pass
        async with uow.reading():
            third = (await asyncio.wait_for(read_first(uow.session, BACKEND, {}), 3))["pid"]
        assert third not in (first, second)
    finally:
        await admin.close()


async def test_a_statement_error_in_a_direct_read_keeps_the_connection(one_connection):
    uow, before = one_connection
    with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
        async with uow.reading():
            await read_first(uow.session, RATIO, {"a": 1, "b": 0})
    async with uow.reading():
        assert (await read_first(uow.session, RATIO, {"a": 7, "b": 3}))["q"] == 1
        assert (await read_first(uow.session, BACKEND, {}))["pid"] == before  # the same server session


async def test_a_direct_read_cancelled_half_way_does_not_hand_its_connection_out_again(one_connection):
    uow, before = one_connection

    async def read_slowly():
        async with uow.reading():
            await read_first(uow.session, SLOW, {"s": 5.0})

    task = asyncio.ensure_future(read_slowly())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # As SQLAlchemy does with its own connections on cancellation: a new server session answers.
    async with uow.reading():
        after = await asyncio.wait_for(read_first(uow.session, BACKEND, {}), 3)
    assert after["pid"] != before


def _pool_samples(collector) -> dict[tuple[str, str], float]:
    samples: dict[tuple[str, str], float] = {}
    for family in collector.collect():
        for sample in family.samples:
            key = (sample.labels["pool"], sample.labels.get("state", "max"))
            samples[key] = sample.value
    return samples


async def test_the_pools_connections_are_exported_to_prometheus(pg_database):
    from prometheus_client import REGISTRY

    from tessera_runtime.db import _POOLS, _PoolCollector

    database = Database(pg_database[1], pool_size=4)
    collector = _PoolCollector()  # this database alone: the process's collector also counts other tests' ones
    collector.add(database)
    try:
        assert _pool_samples(collector) == {
            ("units_of_work", "in_use"): 0, ("units_of_work", "idle"): 0, ("units_of_work", "max"): 8,
            ("direct", "in_use"): 0, ("direct", "idle"): 0, ("direct", "max"): 2,
            ("relay", "in_use"): 0, ("relay", "idle"): 0, ("relay", "max"): 1}
        uow = SqlAlchemyUnitOfWork(database, OUTBOX)
        async with uow.reading():
            await read_first(uow.session, BACKEND, {})
        async with uow:
            await uow.session.execute(text("SELECT 1"))
            during = _pool_samples(collector)
        after = _pool_samples(collector)
        assert (during["units_of_work", "in_use"], during["units_of_work", "idle"]) == (1, 0)
        assert (after["units_of_work", "in_use"], after["units_of_work", "idle"]) == (0, 1)
        assert (after["direct", "in_use"], after["direct", "idle"]) == (0, 1)
        async with database.relay_connection():
            during = _pool_samples(collector)
        after = _pool_samples(collector)
        assert (during["relay", "in_use"], during["relay", "idle"]) == (1, 0)
        assert (after["relay", "in_use"], after["relay", "idle"]) == (0, 1)
        # Every Database registers with the process's collector, which the /metrics endpoint serves.
        assert database in list(_POOLS._databases)
        assert REGISTRY.get_sample_value("tessera_db_connections_max", {"pool": "direct"}) >= 2
    finally:
        await database.dispose()
    after = _pool_samples(collector)
    assert sum(value for (_, state), value in after.items() if state != "max") == 0  # disposed: nothing open


# Database.relay_connection: the outbox relay's own connection, for its statements and transaction.

async def test_the_relays_connection_keeps_its_session_after_a_statement_error_in_its_transaction(pg_db):
    database = pg_db
    async with database.relay_connection() as conn:
        before = await conn.fetchval("SELECT pg_backend_pid()")
    with pytest.raises(asyncpg.exceptions.DivisionByZeroError):
        async with database.relay_connection() as conn, conn.transaction():
            await conn.execute("CREATE TEMPORARY TABLE scratch (n int)")  # rolled back with the transaction
            await conn.fetchval("SELECT 1 / 0")
    async with database.relay_connection() as conn:  # one connection: the same server session
        assert await conn.fetchval("SELECT pg_backend_pid()") == before
        assert not conn.is_in_transaction()
        assert await conn.fetchval("SELECT to_regclass('pg_temp.scratch')") is None
    # So does an error of the caller's own once its transaction ended (the broker did not confirm a batch).
    with pytest.raises(LookupError):
        async with database.relay_connection() as conn, conn.transaction():
            await conn.fetchval("SELECT 1")
            raise LookupError("not confirmed")
    async with database.relay_connection() as conn:
        assert await conn.fetchval("SELECT pg_backend_pid()") == before


async def test_the_relays_connection_handed_back_in_a_transaction_or_cancelled_is_ended(pg_db):
    database = pg_db
    async with database.relay_connection() as conn:
        first = await conn.fetchval("SELECT pg_backend_pid()")
    # A block that leaves its transaction open must not hand it to the next one.
    with pytest.raises(RuntimeError, match="transaction open"):
        async with database.relay_connection() as conn:
            await conn.execute("BEGIN")
            await conn.execute("CREATE TEMPORARY TABLE scratch (n int)")
    async with database.relay_connection() as conn:
        second = await conn.fetchval("SELECT pg_backend_pid()")
        assert not conn.is_in_transaction()
    assert second != first

    async def slowly() -> None:
        async with database.relay_connection() as conn, conn.transaction():
            await conn.execute("SELECT pg_sleep(5)")

    task = asyncio.ensure_future(slowly())
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with database.relay_connection() as conn:
        third = await asyncio.wait_for(conn.fetchval("SELECT pg_backend_pid()"), 3)
    assert third not in (first, second)


async def test_the_relay_holding_its_connection_keeps_no_read_waiting(pg_database):
    """The relay holds its connection while the broker confirms, which a broker that stopped answering makes up
    to the confirm timeout: direct reads, even on a direct pool of one, have their own."""
    _, url = pg_database
    database = Database(url, pool_size=1)
    uow = SqlAlchemyUnitOfWork(database, OUTBOX)
    try:
        async with database.relay_connection() as held, held.transaction():
            relay_pid = await held.fetchval("SELECT pg_backend_pid()")
            async with uow.reading():
                read = await asyncio.wait_for(read_first(uow.session, BACKEND, {}), 3)
            assert read["pid"] != relay_pid
            # Only the relay waits for the relay's connection.
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3), database.relay_connection():
                    pass
    finally:
        await database.dispose()


async def test_the_relays_connection_is_postgresqls(tmp_path):
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'relay.db'}")
    try:
        with pytest.raises(RuntimeError, match="PostgreSQL"):
            database.relay_connection()
    finally:
        await database.dispose()
