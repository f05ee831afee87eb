"""Async SQLAlchemy engine per service: SQLite file by default, PostgreSQL (asyncpg) by URL."""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from sqlalchemy import DateTime, Select, Table, TypeDecorator, and_, event, or_, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker, create_async_engine

from tessera_runtime.telemetry import instrument_engine

log = logging.getLogger("tessera.db")


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
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def ensure_sqlite_folder(url: str) -> None:
    """Creates the folder of a SQLite database file, so that a fresh checkout needs no setup."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)


class Database:
    """Owns one service's engine and session factory. Nothing connects until first use."""

    def __init__(self, url: str, *, pool_size: int = 10, echo: bool = False) -> None:
        self.url = url
        parsed = make_url(url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            ensure_sqlite_folder(url)
            self.engine = create_async_engine(url, echo=echo)
            _prepare_sqlite(self.engine)
        else:
            self.engine = create_async_engine(
                url, echo=echo, pool_size=pool_size, max_overflow=pool_size, pool_recycle=1800,
                connect_args={"timeout": 3, "command_timeout": 30},
            )
        instrument_engine(self.engine)  # one span per statement, child of the RPC or message being handled
        self.sessionmaker = async_sessionmaker(self.engine, expire_on_commit=False, class_=AsyncSession)
        # Reads of one statement need no transaction: in autocommit a read is one round trip instead of three
        # (BEGIN, SELECT, ROLLBACK). SQLite keeps its transactions: its BEGIN IMMEDIATE is what orders writers.
        read_engine = (self.engine.execution_options(isolation_level="AUTOCOMMIT") if self.dialect == "postgresql"
                       else self.engine)
        self.read_sessionmaker = async_sessionmaker(read_engine, expire_on_commit=False, class_=AsyncSession)

    async def ping(self) -> bool:
        """True when the database answers a trivial query; the readiness check of every service."""
        async with self.engine.connect() as conn:
            await conn.execute(text("SELECT 1"))
        return True

    async def dispose(self) -> None:
        await self.engine.dispose()


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
                newest_first: bool = False) -> Select:
    """Adds the keyset cursor of tessera_runtime.pagination to a list query: rows after `key` (create_time, id)
    in (create_time, id) order, oldest or newest first, at most `limit` of them."""
    t_col, id_col = table.c.create_time, table.c.id
    if key is not None:
        t, last_id = key
        if newest_first:
            query = query.where(or_(t_col < t, and_(t_col == t, id_col < last_id)))
        else:
            query = query.where(or_(t_col > t, and_(t_col == t, id_col > last_id)))
    order = (t_col.desc(), id_col.desc()) if newest_first else (t_col, id_col)
    return query.order_by(*order).limit(limit)
