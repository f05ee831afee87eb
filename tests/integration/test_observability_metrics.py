"""RED and business metrics scraped from a real server's /metrics endpoint and parsed with prometheus_client."""

from __future__ import annotations

import asyncio
import gc
import socket
import time
import urllib.error
import urllib.request
import uuid

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tessera.user.v1 import user_pb2, user_service_pb2_grpc
from tessera.user.v1 import user_service_pb2 as svc

from tessera_runtime import context as callctx
from tessera_runtime.clients import open_channel
from tessera_runtime.errors import DeadlineExceeded, NotFound
from tessera_runtime.server import ServiceModule, create_server
from tests.integration.conftest import settings_for
from tests.support.waiting import eventually

USER_SERVICE = svc.DESCRIPTOR.services_by_name["UserService"]
SERVICE = USER_SERVICE.full_name

BUSINESS_METRICS = (
    "tessera_orders_confirmed", "tessera_orders_failed", "tessera_orders_compensated",
    "tessera_saga_duration_seconds", "tessera_saga_compensation_failures", "tessera_outbox_backlog",
    "tessera_outbox_publish_lag_seconds", "tessera_outbox_oldest_unpublished_seconds", "tessera_outbox_published",
    "tessera_outbox_publish_failures", "tessera_outbox_events_parked", "tessera_outbox_parked",
    "tessera_consumer_processed", "tessera_consumer_duplicates", "tessera_consumer_retried",
    "tessera_consumer_dead_lettered", "tessera_inventory_reservation_expiries",
)


class Scrape:
    """One parsed scrape of a /metrics endpoint."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}

    def value(self, sample_name: str, **labels: str) -> float:
        for family in self.families.values():
            for sample in family.samples:
                if sample.name == sample_name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def buckets(self, histogram: str, **labels: str) -> dict[float, float]:
        family = self.families[histogram]
        return {float(s.labels["le"]): s.value for s in family.samples
                if s.name == f"{histogram}_bucket" and all(s.labels.get(k) == v for k, v in labels.items())}


async def scrape(port: int) -> Scrape:
    def fetch() -> tuple[str, str]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            return reply.headers["Content-Type"], reply.read().decode()

    content_type, text = await asyncio.to_thread(fetch)
    assert content_type.startswith("text/plain")
    return Scrape(text)


@pytest.fixture
async def user_with_metrics(tmp_path):
    from tessera_user import bootstrap

    module = await bootstrap.build(settings_for("user", f"sqlite+aiosqlite:///{tmp_path / 'user.db'}"))
    server, port = await create_server(module, readiness_interval=0.2, metrics_port=0)
    yield server, port
    await server.stop()


def new_user() -> svc.CreateUserRequest:
    return svc.CreateUserRequest(user=user_pb2.User(email=f"m-{uuid.uuid4().hex[:8]}@example.com",
                                                    display_name="M"), request_id=uuid.uuid4().hex)


async def test_server_and_client_red_metrics_move_by_the_calls_made(user_with_metrics):
    server, port = user_with_metrics
    before = await scrape(server.metrics.port)
    channel = open_channel(f"127.0.0.1:{port}", [USER_SERVICE])
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    try:
        for _ in range(3):
            await stub.CreateUser(new_user())
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetUser(svc.GetUserRequest(id=str(uuid.uuid4())))
    finally:
        await channel.close()
    after = await scrape(server.metrics.port)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    for side in ("server", "client"):
        handled = f"grpc_{side}_handled_total"
        assert delta(handled, grpc_service=SERVICE, grpc_method="CreateUser", grpc_code="OK") == 3
        assert delta(handled, grpc_service=SERVICE, grpc_method="GetUser", grpc_code="NOT_FOUND") == 2
        assert delta(handled, grpc_service=SERVICE, grpc_method="GetUser", grpc_code="OK") == 0
        seconds = f"grpc_{side}_handling_seconds"
        assert after.families[seconds].type == "histogram"
        assert delta(f"{seconds}_count", grpc_service=SERVICE, grpc_method="CreateUser") == 3
        assert delta(f"{seconds}_sum", grpc_service=SERVICE, grpc_method="CreateUser") > 0
        buckets = after.buckets(seconds, grpc_service=SERVICE, grpc_method="CreateUser")
        assert len(buckets) == 14 and buckets[float("inf")] == after.value(
            f"{seconds}_count", grpc_service=SERVICE, grpc_method="CreateUser")
        assert list(buckets.values()) == sorted(buckets.values())  # cumulative


class _HeldUserServicer(user_service_pb2_grpc.UserServiceServicer):
    """Holds every GetUser until released; then answers it, or fails it when its id says so."""

    def __init__(self) -> None:
        self.entered = 0
        self.release = asyncio.Event()

    async def GetUser(self, request, context):
        self.entered += 1
        await self.release.wait()
        if request.id == "missing":
            raise NotFound("no such user", reason="USER_NOT_FOUND", domain="test.tessera.dev")
        return svc.GetUserResponse(user=user_pb2.User(id=request.id))


async def test_rpcs_in_flight_are_counted_while_they_run():
    servicer = _HeldUserServicer()
    module = ServiceModule(
        service_names=(SERVICE,), domain="test.tessera.dev",
        register=lambda s: user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, s))
    server, port = await create_server(module, metrics_port=0)
    channel = open_channel(f"127.0.0.1:{port}", [USER_SERVICE])
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    labels = {"grpc_service": SERVICE, "grpc_method": "GetUser"}
    try:
        before = (await scrape(server.metrics.port)).value("grpc_server_rpcs_in_flight", **labels)
        ok = asyncio.ensure_future(stub.GetUser(svc.GetUserRequest(id="held")))
        await eventually(lambda: servicer.entered == 1, "the call to reach the servicer")
        assert (await scrape(server.metrics.port)).value("grpc_server_rpcs_in_flight", **labels) == before + 1
        # A call that will fail, and one whose deadline passes while it is held: each counts while it runs.
        missing = asyncio.ensure_future(stub.GetUser(svc.GetUserRequest(id="missing")))
        late = asyncio.ensure_future(stub.GetUser(svc.GetUserRequest(id="late"), timeout=0.5))
        await eventually(lambda: servicer.entered == 3, "the calls to reach the servicer")
        assert (await scrape(server.metrics.port)).value("grpc_server_rpcs_in_flight", **labels) == before + 3
        with pytest.raises(grpc.aio.AioRpcError) as late_err:
            await late
        assert late_err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        servicer.release.set()
        assert (await ok).user.id == "held"
        with pytest.raises(grpc.aio.AioRpcError) as missing_err:
            await missing
        assert missing_err.value.code() == grpc.StatusCode.NOT_FOUND
        after = await scrape(server.metrics.port)
    finally:
        servicer.release.set()
        await channel.close()
        await server.stop()
    assert after.families["grpc_server_rpcs_in_flight"].type == "gauge"
    assert after.value("grpc_server_rpcs_in_flight", **labels) == before


async def test_client_metrics_count_calls_that_fail_before_or_without_a_server():
    # A port nobody listens on: the call fails UNAVAILABLE (after the channel's retries for a read-only method).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    channel = open_channel(f"127.0.0.1:{dead}", [USER_SERVICE], default_deadline=5)
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    before_unavailable = _client_count("GetUser", "UNAVAILABLE")
    before_deadline = _client_count("GetUser", "DEADLINE_EXCEEDED")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetUser(svc.GetUserRequest(id="x"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        # The caller's deadline has already passed: refused before it leaves, and still counted.
        token = callctx.deadline_var.set(time.monotonic() - 1)
        try:
            with pytest.raises(DeadlineExceeded):
                await stub.GetUser(svc.GetUserRequest(id="x"))
        finally:
            callctx.deadline_var.reset(token)
    finally:
        await channel.close()
    assert _client_count("GetUser", "UNAVAILABLE") == before_unavailable + 1
    assert _client_count("GetUser", "DEADLINE_EXCEEDED") == before_deadline + 1


def _client_count(method: str, code: str) -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value("grpc_client_handled_total",
                                      {"grpc_service": SERVICE, "grpc_method": method, "grpc_code": code})
    return value or 0.0


async def test_business_and_machinery_metrics_are_exposed(user_with_metrics):
    server, _ = user_with_metrics
    families = (await scrape(server.metrics.port)).families
    missing = [name for name in BUSINESS_METRICS if name not in families]
    assert missing == []
    assert families["tessera_saga_duration_seconds"].type == "histogram"
    assert families["tessera_outbox_backlog"].type == "gauge"
    assert families["tessera_orders_confirmed"].type == "counter"


async def test_a_postgresql_services_pools_are_on_its_metrics_endpoint(pg_database):
    from tessera_user import bootstrap

    module = await bootstrap.build(settings_for("user", pg_database[1], TESSERA_DATABASE_POOL_SIZE="4"))
    server, port = await create_server(module, readiness_interval=0.2, metrics_port=0)
    channel = open_channel(f"127.0.0.1:{port}", [USER_SERVICE])
    try:
        gc.collect()  # other tests' databases that are gone leave the totals now, not between the two scrapes
        before = await scrape(server.metrics.port)
        with pytest.raises(grpc.aio.AioRpcError):  # a read on the direct pool, then NOT_FOUND
            await user_service_pb2_grpc.UserServiceStub(channel).GetUser(svc.GetUserRequest(id=str(uuid.uuid4())))
        after = await scrape(server.metrics.port)
    finally:
        await channel.close()
        await server.stop()
    assert after.families["tessera_db_connections"].type == "gauge"
    # Other databases of this test process may be counted too: this service's share is what moved.
    assert (after.value("tessera_db_connections", pool="direct", state="idle")
            - before.value("tessera_db_connections", pool="direct", state="idle")) == 1
    assert after.value("tessera_db_connections_max", pool="units_of_work") >= 8
    assert after.value("tessera_db_connections_max", pool="direct") >= 2


async def test_metrics_endpoint_stops_with_the_server(tmp_path):
    from tessera_user import bootstrap

    module = await bootstrap.build(settings_for("user", f"sqlite+aiosqlite:///{tmp_path / 'user.db'}"))
    server, _ = await create_server(module, metrics_port=0)
    port = server.metrics.port
    try:
        assert "grpc_server_handled" in (await scrape(port)).families  # the parser drops a counter's _total
    finally:
        await server.stop()
    with pytest.raises(urllib.error.URLError):
        await scrape(port)


async def test_no_metrics_endpoint_unless_asked(tmp_path):
    from tessera_user import bootstrap

    module = await bootstrap.build(settings_for("user", f"sqlite+aiosqlite:///{tmp_path / 'user.db'}"))
    server, _ = await create_server(module)
    try:
        assert server.metrics is None
    finally:
        await server.stop()
