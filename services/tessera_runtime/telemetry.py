"""OpenTelemetry tracing for every Tessera process: one setup path, gRPC and database spans, message spans.

`setup_telemetry` is called once per process by `tessera_runtime.app`, configured by the standard OTEL_*
variables:

- `OTEL_TRACES_EXPORTER`: `otlp`, `console` or `none` (comma-separated for several). When it is not set, spans
  are exported over OTLP/gRPC if `OTEL_EXPORTER_OTLP_ENDPOINT` (or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set,
  and not exported at all otherwise: that is what `make run` does.
- `OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT` (`http://host:4317`; `http://` means plaintext), `..._INSECURE`,
  `..._HEADERS`, `..._TIMEOUT`, `..._COMPRESSION`; only the `grpc` protocol is installed.
- `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default `parentbased_always_on`), `OTEL_SERVICE_NAME`,
  `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_PROPAGATORS` (default W3C tracecontext + baggage), `OTEL_BSP_*`.
- `OTEL_SDK_DISABLED=true` turns the SDK off entirely.

Without an exporter the SDK still runs with a sampler that records nothing: every unit of work gets a (non
recording, nearly free) span, so log lines carry trace and span ids and an incoming W3C traceparent is continued to
the next service, while nothing is collected.

Messages: the relay's publish span is a PRODUCER child of the context stored in the outbox row, and the context it
publishes in the AMQP headers is that span's. The consumer's span is a CONSUMER span that starts a new trace and
LINKS to the producer's context instead of being its child: a message may be handled long after the request that
caused it (broker outage, retries with delay, a dead-letter replay days later), may be delivered more than once,
and each delivery is its own unit of work with its own outcome. As a child it would stretch the request's trace
over hours and mix redeliveries into it; as a link the request's trace stays the request, and each consumer trace
still leads back to it (and its log lines carry the request's correlation id).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sys
import threading
import urllib.parse
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from tessera_runtime.config import ConfigError, Env
from tessera_runtime.context import clean_id
from tessera_runtime.logs import correlation_id_var, request_id_var

log = logging.getLogger("tessera.telemetry")

INSTRUMENTATION_SCOPE = "tessera_runtime"
SQLALCHEMY_SCOPE = "opentelemetry.instrumentation.sqlalchemy"
# The scope (and schema) of the gRPC spans: OpenTelemetry's gRPC instrumentation makes the client spans, and the
# server spans Tessera makes keep its scope, so that both sides of a call are found under one scope as before.
GRPC_SCOPE = "opentelemetry.instrumentation.grpc"
_GRPC_SCHEMA_URL = "https://opentelemetry.io/schemas/1.11.0"
EXPORTERS = ("otlp", "console", "none")
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on", "parentbased_always_off",
            "parentbased_traceidratio")

# Health probes and reflection are machinery: tracing them would bury every real trace under probe noise.
_UNTRACED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

# Server span statuses follow the OpenTelemetry gRPC conventions: only codes that mean the server failed are
# errors; a NOT_FOUND or INVALID_ARGUMENT is the server doing its job.
_SERVER_ERROR_CODES = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})

_lock = threading.Lock()
_provider: Any = None
_disabled = False


@dataclasses.dataclass(frozen=True)
class TelemetrySettings:
    """Tracing configuration read once from the OTEL_* variables; a bad value names its variable."""

    disabled: bool
    exporters: tuple[str, ...]
    otlp_endpoint: str
    otlp_insecure: bool | None
    sampler: str
    sampler_arg: float | None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> TelemetrySettings:
        env = Env(environ)
        disabled = env.bool("OTEL_SDK_DISABLED", False)
        endpoint = env.optional_str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.optional_str(
            "OTEL_EXPORTER_OTLP_ENDPOINT")
        raw_exporters = env.optional_str("OTEL_TRACES_EXPORTER")
        if raw_exporters is None:
            exporters: tuple[str, ...] = ("otlp",) if endpoint else ()
        else:
            names = tuple(dict.fromkeys(name.strip().lower() for name in raw_exporters.split(",") if name.strip()))
            unknown = [name for name in names if name not in EXPORTERS]
            if unknown:
                raise ConfigError(f"OTEL_TRACES_EXPORTER must list {', '.join(EXPORTERS)}; got {raw_exporters!r}")
            exporters = tuple(name for name in names if name != "none")
        if "otlp" in exporters:
            for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
                protocol = env.optional_str(name)
                if protocol is not None and protocol != "grpc":
                    raise ConfigError(f"{name} must be grpc (the OTLP/gRPC exporter is the one installed), "
                                      f"got {protocol!r}")
        insecure: bool | None = None
        for name in ("OTEL_EXPORTER_OTLP_TRACES_INSECURE", "OTEL_EXPORTER_OTLP_INSECURE"):
            if env.optional_str(name) is not None:
                insecure = env.bool(name, False)
                break
        sampler = env.str("OTEL_TRACES_SAMPLER", "parentbased_always_on").lower()
        if sampler not in SAMPLERS:
            raise ConfigError(f"OTEL_TRACES_SAMPLER must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
        sampler_arg = None
        if sampler.endswith("traceidratio"):
            sampler_arg = env.float("OTEL_TRACES_SAMPLER_ARG", 1.0, minimum=0.0)
            if sampler_arg > 1.0:
                raise ConfigError(f"OTEL_TRACES_SAMPLER_ARG must be between 0 and 1, got {sampler_arg}")
        return cls(disabled=disabled, exporters=exporters, otlp_endpoint=endpoint or "http://localhost:4317",
                   otlp_insecure=insecure, sampler=sampler, sampler_arg=sampler_arg)

    def build_sampler(self):
        from opentelemetry.sdk.trace import sampling

        if not self.exporters:
            # Nothing would be collected: record nothing, but keep valid ids for logs and propagation.
            return sampling.ALWAYS_OFF
        by_name = {
            "always_on": lambda: sampling.ALWAYS_ON,
            "always_off": lambda: sampling.ALWAYS_OFF,
            "traceidratio": lambda: sampling.TraceIdRatioBased(self.sampler_arg),
            "parentbased_always_on": lambda: sampling.ParentBased(sampling.ALWAYS_ON),
            "parentbased_always_off": lambda: sampling.ParentBased(sampling.ALWAYS_OFF),
            "parentbased_traceidratio": lambda: sampling.ParentBased(sampling.TraceIdRatioBased(self.sampler_arg)),
        }
        return by_name[self.sampler]()


def otlp_collector_address(environ: Mapping[str, str] | None = None) -> str | None:
    """HOST:PORT of the OTLP/gRPC collector the services export to (None when they export none): what the gateway
    generator gives Envoy's tracer, so the edge's spans land beside the services'."""
    config = TelemetrySettings.from_env(environ)
    if config.disabled or "otlp" not in config.exporters:
        return None
    endpoint = config.otlp_endpoint
    if "://" not in endpoint:
        endpoint = "http://" + endpoint
    parsed = urllib.parse.urlsplit(endpoint)
    if parsed.hostname is None:
        raise ConfigError(f"OTEL_EXPORTER_OTLP_ENDPOINT must be a URL such as http://host:4317, got {endpoint!r}")
    return f"{parsed.hostname}:{parsed.port or 4317}"


def _drop_orphan_database_spans(processor):
    """Wraps a span processor so that database spans without a parent are not exported.

    Readiness checks and the outbox relay's polling query the database every second or faster, outside any
    request; exported, each statement would be a one-span trace drowning the traces that matter. A statement
    made inside traced work (an RPC, a publish, a consumed message) has a parent and is kept."""
    from opentelemetry.sdk.trace import SpanProcessor

    class DropOrphanDatabaseSpans(SpanProcessor):
        def on_start(self, span, parent_context=None) -> None:
            processor.on_start(span, parent_context=parent_context)

        def on_end(self, span) -> None:
            scope = span.instrumentation_scope
            if span.parent is None and scope is not None and scope.name == SQLALCHEMY_SCOPE:
                return
            processor.on_end(span)

        def shutdown(self) -> None:
            processor.shutdown()

        def force_flush(self, timeout_millis: int = 30000) -> bool:
            return processor.force_flush(timeout_millis)

    return DropOrphanDatabaseSpans()


def _one_line(span) -> str:
    return json.dumps(json.loads(span.to_json()), separators=(",", ":")) + "\n"


def setup_telemetry(service_name: str, settings: Any = None,
                    environ: Mapping[str, str] | None = None):
    """Installs the process's tracer provider from the OTEL_* variables; returns it (None when disabled).

    Called once per process; later calls return the provider of the first. `settings` (the service's
    ServiceSettings) adds the deployment environment to the resource."""
    global _provider, _disabled
    with _lock:
        if _provider is not None or _disabled:
            return _provider
        config = TelemetrySettings.from_env(environ)
        if config.disabled:
            _disabled = True
            log.info("tracing disabled by OTEL_SDK_DISABLED")
            return None

        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

        attributes: dict[str, Any] = {"service.name": service_name, "service.namespace": "tessera"}
        environment = getattr(settings, "environment", None)
        if environment:
            attributes["deployment.environment.name"] = environment
        # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win over the defaults above, as the spec says.
        attributes.update(OTELResourceDetector().detect().attributes)
        provider = TracerProvider(resource=Resource.create(attributes), sampler=config.build_sampler())
        for name in config.exporters:
            if name == "otlp":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

                exporter: Any = OTLPSpanExporter(endpoint=config.otlp_endpoint, insecure=config.otlp_insecure)
            else:
                # stdout carries the "listening on" line scripts read; spans go to stderr beside the logs.
                exporter = ConsoleSpanExporter(service_name=service_name, out=sys.stderr, formatter=_one_line)
            provider.add_span_processor(_drop_orphan_database_spans(BatchSpanProcessor(exporter)))
        trace.set_tracer_provider(provider)
        _provider = provider
        log.info("tracing configured", extra={
            "exporters": list(config.exporters) or ["none"],
            "otlp_endpoint": config.otlp_endpoint if "otlp" in config.exporters else None,
            "sampler": config.sampler if config.exporters else "always_off (no exporter)",
        })
        return provider


# Looked up once: get_tracer builds and compares an instrumentation scope on every call (about 8 us, paid per span
# of every published event). Got before setup_telemetry, it is the API's proxy, which follows the provider set later.
_TRACER = trace.get_tracer(INSTRUMENTATION_SCOPE)


def tracer() -> trace.Tracer:
    return _TRACER


def _traced(method: str) -> bool:
    return not method.startswith(_UNTRACED_PREFIXES)


def _method_of(details: Any) -> str:
    method = details.method
    return method.decode() if isinstance(method, bytes) else method


class ServerSpans:
    """The SERVER span of each traced RPC, made by Tessera's ServerInterceptor (the server's one interceptor, its
    handler built once per method) like the spans of OpenTelemetry's gRPC server instrumentation: named after the
    full method, in that instrumentation's scope, with its rpc.* and net.peer.* attributes, a child of the context
    the caller propagated in its metadata (current while the handler runs, baggage included).

    Its status is the code the call ended with, however it ended (errors leave by `abort_with_status`): only codes
    that mean the server failed are errors, as OpenTelemetry's gRPC conventions say; a NOT_FOUND or
    INVALID_ARGUMENT is the server doing its job. It carries the call's request and correlation ids. It records
    no exception: the one that leaves the handler is gRPC's AbortError, which says nothing (the log line of the
    call, which has the span's ids, holds the cause)."""

    def __init__(self) -> None:
        from opentelemetry.instrumentation.grpc.version import __version__

        # Got now, before setup_telemetry may have run: the API's proxy follows the provider set later.
        self._tracer = trace.get_tracer(GRPC_SCOPE, __version__, schema_url=_GRPC_SCHEMA_URL)

    @staticmethod
    def attributes_for(method: str) -> dict[str, Any] | None:
        """The attributes every span of `method` starts with; None for a method that is not traced."""
        if not _traced(method):
            return None
        service, _, name = method.lstrip("/").partition("/")
        return {"rpc.system": "grpc", "rpc.grpc.status_code": 0, "rpc.method": name, "rpc.service": service}

    def start(self, method: str, attributes: dict[str, Any], metadata: Mapping[str, str],
              servicer_context: grpc.aio.ServicerContext) -> tuple[trace.Span, object]:
        """Starts the span of one call and makes it current; returns it with the token `finish` detaches."""
        parent = propagate.extract(metadata)
        span = self._tracer.start_span(method, parent, SpanKind.SERVER, attributes)
        if span.is_recording():  # the caller's address and agent are of no use on a span that is not kept
            span.set_attributes(_caller_attributes(metadata, servicer_context.peer()))
        return span, otel_context.attach(trace.set_span_in_context(span, parent))

    @staticmethod
    def finish(span: trace.Span, token: object, code: grpc.StatusCode, request_id: str,
               correlation_id: str) -> None:
        """Ends the span started by `start` with the status the call ended with, and restores the context."""
        if span.is_recording():
            span.set_attributes({"rpc.grpc.status_code": code.value[0], "tessera.request_id": request_id,
                                 "tessera.correlation_id": correlation_id})
            if code in _SERVER_ERROR_CODES:
                span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()
        otel_context.detach(token)


def _caller_attributes(metadata: Mapping[str, str], peer: str) -> dict[str, str]:
    """rpc.user_agent and net.peer.* from the call's metadata and its peer (`ipv4:127.0.0.1:57284`,
    `ipv6:[::1]:57284`, `ipv4:10.2.1.1:57284,127.0.0.1:57284`, `unix:...`)."""
    attributes = {}
    if (agent := metadata.get("user-agent")) is not None:
        attributes["rpc.user_agent"] = agent
    if not peer.startswith("unix:"):
        try:
            ip, port = peer.split(",")[0].split(":", 1)[1].rsplit(":", 1)
        except (IndexError, ValueError):
            log.debug("peer address not understood: %r", peer)
            return attributes
        ip = urllib.parse.unquote(ip)
        attributes["net.peer.ip"] = ip
        attributes["net.peer.port"] = port
        if ip in ("[::1]", "127.0.0.1"):
            attributes["net.peer.name"] = "localhost"
    return attributes


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """The OpenTelemetry aio client interceptors (one CLIENT span per call, traceparent injected)."""
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return aio_client_interceptors(filter_=lambda details: _traced(_method_of(details)))


def instrument_engine(engine: Any) -> None:
    """Database spans (one CLIENT span per statement) for an AsyncEngine or Engine, via the SQLAlchemy
    instrumentation. The tracer is the global proxy, so engines made before `setup_telemetry` get spans too."""
    from opentelemetry.instrumentation.sqlalchemy.engine import EngineTracer
    from opentelemetry.instrumentation.sqlalchemy.version import __version__
    from opentelemetry.metrics import get_meter

    sync_engine = getattr(engine, "sync_engine", engine)
    meter = get_meter(SQLALCHEMY_SCOPE, __version__)
    usage = meter.create_up_down_counter(name="db.client.connections.usage", unit="connections")
    EngineTracer(trace.get_tracer(SQLALCHEMY_SCOPE, __version__), sync_engine, usage)


# Message headers -------------------------------------------------------------------------------------------------

def _text_headers(headers: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (headers or {}).items():
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        if isinstance(value, str):
            out[key.lower()] = value
    return out


def message_context(headers: Mapping[str, Any] | None) -> trace.SpanContext:
    """The W3C trace context a message (or outbox row) carries in its headers; invalid when it has none."""
    ctx = propagate.extract(_text_headers(headers))
    return trace.get_current_span(ctx).get_span_context()


def start_publish_span(event_type: str, headers: MutableMapping[str, Any], *, exchange: str,
                       event_id: str | None = None) -> trace.Span:
    """Starts a PRODUCER span for publishing one outbox row, as a child of the context the row was written in,
    and writes this span's traceparent into `headers` (the row's headers, about to become the AMQP headers), so
    the consumer links to the publish. The span is not made current: publishing and the broker's confirm may run
    in different callbacks. End it with `finish_publish_span` when the confirm (or the failure) arrives."""
    parent = propagate.extract(_text_headers(headers))
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "send",
        "messaging.operation.name": "publish",
        "messaging.destination.name": exchange,
        "messaging.rabbitmq.destination.routing_key": event_type,
    }
    if event_id is not None:
        attributes["messaging.message.id"] = event_id
    span = tracer().start_span(f"publish {event_type}", context=parent, kind=SpanKind.PRODUCER,
                               attributes=attributes)
    propagate.inject(headers, context=trace.set_span_in_context(span))
    return span


def finish_publish_span(span: trace.Span, error: str | None = None) -> None:
    """Ends a publish span: confirmed by the broker (error None), or failed (nacked, returned, connection lost)."""
    if error is not None:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end()


@contextlib.contextmanager
def publish_span(event_type: str, headers: MutableMapping[str, Any], *, exchange: str,
                 event_id: str | None = None) -> Iterator[trace.Span]:
    """`start_publish_span` .. `finish_publish_span` around a block that publishes and waits for the confirm;
    an exception marks the span failed."""
    span = start_publish_span(event_type, headers, exchange=exchange, event_id=event_id)
    try:
        with trace.use_span(span, end_on_exit=False, record_exception=True, set_status_on_exception=True):
            yield span
    finally:
        span.end()


@contextlib.contextmanager
def consume_span(event_type: str, headers: Mapping[str, Any] | None, *, consumer: str, queue: str | None = None,
                 event_id: str | None = None, delivery_count: int | None = None) -> Iterator[trace.Span]:
    """A CONSUMER span for handling one delivered message: a new trace LINKED to the producer's (see the module
    docstring for why not a child). While it is open, log lines carry the request and correlation ids that came
    in the message headers (x-request-id, x-correlation-id)."""
    producer = message_context(headers)
    links = [Link(producer, {"messaging.operation.type": "send"})] if producer.is_valid else []
    attributes: dict[str, Any] = {
        "messaging.system": "rabbitmq",
        "messaging.operation.type": "process",
        "messaging.operation.name": "consume",
        "messaging.consumer.group.name": consumer,
        "messaging.rabbitmq.destination.routing_key": event_type,
    }
    if queue is not None:
        attributes["messaging.destination.name"] = queue
    if event_id is not None:
        attributes["messaging.message.id"] = event_id
    if delivery_count is not None:
        attributes["messaging.rabbitmq.delivery_count"] = delivery_count
    text = _text_headers(headers)
    # Kept as a call's ids are (context.clean_id): a foreign producer's id of any length is not copied into every
    # line the handler writes and every event it records.
    request_id, correlation_id = clean_id(text.get("x-request-id")), clean_id(text.get("x-correlation-id"))
    if request_id is not None:
        attributes["tessera.request_id"] = request_id
    if correlation_id is not None:
        attributes["tessera.correlation_id"] = correlation_id
    # An empty context: the span is a root even when the consumer runs inside some other span.
    tokens = (request_id_var.set(request_id), correlation_id_var.set(correlation_id or request_id))
    try:
        with tracer().start_as_current_span(f"process {event_type}", context=otel_context.Context(),
                                            kind=SpanKind.CONSUMER, links=links, attributes=attributes) as span:
            yield span
    finally:
        correlation_id_var.reset(tokens[1])
        request_id_var.reset(tokens[0])
