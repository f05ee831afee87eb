"""Service discovery without a mesh against real gRPC servers on ephemeral ports: instances registered in a real
directory registry (or listed statically), filtered by their real gRPC health, and calls balanced over them through
`open_channel`'s channel with its interceptors (deadline, circuit breaker, metrics, tracing)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
from tessera.user.v1 import user_service_pb2 as svc
from tessera.user.v1 import user_service_pb2_grpc

from tessera_runtime.clients import dependency_check, error_details, open_channel
from tessera_runtime.config import CircuitSettings
from tessera_runtime.discovery import (
    BalancedChannel,
    DiscoverySettings,
    FileRegistry,
    HealthFilteredDiscovery,
    InMemoryRegistry,
    ServiceInstance,
)
from tessera_runtime.server import NOT_SERVING, SERVING
from tests.support.discovery import FAST, USER_SERVICE, HeldUsers, Instance, UserServers, answers, serving, until
from tests.support.tcp_proxy import TcpProxy

pytestmark = pytest.mark.integration


@pytest.fixture
async def start_users() -> AsyncIterator[Callable[..., Awaitable[Instance]]]:
    servers = UserServers()
    yield servers.start
    await servers.stop_all()


def registry_settings(tmp_path: Path, weight: int = 1, **overrides) -> DiscoverySettings:
    return DiscoverySettings(registry_dir=tmp_path / "registry", instance_weight=weight,
                             **{**FAST, "deregister_after_seconds": 30.0, **overrides})


async def test_registered_instances_share_calls_by_weight(start_users, tmp_path):
    heavy = await start_users("heavy", settings=registry_settings(tmp_path, weight=3))
    light = await start_users("light", settings=registry_settings(tmp_path, weight=1))
    other = await start_users("other", settings=registry_settings(tmp_path, weight=1))
    files = {json.loads(p.read_text())["port"]: json.loads(p.read_text())
             for p in (tmp_path / "registry" / "user").glob("*.json")}
    assert {port: f["weight"] for port, f in files.items()} == {
        heavy.server.port: 3, light.server.port: 1, other.server.port: 1}
    assert all(f["metadata"]["version"] == "dev" and f["host"] == "127.0.0.1" for f in files.values())

    channel = open_channel("registry:///user", [USER_SERVICE], discovery=registry_settings(tmp_path))
    assert isinstance(channel, BalancedChannel)
    assert await answers(channel, 50) == {"heavy": 30, "light": 10, "other": 10}
    await channel.close()


async def test_static_list_with_round_robin_ignores_weights(start_users):
    first, second = await start_users("first"), await start_users("second")
    address = f"static:///{first.address};weight=5,{second.address}"
    weighted = open_channel(address, [USER_SERVICE], discovery=DiscoverySettings(**FAST))
    assert await answers(weighted, 12) == {"first": 10, "second": 2}
    plain = open_channel(address, [USER_SERVICE], discovery=DiscoverySettings(**FAST, balancing="round_robin"))
    assert await answers(plain, 12) == {"first": 6, "second": 6}
    await weighted.close()
    await plain.close()


async def test_an_instance_slower_to_connect_than_a_check_interval_is_checked_within_the_check_timeout(start_users):
    """The connection to an instance takes longer than a check interval (a loaded host, a slow path) but less than
    the check timeout: its checks pass and it is picked, at the first round and at every later one."""
    slow = await start_users("slow")
    proxy = TcpProxy("127.0.0.1", slow.server.port, delay=0.15).start()  # the handshake takes 0.3 s or more
    try:
        channel = open_channel(f"static:///127.0.0.1:{proxy.port}", [USER_SERVICE],
                               discovery=DiscoverySettings(check_seconds=0.1, check_timeout_seconds=3.0))
        try:
            assert await answers(channel, 3) == {"slow": 3}
            await asyncio.sleep(0.5)  # several rounds more
            assert serving(channel) == {f"127.0.0.1:{proxy.port}"}
        finally:
            await channel.close()
    finally:
        proxy.close()


async def test_a_not_serving_instance_is_skipped_until_it_serves_again(start_users, tmp_path):
    kept = await start_users("kept", settings=registry_settings(tmp_path))
    flapping = await start_users("flapping", settings=registry_settings(tmp_path))
    channel = open_channel("registry:///user", [USER_SERVICE], discovery=registry_settings(tmp_path))
    assert await answers(channel, 4) == {"kept": 2, "flapping": 2}

    await flapping.server.health.set("", NOT_SERVING)
    await until(lambda: serving(channel) == {kept.address})
    assert await answers(channel, 10) == {"kept": 10}

    await flapping.server.health.set("", SERVING)
    await until(lambda: serving(channel) == {kept.address, flapping.address})
    assert await answers(channel, 10) == {"kept": 5, "flapping": 5}
    await channel.close()


async def test_a_gracefully_stopped_instance_deregisters_and_calls_keep_succeeding(start_users, tmp_path):
    staying = await start_users("staying", settings=registry_settings(tmp_path))
    # The drain outlasts what discovery takes to see the deregistration at worst, a check interval and a round of
    # checks (0.1 + 0.5 s), as TESSERA_DRAIN_SECONDS must in production: calls stop being sent to it before it stops.
    leaving = await start_users("leaving", settings=registry_settings(tmp_path), drain=1.0)
    channel = open_channel("registry:///user", [USER_SERVICE], discovery=registry_settings(tmp_path))
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    assert await answers(channel, 2) == {"staying": 1, "leaving": 1}
    stopping = asyncio.get_running_loop().create_task(leaving.server.stop())
    seen: collections.Counter[str] = collections.Counter()
    while not stopping.done():  # every call made while it drains and stops succeeds
        seen[(await stub.GetUser(svc.GetUserRequest(id="x"))).user.display_name] += 1
    await stopping
    assert seen["staying"] > 0
    assert [p.name for p in (tmp_path / "registry" / "user").glob("*.json")] == \
        [f"{staying.server.registration.instances[0].id}.json"]
    await until(lambda: serving(channel) == {staying.address})
    assert await answers(channel, 5) == {"staying": 5}
    await channel.close()


async def test_a_killed_instance_is_not_picked_and_pruned_after_the_configured_time(start_users, tmp_path):
    survivor = await start_users("survivor", settings=registry_settings(tmp_path))
    victim = await start_users("victim", settings=registry_settings(tmp_path))
    victim_file = tmp_path / "registry" / "user" / f"{victim.server.registration.instances[0].id}.json"
    settings = registry_settings(tmp_path, deregister_after_seconds=0.6)
    channel = open_channel("registry:///user", [USER_SERVICE], discovery=settings)
    assert await answers(channel, 2) == {"survivor": 1, "victim": 1}

    crashed_at = time.monotonic()  # no check of the victim has failed before this
    victim.server.registration._task.cancel()  # a crash: nothing deregisters it
    await victim.server.server.stop(None)
    # The very next calls succeed: a call whose connection is refused goes to another instance.
    assert await answers(channel, 6) == {"survivor": 6}
    await until(lambda: not victim_file.exists())
    # Pruned once its checks have failed for the configured time, not when a call found it unreachable. Measured
    # from before the crash, not by looking at the file after the calls: on a loaded host they may take longer.
    assert time.monotonic() - crashed_at >= 0.6
    assert len(list((tmp_path / "registry" / "user").glob("*.json"))) == 1
    assert serving(channel) == {survivor.address}
    await channel.close()


async def test_no_healthy_instance_is_unavailable_naming_the_service_then_the_circuit_opens(start_users, tmp_path):
    only = await start_users("only", settings=registry_settings(tmp_path))
    await only.server.health.set("", NOT_SERVING)
    channel = open_channel("registry:///user", [USER_SERVICE], discovery=registry_settings(tmp_path),
                           circuit=CircuitSettings(failure_threshold=2, open_seconds=30))
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    reasons = []
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetUser(svc.GetUserRequest(id="x"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        info, _ = error_details(err.value)
        reasons.append(info.reason)
        if info.reason == "NO_HEALTHY_INSTANCE":
            assert info.domain == "tessera.dev"
            assert dict(info.metadata) == {"service": "user", "dependency": "registry:///user"}
            assert err.value.details() == "no healthy instance of user"
    assert reasons == ["NO_HEALTHY_INSTANCE", "NO_HEALTHY_INSTANCE", "CIRCUIT_OPEN"]
    with pytest.raises(grpc.aio.AioRpcError):  # the readiness probe passes the breaker by, and finds nobody
        await dependency_check("user-service", channel).check()
    await channel.close()


async def test_readiness_probe_and_order_clients_work_through_the_registry(start_users, tmp_path):
    from tessera_order.adapters.downstream import DownstreamChannels, GrpcCustomerDirectory

    await start_users("ada", settings=registry_settings(tmp_path))
    channels = DownstreamChannels("registry:///user", "static:///127.0.0.1:1", "127.0.0.1:1", default_deadline=2,
                                  discovery=registry_settings(tmp_path))
    assert isinstance(channels.user, BalancedChannel) and isinstance(channels.inventory, BalancedChannel)
    assert not isinstance(channels.payment, BalancedChannel)  # a plain address is a plain channel, as before
    assert await dependency_check("user-service", channels.user).check() is True
    customer = await GrpcCustomerDirectory(channels.user).get_customer("c-1")
    assert customer.id == "c-1"
    await channels.close()


async def test_a_closed_balanced_channel_fails_its_calls_as_a_closed_channel_does_and_discovers_no_more(
        start_users, tmp_path):
    await start_users("ada", settings=registry_settings(tmp_path))
    channel = open_channel("registry:///user", [USER_SERVICE], discovery=registry_settings(tmp_path))
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    assert await answers(channel, 1) == {"ada": 1}
    await channel.close()

    def discovering() -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("discovery ")]

    assert discovering() == []
    for _ in range(2):
        with pytest.raises(grpc.aio.UsageError, match="Channel is closed"):
            await stub.GetUser(svc.GetUserRequest(id="x"))
    with pytest.raises(grpc.aio.UsageError, match="Channel is closed"):  # a stub made after the close too
        await user_service_pb2_grpc.UserServiceStub(channel).GetUser(svc.GetUserRequest(id="x"))
    with pytest.raises(grpc.aio.UsageError, match="Channel is closed"):
        await dependency_check("user-service", channel).check()
    assert discovering() == [] and channel.discovery.discover() == []


async def test_closing_closes_the_channel_of_a_deregistered_instance_with_calls_still_in_flight(
        start_users, tmp_path):
    held = HeldUsers("held")
    leaving = await start_users("held", settings=registry_settings(tmp_path), servicer=held)
    channel = open_channel("registry:///user", [USER_SERVICE], discovery=registry_settings(tmp_path))
    stub = user_service_pb2_grpc.UserServiceStub(channel)

    async def get_user():
        return await stub.GetUser(svc.GetUserRequest(id="x"), timeout=30)

    call = asyncio.get_running_loop().create_task(get_user())
    await until(lambda: held.held == 1)
    forgotten = channel.discovery.channel_for(channel.discovery.discover()[0])
    await leaving.server.registration.stop()  # deregistered, as a graceful stop does first
    await until(lambda: serving(channel) == set())  # forgotten: its channel stays open for the call in flight
    assert not call.done() and forgotten.get_state() is not grpc.ChannelConnectivity.SHUTDOWN

    await channel.close()  # the call ends then, and the channel is closed, not left open until collected
    with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
        await asyncio.wait_for(call, 5)
    assert forgotten.get_state() is grpc.ChannelConnectivity.SHUTDOWN
    held.release.set()


async def test_the_channel_of_a_deregistered_instance_closes_once_its_calls_in_flight_end(start_users, tmp_path):
    held = HeldUsers("held")
    leaving = await start_users("held", settings=registry_settings(tmp_path), servicer=held)
    channel = open_channel("registry:///user", [USER_SERVICE], discovery=registry_settings(tmp_path))
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    call = asyncio.get_running_loop().create_task(answers(channel, 1))
    await until(lambda: held.held == 1)
    forgotten = channel.discovery.channel_for(channel.discovery.discover()[0])
    await leaving.server.registration.stop()
    await until(lambda: serving(channel) == set())
    await asyncio.sleep(0.3)
    assert not call.done() and forgotten.get_state() is not grpc.ChannelConnectivity.SHUTDOWN

    held.release.set()
    assert await call == {"held": 1}  # answered on the channel kept open for it
    await until(lambda: forgotten.get_state() is grpc.ChannelConnectivity.SHUTDOWN)  # then closed, not after 60 s
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.GetUser(svc.GetUserRequest(id="x"))  # no healthy instance left
    await channel.close()


class ReadOnlyRegistry(InMemoryRegistry):
    """A registry on a read-only standby: it refuses deletions, and its reads too once `reads_fail` is set (they
    delete stale registrations first)."""

    prunes = True
    reads_fail = False

    async def deregister(self, instance: ServiceInstance) -> None:
        raise RuntimeError("cannot execute DELETE in a read-only transaction")

    async def instances(self, service: str) -> list[ServiceInstance]:
        if self.reads_fail:
            raise RuntimeError("cannot execute DELETE in a read-only transaction")
        return await super().instances(service)


async def test_an_instance_or_a_registry_failing_unexpectedly_spoils_no_round_of_checks(start_users, caplog):
    good, odd = await start_users("good"), await start_users("odd")
    registry = ReadOnlyRegistry([
        ServiceInstance(id="good", service="user", host="127.0.0.1", port=good.server.port),
        # A registration written by hand whose health check name cannot be sent (not UTF-8).
        ServiceInstance(id="odd", service="user", host="127.0.0.1", port=odd.server.port, health_check="\ud800"),
        ServiceInstance(id="dead", service="user", host="127.0.0.1", port=1)])  # refused
    caplog.set_level(logging.INFO, logger="tessera.discovery")
    discovery = HealthFilteredDiscovery("registry:///user", "user", registry,
                                        DiscoverySettings(**{**FAST, "deregister_after_seconds": 0.2}))
    await discovery.ready()
    assert [i.address for i in discovery.discover()] == [good.address]
    errors = lambda text: [r for r in caplog.records if r.getMessage().startswith(text)]  # noqa: E731
    await until(lambda: errors("instance deregistration failed"))
    await asyncio.sleep(0.3)  # several rounds more
    assert [i.address for i in discovery.discover()] == [good.address]
    assert [r.address for r in errors("health check failed")] == [odd.address]  # once, not every round
    assert sorted(r.address for r in errors("instance deregistration failed")) == sorted(
        ["127.0.0.1:1", odd.address])  # both fail their checks long enough to be pruned; each said once

    registry.reads_fail = True
    await until(lambda: errors("registry cannot be read"))
    await asyncio.sleep(0.3)  # several rounds more
    assert len(errors("registry cannot be read")) == 1
    await good.server.health.set("", NOT_SERVING)  # the instances last read are still checked
    await until(lambda: discovery.discover() == [])
    await discovery.close()


def test_concurrent_registrations_are_all_kept_and_never_read_half_written(tmp_path):
    registry = FileRegistry(tmp_path / "registry")
    instances = [ServiceInstance(id=f"inventory-{n}", service="inventory", host="127.0.0.1", port=40000 + n,
                                 weight=1 + n % 3, metadata={"version": "v" * 2000})
                 for n in range(200)]
    stop = threading.Event()
    torn: list[str] = []

    def read_all() -> None:
        while not stop.is_set():
            for path in (tmp_path / "registry" / "inventory").glob("[!.]*.json"):
                try:
                    json.loads(path.read_text())
                except FileNotFoundError:
                    continue
                except ValueError:
                    torn.append(path.name)

    reader = threading.Thread(target=read_all)
    (tmp_path / "registry" / "inventory").mkdir(parents=True)
    reader.start()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(registry.register_now, instances))
        list(pool.map(registry.register_now, instances))  # registering again replaces, never duplicates
        list(pool.map(registry.deregister_now, instances[:50]))
    stop.set()
    reader.join()
    assert torn == []
    assert sorted(i.id for i in registry.instances_now("inventory")) == sorted(i.id for i in instances[50:])
    assert list((tmp_path / "registry" / "inventory").glob(".*")) == []  # no temporary file left behind


def test_a_registration_replacing_a_crashed_processes_is_never_listed_beside_it(tmp_path, monkeypatch):
    """An instance started on the port of a process killed without a graceful stop: whoever lists the directory at
    any moment sees the crashed process's registration or the new one, never both (which `tessera registry list`
    would show, and from which callers would take the address's weight)."""
    registry = FileRegistry(tmp_path / "registry")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()  # the id of a process that has ended
    crashed = ServiceInstance(id="inventory-crashed", service="inventory", host="127.0.0.1", port=40001,
                              metadata={"pid": gone})
    restarted = ServiceInstance(id="inventory-restarted", service="inventory", host="127.0.0.1", port=40001,
                                weight=3, metadata={"pid": str(os.getpid())})
    registry.register_now(crashed)
    listed: list[list[str]] = []
    real_replace = os.replace

    def replace(source, destination) -> None:  # the moment the new registration appears
        real_replace(source, destination)
        listed.append([i.id for i in registry.instances_now("inventory")])

    monkeypatch.setattr(os, "replace", replace)
    registry.register_now(restarted)
    assert listed == [["inventory-restarted"]]
    assert [(i.id, i.weight) for i in registry.instances_now("inventory")] == [("inventory-restarted", 3)]


async def test_registry_list_shows_each_instance_with_its_health_and_weight(start_users, tmp_path, capsys,
                                                                           monkeypatch):
    from tessera_runtime.cli import main

    serving_one = await start_users("serving", settings=registry_settings(tmp_path, weight=3))
    draining = await start_users("draining", settings=registry_settings(tmp_path))
    await draining.server.health.set("", NOT_SERVING)
    gone = ServiceInstance(id="user-gone", service="user", host="127.0.0.1", port=1, weight=2,
                           metadata={"version": "v0"})
    FileRegistry(tmp_path / "registry").register_now(gone)

    assert await asyncio.to_thread(main, ["registry", "list", "--dir", str(tmp_path / "registry")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["SERVICE", "ADDRESS", "WEIGHT", "HEALTH", "VERSION", "INSTANCE"]
    rows = {line.split()[1]: line.split() for line in lines[1:]}
    assert rows[serving_one.address][:5] == ["user", serving_one.address, "3", "SERVING", "dev"]
    assert rows[draining.address][:5] == ["user", draining.address, "1", "NOT_SERVING", "dev"]
    assert rows["127.0.0.1:1"] == ["user", "127.0.0.1:1", "2", "UNREACHABLE", "(UNAVAILABLE)", "v0", "user-gone"]

    assert await asyncio.to_thread(main, ["registry", "list", "--dir", str(tmp_path / "none")]) == 0
    assert capsys.readouterr().out.strip() == f"no instance registered in {tmp_path / 'none'}"

    monkeypatch.delenv("TESSERA_REGISTRY_DIR", raising=False)
    monkeypatch.delenv("TESSERA_REGISTRY_URL", raising=False)
    assert await asyncio.to_thread(main, ["registry", "list"]) == 2
    assert "no registry: set TESSERA_REGISTRY_DIR or TESSERA_REGISTRY_URL, or pass --dir or --url" \
        in capsys.readouterr().err


async def test_a_registration_file_edited_by_hand_into_something_unreadable_is_reported_not_silently_skipped(
        start_users, tmp_path, capsys, caplog):
    from tessera_runtime.cli import main

    listed = await start_users("listed", settings=registry_settings(tmp_path))
    directory = tmp_path / "registry" / "user"
    typo = directory / "user-by-hand.json"
    typo.write_text('{"id": "user-by-hand", "service": "user", "host": "127.0.0.1", "port": "5o051", "weight": 3}')
    torn = directory / "user-torn.json"
    torn.write_text('{"id": "user-torn", "service": "us')
    elsewhere = directory / "user-copied.json"
    elsewhere.write_text(json.dumps({"id": "user-copied", "service": "inventory", "host": "127.0.0.1", "port": 1}))

    assert await asyncio.to_thread(main, ["registry", "list", "--dir", str(tmp_path / "registry")]) == 0
    out, err = capsys.readouterr()
    assert [line.split()[1] for line in out.splitlines()[1:]] == [listed.address]
    for path, why in ((typo, "5o051"), (torn, "not JSON"), (elsewhere, "inventory")):
        assert any(str(path) in line and why in line for line in err.splitlines()), (path, err)

    # A caller's discovery says so in its log, once per file and error, not at every round.
    caplog.set_level(logging.WARNING, logger="tessera.discovery")
    caplog.clear()
    channel = open_channel("registry:///user", [USER_SERVICE], discovery=registry_settings(tmp_path))
    try:
        assert [i.address for i in await channel.discovery.refresh()] == [listed.address]
        await channel.discovery.refresh()
    finally:
        await channel.close()
    skipped = [r for r in caplog.records if r.getMessage().startswith("registry file skipped")]
    assert sorted(r.path for r in skipped) == sorted(str(p) for p in (typo, torn, elsewhere)), skipped


async def test_registry_list_refuses_a_timeout_that_would_show_every_instance_unreachable(start_users, tmp_path,
                                                                                          capsys):
    from tessera_runtime.cli import main

    await start_users("listed", settings=registry_settings(tmp_path))
    for timeout in ("0", "-1", "nan", "inf"):
        with pytest.raises(SystemExit) as exited:
            await asyncio.to_thread(main, ["registry", "list", "--dir", str(tmp_path / "registry"),
                                           "--timeout", timeout])
        assert exited.value.code == 2
        err = capsys.readouterr().err
        assert "--timeout" in err and "more than 0" in err, err


async def test_a_call_that_waited_for_discoverys_first_round_has_only_the_rest_of_its_deadline():
    """Discovery's first round waits for an instance whose health check answers slowly (a busy instance); the call
    then sent to it, which it holds, fails DEADLINE_EXCEEDED at the caller's deadline, not a whole deadline after
    the first round ended (and the instance is told the deadline that is left)."""
    import time

    from grpc_health.v1 import health_pb2, health_pb2_grpc

    class SlowHealth(health_pb2_grpc.HealthServicer):
        async def Check(self, request, context):
            await asyncio.sleep(0.6)
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    class HeldTelling(HeldUsers):
        remaining: list[float] = []

        async def GetUser(self, request, context):
            self.remaining.append(context.time_remaining())
            return await super().GetUser(request, context)

    held = HeldTelling("held")
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(SlowHealth(), server)
    user_service_pb2_grpc.add_UserServiceServicer_to_server(held, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        channel = open_channel(f"static:///127.0.0.1:{port}", [USER_SERVICE],
                               discovery=DiscoverySettings(check_seconds=5.0, check_timeout_seconds=2.0))
        try:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            began = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.GetUser(svc.GetUserRequest(id="u1"), timeout=1.0)
            took = time.monotonic() - began
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
            assert held.held == 1  # it reached the instance: the deadline passed while the instance held it
            assert took < 1.35, f"the call took {took:.2f} s with a 1 s deadline"
            assert held.remaining[0] < 0.6, held.remaining
        finally:
            await channel.close()
    finally:
        held.release.set()
        await server.stop(0)
