"""A service registry in one PostgreSQL database shared by the instances of several hosts.

One row per instance, keyed by its id. An instance upserts its row when it starts serving, renews the row's
heartbeat every check interval while it is ready, and deletes the row on a graceful stop. A host that crashes
cannot delete its rows: a row whose heartbeat is older than the deregister-after time is not discovered, and
whoever reads it deletes it (Consul's deregister_critical_service_after, without an agent). Times are the
database's (now()), so the hosts' clocks need not agree.

Except after an outage: while the database was away no instance could renew, so every heartbeat is old when it
returns. A reader that found the database unreachable believes no heartbeat until it has reached it again for the
deregister-after time, by when every live instance has renewed: meanwhile it lists every row and deletes none (the
gRPC health checks of discovery keep out the instances that died meanwhile), instead of dropping every instance at
once until each writes its row again.

The table is created by the registry itself, idempotently, under an advisory lock: the services' Alembic
migrations each run on the service's own database, and the registry's database is none of theirs (the operator
picks it, and every service of every host shares it)."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import asyncpg
from sqlalchemy import (
    Column,
    DateTime,
    Index,
    Integer,
    Interval,
    MetaData,
    Table,
    Text,
    delete,
    func,
    literal,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import JSONB, insert
from sqlalchemy.ext.asyncio import AsyncConnection, create_async_engine
from sqlalchemy.schema import CreateIndex, CreateTable

from tessera_runtime.db import cannot_connect, database_location, drop_closed_on_checkout, error_chain, first_line
from tessera_runtime.discovery.model import ServiceInstance
from tessera_runtime.discovery.registry import RegistryUnavailable

log = logging.getLogger("tessera.discovery")

T = TypeVar("T")

_metadata = MetaData()
INSTANCES = Table(
    "tessera_service_instances", _metadata,
    Column("id", Text, primary_key=True),
    Column("service", Text, nullable=False),
    Column("host", Text, nullable=False),
    Column("port", Integer, nullable=False),
    Column("weight", Integer, nullable=False),
    Column("health_check", Text, nullable=False),
    Column("metadata", JSONB, nullable=False),
    Column("registered_at", DateTime(timezone=True), nullable=False),
    Column("heartbeat_at", DateTime(timezone=True), nullable=False),
)
_BY_SERVICE = Index("ix_tessera_service_instances_service", INSTANCES.c.service)
# Held while the table is created, so that instances starting together on several hosts do not race on
# CREATE TABLE IF NOT EXISTS (which can still fail on a duplicate catalog row when two run at once).
_CREATE_LOCK_KEY = int.from_bytes(hashlib.sha256(b"tessera.registry").digest()[:8], "big", signed=True)
# Connect within 3 s and let no statement take longer than 5: a registry that hangs is one that is away, and the
# instances known stand meanwhile.
_CONNECT_ARGS = {"timeout": 3, "command_timeout": 5}


class PostgresRegistry:
    """The instances registered in the table tessera_service_instances of the database at `url`
    (postgresql+asyncpg://). Rows whose heartbeat is older than `stale_after` seconds are a crashed instance's:
    never listed, and deleted when seen. Every method raises RegistryUnavailable when the database cannot be
    reached (and, from then on until it has been reachable for `stale_after` again, neither lists nor deletes
    rows by their heartbeat). With `read_only` (`tessera registry list`, which cannot know the deregister-after time
    the services use) it lists every row and deletes none. Nothing connects until first use."""

    def __init__(self, url: str, *, stale_after: float, read_only: bool = False) -> None:
        self.url = url
        self.location = database_location(url)
        self.stale_after = dt.timedelta(seconds=stale_after)
        self.read_only = read_only
        self.prunes = not read_only
        # One connection is all a process's registration or one dependency's discovery needs at a time (each works
        # one statement after the other); the overflow serves callers that share one registry concurrently.
        self.engine = create_async_engine(url, pool_size=1, max_overflow=4, pool_recycle=1800,
                                          connect_args=_CONNECT_ARGS)
        drop_closed_on_checkout(self.engine)
        self._created = False
        self._creating = asyncio.Lock()
        self._away = False
        self._heartbeats_believed_from = 0.0  # time.monotonic()

    # -- the port ----------------------------------------------------------------------------------------------

    async def register(self, instance: ServiceInstance) -> None:
        async def run(conn: AsyncConnection) -> None:
            await conn.execute(self._upsert(instance))

        await self._run(run)

    async def renew(self, instance: ServiceInstance) -> bool:
        """The heartbeat: the row's heartbeat set to now; the row written again when it had been deleted (a reader
        found it stale, discovery pruned it), and then True."""
        async def run(conn: AsyncConnection) -> bool:
            renewed = await conn.execute(
                update(INSTANCES).where(INSTANCES.c.id == instance.id).values(heartbeat_at=func.now()))
            if renewed.rowcount:
                return False
            await conn.execute(self._upsert(instance))
            return True

        return await self._run(run)

    async def deregister(self, instance: ServiceInstance) -> None:
        async def run(conn: AsyncConnection) -> None:
            await conn.execute(delete(INSTANCES).where(INSTANCES.c.id == instance.id))

        await self._run(run)

    async def instances(self, service: str) -> list[ServiceInstance]:
        async def run(conn: AsyncConnection) -> list[ServiceInstance]:
            listed = select(INSTANCES).where(INSTANCES.c.service == service).order_by(INSTANCES.c.id)
            if self._heartbeats_believed():
                await self._delete_stale(conn, INSTANCES.c.service == service)
                listed = listed.where(self._fresh())
            rows = await conn.execute(listed)
            return [_instance(row) for row in rows.mappings()]

        return await self._run(run)

    async def services(self) -> list[str]:
        async def run(conn: AsyncConnection) -> list[str]:
            listed = select(INSTANCES.c.service).distinct().order_by(INSTANCES.c.service)
            if self._heartbeats_believed():
                await self._delete_stale(conn, None)
                listed = listed.where(self._fresh())
            rows = await conn.execute(listed)
            return list(rows.scalars())

        return await self._run(run)

    async def close(self) -> None:
        await self.engine.dispose()

    # -- inside ------------------------------------------------------------------------------------------------

    @staticmethod
    def _upsert(instance: ServiceInstance):
        values = {"service": instance.service, "host": instance.host, "port": instance.port,
                  "weight": instance.weight, "health_check": instance.health_check,
                  "metadata": dict(instance.metadata), "registered_at": func.now(), "heartbeat_at": func.now()}
        return insert(INSTANCES).values(id=instance.id, **values).on_conflict_do_update(
            index_elements=[INSTANCES.c.id], set_=values)

    def _heartbeats_believed(self) -> bool:
        return not self.read_only and not self._away and time.monotonic() >= self._heartbeats_believed_from

    def _fresh(self):
        return INSTANCES.c.heartbeat_at >= func.now() - literal(self.stale_after, Interval)

    async def _delete_stale(self, conn: AsyncConnection, where) -> None:
        statement = delete(INSTANCES).where(INSTANCES.c.heartbeat_at < func.now() - literal(self.stale_after,
                                                                                               Interval))
        if where is not None:
            statement = statement.where(where)
        deleted = (await conn.execute(statement.returning(INSTANCES.c.id, INSTANCES.c.host, INSTANCES.c.port,
                                                          INSTANCES.c.heartbeat_at))).all()
        for row in deleted:
            log.warning("stale registration deleted: no heartbeat for more than %.1f s",
                        self.stale_after.total_seconds(), extra={
                            "instance_id": row.id, "address": f"{row.host}:{row.port}",
                            "heartbeat_at": row.heartbeat_at.isoformat(), "registry": self.location})

    async def _create(self) -> None:
        async with self._creating:
            if self._created:
                return
            async with self.engine.begin() as conn:
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _CREATE_LOCK_KEY})
                await conn.execute(CreateTable(INSTANCES, if_not_exists=True))
                await conn.execute(CreateIndex(_BY_SERVICE, if_not_exists=True))
            self._created = True

    async def _run(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        """`work` in a transaction of its own, once the table exists; created again if it was dropped meanwhile
        (the registry's database dropped and created again by its operator)."""
        for attempt in (1, 2):
            try:
                await self._create()
                async with self.engine.begin() as conn:
                    done = await work(conn)
                if self._away:
                    self._away = False
                    self._heartbeats_believed_from = time.monotonic() + self.stale_after.total_seconds()
                    log.info("registry back after an outage: no registration is taken for stale for %.1f s, while the "
                             "instances renew theirs", self.stale_after.total_seconds(),
                             extra={"registry": self.location})
                return done
            except Exception as exc:
                if _undefined_table(exc) and attempt == 1:
                    self._created = False
                    continue
                if cannot_connect(exc):
                    self._away = True
                    raise RegistryUnavailable(f"the registry {self.location} cannot be reached: "
                                              f"{first_line(exc)}") from exc
                raise
        raise AssertionError("unreachable")


def _undefined_table(exc: BaseException) -> bool:
    """The table is missing: `exc`, the DBAPI error SQLAlchemy wraps, or asyncpg's under it, says so."""
    return any(isinstance(error, asyncpg.exceptions.UndefinedTableError) for error in error_chain(exc, context=False))


def _instance(row) -> ServiceInstance:
    return ServiceInstance(id=row["id"], service=row["service"], host=row["host"], port=row["port"],
                           weight=row["weight"], health_check=row["health_check"],
                           metadata={str(k): str(v) for k, v in (row["metadata"] or {}).items()})
