"""A real OTLP/gRPC trace collector endpoint for tests: services and Envoy export spans to it over the network."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

SPAN_KINDS = {
    trace_pb2.Span.SPAN_KIND_INTERNAL: "INTERNAL",
    trace_pb2.Span.SPAN_KIND_SERVER: "SERVER",
    trace_pb2.Span.SPAN_KIND_CLIENT: "CLIENT",
    trace_pb2.Span.SPAN_KIND_PRODUCER: "PRODUCER",
    trace_pb2.Span.SPAN_KIND_CONSUMER: "CONSUMER",
    trace_pb2.Span.SPAN_KIND_UNSPECIFIED: "UNSPECIFIED",
}


def _value(v: common_pb2.AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item) for item in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in v.kvlist_value.values}
    return getattr(v, kind)


def _attributes(kvs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs}


@dataclasses.dataclass(frozen=True)
class ReceivedSpan:
    """One span as the collector received it, with ids in lowercase hex as they appear in logs and headers."""

    service: str
    scope: str
    name: str
    kind: str
    trace_id: str
    span_id: str
    parent_span_id: str | None
    attributes: dict[str, Any]
    resource: dict[str, Any]
    links: tuple[tuple[str, str], ...]
    status_code: int

    @property
    def is_error(self) -> bool:
        return self.status_code == trace_pb2.Status.STATUS_CODE_ERROR


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self.receiver = receiver

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext):
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service = str(resource.get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(ReceivedSpan(
                        service=service,
                        scope=scope_spans.scope.name,
                        name=span.name,
                        kind=SPAN_KINDS.get(span.kind, str(span.kind)),
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex() or None,
                        attributes=_attributes(span.attributes),
                        resource=resource,
                        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        status_code=span.status.code,
                    ))
        self.receiver._add(received, dict(context.invocation_metadata()))
        return trace_service_pb2.ExportTraceServiceResponse()


class OtlpReceiver:
    """An OTLP/gRPC TraceService on 127.0.0.1:<port 0>, on its own threads (so exporters in the test's own
    process and event loop never wait on the loop that is waiting for them)."""

    def __init__(self) -> None:
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._server)
        self._spans: list[ReceivedSpan] = []
        self._user_agents: set[str] = set()
        self._cond = threading.Condition()
        self.port = 0

    @property
    def endpoint(self) -> str:
        """For OTEL_EXPORTER_OTLP_ENDPOINT (http:// = plaintext gRPC)."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(grace=1).wait(5)

    def _add(self, spans: list[ReceivedSpan], metadata: dict[str, Any]) -> None:
        with self._cond:
            self._spans.extend(spans)
            if agent := metadata.get("user-agent"):
                self._user_agents.add(str(agent))
            self._cond.notify_all()

    @property
    def user_agents(self) -> set[str]:
        with self._cond:
            return set(self._user_agents)

    def spans(self, predicate: Callable[[ReceivedSpan], bool] = lambda _s: True) -> list[ReceivedSpan]:
        with self._cond:
            return [s for s in self._spans if predicate(s)]

    def trace(self, trace_id: str) -> list[ReceivedSpan]:
        return self.spans(lambda s: s.trace_id == trace_id)

    def wait_for(self, condition: Callable[[OtlpReceiver], bool], timeout: float = 30.0) -> None:
        """Blocks until condition(receiver) holds (checked on every export), or fails after timeout seconds."""
        deadline = time.monotonic() + timeout
        with self._cond:  # a re-entrant lock: the condition may call spans()
            while not condition(self):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = sorted({f"{s.service}:{s.name}" for s in self._spans})
                    raise AssertionError(f"spans did not arrive within {timeout}s; received: {names}")
                self._cond.wait(min(remaining, 0.5))

    async def wait(self, condition: Callable[[OtlpReceiver], bool], timeout: float = 30.0) -> None:
        """wait_for from a coroutine, without blocking the event loop (in-process servers and clients end their
        spans on it)."""
        await asyncio.to_thread(self.wait_for, condition, timeout)


class InProcessTracing:
    """This test process's tracer provider exporting to one receiver, shared by every test that needs it.

    A process has one global tracer provider, so it is made once (by tessera_runtime.telemetry, as a service
    process makes it) and kept for the whole session."""

    def __init__(self, receiver: OtlpReceiver, provider: Any) -> None:
        self.receiver = receiver
        self.provider = provider

    async def flush(self) -> None:
        await asyncio.to_thread(self.provider.force_flush, 10_000)

    async def wait(self, condition: Callable[[OtlpReceiver], bool], timeout: float = 30.0) -> None:
        await self.flush()
        await self.receiver.wait(condition, timeout)

    def drain(self) -> None:
        """Exports every pending span now, while the receiver still runs. Called at the end of the test session:
        at interpreter exit gRPC's threads stop before the SDK's own final flush, which would then wait for a
        receiver that no longer answers."""
        self.provider.force_flush(10_000)


_in_process: InProcessTracing | None = None


def in_process_tracing() -> InProcessTracing:
    """The session's InProcessTracing; tests use it through the session fixture `tracing` (tests/conftest.py),
    which drains it."""
    global _in_process
    if _in_process is None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from tessera_runtime.telemetry import setup_telemetry

        receiver = OtlpReceiver().start()
        provider = setup_telemetry("tessera-tests", None, {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint})
        if trace.get_tracer_provider() is not provider:
            # Something in this process installed its provider first: export from that one as well.
            provider = trace.get_tracer_provider()
            assert isinstance(provider, TracerProvider), f"cannot export spans from {provider!r}"
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.endpoint)))
        _in_process = InProcessTracing(receiver, provider)
    return _in_process
