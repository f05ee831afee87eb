"""The GraphQL API's HTTP server (aiohttp): POST or GET /graphql behind the Envoy gateway, /health and /metrics.

The gateway authenticates the caller (JWT) and passes the subject and scopes as x-user-id and x-user-scopes,
replacing any a client sent; a request without them is refused (401). Every request gets a request id and a
correlation id (the gateway's, or new ones), a server span that continues the caller's W3C trace (each gRPC call
it makes is a child span), a JSON access line and RED metrics; each operation is counted by outcome and error
code too (tessera_graphql.metrics).

A request with the header `canary: true` (the one value the mesh routes to a service's canary v2) passes it on to
every call it makes when the caller's scopes hold the gateway's canary scope or its admin scope; otherwise the
header is dropped, as the gateway drops it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web
from opentelemetry import propagate, trace
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from strawberry.aiohttp.views import GraphQLView

from tessera_graphql import metrics as graphql_metrics
from tessera_graphql.schema import Context, build_schema
from tessera_graphql.upstream import Scopes, Upstream
from tessera_runtime import context as callctx
from tessera_runtime import metrics
from tessera_runtime.config import CircuitSettings, ConfigError, Env
from tessera_runtime.discovery.model import DiscoverySettings, service_address
from tessera_runtime.logs import correlation_id_var, request_id_var, setup_logging
from tessera_runtime.telemetry import setup_telemetry

log = logging.getLogger("tessera.graphql")
access = logging.getLogger("tessera.graphql.access")
tracer = trace.get_tracer("tessera.graphql")

DEFAULT_PORT = 8090
PRINCIPAL = web.RequestKey("principal", callctx.Principal)
SCOPES = web.AppKey("scopes", Scopes)


@dataclasses.dataclass(frozen=True)
class GraphQLSettings:
    host: str
    port: int
    environment: str
    log_level: str
    addresses: Mapping[str, str]
    default_deadline_seconds: float
    circuit: CircuitSettings
    discovery: DiscoverySettings
    max_depth: int
    max_aliases: int
    max_tokens: int

    @property
    def gateway_profile(self) -> str:
        return "prod" if self.environment == "production" else "dev"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GraphQLSettings:
        env = Env(environ)
        return cls(
            host=env.str("TESSERA_GRAPHQL_HOST", "127.0.0.1"),
            port=env.int("TESSERA_GRAPHQL_PORT", DEFAULT_PORT, minimum=0, maximum=65535),
            environment=env.choice("TESSERA_ENV", "dev", ("dev", "test", "production")),
            log_level=env.choice("TESSERA_LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            addresses={
                "user": service_address(env, "TESSERA_USER_SERVICE_ADDR", "127.0.0.1:50051"),
                "inventory": service_address(env, "TESSERA_INVENTORY_SERVICE_ADDR", "127.0.0.1:50052"),
                "order": service_address(env, "TESSERA_ORDER_SERVICE_ADDR", "127.0.0.1:50054"),
                "analytics": service_address(env, "TESSERA_ANALYTICS_SERVICE_ADDR", "127.0.0.1:50056"),
            },
            default_deadline_seconds=env.float("TESSERA_DEFAULT_DEADLINE_SECONDS", 5.0, minimum=0.01),
            circuit=CircuitSettings.from_env(env),
            discovery=DiscoverySettings.from_env(env),
            max_depth=env.int("TESSERA_GRAPHQL_MAX_DEPTH", 10, minimum=2, maximum=50),
            max_aliases=env.int("TESSERA_GRAPHQL_MAX_ALIASES", 30, minimum=1, maximum=1000),
            max_tokens=env.int("TESSERA_GRAPHQL_MAX_TOKENS", 2000, minimum=100, maximum=100_000),
        )


class _View(GraphQLView):
    def __init__(self, upstream: Upstream, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.upstream = upstream

    async def get_context(self, request: web.Request, response: Any) -> dict[str, Any]:
        return {"request": request, "response": response, "principal": request[PRINCIPAL],
                "tessera": Context(self.upstream)}


def _unauthenticated(principal: callctx.Principal | None) -> web.Response | None:
    """The 401 for a request without a caller identity, or whose identity headers no gRPC call could pass on (a tab,
    a character outside printable ASCII: the gateway writes none from a verified token); None when it has one."""
    if principal is None:
        message, reason = "the request carries no caller identity; call through the gateway with a token", \
            "TOKEN_MISSING"
    elif not (callctx.sendable(principal.subject) and all(callctx.sendable(s) for s in principal.scopes)):
        message, reason = (f"the caller identity headers ({callctx.SUBJECT}, {callctx.SCOPES}) hold characters "
                           "other than printable ASCII; call through the gateway with a token"), "IDENTITY_INVALID"
    else:
        return None
    return web.json_response({"errors": [{"message": message,
                                          "extensions": {"code": "UNAUTHENTICATED", "reason": reason}}]}, status=401)


@web.middleware
async def _per_request(request: web.Request,
                       handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    if request.path != "/graphql":
        return await handler(request)
    start = time.perf_counter()
    request_id = callctx.clean_id(request.headers.get(callctx.REQUEST_ID)) or str(uuid.uuid4())
    correlation_id = callctx.clean_id(request.headers.get(callctx.CORRELATION_ID)) or request_id
    principal = callctx.principal_from(request.headers)
    request[PRINCIPAL] = principal
    canary = (principal is not None and callctx.asks_for_canary(request.headers.getall(callctx.CANARY, []))
              and request.app[SCOPES].may_choose_canary(principal))
    tokens = (request_id_var.set(request_id), correlation_id_var.set(correlation_id),
              callctx.principal_var.set(principal), callctx.canary_var.set(canary))
    status = 500
    try:
        with tracer.start_as_current_span(f"{request.method} /graphql", kind=trace.SpanKind.SERVER,
                                          context=propagate.extract(request.headers)) as span:
            span.set_attribute("http.request.method", request.method)
            span.set_attribute("tessera.request_id", request_id)
            try:
                response = _unauthenticated(principal) or await handler(request)
            except web.HTTPException as exc:  # aiohttp's answer, raised (405 for a method /graphql has no route for)
                status = exc.status
                span.set_attribute("http.response.status_code", status)
                raise
            status = response.status
            span.set_attribute("http.response.status_code", status)
        response.headers[callctx.REQUEST_ID] = request_id
        response.headers[callctx.CORRELATION_ID] = correlation_id
        return response
    finally:
        elapsed = time.perf_counter() - start
        outcome = "ok" if status < 400 else ("client_error" if status < 500 else "server_error")
        graphql_metrics.REQUESTS.labels(outcome).inc()
        graphql_metrics.DURATION.labels(outcome).observe(elapsed)
        access.info("%s /graphql %d", request.method, status, extra={
            "http_status": status, "duration_ms": round(elapsed * 1000, 2),
            "subject": principal.subject if principal else None})
        callctx.canary_var.reset(tokens[3])
        callctx.principal_var.reset(tokens[2])
        correlation_id_var.reset(tokens[1])
        request_id_var.reset(tokens[0])


async def _health(request: web.Request) -> web.Response:
    return web.json_response({"status": "UP", "service": "graphql"})


async def _metrics(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def build_app(settings: GraphQLSettings, scopes: Scopes | None = None) -> web.Application:
    """The aiohttp application; its channels to the services close with it."""
    scopes = scopes or Scopes.from_gateway(settings.gateway_profile)
    upstream = Upstream(settings.addresses, scopes, settings.default_deadline_seconds, settings.circuit,
                        settings.discovery)
    schema = build_schema(max_depth=settings.max_depth, max_aliases=settings.max_aliases,
                          max_tokens=settings.max_tokens)
    app = web.Application(middlewares=[_per_request], client_max_size=1024 * 1024)
    app[SCOPES] = scopes
    view = _View(upstream, schema=schema, graphql_ide=None)
    app.router.add_route("GET", "/graphql", view)
    app.router.add_route("POST", "/graphql", view)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)

    async def close(_: web.Application) -> None:
        await upstream.close()

    app.on_cleanup.append(close)
    return app


async def serve(settings: GraphQLSettings) -> None:
    """Serves until SIGTERM or SIGINT, then stops taking requests and lets those in flight finish."""
    app = build_app(settings)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port, shutdown_timeout=10)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.port
    log.info("listening on %s:%d", settings.host, port, extra={"port": port})
    # The runtime's tessera_ready is in this process's /metrics too: it says what /health says (UP while it serves),
    # and 0 once it stops, as a service's does.
    metrics.READY.set(1)
    # One plain line on stdout, like the services', for scripts and humans that want the address.
    print(f"tessera-graphql listening on {settings.host}:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    metrics.READY.set(0)
    await runner.cleanup()


def main() -> int:
    try:
        settings = GraphQLSettings.from_env()
    except ConfigError as exc:
        print(f"tessera-graphql: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging("graphql", settings.log_level)
    try:
        setup_telemetry("graphql", settings)
    except ConfigError as exc:
        print(f"tessera-graphql: configuration error: {exc}", file=sys.stderr)
        return 2
    asyncio.run(serve(settings))
    return 0
