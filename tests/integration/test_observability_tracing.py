"""Traces from real servers and channels to a real OTLP/gRPC collector: server, client and database spans."""

from __future__ import annotations

import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import baggage, trace
from tessera.user.v1 import user_pb2, user_service_pb2_grpc
from tessera.user.v1 import user_service_pb2 as svc

from tessera_runtime.clients import open_channel
from tessera_runtime.server import ServiceModule, create_server
from tests.integration.conftest import settings_for
from tests.support.otlp_receiver import ReceivedSpan

USER_SERVICE = svc.DESCRIPTOR.services_by_name["UserService"]
CREATE_USER = "/tessera.user.v1.UserService/CreateUser"
GET_USER = "/tessera.user.v1.UserService/GetUser"


@pytest.fixture
async def user_address(db_url):
    from tessera_user import bootstrap

    module = await bootstrap.build(settings_for("user", db_url))
    server, port = await create_server(module, readiness_interval=0.2)
    yield f"127.0.0.1:{port}"
    await server.stop()


@pytest.fixture
async def user_client(user_address):
    channel = open_channel(user_address, [USER_SERVICE])
    yield user_service_pb2_grpc.UserServiceStub(channel)
    await channel.close()


def hex_trace_id(span: trace.Span) -> str:
    return format(span.get_span_context().trace_id, "032x")


def only(spans: list[ReceivedSpan], **fields) -> ReceivedSpan:
    matching = [s for s in spans if all(getattr(s, k) == v for k, v in fields.items())]
    assert len(matching) == 1, f"expected one span with {fields}, got {[(s.kind, s.name) for s in matching]}"
    return matching[0]


def new_user() -> svc.CreateUserRequest:
    return svc.CreateUserRequest(user=user_pb2.User(email=f"obs-{uuid.uuid4().hex[:8]}@example.com",
                                                    display_name="Obs"), request_id=uuid.uuid4().hex)


async def test_one_call_yields_client_server_and_database_spans_in_one_trace(tracing, user_client, db_url):
    with trace.get_tracer("tests").start_as_current_span("test-root") as root:
        call = user_client.CreateUser(new_user())
        await call
        request_id = dict(await call.trailing_metadata())["x-request-id"]
    trace_id = hex_trace_id(root)
    vendor = "sqlite" if db_url.startswith("sqlite") else "postgresql"

    def complete(r) -> bool:
        spans = r.trace(trace_id)
        return any(s.kind == "SERVER" for s in spans) and any(s.name.startswith("INSERT") for s in spans)

    await tracing.wait(complete)
    spans = tracing.receiver.trace(trace_id)
    client = only(spans, kind="CLIENT", name=CREATE_USER)
    server = only(spans, kind="SERVER", name=CREATE_USER)
    assert client.parent_span_id == format(root.get_span_context().span_id, "016x")
    assert server.parent_span_id == client.span_id  # the traceparent crossed the wire
    assert server.attributes["rpc.grpc.status_code"] == 0
    assert server.attributes["tessera.request_id"] == request_id
    assert server.resource["service.name"] == "tessera-tests"

    database = [s for s in spans if s.scope == "opentelemetry.instrumentation.sqlalchemy"]
    inserts = [s for s in database if s.name.startswith("INSERT")]
    # The user row, the record of the call and the outbox event: on PostgreSQL one statement (a unit of work's
    # inserting()), on SQLite three.
    statements = " ".join(s.attributes.get("db.statement", "") for s in inserts)
    assert all(f"INSERT INTO {t}" in statements for t in ("users", "user_create_requests", "outbox"))
    assert len(inserts) == (1 if vendor == "postgresql" else 3)
    assert all(s.parent_span_id == server.span_id and s.kind == "CLIENT" for s in database)
    assert {s.attributes.get("db.system") for s in database} == {vendor}


async def test_server_continues_an_incoming_w3c_traceparent(tracing, user_address):
    # What the gateway does: a plain gRPC call carrying a traceparent; the service joins that trace.
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    async with grpc.aio.insecure_channel(user_address) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        await stub.CreateUser(new_user(), metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"),))
    await tracing.wait(lambda r: any(s.kind == "SERVER" for s in r.trace(trace_id)))
    server = only(tracing.receiver.trace(trace_id), kind="SERVER")
    assert server.parent_span_id == parent_id


class _BaggageUserServicer(user_service_pb2_grpc.UserServiceServicer):
    """Answers every GetUser and keeps the baggage that was current while it did."""

    def __init__(self) -> None:
        self.baggage: list[dict[str, object]] = []

    async def GetUser(self, request, context):
        self.baggage.append(dict(baggage.get_all()))
        return svc.GetUserResponse(user=user_pb2.User(id=request.id))


async def test_server_spans_carry_the_grpc_attributes_and_the_callers_context(tracing):
    servicer = _BaggageUserServicer()
    module = ServiceModule(
        service_names=(USER_SERVICE.full_name,),
        register=lambda s: user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, s),
        domain="test.tessera.dev",
    )
    server, port = await create_server(module)
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await user_service_pb2_grpc.UserServiceStub(channel).GetUser(
                svc.GetUserRequest(id="x"),
                metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"), ("baggage", "tenant=acme")))
    finally:
        await server.stop()
    await tracing.wait(lambda r: any(s.kind == "SERVER" for s in r.trace(trace_id)))
    span = only(tracing.receiver.trace(trace_id), kind="SERVER")
    assert (span.name, span.scope, span.parent_span_id) == (GET_USER, "opentelemetry.instrumentation.grpc", parent_id)
    attributes = dict(span.attributes)
    assert attributes.pop("net.peer.port").isdigit()
    assert attributes.pop("rpc.user_agent").startswith("grpc-python-asyncio/")
    assert attributes.pop("tessera.request_id") == attributes.pop("tessera.correlation_id")
    assert attributes == {"rpc.system": "grpc", "rpc.service": USER_SERVICE.full_name, "rpc.method": "GetUser",
                          "rpc.grpc.status_code": 0, "net.peer.ip": "127.0.0.1", "net.peer.name": "localhost"}
    assert not span.is_error
    assert servicer.baggage == [{"tenant": "acme"}]  # the caller's baggage is current in the handler


async def test_error_codes_on_spans_follow_the_grpc_conventions(tracing, user_client):
    # NOT_FOUND is the server doing its job (span status unset) but an error for the caller.
    with trace.get_tracer("tests").start_as_current_span("test-root") as root:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await user_client.GetUser(svc.GetUserRequest(id=str(uuid.uuid4())))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    trace_id = hex_trace_id(root)
    await tracing.wait(lambda r: {s.kind for s in r.trace(trace_id)} >= {"CLIENT", "SERVER"})
    spans = tracing.receiver.trace(trace_id)
    server, client = only(spans, kind="SERVER", name=GET_USER), only(spans, kind="CLIENT", name=GET_USER)
    assert server.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    assert not server.is_error
    assert client.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0] and client.is_error


class _BrokenUserServicer(user_service_pb2_grpc.UserServiceServicer):
    async def GetUser(self, request, context):
        raise RuntimeError("the disk is on fire")


async def test_unexpected_error_marks_the_server_span_as_failed(tracing):
    module = ServiceModule(
        service_names=(USER_SERVICE.full_name,),
        register=lambda s: user_service_pb2_grpc.add_UserServiceServicer_to_server(_BrokenUserServicer(), s),
        domain="test.tessera.dev",
    )
    server, port = await create_server(module)
    channel = open_channel(f"127.0.0.1:{port}", [USER_SERVICE])
    try:
        with trace.get_tracer("tests").start_as_current_span("test-root") as root:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await user_service_pb2_grpc.UserServiceStub(channel).GetUser(svc.GetUserRequest(id="x"))
    finally:
        await channel.close()
        await server.stop()
    assert err.value.code() == grpc.StatusCode.INTERNAL
    trace_id = hex_trace_id(root)
    await tracing.wait(lambda r: any(s.kind == "SERVER" for s in r.trace(trace_id)))
    server_span = only(tracing.receiver.trace(trace_id), kind="SERVER", name=GET_USER)
    assert server_span.is_error
    assert server_span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INTERNAL.value[0]


async def test_probes_and_background_queries_make_no_traces(tracing, user_address):
    # Health checks are not traced, and the readiness loop's database pings (every 0.2 s here) have no parent
    # span: neither may reach the collector, or they would bury the real traces.
    async with grpc.aio.insecure_channel(user_address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(3):
            reply = await health.Check(health_pb2.HealthCheckRequest())
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        marker_trace, marker_parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        # A traced call made after the probes: once it has arrived, anything exported before it has too.
        await user_service_pb2_grpc.UserServiceStub(channel).CreateUser(
            new_user(), metadata=(("traceparent", f"00-{marker_trace}-{marker_parent}-01"),))
    await tracing.wait(lambda r: any(s.kind == "SERVER" for s in r.trace(marker_trace)))
    spans = tracing.receiver.spans()
    assert not [s for s in spans if "grpc.health" in s.name]
    orphans = [s for s in spans if s.scope == "opentelemetry.instrumentation.sqlalchemy" and s.parent_span_id is None]
    assert orphans == []
