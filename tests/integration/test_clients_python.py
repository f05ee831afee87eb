"""The Python client package against real servers: typed calls, error details, deadlines, retries, the token."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pb2, json_format
from tessera.analytics.v1 import analytics_service_pb2 as analytics_api
from tessera.order.v1 import order_service_pb2
from tessera.user.v1 import user_pb2
from tessera.user.v1 import user_service_pb2 as user_api

from tessera_client import RpcFailure, aio_connect, connect, retryable_methods, service_config
from tessera_client.services import SERVICES
from tests.support.processes import ROOT, ServiceProcess
from tests.support.tcp_proxy import TcpProxy

EXAMPLE = ROOT / "clients" / "python" / "examples" / "quickstart.py"
DESCRIPTORS = ROOT / "gen" / "descriptors" / "tessera.pb"
TS_CLIENTS = ROOT / "clients" / "ts" / "src" / "index.ts"


@pytest.fixture(scope="module")
def user_service(tmp_path_factory) -> Iterator[ServiceProcess]:
    data = tmp_path_factory.mktemp("clients-user")
    # No broker: the service keeps its events in the outbox, and these tests publish into no one else's broker.
    env = {"TESSERA_DATA_DIR": str(data), "TESSERA_ENV": "test", "TESSERA_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F"}
    service = ServiceProcess("user", env, data / "user.log").start()
    yield service
    service.stop()


@pytest.fixture(scope="module")
def analytics_service(tmp_path_factory) -> Iterator[ServiceProcess]:
    data = tmp_path_factory.mktemp("clients-analytics")
    # No broker: nothing is counted, and every day of the contract reads as zeros.
    env = {"TESSERA_DATA_DIR": str(data), "TESSERA_ENV": "test", "TESSERA_AMQP_URL": "amqp://guest:guest@127.0.0.1:1/%2F"}
    service = ServiceProcess("analytics", env, data / "analytics.log").start()
    yield service
    service.stop()


def new_user(suffix: str = "") -> user_api.CreateUserRequest:
    tag = uuid.uuid4().hex[:10]
    return user_api.CreateUserRequest(
        user=user_pb2.User(email=f"py-{tag}{suffix}@example.com", display_name="Py Client"),
        request_id=f"py-{tag}",
    )


class ScriptedUserService:
    """A real gRPC server for tessera.user.v1.UserService whose answers a test scripts: it records each call's
    metadata and deadline and fails the first `failures[method]` calls of a method with UNAVAILABLE. It lets the
    tests observe what the client puts on the wire, which the real service does not report."""

    def __init__(self, failures: dict[str, int] | None = None) -> None:
        self.failures = dict(failures or {})
        self.calls: dict[str, int] = {}
        self.metadata: list[dict[str, str]] = []
        self.time_remaining: list[float | None] = []
        self._lock = threading.Lock()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        service = user_api.DESCRIPTOR.services_by_name["UserService"]
        handlers = {}
        for method in service.methods:
            request_cls = getattr(user_api, method.input_type.name)
            response_cls = getattr(user_api, method.output_type.name)
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                self._answer(method.name, response_cls),
                request_deserializer=request_cls.FromString,
                response_serializer=response_cls.SerializeToString,
            )
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.full_name, handlers),))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _answer(self, name: str, response_cls):
        def handle(request, context: grpc.ServicerContext):
            with self._lock:
                self.calls[name] = self.calls.get(name, 0) + 1
                self.metadata.append(dict(context.invocation_metadata()))
                self.time_remaining.append(context.time_remaining())
                fail = self.calls[name] <= self.failures.get(name, 0)
            if fail:
                context.abort(grpc.StatusCode.UNAVAILABLE, "scripted outage")
            return response_cls()

        return handle

    def stop(self) -> None:
        self.server.stop(grace=None).wait(10)


@pytest.fixture
def scripted() -> Iterator[type[ScriptedUserService]]:
    servers: list[ScriptedUserService] = []

    def make(failures: dict[str, int] | None = None) -> ScriptedUserService:
        server = ScriptedUserService(failures)
        servers.append(server)
        return server

    yield make  # type: ignore[misc]
    for server in servers:
        server.stop()


def test_typed_calls_and_error_details(user_service):
    with connect(user_service.address) as tessera:
        request = new_user()
        created = tessera.users.CreateUser(request).user
        assert created.status == user_pb2.USER_STATUS_ACTIVE and created.version == 1
        assert tessera.users.CreateUser(request).user == created, "a repeated request_id returns the first result"
        assert tessera.users.GetUser(user_api.GetUserRequest(id=created.id)).user == created

        with pytest.raises(grpc.RpcError) as missing:
            tessera.users.GetUser(user_api.GetUserRequest(id=str(uuid.uuid4())))
        failure = RpcFailure.of(missing.value)
        assert failure.code == grpc.StatusCode.NOT_FOUND
        assert failure.reason == "USER_NOT_FOUND" and failure.error_info.domain == "user.tessera.dev"
        assert failure.bad_request is None and failure.field_violations == {}

        with pytest.raises(grpc.RpcError) as invalid:
            tessera.users.CreateUser(user_api.CreateUserRequest(
                user=user_pb2.User(email="not-an-address", display_name=""), request_id="py-invalid"))
        failure = RpcFailure.of(invalid.value)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT and failure.reason == "INVALID_ARGUMENT"
        assert set(failure.field_violations) == {"user.email", "user.display_name"}


async def test_asyncio_client_pages_and_reads_errors(user_service):
    async with aio_connect(user_service.address) as tessera:
        ids = [(await tessera.users.CreateUser(new_user())).user.id for _ in range(3)]
        seen: list[str] = []
        token = ""
        while True:
            page = await tessera.users.ListUsers(user_api.ListUsersRequest(page_size=2, page_token=token))
            assert len(page.users) <= 2
            seen += [u.id for u in page.users]
            token = page.next_page_token
            if not token:
                break
        assert len(seen) == len(set(seen)), "paging repeated a user"
        assert set(ids) <= set(seen)

        with pytest.raises(grpc.aio.AioRpcError) as bad_page:
            await tessera.users.ListUsers(user_api.ListUsersRequest(page_size=-1))
        failure = RpcFailure.of(bad_page.value)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in failure.field_violations


def test_retry_policy_is_derived_from_the_contracts():
    config = json.loads(service_config())
    names = {(n["service"], n["method"]) for n in config["methodConfig"][0]["name"]}
    expected = {(s.descriptor.full_name, m.name) for s in SERVICES for m in s.descriptor.methods
                if m.GetOptions().idempotency_level != m.GetOptions().IDEMPOTENCY_UNKNOWN}
    assert names == expected
    assert ("tessera.user.v1.UserService", "GetUser") in names
    assert ("tessera.order.v1.OrderService", "CancelOrder") in names
    assert ("tessera.order.v1.OrderService", "CreateOrder") not in names
    assert ("tessera.user.v1.UserService", "CreateUser") not in names
    order = order_service_pb2.DESCRIPTOR.services_by_name["OrderService"]
    assert retryable_methods(order) == ["GetOrder", "ListOrders", "CancelOrder"]
    assert json.loads(service_config(max_attempts=1)) == {"methodConfig": []}
    with pytest.raises(ValueError, match="max_attempts"):
        service_config(max_attempts=6)
    with pytest.raises(ValueError, match="timeout"):
        connect("127.0.0.1:1", timeout=0)


def test_every_service_of_the_contracts_has_a_client_in_python_and_typescript():
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTORS.read_bytes()).file
    contracts = {f"{f.package}.{s.name}" for f in files if f.package.startswith("tessera.") for s in f.service}
    assert "tessera.analytics.v1.AnalyticsService" in contracts
    assert {s.descriptor.full_name for s in SERVICES} == contracts
    typescript = TS_CLIENTS.read_text()
    with connect("127.0.0.1:1") as tessera:
        for service in SERVICES:
            stub = getattr(tessera, service.attribute)
            assert all(callable(getattr(stub, m.name, None)) for m in service.descriptor.methods), service.attribute
            name = service.descriptor.name
            assert f"  {service.attribute}: Client<typeof {name}>;" in typescript, name
            assert f"    {service.attribute}: createClient({name}, transport)," in typescript, name


def test_analytics_reads_days_and_names_the_bad_field(analytics_service):
    with connect(analytics_service.address) as tessera:
        day = tessera.analytics.GetDailyMetrics(analytics_api.GetDailyMetricsRequest(date="2026-03-01")).metrics
        assert day.date == "2026-03-01" and day.users_registered == 0 and list(day.revenue) == []
        first = tessera.analytics.ListDailyMetrics(analytics_api.ListDailyMetricsRequest(
            start_date="2026-02-27", end_date="2026-03-01", page_size=2))
        rest = tessera.analytics.ListDailyMetrics(analytics_api.ListDailyMetricsRequest(
            start_date="2026-02-27", end_date="2026-03-01", page_size=2, page_token=first.next_page_token))
        assert [d.date for d in [*first.daily_metrics, *rest.daily_metrics]] == [
            "2026-02-27", "2026-02-28", "2026-03-01"]
        assert rest.next_page_token == ""

        with pytest.raises(grpc.RpcError) as invalid:
            tessera.analytics.ListDailyMetrics(analytics_api.ListDailyMetricsRequest(
                start_date="2026-03-01", end_date="2026-02-01"))
        failure = RpcFailure.of(invalid.value)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT and failure.reason == "INVALID_ARGUMENT"
        assert failure.error_info.domain == "analytics.tessera.dev"
        assert list(failure.field_violations) == ["end_date"]


async def test_asyncio_client_reads_an_analytics_summary(analytics_service):
    async with aio_connect(analytics_service.address) as tessera:
        summary = (await tessera.analytics.GetMetricsSummary(analytics_api.GetMetricsSummaryRequest(
            start_date="2026-03-01", end_date="2026-03-07"))).summary
        assert (summary.start_date, summary.end_date) == ("2026-03-01", "2026-03-07")
        assert summary.totals.orders_confirmed == 0
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await tessera.analytics.GetDailyMetrics(analytics_api.GetDailyMetricsRequest(date="2026-02-30"))
        failure = RpcFailure.of(invalid.value)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT and list(failure.field_violations) == ["date"]


def test_idempotent_methods_are_retried_and_others_are_not(scripted):
    server = scripted({"GetUser": 2, "UpdateUser": 2, "CreateUser": 1})
    with connect(server.address, max_attempts=4) as tessera:
        tessera.users.GetUser(user_api.GetUserRequest(id="x"))
        tessera.users.UpdateUser(user_api.UpdateUserRequest())
        with pytest.raises(grpc.RpcError) as created:
            tessera.users.CreateUser(user_api.CreateUserRequest())
    assert RpcFailure.of(created.value).code == grpc.StatusCode.UNAVAILABLE
    assert server.calls == {"GetUser": 3, "UpdateUser": 3, "CreateUser": 1}


def test_retries_stop_at_max_attempts(scripted):
    server = scripted({"GetUser": 10})
    with connect(server.address, max_attempts=3) as tessera, pytest.raises(grpc.RpcError) as failed:
        tessera.users.GetUser(user_api.GetUserRequest(id="x"))
    assert RpcFailure.of(failed.value).code == grpc.StatusCode.UNAVAILABLE
    assert server.calls == {"GetUser": 3}


async def test_token_and_deadline_go_on_every_call(scripted):
    server = scripted()
    with connect(server.address, token="tok-123", timeout=7.0) as tessera:
        tessera.users.GetUser(user_api.GetUserRequest(id="x"))
        tessera.users.GetUser(user_api.GetUserRequest(id="x"), timeout=60.0)
        tessera.users.GetUser(user_api.GetUserRequest(id="x"), metadata=(("authorization", "Bearer mine"),))
    async with aio_connect(server.address, token="tok-aio", timeout=7.0) as tessera:
        await tessera.users.GetUser(user_api.GetUserRequest(id="x"))
    with connect(server.address) as tessera:
        tessera.users.GetUser(user_api.GetUserRequest(id="x"))
    tokens = [m.get("authorization") for m in server.metadata]
    assert tokens == ["Bearer tok-123", "Bearer tok-123", "Bearer mine", "Bearer tok-aio", None]
    remaining = server.time_remaining
    # The default deadline (7 s) is on calls that set none; a call's own timeout (60 s) wins over it; without a
    # timeout argument the default is 5 s. gRPC rounds the deadline it sends up a little, hence the margins.
    assert all(r is not None for r in remaining)
    assert remaining[0] <= 8 and remaining[2] <= 8 and remaining[3] <= 8
    assert remaining[1] > 30
    assert remaining[4] <= 6


def test_default_deadline_ends_a_call_on_a_stalled_link(user_service):
    proxy = TcpProxy("127.0.0.1", user_service.port, delay=3.0).start()
    try:
        with connect(f"127.0.0.1:{proxy.port}", timeout=0.5) as tessera, pytest.raises(grpc.RpcError) as slow:
            tessera.users.GetUser(user_api.GetUserRequest(id=str(uuid.uuid4())))
        assert RpcFailure.of(slow.value).code == grpc.StatusCode.DEADLINE_EXCEEDED
    finally:
        proxy.close()


def test_unreachable_service_fails_unavailable_after_retries(scripted):
    server = scripted()
    address = server.address
    server.stop()
    with connect(address, timeout=10.0) as tessera, pytest.raises(grpc.RpcError) as down:
        tessera.users.GetUser(user_api.GetUserRequest(id="x"))
    assert RpcFailure.of(down.value).code == grpc.StatusCode.UNAVAILABLE


def test_example_script(user_service):
    email = f"example-{uuid.uuid4().hex[:8]}@example.com"
    run = subprocess.run([sys.executable, str(EXAMPLE), "--target", user_service.address, "--email", email],
                         capture_output=True, text=True, timeout=60, cwd=Path(ROOT))
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0].startswith("created ") and "USER_STATUS_ACTIVE version 1" in lines[0]
    read_back = json.loads(lines[1].removeprefix("read back: "))
    assert read_back["email"] == email and read_back["version"] == "1"
    json_format.ParseDict(read_back, user_pb2.User())
    assert "unknown id: NOT_FOUND USER_NOT_FOUND (user.tessera.dev)" in lines
    assert any(line.startswith("invalid input: INVALID_ARGUMENT; user.display_name: ") and "user.email: " in line
               for line in lines)
