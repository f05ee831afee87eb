"""The PostgreSQL registry (TESSERA_REGISTRY_URL) against a real database created for the test and dropped after it,
with real gRPC servers on ephemeral ports registering in it as several hosts' instances would: balancing by weight
through `registry:///user`, heartbeats, deregistration, stale rows of crashed hosts, concurrent registrations, and
serving on while the database is away."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

from tessera_runtime.clients import open_channel
from tessera_runtime.discovery import BalancedChannel, DiscoverySettings, RegistryUnavailable, ServiceInstance
from tessera_runtime.discovery.postgres import PostgresRegistry
from tests.support import postgres
from tests.support.discovery import FAST, USER_SERVICE, Instance, UserServers, answers, serving, until
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture
async def registry_db() -> AsyncIterator[tuple[str, str]]:
    """A database of its own for the registry: (asyncpg DSN for reading rows directly, registry URL)."""
    name, url = await postgres.create_database("tessera_registry")
    yield url.replace("postgresql+asyncpg://", "postgresql://"), url
    await postgres.drop_database(name)


@pytest.fixture
async def start_users() -> AsyncIterator[Callable[..., Awaitable[Instance]]]:
    servers = UserServers()
    yield servers.start
    await servers.stop_all()


def settings_for(url: str, weight: int = 1, **overrides) -> DiscoverySettings:
    return DiscoverySettings(registry_url=url, instance_weight=weight,
                             **{**FAST, "deregister_after_seconds": 30.0, **overrides})


async def rows(dsn: str) -> dict[int, asyncpg.Record]:
    """The registry's rows by port, read directly."""
    conn = await asyncpg.connect(dsn)
    try:
        return {r["port"]: r for r in await conn.fetch("SELECT * FROM tessera_service_instances")}
    finally:
        await conn.close()


async def execute(dsn: str, statement: str, *args) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(statement, *args)
    finally:
        await conn.close()


async def test_instances_registered_in_postgres_share_calls_by_weight_and_leave_on_graceful_stop(
        start_users, registry_db):
    dsn, url = registry_db
    heavy = await start_users("heavy", settings=settings_for(url, weight=3))
    light = await start_users("light", settings=settings_for(url, weight=1))
    registered = await rows(dsn)
    assert {port: (r["service"], r["host"], r["weight"]) for port, r in registered.items()} == {
        heavy.server.port: ("user", "127.0.0.1", 3), light.server.port: ("user", "127.0.0.1", 1)}
    assert registered[heavy.server.port]["id"] == heavy.server.registration.instances[0].id
    assert '"version": "dev"' in registered[heavy.server.port]["metadata"]

    # The heartbeat moves at a check interval (0.1 s, later on a loaded host); the registration time does not.
    first_beat = registered[heavy.server.port]["heartbeat_at"]
    for _ in range(200):
        renewed = (await rows(dsn))[heavy.server.port]
        if renewed["heartbeat_at"] > first_beat:
            break
        await asyncio.sleep(0.05)
    assert renewed["heartbeat_at"] > first_beat
    assert renewed["registered_at"] == registered[heavy.server.port]["registered_at"]

    channel = open_channel("registry:///user", [USER_SERVICE], discovery=settings_for(url))
    assert isinstance(channel, BalancedChannel)
    assert await answers(channel, 40) == {"heavy": 30, "light": 10}

    await light.server.stop()
    assert set(await rows(dsn)) == {heavy.server.port}  # its row is gone as the stop begins
    await until(lambda: serving(channel) == {heavy.address})
    assert await answers(channel, 4) == {"heavy": 4}
    await channel.close()


async def test_a_stale_row_is_not_discovered_and_is_deleted_by_the_reader(start_users, registry_db, caplog):
    dsn, url = registry_db
    live = await start_users("live", settings=settings_for(url))
    # A crashed host's row: its heartbeat stopped a minute ago. It points at a live server whose health answers
    # SERVING, so only the heartbeat can keep it out.
    crashed = await start_users("crashed-host")
    await execute(dsn, "INSERT INTO tessera_service_instances (id, service, host, port, weight, health_check, "
                       "metadata, registered_at, heartbeat_at) VALUES ($1, 'user', '127.0.0.1', $2, 5, '', '{}', "
                       "now() - interval '2 minutes', now() - interval '1 minute')",
                  "user-crashed-host", crashed.server.port)
    assert set(await rows(dsn)) == {live.server.port, crashed.server.port}

    caplog.set_level(logging.WARNING, logger="tessera.discovery")
    channel = open_channel("registry:///user", [USER_SERVICE], discovery=settings_for(url))
    assert await answers(channel, 6) == {"live": 6}
    assert set(await rows(dsn)) == {live.server.port}
    deleted = [r for r in caplog.records if r.getMessage().startswith("stale registration deleted")]
    assert [r.instance_id for r in deleted] == ["user-crashed-host"]
    await channel.close()


async def test_concurrent_registrations_from_many_tasks_and_hosts_are_all_kept(registry_db):
    dsn, url = registry_db
    # Four registries on a database without the table yet, as four hosts starting at once: they create it together.
    hosts = [PostgresRegistry(url, stale_after=30) for _ in range(4)]
    instances = [ServiceInstance(id=f"inventory-{n}", service="inventory", host=f"10.0.0.{n % 4}", port=40000 + n,
                                 weight=1 + n % 3, metadata={"version": f"v{n}"}) for n in range(120)]
    try:
        await asyncio.gather(*(hosts[n % 4].register(i) for n, i in enumerate(instances)))
        # Registering again replaces; renewing finds each row there; a third of them leave meanwhile.
        await asyncio.gather(*(hosts[(n + 1) % 4].register(i) for n, i in enumerate(instances)),
                             *(hosts[n % 4].deregister(i) for n, i in enumerate(instances[:40])))
        renewed = await asyncio.gather(*(hosts[n % 4].renew(i) for n, i in enumerate(instances[40:])))
        assert renewed == [False] * 80
        found = await hosts[0].instances("inventory")
        assert sorted(found, key=lambda i: i.id) == sorted(instances[40:], key=lambda i: i.id)
        assert await hosts[3].services() == ["inventory"]
        assert await hosts[1].renew(instances[0]) is True  # deregistered: the heartbeat writes it again
    finally:
        for host in hosts:
            await host.close()
    assert len(await rows(dsn)) == 81


async def test_the_registry_away_stops_neither_serving_nor_discovery(start_users, registry_db, caplog):
    dsn, url = registry_db
    proxy = TcpProxy("127.0.0.1", 5432).start()
    through_proxy = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    caplog.set_level(logging.INFO, logger="tessera.discovery")
    try:
        first = await start_users("first", settings=settings_for(through_proxy))
        second = await start_users("second", settings=settings_for(through_proxy))
        channel = open_channel("registry:///user", [USER_SERVICE], discovery=settings_for(through_proxy))
        assert await answers(channel, 4) == {"first": 2, "second": 2}

        proxy.cut()  # connections reset, new ones refused
        late = await start_users("late", settings=settings_for(through_proxy))  # starts and serves all the same

        def said(message: str) -> list[logging.LogRecord]:
            return [r for r in caplog.records if r.getMessage().startswith(message)]

        # Each instance's heartbeat and the caller's reads run on timers of their own: wait until each has failed,
        # then for several check intervals more of failing, before counting what was said.
        await until(lambda: len(said("registry unreachable")) >= 3 and said("registry cannot be read"))
        await asyncio.sleep(0.6)
        assert await answers(channel, 4) == {"first": 2, "second": 2}  # the last known instances
        assert serving(channel) == {first.address, second.address}
        assert len(said("registry cannot be read: the last known instances stand until it can")) == 1
        # Once per outage and per instance, however many heartbeats failed.
        away = said("registry unreachable")
        assert len(away) == 3 and all("cannot be reached" in r.error for r in away)
        assert late.server.port not in await rows(dsn)

        proxy.restore()
        # The caller finding `late` says nothing of when first's and second's next heartbeats get through.
        await until(lambda: late.address in serving(channel) and len(said("registry reachable again")) >= 3)
        assert await answers(channel, 6) == {"first": 2, "second": 2, "late": 2}
        await asyncio.sleep(0.3)  # several heartbeats and reads more: said once, not at every success
        assert len(said("registry read again")) == 1
        assert len(said("registry reachable again")) == 3
        assert set(await rows(dsn)) == {first.server.port, second.server.port, late.server.port}
        await channel.close()
    finally:
        proxy.close()


async def test_a_registry_outage_longer_than_the_deregister_after_time_drops_no_live_instance(
        start_users, registry_db, caplog):
    dsn, url = registry_db
    proxy = TcpProxy("127.0.0.1", 5432).start()
    through_proxy = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    # Every heartbeat is older than the deregister-after time once the database is back; the instances renew
    # less often than the caller reads, so a caller that believed the old heartbeats would find none fresh. The
    # deregister-after time leaves the instances several renewals after the outage (a loaded host is slow to
    # reconnect them), and the caller's health checks a timeout a loaded host meets: what this test is about is the
    # registry's rows, not either of those.
    instance_settings = settings_for(through_proxy, check_seconds=0.4, deregister_after_seconds=2.0)
    caller_settings = settings_for(through_proxy, deregister_after_seconds=2.0, check_timeout_seconds=3.0)
    caplog.set_level(logging.WARNING, logger="tessera.discovery")
    try:
        first = await start_users("first", settings=instance_settings)
        second = await start_users("second", settings=instance_settings)
        channel = open_channel("registry:///user", [USER_SERVICE], discovery=caller_settings)
        assert await answers(channel, 2) == {"first": 1, "second": 1}

        async def calls_for(seconds: float) -> collections.Counter[str]:
            seen: collections.Counter[str] = collections.Counter()
            deadline = asyncio.get_running_loop().time() + seconds
            while asyncio.get_running_loop().time() < deadline:  # every call succeeds
                seen += await answers(channel, 2)
                await asyncio.sleep(0.02)
            return seen

        proxy.cut()
        during = await calls_for(2.5)  # longer than the deregister-after time
        proxy.restore()
        after = await calls_for(3.0)  # past the time the heartbeats need to be fresh again
        assert set(during) == set(after) == {"first", "second"}
        assert serving(channel) == {first.address, second.address}
        assert set(await rows(dsn)) == {first.server.port, second.server.port}
        assert not [r for r in caplog.records if r.getMessage().startswith("stale registration deleted")]
        await channel.close()
    finally:
        proxy.close()


async def test_the_registry_database_dropped_and_created_again_is_written_again(start_users, registry_db):
    dsn, url = registry_db
    only = await start_users("only", settings=settings_for(url))
    name = dsn.rsplit("/", 1)[1]
    await postgres.drop_database(name)
    admin = await asyncpg.connect(postgres.ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    # The next heartbeats find no table: the registry creates it and the instance registers again.
    for _ in range(200):
        with contextlib.suppress(asyncpg.UndefinedTableError):
            if only.server.port in await rows(dsn):
                break
        await asyncio.sleep(0.05)
    assert set(await rows(dsn)) == {only.server.port}


async def test_registry_list_reads_the_postgres_registry(start_users, registry_db, capsys, monkeypatch):
    from tessera_runtime.cli import main

    _, url = registry_db
    instance = await start_users("listed", settings=settings_for(url, weight=3))
    plain = url.replace("postgresql+asyncpg://", "postgresql://")
    monkeypatch.delenv("TESSERA_REGISTRY_DIR", raising=False)
    monkeypatch.setenv("TESSERA_REGISTRY_URL", plain)
    assert await asyncio.to_thread(main, ["registry", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SERVICE", "ADDRESS", "WEIGHT", "HEALTH", "VERSION", "INSTANCE"]
    assert lines[1].split() == ["user", instance.address, "3", "SERVING", "dev",
                                instance.server.registration.instances[0].id]

    assert await asyncio.to_thread(main, ["registry", "list", "--url", plain, "--service", "inventory"]) == 0
    assert "no instance registered in" in capsys.readouterr().out

    monkeypatch.setenv("TESSERA_REGISTRY_DIR", "/tmp")
    assert await asyncio.to_thread(main, ["registry", "list"]) == 2
    assert "TESSERA_REGISTRY_DIR and TESSERA_REGISTRY_URL are both set" in capsys.readouterr().err
    assert await asyncio.to_thread(main, ["registry", "list", "--url", "mysql://h/db"]) == 2
    assert "--url must be postgresql://" in capsys.readouterr().err
    refusing = "postgresql://postgres@127.0.0.1:1/registry"
    assert await asyncio.to_thread(main, ["registry", "list", "--url", refusing]) == 1
    assert "the registry 127.0.0.1:1/registry cannot be reached" in capsys.readouterr().err


async def test_an_unreachable_registry_raises_registry_unavailable_naming_it():
    registry = PostgresRegistry("postgresql+asyncpg://postgres@127.0.0.1:1/registry", stale_after=30)
    try:
        with pytest.raises(RegistryUnavailable, match=r"the registry 127\.0\.0\.1:1/registry cannot be reached"):
            await registry.instances("user")
    finally:
        await registry.close()


async def test_registry_list_deletes_no_registration_whatever_deregister_after_time_the_services_use(
        start_users, registry_db, capsys, monkeypatch):
    """The services renew every 50 s and take a row for stale after 120 s; the operator's shell sets neither. A row
    renewed 40 s ago is a live instance's: listing the registry must not delete it (callers would drop the instance
    until its next renewal)."""
    from tessera_runtime.cli import main

    dsn, url = registry_db
    instance = await start_users("live", settings=settings_for(url, check_seconds=50.0,
                                                               deregister_after_seconds=120.0))
    await execute(dsn, "UPDATE tessera_service_instances SET heartbeat_at = now() - interval '40 seconds'")
    monkeypatch.delenv("TESSERA_REGISTRY_DIR", raising=False)
    monkeypatch.delenv("TESSERA_REGISTRY_URL", raising=False)
    monkeypatch.delenv("TESSERA_REGISTRY_DEREGISTER_AFTER_SECONDS", raising=False)
    plain = url.replace("postgresql+asyncpg://", "postgresql://")
    assert await asyncio.to_thread(main, ["registry", "list", "--url", plain]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:4] for line in lines[1:]] == [["user", instance.address, "1", "SERVING"]], lines
    assert set(await rows(dsn)) == {instance.server.port}


async def test_a_call_keeps_its_deadline_while_discovery_first_waits_for_a_registry_that_does_not_answer():
    """A registry host that takes connections and never answers (a database hung, a half-open network): the first
    call through the channel waits for discovery's first round no longer than its own deadline."""
    import socket
    import time

    import grpc
    from tessera.user.v1 import user_service_pb2 as svc
    from tessera.user.v1 import user_service_pb2_grpc

    silent = socket.create_server(("127.0.0.1", 0))  # listens, never accepts nor answers
    try:
        port = silent.getsockname()[1]
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{port}/registry"
        channel = open_channel("registry:///user", [USER_SERVICE], discovery=settings_for(url))
        try:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetUser(svc.GetUserRequest(id="u1"), timeout=0.5)
            took = time.monotonic() - began
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
            assert took < 1.5, f"the call took {took:.1f} s with a 0.5 s deadline"
        finally:
            await channel.close()
    finally:
        silent.close()
