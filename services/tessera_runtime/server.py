"""grpc.aio server bootstrap: interceptors, real health, reflection, and graceful shutdown on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from tessera_runtime import metrics
from tessera_runtime.interceptors import RpcObserver, ServerInterceptor

if TYPE_CHECKING:
    from tessera_runtime.discovery import Registration

log = logging.getLogger("tessera.server")

# Health service names: "" and each gRPC service name report readiness (dependencies reachable);
# LIVENESS reports only that the process serves, so a failing database never gets a pod restarted.
LIVENESS = "liveness"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

ReadinessCheck = Callable[[], Awaitable[bool]]


@dataclasses.dataclass(frozen=True)
class HealthCheck:
    """A named dependency check. A failing critical check makes the service NOT_SERVING (its database); a
    failing non-critical one only marks it DEGRADED (the broker: events wait in the outbox; a downstream service:
    the saga compensates), because taking this service out of rotation would not help and would cascade."""

    name: str
    check: ReadinessCheck
    critical: bool = True


def _as_health_check(item: HealthCheck | ReadinessCheck) -> HealthCheck:
    if isinstance(item, HealthCheck):
        return item
    owner = getattr(getattr(item, "__self__", None), "__class__", None)
    name = (owner.__name__ if owner is not None else getattr(item, "__name__", "check")).lower()
    return HealthCheck(name=name, check=item)

# Request metadata a server takes: what the gateway admits (request headers up to 60 KiB, gateway.yaml's
# limits.max_request_headers_kb) plus the headers it adds, with room for gRPC's count of 32 bytes per entry. gRPC's
# own limits (8 KiB, refused at random up to 16 KiB) would answer RESOURCE_EXHAUSTED to calls the gateway let through.
MAX_METADATA_BYTES = 96 * 1024

_SERVER_OPTIONS = (
    ("grpc.so_reuseport", 1),
    ("grpc.max_receive_message_length", 4 * 1024 * 1024),
    ("grpc.max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
)


class ServiceFailure:
    """A failure a part of a running service reports from any thread when the process cannot go on (a consumer
    whose queue must be migrated first): `tessera serve` then stops the server gracefully and exits with it."""

    def __init__(self) -> None:
        self.error: Exception | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None

    def report(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(event.set)

    async def wait(self) -> Exception:
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        if self.error is None:
            await self._event.wait()
        assert self.error is not None
        return self.error


@dataclasses.dataclass
class ServiceModule:
    """What one Tessera service contributes to its server; built by the service's composition root."""

    service_names: tuple[str, ...]
    register: Callable[[grpc.aio.Server], None]
    domain: str
    readiness_checks: Sequence[HealthCheck | ReadinessCheck] = ()
    on_start: Sequence[Callable[[], Awaitable[None]]] = ()
    on_stop: Sequence[Callable[[], Awaitable[None]]] = ()
    # Run during the grace period, alongside the in-flight calls finishing, and given its length in seconds: work
    # that must end within the same TESSERA_GRACE_SECONDS (an event consumer letting its handlers finish). They
    # end before the on_stop hooks run.
    on_grace: Sequence[Callable[[float], Awaitable[None]]] = ()
    rpc_observers: tuple[RpcObserver, ...] = ()
    extra_interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()
    failure: ServiceFailure = dataclasses.field(default_factory=ServiceFailure)


class Readiness:
    """Runs the health checks periodically, reflects them in the gRPC health servicer, and keeps a report
    ({status: UP | DEGRADED | DOWN, checks: {name: {status, error}}}) for the /health endpoint."""

    def __init__(self, health: HealthServicer, names: Sequence[str], checks: Sequence[HealthCheck | ReadinessCheck],
                 interval: float, check_timeout: float = 2.0) -> None:
        self.health = health
        self.names = ("", *names)
        self.checks = [_as_health_check(c) for c in checks]
        self.interval = interval
        self.check_timeout = check_timeout
        self.ready: bool | None = None
        self.report: dict = {"status": "DOWN", "checks": {}}
        self._task: asyncio.Task[None] | None = None

    async def _run(self, item: HealthCheck) -> tuple[bool, str | None]:
        try:
            async with asyncio.timeout(self.check_timeout):
                return bool(await item.check()), None
        except Exception as exc:  # a failing check means not ready, whatever the cause
            return False, f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__

    async def check_once(self) -> bool:
        results = await asyncio.gather(*(self._run(c) for c in self.checks))
        checks, ok, degraded = {}, True, False
        for item, (passed, error) in zip(self.checks, results, strict=True):
            checks[item.name] = {"status": "UP" if passed else "DOWN", "critical": item.critical,
                                 **({"error": error} if error else {})}
            metrics.HEALTH_CHECK_UP.labels(item.name, "true" if item.critical else "false").set(1 if passed else 0)
            if not passed:
                ok = ok and not item.critical
                degraded = degraded or not item.critical
        self.report = {"status": "DOWN" if not ok else "DEGRADED" if degraded else "UP", "checks": checks}
        if ok != self.ready:
            log.info("readiness changed", extra={"ready": ok, "health": self.report})
            self.ready = ok
        metrics.READY.set(1 if ok else 0)
        for name in self.names:
            await self.health.set(name, SERVING if ok else NOT_SERVING)
        return ok

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self.check_once()

    def leave_rotation(self) -> None:
        """A graceful stop began: the /health report and tessera_ready say what the gRPC health now says."""
        self.report = {**self.report, "status": "DOWN", "shutting_down": True}
        metrics.READY.set(0)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="readiness")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class TesseraServer:
    """A started gRPC server with its health, reflection and readiness loop."""

    def __init__(self, module: ServiceModule, *, host: str = "127.0.0.1", port: int = 0,
                 require_identity: bool = False, readiness_interval: float = 1.0,
                 drain_seconds: float = 0.0, grace_seconds: float = 5.0,
                 metrics_port: int | None = None,
                 registration: Callable[[TesseraServer], Registration | None] | None = None) -> None:
        self.module = module
        # Service discovery without a mesh: builds this server's registration once its port is bound (None when no
        # registry is configured); registered once serving, deregistered first thing on a graceful stop.
        self._registration_for = registration
        self.registration: Registration | None = None
        self.host = host
        self.requested_port = port
        self.drain_seconds = drain_seconds
        self.grace_seconds = grace_seconds
        self.health = HealthServicer()
        interceptors = (
            ServerInterceptor(domain=module.domain, require_identity=require_identity,
                              observers=(metrics.observe_server_rpc, *module.rpc_observers)),
            *module.extra_interceptors,
        )
        self.server = grpc.aio.server(interceptors=interceptors, options=_SERVER_OPTIONS)
        self.readiness = Readiness(self.health, module.service_names, module.readiness_checks,
                                   readiness_interval)
        self.port = 0
        # None: no /metrics endpoint; 0: an ephemeral port (tests); the process's settings give a fixed one.
        self.metrics = None if metrics_port is None else metrics.MetricsServer(
            host, metrics_port, health=lambda: self.readiness.report)
        self._stopped = False

    async def start(self) -> int:
        for hook in self.module.on_start:
            await hook()
        self.module.register(self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*self.module.service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self.server,
        )
        self.port = self.server.add_insecure_port(f"{self.host}:{self.requested_port}")
        if self.port == 0:
            raise RuntimeError(f"could not bind {self.host}:{self.requested_port}")
        await self.health.set(LIVENESS, SERVING)
        await self.readiness.check_once()
        await self.server.start()
        if self.metrics is not None:
            self.metrics.start()
        self.readiness.start()
        if self._registration_for is not None:
            self.registration = self._registration_for(self)
            if self.registration is not None:
                await self.registration.start()
        log.info("serving", extra={"address": f"{self.host}:{self.port}",
                                   "services": list(self.module.service_names)})
        return self.port

    async def stop(self) -> None:
        """Graceful stop: NOT_SERVING first, keep serving through the drain period, then finish in-flight calls."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        if self.registration is not None:
            await self.registration.stop()
        await self.readiness.stop()
        self.readiness.leave_rotation()
        if self.drain_seconds > 0:
            log.info("draining", extra={"drain_seconds": self.drain_seconds})
            await asyncio.sleep(self.drain_seconds)
        outcomes = await asyncio.gather(self.server.stop(self.grace_seconds),
                                        *(hook(self.grace_seconds) for hook in self.module.on_grace),
                                        return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                log.error("error while stopping", exc_info=outcome)
        for hook in reversed(self.module.on_stop):
            try:
                await hook()
            except Exception:
                log.exception("error while stopping")
        if self.metrics is not None:
            await asyncio.to_thread(self.metrics.stop)  # waits for the HTTP thread's poll loop to notice
        log.info("stopped")


async def create_server(module: ServiceModule, address: str = "127.0.0.1:0", **options) -> tuple[TesseraServer, int]:
    """Builds and starts a server on address (port 0 picks a free port); returns it with the bound port."""
    host, _, port = address.rpartition(":")
    server = TesseraServer(module, host=host or "127.0.0.1", port=int(port or 0), **options)
    bound = await server.start()
    return server, bound


async def serve_until_signalled(server: TesseraServer, on_ready: Callable[[int], None] | None = None) -> None:
    """Runs a started server until SIGTERM or SIGINT, then stops it gracefully. A failure the service reports
    (ServiceModule.failure) stops it the same way, then is raised."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready(server.port)
    signalled = loop.create_task(stop.wait())
    failed = loop.create_task(server.module.failure.wait())
    await asyncio.wait((signalled, failed), return_when=asyncio.FIRST_COMPLETED)
    for task in (signalled, failed):
        task.cancel()
    if failed.done() and not failed.cancelled():
        await server.stop()
        raise failed.result()
    log.info("signal received, shutting down")
    await server.stop()
