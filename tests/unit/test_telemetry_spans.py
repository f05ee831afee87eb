"""Span export rules and metric names, on a real OpenTelemetry SDK with an in-memory exporter."""

from __future__ import annotations

import grpc
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import REGISTRY

from tessera_runtime import metrics
from tessera_runtime.telemetry import SQLALCHEMY_SCOPE, _drop_orphan_database_spans, _one_line


def provider_with_memory() -> tuple[TracerProvider, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(_drop_orphan_database_spans(SimpleSpanProcessor(exporter)))
    return provider, exporter


def test_database_spans_without_a_parent_are_not_exported():
    provider, exporter = provider_with_memory()
    database = provider.get_tracer(SQLALCHEMY_SCOPE)
    with database.start_as_current_span("SELECT readiness"):
        pass
    assert exporter.get_finished_spans() == ()


def test_database_spans_inside_traced_work_and_other_roots_are_exported():
    provider, exporter = provider_with_memory()
    rpc = provider.get_tracer("opentelemetry.instrumentation.grpc")
    database = provider.get_tracer(SQLALCHEMY_SCOPE)
    with rpc.start_as_current_span("/tessera.order.v1.OrderService/CreateOrder"):
        with database.start_as_current_span("INSERT orders"):
            pass
    with provider.get_tracer("tessera_runtime").start_as_current_span("process tessera.order.v1.OrderConfirmed"):
        pass
    names = [s.name for s in exporter.get_finished_spans()]
    assert names == ["INSERT orders", "/tessera.order.v1.OrderService/CreateOrder",
                     "process tessera.order.v1.OrderConfirmed"]


def test_console_spans_are_one_json_line_each():
    provider, exporter = provider_with_memory()
    with provider.get_tracer("t").start_as_current_span("one"):
        pass
    line = _one_line(exporter.get_finished_spans()[0])
    assert line.count("\n") == 1 and line.endswith("\n") and '"name":"one"' in line


def test_rpc_method_names_split_into_service_and_method():
    assert metrics.split_method("/tessera.user.v1.UserService/GetUser") == ("tessera.user.v1.UserService", "GetUser")
    assert metrics.split_method("garbage") == ("unknown", "garbage")


def test_a_server_observation_counts_once_and_times_once():
    labels = {"grpc_service": "tessera.test.v1.Probe", "grpc_method": "Poke"}

    def value(name: str, **extra: str) -> float:
        return REGISTRY.get_sample_value(name, {**labels, **extra}) or 0.0

    before = value("grpc_server_handled_total", grpc_code="ABORTED"), value("grpc_server_handling_seconds_count")
    metrics.observe_server_rpc("/tessera.test.v1.Probe/Poke", grpc.StatusCode.ABORTED, 0.003)
    assert value("grpc_server_handled_total", grpc_code="ABORTED") == before[0] + 1
    assert value("grpc_server_handling_seconds_count") == before[1] + 1
    assert value("grpc_server_handling_seconds_bucket", le="0.0025") < value("grpc_server_handling_seconds_bucket",
                                                                             le="0.005")
