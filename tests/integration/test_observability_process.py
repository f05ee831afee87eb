"""A real `tessera serve user` process configured by OTEL_* and TESSERA_METRICS_PORT: its spans, logs and metrics."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request
import uuid

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tessera.user.v1 import user_pb2, user_service_pb2_grpc
from tessera.user.v1 import user_service_pb2 as svc

from tests.support.otlp_receiver import OtlpReceiver
from tests.support.processes import ServiceProcess

LOG_FIELDS = {"time", "level", "service", "message", "trace_id", "span_id", "request_id", "correlation_id"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def receiver():
    r = OtlpReceiver().start()
    yield r
    r.stop()


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def json_lines(text: str) -> list[dict]:
    lines = []
    for raw in text.splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    return lines


async def test_a_request_is_traced_logged_and_counted_by_the_service_process(tmp_path, receiver):
    metrics_port = free_port()
    process = ServiceProcess("user", {
        "TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'user.db'}",
        "TESSERA_METRICS_PORT": str(metrics_port),
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }, tmp_path / "user.log").start()
    trace_id, parent_id, request_id = uuid.uuid4().hex, uuid.uuid4().hex[:16], f"req-{uuid.uuid4().hex[:8]}"
    email = f"grace.hopper.{uuid.uuid4().hex[:6]}@example.com"
    try:
        async with grpc.aio.insecure_channel(process.address) as channel:
            stub = user_service_pb2_grpc.UserServiceStub(channel)
            await stub.CreateUser(
                svc.CreateUserRequest(user=user_pb2.User(email=email, display_name="Grace"),
                                      request_id=uuid.uuid4().hex),
                metadata=(("traceparent", f"00-{trace_id}-{parent_id}-01"), ("x-request-id", request_id)))
        await receiver.wait(lambda r: any(s.kind == "SERVER" for s in r.trace(trace_id)))
        exposition = await asyncio.to_thread(scrape, metrics_port)
    finally:
        process.stop()

    server = next(s for s in receiver.trace(trace_id) if s.kind == "SERVER")
    assert server.service == "user-service" and server.parent_span_id == parent_id
    assert server.attributes["tessera.request_id"] == request_id
    assert receiver.user_agents and all("OTel" in agent for agent in receiver.user_agents)

    log_text = process.log_text()
    lines = json_lines(log_text)
    of_request = [line for line in lines if line.get("request_id") == request_id]
    assert of_request, "the request wrote no log line"
    for line in of_request:
        assert LOG_FIELDS <= line.keys()
        assert line["service"] == "user-service"
        assert line["trace_id"] == trace_id
        assert line["correlation_id"] == request_id  # no correlation id came in: the request id stands for it
    rpc_line = next(line for line in of_request if line.get("rpc_method") == "/tessera.user.v1.UserService/CreateUser")
    assert rpc_line["span_id"] == server.span_id and rpc_line["grpc_code"] == "OK"
    assert email not in log_text and "guest:guest" not in log_text

    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(exposition) for s in f.samples}
    key = ("grpc_server_handled_total", (("grpc_code", "OK"), ("grpc_method", "CreateUser"),
                                         ("grpc_service", "tessera.user.v1.UserService")))
    assert samples[key] == 1


@pytest.mark.parametrize(("variable", "value"), [
    ("OTEL_TRACES_EXPORTER", "zipkin"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    ("OTEL_TRACES_SAMPLER", "sometimes"),
])
def test_a_bad_telemetry_variable_stops_the_service_naming_it(tmp_path, variable, value):
    process = ServiceProcess("user", {
        "TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'user.db'}",
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9",
        variable: value,
    }, tmp_path / "user.log")
    with pytest.raises(RuntimeError, match="exited with 2"):
        process.start()
    assert f"configuration error: {variable}" in process.log_text()
