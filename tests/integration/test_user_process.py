"""The user service as a process: grpcurl, health that reflects the database, graceful SIGTERM, bad config."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tessera.user.v1 import user_pb2, user_service_pb2_grpc
from tessera.user.v1 import user_service_pb2 as svc

from tessera_runtime.clients import error_details
from tests.support import postgres
from tests.support.processes import ROOT, ServiceProcess
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_for

GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([GRPCURL, "-plaintext", *args], capture_output=True, text=True, timeout=30)


@pytest.fixture
async def pg_via_proxy():
    """A PostgreSQL database reached through a proxy the test can cut or slow down."""
    name, url = await postgres.create_database()
    proxy = TcpProxy("127.0.0.1", 5432).start()
    yield url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"), proxy
    proxy.close()
    await postgres.drop_database(name)


@pytest.fixture
async def user_via_proxy(pg_via_proxy, tmp_path):
    """The user service process on the proxied database, its proxy, and a stub on a channel to it."""
    url, proxy = pg_via_proxy
    service = ServiceProcess("user", {"TESSERA_DATABASE_URL": url}, tmp_path / "user.log").start()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            yield service, proxy, user_service_pb2_grpc.UserServiceStub(channel)
    finally:
        service.stop()


@pytest.fixture
def sqlite_service(tmp_path):
    service = ServiceProcess("user", {"TESSERA_DATA_DIR": str(tmp_path)}, tmp_path / "user.log").start()
    yield service
    service.stop()


def health(address: str, service: str = "") -> int:
    with grpc.insecure_channel(address) as channel:
        return health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_grpcurl_lists_describes_and_calls(sqlite_service):
    address = sqlite_service.address
    listed = grpcurl(address, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == {"tessera.user.v1.UserService", "grpc.health.v1.Health",
                                          "grpc.reflection.v1alpha.ServerReflection"}
    described = grpcurl(address, "describe", "tessera.user.v1.UserService")
    assert described.returncode == 0 and "rpc CreateUser ( .tessera.user.v1.CreateUserRequest )" in described.stdout
    message = grpcurl(address, "describe", "tessera.user.v1.CreateUserRequest")
    assert message.returncode == 0 and "string request_id = 2;" in message.stdout

    body = json.dumps({"user": {"email": "grace@example.com", "display_name": "Grace"}, "request_id": "g-1"})
    created = grpcurl("-d", body, address, "tessera.user.v1.UserService/CreateUser")
    assert created.returncode == 0, created.stderr
    user = json.loads(created.stdout)["user"]
    assert user["status"] == "USER_STATUS_ACTIVE"
    got = grpcurl("-d", json.dumps({"id": user["id"]}), address, "tessera.user.v1.UserService/GetUser")
    assert json.loads(got.stdout)["user"]["email"] == "grace@example.com"

    bad = grpcurl("-d", json.dumps({"user": {"email": "nope"}, "request_id": "g-2"}), address,
                  "tessera.user.v1.UserService/CreateUser")
    assert bad.returncode == 64 + grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "user.email" in bad.stderr and "user.display_name" in bad.stderr

    for service in ("", "tessera.user.v1.UserService", "liveness"):
        checked = grpcurl("-d", json.dumps({"service": service}), address, "grpc.health.v1.Health/Check")
        assert json.loads(checked.stdout)["status"] == "SERVING"


def test_readiness_follows_the_database(pg_via_proxy, tmp_path):
    url, proxy = pg_via_proxy
    service = ServiceProcess("user", {"TESSERA_DATABASE_URL": url}, tmp_path / "user.log").start()
    try:
        address = service.address
        assert health(address) == health_pb2.HealthCheckResponse.SERVING
        proxy.cut()
        wait_for(lambda: health(address, "tessera.user.v1.UserService") == health_pb2.HealthCheckResponse.NOT_SERVING)
        assert health(address, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        # Liveness does not depend on the database: the process itself is fine.
        assert health(address, "liveness") == health_pb2.HealthCheckResponse.SERVING
        result = grpcurl("-d", '{"service":"tessera.user.v1.UserService"}', address, "grpc.health.v1.Health/Check")
        assert json.loads(result.stdout)["status"] == "NOT_SERVING"
        proxy.restore()
        wait_for(lambda: health(address) == health_pb2.HealthCheckResponse.SERVING)
    finally:
        service.stop()


async def test_calls_while_the_database_is_unreachable_are_unavailable_and_change_nothing(user_via_proxy):
    service, proxy, stub = user_via_proxy
    ada = (await stub.CreateUser(svc.CreateUserRequest(
        user=user_pb2.User(email="ada@example.com", display_name="Ada"), request_id="ada"))).user
    proxy.cut()  # the pooled connections are dropped, and new ones are refused
    calls = {
        "GetUser": lambda: stub.GetUser(svc.GetUserRequest(id=ada.id), timeout=10),
        "CreateUser": lambda: stub.CreateUser(svc.CreateUserRequest(
            user=user_pb2.User(email="bob@example.com", display_name="Bob"), request_id="bob"), timeout=10),
    }
    for name, call in calls.items():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call()
        # UNAVAILABLE, which callers and the mesh retry, not INTERNAL: nothing is wrong with the request.
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (name, err.value)
        info, _ = error_details(err.value)
        assert info.reason == "DATABASE_UNAVAILABLE" and info.domain == "user.tessera.dev", name
        assert "database" in err.value.details()
    proxy.restore()
    # The same calls succeed once the database is back; Bob was not created by the failed call.
    listed = await stub.ListUsers(svc.ListUsersRequest(), timeout=10)
    assert [u.email for u in listed.users] == ["ada@example.com"]
    assert (await calls["GetUser"]()).user.id == ada.id
    assert (await calls["CreateUser"]()).user.email == "bob@example.com"
    assert "the database could not be used in /tessera.user.v1.UserService/GetUser" in service.log_text()


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_or_sigint_finishes_in_flight_calls_refuses_new_ones_and_exits_zero(pg_via_proxy, tmp_path,
                                                                                          stop_signal):
    url, proxy = pg_via_proxy
    service = ServiceProcess("user", {"TESSERA_DATABASE_URL": url, "TESSERA_DRAIN_SECONDS": "0.5",
                                      "TESSERA_GRACE_SECONDS": "20"}, tmp_path / "user.log").start()
    try:
        async with grpc.aio.insecure_channel(service.address) as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            await stub.CreateUser(svc.CreateUserRequest(
                user=user_pb2.User(email="warm@example.com", display_name="Warm"), request_id="warm"))
            proxy.delay = 0.25  # every database round trip now takes a while: calls stay in flight
            calls = [asyncio.ensure_future(stub.CreateUser(svc.CreateUserRequest(
                user=user_pb2.User(email=f"f{i}@example.com", display_name="F"), request_id=f"f{i}"),
                timeout=30)) for i in range(6)]
            await asyncio.sleep(0.3)
            service.proc.send_signal(stop_signal)
            replies = await asyncio.gather(*calls)
            assert len({r.user.id for r in replies}) == 6
            proxy.delay = 0
            # After the drain period the server stops accepting calls; the process then exits.
            deadline = time.monotonic() + 20
            refused = None
            while time.monotonic() < deadline and service.proc.poll() is None:
                try:
                    await stub.GetUser(svc.GetUserRequest(id=str(uuid.uuid4())), timeout=1)
                except grpc.aio.AioRpcError as err:
                    if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        refused = err.code()
                        break
                await asyncio.sleep(0.05)
        assert service.proc.wait(timeout=30) == 0
        if refused is None:  # the process was already gone: a new connection must be refused
            async with grpc.aio.insecure_channel(service.address) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await user_service_pb2_grpc.UserServiceStub(channel).GetUser(
                        svc.GetUserRequest(id=str(uuid.uuid4())), timeout=2)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert '"draining"' in service.log_text() or "draining" in service.log_text()
        assert "Traceback" not in service.log_text()  # SIGINT is a stop, not a KeyboardInterrupt
    finally:
        service.kill()


def test_bad_configuration_stops_the_service_naming_the_variable(tmp_path):
    result = subprocess.run([sys.executable, "-m", "tessera_runtime.cli", "serve", "user"], cwd=ROOT,
                            env={"PATH": "/usr/bin:/bin", "TESSERA_GRPC_PORT": "fifty"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "TESSERA_GRPC_PORT" in result.stderr and "fifty" in result.stderr


@pytest.mark.parametrize(("name", "value"), [
    ("TESSERA_DRAIN_SECONDS", "nan"),  # accepted, the process then never ended on SIGTERM
    ("TESSERA_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:port/tessera"),  # a traceback
    ("TESSERA_AMQP_URL", "amqp://guest:guest@127.0.0.1:port/"),  # a traceback
])
def test_a_value_the_service_cannot_use_stops_it_naming_the_variable(tmp_path, name, value):
    try:
        result = subprocess.run([sys.executable, "-m", "tessera_runtime.cli", "serve", "user"], cwd=ROOT,
                                env={"PATH": "/usr/bin:/bin", "TESSERA_DATA_DIR": str(tmp_path),
                                     "TESSERA_GRPC_PORT": "0", "TESSERA_OUTBOX_RELAY": "false", name: value},
                                capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name}={value} was accepted: the service started")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "configuration error" in result.stderr and name in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_callers_deadline_stops_the_work(user_via_proxy):
    service, proxy, stub = user_via_proxy
    await stub.ListUsers(svc.ListUsersRequest(), timeout=10)  # connections warmed up
    proxy.delay = 0.3
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.CreateUser(svc.CreateUserRequest(
            user=user_pb2.User(email="late@example.com", display_name="Late"), request_id="late"),
            timeout=0.8)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # The server's own log line shows the handler was stopped, not left running to completion.
    ended = ("UserService/CreateUser DEADLINE_EXCEEDED", "UserService/CreateUser CANCELLED")
    await asyncio.to_thread(wait_for, lambda: any(e in service.log_text() for e in ended))
    proxy.delay = 0
    await asyncio.sleep(1)
    listed = await stub.ListUsers(svc.ListUsersRequest(), timeout=10)
    assert [u.email for u in listed.users] == []


def test_migrate_command_creates_the_schema(tmp_path):
    import sqlite3

    data = tmp_path / "fresh" / "nested"
    result = subprocess.run([sys.executable, "-m", "tessera_runtime.cli", "migrate", "user"], cwd=ROOT,
                            env={"PATH": "/usr/bin:/bin", "TESSERA_DATA_DIR": str(data)},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    with sqlite3.connect(data / "user.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        version = conn.execute("SELECT version_num FROM alembic_version").fetchone()[0]
    assert {"users", "user_create_requests", "outbox", "alembic_version"} <= tables
    assert version == "0003"


@pytest.mark.parametrize("url", [
    "postgresql+asyncpg://postgres@127.0.0.1:1/tessera",  # nothing listens there
    "postgresql+asyncpg://postgres@127.0.0.1:5432/tessera_no_such_database",
])
def test_migrate_command_names_a_database_it_cannot_use(url):
    result = subprocess.run([sys.executable, "-m", "tessera_runtime.cli", "migrate", "user"], cwd=ROOT,
                            env={"PATH": "/usr/bin:/bin", "TESSERA_DATABASE_URL": url},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "cannot use the database" in result.stderr and url.split("@")[-1] in result.stderr
