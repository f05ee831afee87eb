"""Async SQLAlchemy engine per service: SQLite file by default, PostgreSQL (asyncpg) by URL."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import socket
import sqlite3
import threading
import types
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import asyncpg
from opentelemetry import trace
from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import (
    DateTime,
    Integer,
    Select,
    Table,
    TypeDecorator,
    and_,
    bindparam,
    event,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    values,
)
from sqlalchemy import column as column_clause
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError, IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.util.concurrency import await_, in_greenlet

from tessera_runtime.config import POOL_SIZE
from tessera_runtime.telemetry import SQLALCHEMY_SCOPE, instrument_engine

log = logging.getLogger("tessera.db")

_READS_ONLY = "tessera_reads_only"  # an execution option of the read engine
# asyncpg's own settings, for the engine's connections and the direct pool's: connect within 3 s, and no
# statement runs longer than 30 s.
_CONNECT_ARGS = {"timeout": 3, "command_timeout": 30}
# SQLAlchemy's pool waits this long for a free connection before it gives up (its default); so does read_first.
_POOL_TIMEOUT = 30.0


def engine_pool_max(pool_size: int) -> int:
    """The most connections the engine's pool opens: `pool_size`, and as many again under load (its overflow)."""
    return 2 * pool_size


def direct_pool_size(pool_size: int) -> int:
    """The direct pool's most connections for an engine pool of `pool_size` (see read_first and insert_staged)."""
    return max(1, pool_size // 2)


# The outbox relay's own connection (see _DirectPool.relay_connection).
RELAY_CONNECTIONS = 1


def max_connections(pool_size: int = POOL_SIZE) -> int:
    """The most PostgreSQL connections one process opens with an engine pool of `pool_size`: the pool may grow to
    twice that under load, plus the direct pool and the outbox relay's connection. Deployments size their servers
    by it (tessera_deploy.checks)."""
    return engine_pool_max(pool_size) + direct_pool_size(pool_size) + RELAY_CONNECTIONS


def drop_closed_on_checkout(engine: AsyncEngine) -> None:
    """A pooled connection whose socket the server or the network closed while it sat idle (a restart, a failover,
    a proxy's idle timeout) is not handed out: asyncpg already knows it is closed, so this costs no round trip,
    unlike a pre-ping. SQLAlchemy discards a connection whose checkout raises DisconnectionError and takes
    another. Without it, each dead connection fails the first call that gets it after the database is back."""

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection, _record, _proxy) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("the pooled connection was closed while idle")


def _prepare_sqlite(engine: AsyncEngine) -> None:
    """WAL for concurrent readers, foreign keys on, and BEGIN IMMEDIATE so that writers serialise up front
    instead of failing when a read lock cannot be upgraded (SQLite's default deferred transactions)."""

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=10000")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn) -> None:
        # A unit of work's reading() writes nothing: a deferred BEGIN, which in WAL mode neither waits for a writer
        # nor holds one up.
        conn.exec_driver_sql("BEGIN" if conn.get_execution_options().get(_READS_ONLY) else "BEGIN IMMEDIATE")

    @event.listens_for(engine.sync_engine, "invalidate")
    def _on_invalidate(dbapi_connection, _record, _exception) -> None:
        # SQLAlchemy invalidates (closes) a connection when a call is cancelled while it waits on the database: a
        # caller that went away, a deadline. The statement it waited on still finishes on aiosqlite's thread, and a
        # SELECT is then left with rows unread. SQLite does not really close a connection while one of its
        # statements is unfinished: it stays open inside SQLite, with its transaction and the write lock that
        # BEGIN IMMEDIATE took, until the statement is finalized, which is when the garbage collector frees the
        # cancelled call's traceback. Meanwhile every write fails as "database is locked". A rollback queued behind
        # that statement ends the transaction before the close (tests/integration/test_runtime_db_faults.py).
        if not in_greenlet():
            return  # the garbage collector's own cleanup: the connection is going away with nothing waiting on it
        try:
            await_(asyncio.shield(dbapi_connection.driver_connection.rollback()))
        except Exception:  # already closed, or broken: then it holds nothing either
            log.debug("rollback before closing an invalidated SQLite connection failed", exc_info=True)


# Errors that say the database could not be used just now, not that a statement was wrong.
_UNREACHABLE = (
    ConnectionError,  # refused, reset, broken pipe
    socket.gaierror,  # the database's host name does not resolve (yet)
    asyncpg.exceptions.PostgresConnectionError,  # class 08: the connection does not exist, failed, ...
    asyncpg.exceptions.OperatorInterventionError,  # class 57: shutting down, starting up, statement cancelled
    asyncpg.exceptions.InsufficientResourcesError,  # class 53: too many connections, disk full
    asyncpg.exceptions.InternalClientError,  # the server's notice that it ended the session is being read
)
_SQLITE_BUSY = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED: the write lock stayed taken for the whole busy timeout


def error_chain(exc: BaseException, *, context: bool) -> Iterator[BaseException]:
    """`exc` and what it wraps: the DBAPI error SQLAlchemy keeps in `orig`, the cause, and with `context` the
    exception being handled when it was raised; each once."""
    pending: list[BaseException | None] = [exc]
    seen: set[int] = set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        yield error
        pending += [getattr(error, "orig", None), error.__cause__, *((error.__context__,) if context else ())]


def database_unavailable(exc: BaseException) -> bool:
    """True when `exc` (or what it wraps) says the database could not be used just then, so that the call may
    succeed later: the interceptor answers UNAVAILABLE instead of INTERNAL. A wrong statement, a missing table or a
    constraint is not that."""
    for error in error_chain(exc, context=False):
        if isinstance(error, DBAPIError) and error.connection_invalidated:
            return True
        if isinstance(error, _UNREACHABLE):
            return True
        # asyncpg's InterfaceError is also how it reports a statement given the wrong arguments: only a closed
        # connection counts.
        if isinstance(error, asyncpg.exceptions.InterfaceError) and "closed" in str(error):
            return True
        if isinstance(error, sqlite3.OperationalError) and getattr(error, "sqlite_errorcode", None) in _SQLITE_BUSY:
            return True
    return False


def cannot_connect(exc: BaseException) -> bool:
    """The database could not be reached or entered: down, unreachable, no such database, the login refused (what a
    process starting against it reports as such, rather than as a failure of its own)."""
    refused = (asyncpg.exceptions.InvalidCatalogNameError, asyncpg.exceptions.InvalidAuthorizationSpecificationError,
               OSError)
    return any(isinstance(error, refused) for error in error_chain(exc, context=True)) or database_unavailable(exc)


def first_line(exc: BaseException) -> str:
    """The first line of an error's text (its type when it has none): what a one-line report of it shows."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def database_location(url: str) -> str:
    """Where a database URL points, without user or password: host:port/database, or the SQLite file."""
    try:
        parsed = make_url(url)
    except Exception:
        return url.split("@")[-1]
    if parsed.get_backend_name() == "sqlite":
        return parsed.database or ":memory:"
    host = parsed.host or "localhost"
    return f"{host}:{parsed.port}/{parsed.database or ''}" if parsed.port else f"{host}/{parsed.database or ''}"


def ensure_sqlite_folder(url: str) -> None:
    """Creates the folder of a SQLite database file, so that a fresh checkout needs no setup."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


class Database:
    """Owns one service's engine and session factory. Nothing connects until first use."""

    def __init__(self, url: str, *, pool_size: int = POOL_SIZE, direct_size: int | None = None,
                 echo: bool = False) -> None:
        """`pool_size`: the engine's pool on PostgreSQL (it may grow to twice that under load). `direct_size`: the
        direct pool's most connections (default: direct_pool_size(pool_size); see read_first and insert_staged)."""
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            ensure_sqlite_folder(url)
            self.engine = create_async_engine(url, echo=echo)
            _prepare_sqlite(self.engine)
        else:
            self.engine = create_async_engine(
                url, echo=echo, pool_size=pool_size, max_overflow=engine_pool_max(pool_size) - pool_size,
                pool_recycle=1800,
                connect_args=_CONNECT_ARGS,
            )
            drop_closed_on_checkout(self.engine)
        instrument_engine(self.engine)  # one span per statement, child of the RPC or message being handled
        # Reads of one statement need no transaction: in autocommit a read is one round trip instead of three
        # (BEGIN, SELECT, ROLLBACK). SQLite keeps its transactions, deferred for reads (see _prepare_sqlite).
        read_engine = (self.engine.execution_options(isolation_level="AUTOCOMMIT") if self.dialect == "postgresql"
                       else self.engine.execution_options(**{_READS_ONLY: True}))
        self._direct = (_DirectPool(self.engine, direct_size or direct_pool_size(pool_size))
                        if self.dialect == "postgresql" else None)
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False, class_=AsyncSession,
                                               info={_DIRECT: self._direct})
        self.read_sessionmaker = async_sessionmaker(
            read_engine, expire_on_commit=False, class_=AsyncSession, info={_DIRECT: self._direct})
        self.pool_size = pool_size
        if self._direct is not None:
            _POOLS.add(self)

    async def ping(self) -> bool:
        """True when the database answers a trivial query; the readiness check of every service."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return True

    def relay_connection(self) -> contextlib.AbstractAsyncContextManager[asyncpg.Connection]:
        """On PostgreSQL, the outbox relay's connection (see _DirectPool.relay_connection): its pass runs its statements
        and its transaction straight on asyncpg, without SQLAlchemy's per-statement cost. Not on SQLite."""
        if self._direct is None:
            raise RuntimeError("the relay's connection is PostgreSQL's")
        return self._direct.relay_connection()

    def direct_plan(self, statement: Any, kind: str) -> _Plan:
        """`statement` compiled once for a direct connection: its positional `sql`, `arguments(params)` (values by
        bindparam name, bound as SQLAlchemy would bind them) and `row(record)` (a row's values as SQLAlchemy would
        give them). `kind` names its database span (SELECT, UPDATE) where one is made."""
        return _Plan(statement, self.engine, kind)

    async def dispose(self) -> None:
        try:
            if self._direct is not None:
                await self._direct.close()
        finally:
            await self.engine.dispose()


class _PoolCollector:
    """Prometheus collector of the PostgreSQL pools of every Database of the process, read at each scrape:

    | name | type | labels | meaning |
    |---|---|---|---|
    | tessera_db_connections | gauge | pool (units_of_work, direct, relay), state (in_use, idle) | open connections |
    | tessera_db_connections_max | gauge | pool | the most connections the pool opens (TESSERA_DATABASE_POOL_SIZE) |

    A pool whose in-use count stays at its max makes calls wait for a connection: raise the pool size, or the
    server's capacity, before that."""

    def __init__(self) -> None:
        self._databases: weakref.WeakSet[Database] = weakref.WeakSet()
        self._lock = threading.Lock()  # scrapes run on the metrics server's thread

    def add(self, database: Database) -> None:
        with self._lock:
            self._databases.add(database)

    def collect(self):
        connections = GaugeMetricFamily("tessera_db_connections",
                                        "PostgreSQL connections open in this process's pools, by pool and state",
                                        labels=["pool", "state"])
        most = GaugeMetricFamily("tessera_db_connections_max",
                                 "The most PostgreSQL connections each pool of this process opens", labels=["pool"])
        totals = {(pool, state): 0 for pool in ("units_of_work", "direct", "relay") for state in ("in_use", "idle")}
        limits = {"units_of_work": 0, "direct": 0, "relay": 0}
        with self._lock:
            databases = list(self._databases)
        for db in databases:
            direct = db._direct
            assert direct is not None  # only PostgreSQL databases are added
            pool = db.engine.sync_engine.pool
            totals["units_of_work", "in_use"] += pool.checkedout()  # type: ignore[attr-defined]
            totals["units_of_work", "idle"] += pool.checkedin()  # type: ignore[attr-defined]
            limits["units_of_work"] += engine_pool_max(db.pool_size)
            limits["direct"] += direct.size
            limits["relay"] += RELAY_CONNECTIONS
            for name, opened in (("direct", direct.ready), ("relay", direct.relay)):
                if opened is not None:
                    idle = opened.get_idle_size()
                    totals[name, "in_use"] += opened.get_size() - idle
                    totals[name, "idle"] += idle
        if not databases:
            return  # no PostgreSQL here (SQLite, or no database at all): nothing to report
        for (pool_name, state), value in totals.items():
            connections.add_metric([pool_name, state], value)
        for pool_name, value in limits.items():
            most.add_metric([pool_name], value)
        yield connections
        yield most


_POOLS = _PoolCollector()
REGISTRY.register(_POOLS)


class UtcDateTime(TypeDecorator):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UtcDateTime column")
        value = value.astimezone(dt.UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: dt.datetime | None, dialect) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def keyset_page(query: Select, table: Table, key: tuple[dt.datetime, str] | None, limit: int, *,
                newest_first: bool = False, time_column: str = "create_time") -> Select:
    """Adds the keyset cursor of tessera_runtime.pagination to a list query: rows after `key` (create_time, id)
    in (create_time, id) order, oldest or newest first, at most `limit` of them. `time_column` names another
    time to order by (a backlog's deadline)."""
    t_col, id_col = table.c[time_column], table.c.id
    if key is not None:
        t, last_id = key
        if newest_first:
            query = query.where(or_(t_col < t, and_(t_col == t, id_col < last_id)))
        else:
            query = query.where(or_(t_col > t, and_(t_col == t, id_col > last_id)))
    order = (t_col.desc(), id_col.desc()) if newest_first else (t_col, id_col)
    return query.order_by(*order).limit(limit)


# Direct statements -----------------------------------------------------------------------------------------------

_DIRECT = "tessera.direct"  # a session's info: the _DirectPool of its Database (None on SQLite)
_STAGED = "tessera.staged"  # a session's info: the inserts staged in a unit of work's inserting() block
_GUARD = "tessera.guard"  # a session's info: the guarded update staged in that block (update_guarded)


class _Plan:
    """A statement compiled once for asyncpg: its SQL, its parameters in order with their bind processors, and, for
    a SELECT, the result processors of its columns (only TypeDecorators have one on asyncpg)."""

    def __init__(self, statement: Any, engine: AsyncEngine, span_name: str) -> None:
        dialect = engine.dialect
        self.statement = statement
        self.compiled = statement.compile(dialect=dialect)
        self.sql = str(self.compiled)
        self.names = tuple(self.compiled.positiontup or ())
        self.bind_processors = tuple(
            self.compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in self.names)
        self.result_processors: list[tuple[str, Callable[[Any], Any]]] = []
        for column in getattr(statement, "selected_columns", ()):
            processor = column.type.dialect_impl(dialect).result_processor(dialect, None)
            if processor is not None:
                self.result_processors.append((column.key, processor))
        url = engine.url
        self.span_name = f"{span_name} {url.database}"
        self.span_attributes = {"db.system": "postgresql", "db.name": url.database or "", "db.statement": self.sql,
                                "net.peer.name": url.host or "", "net.peer.port": url.port or 5432}

    def arguments(self, params: Mapping[str, Any]) -> list[Any]:
        values = self.compiled.construct_params(dict(params))
        return [value if processor is None else processor(value)
                for value, processor in zip((values[n] for n in self.names), self.bind_processors, strict=True)]

    def row(self, record: Any) -> dict[str, Any]:
        row = dict(record.items())
        for key, processor in self.result_processors:
            row[key] = processor(row[key])
        return row


class _InsertPlan:
    """Staged inserts of one shape as one statement compiled once. The shape is its groups (see _groups): each a
    table, the columns given and how many rows. A group is one multi-row INSERT, so that its serial columns (the
    outbox's seq) follow the rows' order; each group but the last is a data-modifying CTE before it, whose order
    against the others PostgreSQL leaves open. Each row's values are bound under its own prefix.

    A column left out of a row gets its scalar default, as SQLAlchemy's insert would give it; a column with a
    Python-callable default must be given (the plan refuses to be built otherwise, a mistake of the code).

    With a guard (update_guarded), the statement is `SELECT count(*) FROM` the guard, with the guard's CTEs and each
    group as `INSERT ... SELECT` from its VALUES `WHERE EXISTS` a guard row, in the rows' order: nothing is inserted
    when the guard matched no row, and the count says whether it did."""

    def __init__(self, shape: tuple[tuple[Table, tuple[str, ...], int], ...], engine: AsyncEngine,
                 guard: _Guard | None = None) -> None:
        self.defaults: list[dict[str, Any]] = []
        inserts: list[Any] = []
        for table, keys, count in shape:
            defaults: dict[str, Any] = {}
            for column in table.columns:
                if column.key in keys or column.default is None:
                    continue
                if not column.default.is_scalar:  # type: ignore[attr-defined]
                    raise ValueError(f"a staged insert into {table.name} must give {column.key}: its default is "
                                     "computed by Python")
                defaults[column.key] = column.default.arg  # type: ignore[attr-defined]
            first = len(self.defaults)
            self.defaults += [defaults] * count
            columns = (*keys, *defaults)
            if guard is None:
                inserts.append(insert(table).values([
                    {k: bindparam(f"r{i}_{k}", type_=table.c[k].type) for k in columns}
                    for i in range(first, first + count)]))
                continue
            # Behind a guard the rows are written only if it matched: INSERT ... SELECT from their VALUES, in their
            # order (the outbox's seq follows it), WHERE EXISTS (the guard's rows).
            rows = values(column_clause("n", Integer()), *(column_clause(k, table.c[k].type) for k in columns),
                          name=f"v{len(inserts)}").data([
                (n, *(bindparam(f"r{i}_{k}", type_=table.c[k].type) for k in columns))
                for n, i in enumerate(range(first, first + count))])
            inserts.append(insert(table).from_select(
                list(columns), select(*(rows.c[k] for k in columns)).where(exists(select(guard.cte)))
                .order_by(rows.c.n)))
        if guard is not None:
            statement = _guard_statement(guard.cte, guard.others).add_cte(
                *(ins.cte(f"g{n}") for n, ins in enumerate(inserts)))
            self.plan = _Plan(statement, engine, "UPDATE")
            return
        statement = inserts[-1].add_cte(*(ins.cte(f"g{n}") for n, ins in enumerate(inserts[:-1])))
        self.plan = _Plan(statement, engine, "INSERT")

    def arguments(self, rows: list[Mapping[str, Any]], guard_params: Mapping[str, Any] | None = None) -> list[Any]:
        params: dict[str, Any] = dict(guard_params or {})
        for i, (row, defaults) in enumerate(zip(rows, self.defaults, strict=True)):
            for key, value in (*row.items(), *defaults.items()):
                params[f"r{i}_{key}"] = value
        return self.plan.arguments(params)


class _Connections:
    """The direct statements' connections: at most `size`, opened on demand by `connect`, lent one statement at a
    time and taken back as they are.

    asyncpg's Pool did this before, and on every statement it set and cancelled a timer for the wait for a
    connection and another for its release, wrapped the connection in a proxy, and released it in a task of its
    own (asyncio.shield): 0.04–0.09 ms of GetUser's 0.7–0.8 ms of CPU under load. Here a statement that finds
    a connection idle takes it at once; only one that has to wait arms a timer (_POOL_TIMEOUT, as before), and waiters
    are served in their order, each handed the connection the statement before it gave back. A connection the
    server closed is never lent: found closed while idle, it is dropped and another opened."""

    def __init__(self, connect: Callable[[], Awaitable[asyncpg.Connection]], size: int) -> None:
        self.connect = connect
        self.size = size
        self.slots = 0  # connections open, being opened, or whose slot was handed to a waiter to open one
        self.idle: list[asyncpg.Connection] = []
        self.lent: set[asyncpg.Connection] = set()
        # Each gets a connection, or None: a slot of its own in which to open one.
        self.waiters: collections.deque[asyncio.Future[asyncpg.Connection | None]] = collections.deque()
        self.closing = False
        self.drained: asyncio.Future[None] | None = None

    def get_size(self) -> int:
        return len(self.idle) + len(self.lent)

    def get_idle_size(self) -> int:
        return len(self.idle)

    async def acquire(self) -> asyncpg.Connection:
        if self.closing:
            raise asyncpg.InterfaceError("the pool is closing")
        while self.idle:
            connection = self.idle.pop()
            if not connection.is_closed():
                self.lent.add(connection)
                return connection
            self.slots -= 1  # the server ended it while it was idle (no waiter can exist while one is idle)
        if self.slots < self.size:
            self.slots += 1
            return await self._open()
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            async with asyncio.timeout(_POOL_TIMEOUT):
                connection = await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():  # handed over just as the wait ended: pass it on
                handed = waiter.result()
                if handed is not None:
                    self.lent.discard(handed)
                self._pass(handed)
            else:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)
            raise
        return await self._open() if connection is None else connection

    async def _open(self) -> asyncpg.Connection:
        """Opens a connection in a slot already counted."""
        try:
            connection = await self.connect()
        except BaseException:
            self._pass(None)
            raise
        self.lent.add(connection)
        return connection

    def release(self, connection: asyncpg.Connection, keep: bool = True) -> None:
        """Takes a lent connection back: for the next statement when `keep` and it is still open, else ended."""
        if connection not in self.lent:  # terminate() ended it meanwhile
            return
        self.lent.remove(connection)
        if not keep or connection.is_closed():
            connection.terminate()
            self._pass(None)
        else:
            self._pass(connection)
        if self.closing and not self.lent and self.drained is not None and not self.drained.done():
            self.drained.set_result(None)

    def _pass(self, connection: asyncpg.Connection | None) -> None:
        """Hands a connection, or a free slot (None), to the first waiter; with none waiting, keeps it."""
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                if connection is not None:
                    self.lent.add(connection)
                waiter.set_result(connection)
                return
        if connection is None:
            self.slots -= 1
        else:
            self.idle.append(connection)

    async def close(self) -> None:
        """Waits for the lent connections to come back, then closes them all."""
        self.closing = True
        while self.lent:
            self.drained = asyncio.get_running_loop().create_future()
            await self.drained
        idle, self.idle = self.idle, []
        self.slots -= len(idle)
        for connection in idle:
            try:
                await connection.close()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                connection.terminate()

    def terminate(self) -> None:
        """Ends every connection at once, lent or not."""
        self.closing = True
        for connection in (*self.idle, *self.lent):
            connection.terminate()
        self.idle, self.lent, self.slots = [], set(), 0
        for waiter in self.waiters:
            if not waiter.done():
                waiter.set_exception(asyncpg.InterfaceError("the pool was closed"))
        self.waiters.clear()


class _DirectPool:
    """The direct statements of one PostgreSQL Database (read_first's reads, insert_staged's inserts): their plans
    and their own pool of asyncpg connections.

    The pool is not SQLAlchemy's: checking a connection out of the engine and back in (an AsyncConnection, a
    greenlet round per step, the pool's events) cost more CPU than a read itself; nor asyncpg's (see _Connections).
    It opens on the first statement, keeps at most `size` connections, and takes them back as they are, without a
    reset query (a round trip per statement), since each statement it runs is a single one in autocommit, which
    leaves no session state behind. Its connections decode json and jsonb as the engine's do.

    `ready` is the pool (None until the first statement, or after close()): callers call pool() only to make it.
    `relay` is the outbox relay's pool of one connection, asyncpg's, apart (see relay_connection)."""

    def __init__(self, engine: AsyncEngine, size: int) -> None:
        self.engine = engine
        self.size = size
        self.plans: dict[int, _Plan] = {}
        # By the staged rows' shape and the guard (the CTE a repository built once) they depend on, if any.
        self.insert_plans: dict[tuple[tuple[tuple[Table, tuple[str, ...], int], ...], Any], _InsertPlan] = {}
        self.ready: _Connections | None = None
        self.relay: asyncpg.Pool | None = None
        self._opening: asyncio.Lock | None = None

    def pool(self) -> _Connections:
        if self.ready is None:
            self.ready = _Connections(self._connect, self.size)
        return self.ready

    def _connect_args(self) -> dict[str, Any]:
        _, params = self.engine.dialect.create_connect_args(self.engine.url)
        for adapter_only in ("prepared_statement_cache_size", "prepared_statement_name_func", "async_creator_fn"):
            params.pop(adapter_only, None)
        return {**params, **_CONNECT_ARGS}

    async def _connect(self) -> asyncpg.Connection:
        connection = await asyncpg.connect(**self._connect_args())
        try:
            await self._json_codecs(connection)
        except BaseException:
            connection.terminate()
            raise
        return connection

    async def relay_pool(self) -> asyncpg.Pool:
        """The outbox relay's pool of one connection (see connection())."""
        if self.relay is None:
            self.relay = await self._open(RELAY_CONNECTIONS, lambda: self.relay)
        return self.relay

    async def _open(self, size: int, opened: Callable[[], asyncpg.Pool | None]) -> asyncpg.Pool:
        """An asyncpg pool of `size` connections, unless `opened()` gives one another caller opened meanwhile."""
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if (ready := opened()) is not None:  # another caller opened it while this one waited
                return ready
            return await asyncpg.create_pool(**self._connect_args(), min_size=0, max_size=size,
                                             init=self._json_codecs, reset=_no_reset)

    async def _json_codecs(self, connection: asyncpg.Connection) -> None:
        """json and jsonb as the engine's connections decode them: the dialect's own set-up (its documented hooks,
        which take SQLAlchemy's adapted connection and use the asyncpg one inside it)."""
        adapted = types.SimpleNamespace(_connection=connection)
        await self.engine.dialect.setup_asyncpg_json_codec(adapted)  # type: ignore[attr-defined]
        await self.engine.dialect.setup_asyncpg_jsonb_codec(adapted)  # type: ignore[attr-defined]

    async def run(self, plan: _Plan, arguments: list[Any], method: str) -> Any:
        """Runs one statement on a pooled connection, with its database CLIENT span; `method` is the asyncpg
        connection's (fetchrow, fetchval, execute)."""
        with _tracer.start_as_current_span(plan.span_name, kind=trace.SpanKind.CLIENT,
                                           attributes=plan.span_attributes):
            pool = self.ready or self.pool()
            connection = await pool.acquire()
            try:
                result = await getattr(connection, method)(plan.sql, *arguments)
            except BaseException as exc:
                # Closed, closing, or cancelled half way (asyncpg would wait for the server to confirm a
                # cancellation): like SQLAlchemy, Tessera ends the session instead.
                pool.release(connection, keep=_statement_error(exc))
                raise
            pool.release(connection)
            return result

    @contextlib.asynccontextmanager
    async def relay_connection(self) -> AsyncIterator[asyncpg.Connection]:
        """The relay's connection, for the outbox relay's pass: a few statements in a transaction it opens and ends
        itself, held while the broker confirms. It is a pool of its own, apart from the direct statements', so that
        a broker slow to confirm never keeps a read waiting for a connection. It goes back as it is, like run()'s,
        so it is ended instead when the block leaves anything behind: a transaction still open, or an error that
        is not one statement's."""
        pool = self.relay or await self.relay_pool()
        async with pool.acquire(timeout=_POOL_TIMEOUT) as connection:
            try:
                yield connection
            except BaseException as exc:
                # An error of the caller's own (a broker that did not confirm), raised once its transaction ended,
                # leaves the connection fit; a cancellation may have cut a statement half way.
                if (not isinstance(exc, Exception) or database_unavailable(exc)
                        or isinstance(exc, asyncpg.InterfaceError) or connection.is_in_transaction()):
                    connection.terminate()
                raise
            if connection.is_in_transaction():
                connection.terminate()
                raise RuntimeError("the relay's connection was handed back with its transaction open")

    async def close(self) -> None:
        """Closes the pools (as the engine's dispose(), a later statement opens a new one)."""
        direct, relay = self.ready, self.relay
        self.ready = self.relay = None
        try:
            await self._close(direct)
        finally:
            await self._close(relay)

    async def _close(self, pool: asyncpg.Pool | _Connections | None) -> None:
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), 5)
            except TimeoutError:
                log.warning("direct statements still running after 5 s; their connections are closed under them")
                pool.terminate()
            except asyncio.CancelledError:
                pool.terminate()
                raise


# The statement spans of direct statements carry the scope and attributes of the SQLAlchemy instrumentation's
# spans, so that every database statement is one kind of span to a trace viewer and to the export rules in
# telemetry.py.
_tracer = trace.get_tracer(SQLALCHEMY_SCOPE)


async def _no_reset(_connection: asyncpg.Connection) -> None:
    """The relay's connection goes back to its pool as it is (see _DirectPool and relay_connection)."""


def _statement_error(exc: BaseException) -> bool:
    """True for an error the server reported about one statement, which leaves the connection fit for the next.
    Anything else means the connection is never handed out again: one that database_unavailable() recognises (a
    connection closed or closing, the server shutting down or cancelling), or a statement cancelled half way."""
    return isinstance(exc, asyncpg.PostgresError) and not database_unavailable(exc)


async def read_first(session: AsyncSession, statement: Select, params: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The first row of `statement` (a SELECT built once, at import, with `bindparam`s named in `params`), as a
    mapping of column key to value, or None.

    In a read session on PostgreSQL (a unit of work's `reading()`, autocommit) the statement runs straight on a
    connection of the database's direct pool (asyncpg's, see _DirectPool), compiled once: about a third of the CPU
    of a read through AsyncSession.execute, the greenlet bridge and the engine's pool, which matters on hot
    single-row reads such as GetUser.
    The values are the ones SQLAlchemy would give (the columns' TypeDecorators run), and the statement gets its
    database CLIENT span like every other one. In any other session (a transaction, or SQLite) it is an ordinary
    `session.execute`."""
    direct: _DirectPool | None = session.info.get(_DIRECT)
    if direct is None or session.in_transaction() or session.info.get(_STAGED) is not None:
        row = (await session.execute(statement, dict(params))).first()
        return None if row is None else row._mapping
    plan = direct.plans.get(id(statement))
    if plan is None or plan.statement is not statement:
        plan = direct.plans[id(statement)] = _Plan(statement, direct.engine, "SELECT")
    record = await direct.run(plan, plan.arguments(params), "fetchrow")
    return None if record is None else plan.row(record)


# Staged inserts --------------------------------------------------------------------------------------------------

# Turns a constraint clash on a staged row into the repository's own error (or None: not one it knows).
Translate = Callable[[IntegrityError], Exception | None]


@dataclasses.dataclass(frozen=True, slots=True)
class _Staged:
    table: Table
    row: Mapping[str, Any]
    translate: Translate | None


async def insert_row(session: AsyncSession, table: Table, row: Mapping[str, Any],
                     translate: Translate | None = None) -> None:
    """Inserts `row` (column key → value) into `table`, the way a repository adds a new aggregate (insert_rows
    with one row)."""
    await insert_rows(session, table, [row], translate)


async def insert_rows(session: AsyncSession, table: Table, rows: list[Mapping[str, Any]],
                      translate: Translate | None = None) -> None:
    """Inserts `rows` (column key → value, the same columns in each) into `table`, as one INSERT of many rows.

    In a unit of work's `inserting()` block they are staged: written at commit, with the others and the outbox
    events (see insert_staged), and a clash on a unique or foreign key is raised there. Anywhere else they are
    inserted at once. Either way a clash goes through `translate`: the repository's own error is raised when it
    returns one, the IntegrityError otherwise."""
    if not rows:
        return
    staged: list[_Staged] | None = session.info.get(_STAGED)
    if staged is not None:
        staged.extend(_Staged(table, row, translate) for row in rows)
        return
    await _insert_now(session, table, rows, (translate,))


@functools.cache
def _insert_into(table: Table) -> Any:
    """The table's INSERT, built once: values go in as parameters, so SQLAlchemy finds its compiled form in its cache
    without building and hashing a new statement per call."""
    return insert(table)


async def _insert_now(session: AsyncSession, table: Table, rows: list[Mapping[str, Any]],
                      translators: Iterable[Translate | None]) -> None:
    """Inserts `rows` in the session's transaction, one INSERT of many rows; a clash as insert_row says."""
    try:
        await session.execute(_insert_into(table), [dict(row) for row in rows] if len(rows) > 1 else dict(rows[0]))
    except IntegrityError as exc:
        _raise_translated(exc, translators)


@dataclasses.dataclass(frozen=True, slots=True)
class _Guard:
    cte: Any  # the guarded UPDATE ... RETURNING, as a CTE: the block's other writes happen only if it returned rows
    others: tuple[Any, ...]  # the CTEs that go with it: those it reads, and those (unreferenced) that follow from it
    params: Mapping[str, Any]
    missed: Callable[[], Exception]
    translate: Translate | None = None


async def update_guarded(session: AsyncSession, guard: Any, params: Mapping[str, Any],
                         missed: Callable[[], Exception], *others: Any, translate: Translate | None = None) -> bool:
    """Writes a change that holds only if its guard matches, the way a repository saves an aggregate fenced by its
    version or a lease: `guard` is an UPDATE ... RETURNING made a CTE (built once, at import, with `bindparam`s named
    in `params`), `others` the data-modifying CTEs that go with it (those it selects from, and those that select
    from it, each written only where the guard's rows lead). When the guard returns no row, nothing is written and
    `missed()` is raised.

    In a unit of work's `inserting()` block on PostgreSQL it is staged: commit() writes it together with the block's
    new rows and outbox events as one statement, those rows and events only if the guard matched (INSERT ... SELECT
    ... WHERE EXISTS), and raises `missed()` there; the block's save is then one round trip instead of BEGIN, its
    statements and COMMIT. Anywhere else on PostgreSQL it runs at once, in the session's transaction. Returns False
    on SQLite, which has no data-modifying CTEs: the repository then writes its own way. A constraint the write
    breaks goes through `translate`, as insert_row's clashes do."""
    if session.info.get(_DIRECT) is None:
        return False
    item = _Guard(guard, others, dict(params), missed, translate)
    if session.info.get(_STAGED) is not None:
        if session.info.get(_GUARD) is not None:
            raise RuntimeError("a unit of work stages at most one guarded update")
        session.info[_GUARD] = item
        return True
    await _guard_in_session(session, item)
    return True


@functools.cache
def _guard_statement(cte: Any, others: tuple[Any, ...]) -> Any:
    """How many rows the guarded UPDATE changed, with the statements that go with it: built once per guard (the
    guards are built once, at import), not on every save."""
    return select(func.count()).select_from(cte).add_cte(*others)


async def _guard_in_session(session: AsyncSession, guard: _Guard) -> None:
    try:
        matched = (await session.execute(_guard_statement(guard.cte, guard.others), dict(guard.params))).scalar_one()
    except IntegrityError as exc:
        _raise_translated(exc, (guard.translate,))
    if not matched:
        raise guard.missed()


def stage_inserts(session: AsyncSession) -> None:
    """Makes `session` stage insert_row's rows until insert_staged (a unit of work's `inserting()`)."""
    session.info[_STAGED] = []


def _raise_translated(exc: IntegrityError, translators: Iterable[Translate | None]) -> None:
    for translate in translators:
        if translate is not None and (mapped := translate(exc)) is not None:
            raise mapped from None
    raise exc


def _groups(rows: list[_Staged]) -> list[list[_Staged]]:
    """Consecutive rows of one table with the same columns, together: each group is one INSERT of many rows."""
    groups: list[list[_Staged]] = []
    for item in rows:
        if groups and groups[-1][0].table is item.table and tuple(groups[-1][0].row) == tuple(item.row):
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


async def insert_staged(session: AsyncSession, extra: list[tuple[Table, Mapping[str, Any]]]) -> bool:
    """Writes the rows `session` staged, then `extra` (the outbox events), as one atomic change.

    On PostgreSQL, when nothing else ran on the session, they go as one statement of data-modifying CTEs on the direct
    pool, in autocommit: one round trip, where a transaction takes BEGIN, an INSERT per row and COMMIT, each through
    the greenlet bridge. Returns True then: the change is committed. Otherwise (SQLite, or a block that also read
    through its session) the rows are inserted in the session's transaction and it returns False: the caller
    commits. A clash raises as insert_row says. A staged guarded update (update_guarded) goes first, the rows only
    if it matched, in the one statement or in the transaction, and its `missed()` is raised when it did not. A call
    cancelled while the statement runs ends its connection (see _DirectPool.run): the rows are then all written or
    none, as with any commit its caller stopped waiting for."""
    staged: list[_Staged] = session.info.pop(_STAGED, None) or []
    guard: _Guard | None = session.info.pop(_GUARD, None)
    rows = [*staged, *(_Staged(table, row, None) for table, row in extra)]
    if not rows and guard is None:
        return False
    translators = [item.translate for item in staged] + ([guard.translate] if guard is not None else [])
    groups = _groups(rows)
    direct: _DirectPool | None = session.info.get(_DIRECT)
    if direct is None or session.in_transaction():
        if guard is not None:
            await _guard_in_session(session, guard)
        for group in groups:
            await _insert_now(session, group[0].table, [item.row for item in group], translators)
        return False
    shape = tuple((group[0].table, tuple(group[0].row), len(group)) for group in groups)
    key = (shape, None if guard is None else guard.cte)
    plan = direct.insert_plans.get(key)
    if plan is None:
        plan = direct.insert_plans[key] = _InsertPlan(shape, direct.engine, guard)
    arguments = plan.arguments([item.row for item in rows], None if guard is None else guard.params)
    try:
        matched = await direct.run(plan.plan, arguments, "execute" if guard is None else "fetchval")
    except asyncpg.IntegrityConstraintViolationError as exc:
        _raise_translated(IntegrityError(plan.plan.sql, None, exc), translators)
    if guard is not None and not matched:
        raise guard.missed()
    return True
