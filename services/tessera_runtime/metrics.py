"""Prometheus metrics of every Tessera process: RED per RPC (server and client), business and machinery metrics.

Each process exposes them in Prometheus text format at http://<grpc host>:$TESSERA_METRICS_PORT/metrics (0 = off),
started by TesseraServer. The RPC metrics are recorded by the runtime for every service with no code in the
service. The others are defined here, once, and incremented where the thing happens:

    from tessera_runtime import metrics
    metrics.ORDERS_CONFIRMED.inc()
    metrics.SAGA_DURATION.labels(outcome="confirmed").observe(seconds)
    metrics.CONSUMER_PROCESSED.labels(consumer="notification-email", event_type=msg_type).inc()

| name | type | labels | meaning |
|---|---|---|---|
| grpc_server_handled_total | counter | grpc_service, grpc_method, grpc_code | RPCs this server finished |
| grpc_server_handling_seconds | histogram | grpc_service, grpc_method | server-side latency |
| grpc_server_rpcs_in_flight | gauge | grpc_service, grpc_method | RPCs this server has started and not yet answered |
| grpc_client_handled_total | counter | grpc_service, grpc_method, grpc_code | calls this process made to others |
| grpc_client_handling_seconds | histogram | grpc_service, grpc_method | client-side latency (retries included) |
| tessera_orders_confirmed_total | counter | | sagas that ended CONFIRMED |
| tessera_orders_failed_total | counter | reason | sagas that ended without confirming (compensated or not) |
| tessera_orders_compensated_total | counter | | sagas whose compensations all completed |
| tessera_saga_duration_seconds | histogram | outcome (confirmed, failed, compensated) | saga start to end state |
| tessera_saga_compensation_failures_total | counter | step | compensations given up after their retries |
| tessera_outbox_backlog | gauge | service | unpublished outbox rows, as last counted by the relay |
| tessera_outbox_publish_lag_seconds | histogram | service | outbox row written → broker confirmed it |
| tessera_outbox_oldest_unpublished_seconds | gauge | service | age of the oldest unpublished row (0 when none) |
| tessera_outbox_published_total | counter | service, event_type | events published and confirmed |
| tessera_outbox_publish_failures_total | counter | service | publish attempts that failed (broker away, nack) |
| tessera_outbox_events_parked_total | counter | service, event_type | events parked: refused for good, passed over |
| tessera_outbox_parked | gauge | service | parked outbox events not yet put back in line (last count) |
| tessera_consumer_processed_total | counter | consumer, event_type | messages handled and acknowledged |
| tessera_consumer_duplicates_total | counter | consumer, event_type | messages skipped: event id already applied |
| tessera_consumer_retried_total | counter | consumer, event_type | messages sent back for a delayed retry |
| tessera_consumer_dead_lettered_total | counter | consumer, event_type | messages moved to the dead-letter queue |
| tessera_inventory_reservation_expiries_total | counter | | stock reservations released because they expired |
| tessera_batch_job_items_passed_over_total | counter | job | rows a job failed on, passed over until its next round |
| tessera_db_connections | gauge | pool (units_of_work, direct, relay), state (in_use, idle) | PostgreSQL connections |
| tessera_db_connections_max | gauge | pool | the most connections each pool opens (TESSERA_DATABASE_POOL_SIZE) |
| tessera_circuit_state | gauge | dependency (the address called) | its circuit: 0 closed, 1 half-open, 2 open |
| tessera_circuit_transitions_total | counter | dependency, state (closed, half_open, open) | circuit transitions |
| tessera_discovery_instances | gauge | dependency (a discovery address), health (serving, not_serving) | instances |
| tessera_discovery_picks_total | counter | dependency, address | calls the balancer sent to each instance |
| tessera_ready | gauge | | 1 while the process reports SERVING (critical checks pass), 0 when not or stopping |
| tessera_health_check_up | gauge | check, critical (true, false) | each readiness check's last result: 1 passed |

Label values are short, bounded strings (an ErrorReason name, a step name, a message's full type name): never ids.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    make_wsgi_app,
)
from prometheus_client.exposition import ThreadingWSGIServer

log = logging.getLogger("tessera.metrics")

# The text format would carry a `*_created` series beside every counter and histogram, doubling what is scraped
# for a timestamp Prometheus does not use from this format.
disable_created_metrics()

# Latency buckets from 1 ms (an in-memory read) to 10 s (past every default deadline).
RPC_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Sagas and publish lag span a few milliseconds to a broker outage.
SLOW_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)

_RPC_LABELS = ("grpc_service", "grpc_method")

GRPC_SERVER_HANDLED = Counter(
    "grpc_server_handled_total", "RPCs completed on the server, by method and status code.",
    (*_RPC_LABELS, "grpc_code"))
GRPC_SERVER_HANDLING_SECONDS = Histogram(
    "grpc_server_handling_seconds", "Time the server took to answer an RPC.", _RPC_LABELS, buckets=RPC_BUCKETS)
GRPC_SERVER_IN_FLIGHT = Gauge(
    "grpc_server_rpcs_in_flight", "RPCs the server has started and not yet answered, by method.", _RPC_LABELS)
GRPC_CLIENT_HANDLED = Counter(
    "grpc_client_handled_total", "Calls to other services completed, by method and status code.",
    (*_RPC_LABELS, "grpc_code"))
GRPC_CLIENT_HANDLING_SECONDS = Histogram(
    "grpc_client_handling_seconds", "Time a call to another service took, retries included.", _RPC_LABELS,
    buckets=RPC_BUCKETS)

ORDERS_CONFIRMED = Counter("tessera_orders_confirmed_total", "Orders whose CreateOrder saga ended CONFIRMED.")
ORDERS_FAILED = Counter(
    "tessera_orders_failed_total",
    "Orders whose CreateOrder saga ended without confirming (compensated or rejected up front), by reason.",
    ("reason",))
ORDERS_COMPENSATED = Counter(
    "tessera_orders_compensated_total", "Orders whose saga had to undo steps and completed every compensation.")
SAGA_DURATION = Histogram(
    "tessera_saga_duration_seconds", "Time from a saga's start to its end state, by outcome.", ("outcome",),
    buckets=SLOW_BUCKETS)
SAGA_COMPENSATION_FAILURES = Counter(
    "tessera_saga_compensation_failures_total",
    "Saga compensations given up after all retries, by step; each leaves an order stuck for an operator.",
    ("step",))

OUTBOX_BACKLOG = Gauge(
    "tessera_outbox_backlog", "Outbox rows not yet published, as last counted by the relay.", ("service",))
OUTBOX_PUBLISH_LAG = Histogram(
    "tessera_outbox_publish_lag_seconds", "Time from an outbox row's write to the broker confirming its publish.",
    ("service",), buckets=SLOW_BUCKETS)
OUTBOX_OLDEST_UNPUBLISHED = Gauge(
    "tessera_outbox_oldest_unpublished_seconds",
    "Age of the oldest outbox row not yet published (0 when none): how far publishing is behind.", ("service",))
OUTBOX_PUBLISHED = Counter(
    "tessera_outbox_published_total", "Outbox events published and confirmed by the broker.",
    ("service", "event_type"))
OUTBOX_PUBLISH_FAILURES = Counter(
    "tessera_outbox_publish_failures_total", "Publish attempts that failed: broker unreachable or a nack.",
    ("service",))

OUTBOX_EVENTS_PARKED = Counter(
    "tessera_outbox_events_parked_total",
    "Outbox events parked: the broker refused each one alone for good (larger than its max_message_size, say), or it "
    "could not be made an AMQP message; kept in the outbox and passed over until `tessera outbox retry`.",
    ("service", "event_type"))
OUTBOX_PARKED = Gauge(
    "tessera_outbox_parked", "Outbox events parked and not yet put back in line, as last counted by the relay.",
    ("service",))

_CONSUMER_LABELS = ("consumer", "event_type")
CONSUMER_PROCESSED = Counter(
    "tessera_consumer_processed_total", "Messages handled and acknowledged after their transaction committed.",
    _CONSUMER_LABELS)
CONSUMER_DUPLICATES = Counter(
    "tessera_consumer_duplicates_total", "Messages acknowledged without effect: their event id was already applied.",
    _CONSUMER_LABELS)
CONSUMER_RETRIED = Counter(
    "tessera_consumer_retried_total", "Messages whose handling failed and were sent back for a delayed retry.",
    _CONSUMER_LABELS)
CONSUMER_DEAD_LETTERED = Counter(
    "tessera_consumer_dead_lettered_total", "Messages given up on after their retries, moved to the dead-letter queue.",
    _CONSUMER_LABELS)

RESERVATION_EXPIRIES = Counter(
    "tessera_inventory_reservation_expiries_total", "Stock reservations released because they expired.")

# Set by tessera_runtime.periodic.BacklogJob: a row that failed for a reason other than the database being away
# (a row edited by hand, a defect) is passed over until the job's next round; `job` is the job's name. A rate that
# never falls back to 0 means a row that needs a person; the job logs its id each time.
BATCH_JOB_ITEMS_PASSED_OVER = Counter(
    "tessera_batch_job_items_passed_over_total",
    "Rows a background job failed on and passed over until its next round, by job.", ("job",))

# Set by tessera_runtime.resilience.CircuitBreaker; `dependency` is the address its channel calls.
CIRCUIT_STATE = Gauge(
    "tessera_circuit_state",
    "State of the circuit breaker of a channel to another service: 0 closed, 1 half-open, 2 open.", ("dependency",))
CIRCUIT_TRANSITIONS = Counter(
    "tessera_circuit_transitions_total", "Circuit breaker transitions, by dependency and the state entered.",
    ("dependency", "state"))


# Set by tessera_runtime.server.Readiness after each round of checks, as the gRPC health and /health report them.
READY = Gauge(
    "tessera_ready",
    "1 while this process reports SERVING (its critical checks pass); 0 while NOT_SERVING or stopping.")
HEALTH_CHECK_UP = Gauge(
    "tessera_health_check_up",
    "Last result of each readiness check: 1 passed, 0 failed; a failing critical check makes the process NOT_SERVING.",
    ("check", "critical"))


DISCOVERY_INSTANCES = Gauge(
    "tessera_discovery_instances", "Instances of a dependency addressed through discovery, by health as last checked.",
    ("dependency", "health"))
DISCOVERY_PICKS = Counter(
    "tessera_discovery_picks_total", "Calls the balancer of a discovery address sent to each instance.",
    ("dependency", "address"))


def split_method(method: str) -> tuple[str, str]:
    """'/tessera.user.v1.UserService/GetUser' -> ('tessera.user.v1.UserService', 'GetUser')."""
    service, _, name = method.lstrip("/").rpartition("/")
    return service or "unknown", name or "unknown"


class _RpcSeries:
    """The labelled children of a handled-counter and a latency histogram, looked up once per (method, code):
    `labels()` builds and locks its key on every call, which the path of every RPC need not pay."""

    def __init__(self, handled: Counter, seconds: Histogram) -> None:
        self.handled = handled
        self.seconds = seconds
        self._children: dict[tuple[str, grpc.StatusCode], tuple[Any, Any]] = {}

    def observe(self, method: str, code: grpc.StatusCode, duration: float) -> None:
        children = self._children.get((method, code))
        if children is None:
            service, name = split_method(method)
            children = (self.handled.labels(service, name, code.name), self.seconds.labels(service, name))
            self._children[(method, code)] = children
        children[0].inc()
        children[1].observe(duration)


_SERVER_SERIES = _RpcSeries(GRPC_SERVER_HANDLED, GRPC_SERVER_HANDLING_SECONDS)
_CLIENT_SERIES = _RpcSeries(GRPC_CLIENT_HANDLED, GRPC_CLIENT_HANDLING_SECONDS)


def observe_server_rpc(method: str, code: grpc.StatusCode, duration: float) -> None:
    """RPC observer of every TesseraServer (see ServerInterceptor.observers)."""
    _SERVER_SERIES.observe(method, code, duration)


def server_rpcs_in_flight(method: str) -> Any:
    """The in-flight gauge's child for `method`, which ServerInterceptor looks up once per method and raises while
    each call runs."""
    return GRPC_SERVER_IN_FLIGHT.labels(*split_method(method))


def observe_client_rpc(method: str, code: grpc.StatusCode, duration: float) -> None:
    _CLIENT_SERIES.observe(method, code, duration)


def _code_of(exc: BaseException) -> grpc.StatusCode:
    if isinstance(exc, grpc.aio.AioRpcError):
        return exc.code()
    code = getattr(exc, "code", None)  # tessera_runtime.errors.DomainError raised before the call was made
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(exc, TimeoutError):
        return grpc.StatusCode.DEADLINE_EXCEEDED
    if not isinstance(exc, Exception):  # asyncio.CancelledError: the caller gave up
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class ClientMetricsInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Client-side RED for every call on a channel from `tessera_runtime.clients.open_channel`; the outermost
    interceptor, so the latency includes the channel's retries and a call refused before it left counts too."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        method = client_call_details.method
        method = method.decode() if isinstance(method, bytes) else method
        start = time.perf_counter()
        try:
            call = await continuation(client_call_details, request)
            code = await call.code()
        except BaseException as exc:
            observe_client_rpc(method, _code_of(exc), time.perf_counter() - start)
            raise
        observe_client_rpc(method, code, time.perf_counter() - start)
        return call


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would flood the JSON logs; access is visible in the metrics instead."""


class MetricsServer:
    """The process's HTTP side door on its own thread: /metrics (Prometheus text format) and /health (the
    readiness report as JSON: 200 when UP or DEGRADED, 503 when DOWN)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, registry: CollectorRegistry = REGISTRY,
                 health: Callable[[], dict] | None = None) -> None:
        self.host = host
        self.requested_port = port
        self.registry = registry
        self.health = health
        self.port = 0
        self._httpd: Any = None
        self._thread: Any = None

    def _app(self) -> Callable:
        metrics_app = make_wsgi_app(self.registry)

        def app(environ: dict, start_response: Callable) -> list[bytes]:
            if environ.get("PATH_INFO") == "/health" and self.health is not None:
                report = self.health()
                status = "503 Service Unavailable" if report.get("status") == "DOWN" else "200 OK"
                start_response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store")])
                return [json.dumps(report).encode()]
            return metrics_app(environ, start_response)

        return app

    def start(self) -> int:
        self._httpd = make_server(self.host, self.requested_port, self._app(), ThreadingWSGIServer,
                                  handler_class=_QuietHandler)
        self.port = self._httpd.server_port
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics served", extra={"metrics_url": f"http://{self.host}:{self.port}/metrics"})
        return self.port

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join(timeout=5)
            self._httpd = None
