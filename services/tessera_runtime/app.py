"""Runs one Tessera service process: settings, logging, composition root, server, graceful shutdown."""

from __future__ import annotations

import asyncio
import importlib
import logging
import sys
from collections.abc import Awaitable, Callable
from types import ModuleType
from typing import Any

from tessera_runtime.config import ConfigError, ServiceSettings
from tessera_runtime.db import cannot_connect, database_location, first_line
from tessera_runtime.discovery import registration
from tessera_runtime.logs import setup_logging
from tessera_runtime.messaging.topology import MIGRATE_COMMAND, QueueNotMigrated
from tessera_runtime.server import ServiceModule, TesseraServer, serve_until_signalled
from tessera_runtime.telemetry import setup_telemetry

log = logging.getLogger("tessera.app")

# Exit status of `tessera serve` when the service's database cannot be reached or entered as it starts (down, no
# such database, login refused): one JSON log line names where, and the orchestrator restarts the process later
# (Kubernetes with its back-off). 2 is a configuration error; 128 + N a worker killed by signal N.
EXIT_DATABASE_UNAVAILABLE = 3
# Exit status when a consumer finds its queue declared as the other type than TESSERA_QUEUE_TYPE (a classic queue
# while it is quorum, or the other way round): one JSON log line names the queue, both types and the command that
# converts it (`tessera queues migrate`); restarting cannot help before that or a change of the setting.
EXIT_QUEUES_NOT_MIGRATED = 4

# Service name → module of its composition root. A composition root exposes SETTINGS (a ServiceSettings class),
# DEFAULT_PORT, SERVICE (the short name), `async def build(settings) -> ServiceModule` and MIGRATIONS (a Path).
SERVICES: dict[str, str] = {
    "user": "tessera_user.bootstrap",
    "inventory": "tessera_inventory.bootstrap",
    "payment": "tessera_payment.bootstrap",
    "order": "tessera_order.bootstrap",
    "notification": "tessera_notification.bootstrap",
    "analytics": "tessera_analytics.bootstrap",
}


def composition_root(service: str) -> ModuleType:
    if service not in SERVICES:
        raise SystemExit(f"unknown service {service!r}; known: {', '.join(SERVICES)}")
    return importlib.import_module(SERVICES[service])


def load_settings(root: ModuleType, environ: dict[str, str] | None = None) -> Any:
    settings_cls: type[ServiceSettings] = root.SETTINGS
    return settings_cls.from_env(root.SERVICE, root.DEFAULT_PORT, environ)


async def start_service(root: ModuleType, settings: Any) -> TesseraServer:
    build: Callable[[Any], Awaitable[ServiceModule]] = root.build
    module = await build(settings)
    server = TesseraServer(
        module, host=settings.grpc_host, port=settings.grpc_port, require_identity=settings.require_identity,
        readiness_interval=settings.readiness_interval_seconds, drain_seconds=settings.drain_seconds,
        grace_seconds=settings.grace_seconds, metrics_port=settings.metrics_port or None,
        registration=lambda started: registration(settings.discovery, settings.service, settings.grpc_host,
                                                  started.port, ready=lambda: started.readiness.ready),
    )
    await server.start()
    return server


def _announce(service: str, host: str) -> Callable[[int], None]:
    def announce(port: int) -> None:
        # One plain line on stdout, for scripts and humans that start the process and want its address.
        print(f"tessera-{service} listening on {host}:{port}", flush=True)

    return announce


def run(service: str) -> int:
    root = composition_root(service)
    try:
        settings = load_settings(root)
    except ConfigError as exc:
        print(f"tessera-{service}: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(f"{service}-service", settings.log_level)
    from tessera_runtime.workers import die_with_supervisor, supervise

    if settings.workers > 1:
        # The parent only supervises; each worker is this same command with TESSERA_WORKERS=1.
        return supervise(service, settings)
    die_with_supervisor()  # in a worker: never outlive the parent that supervises it
    try:
        setup_telemetry(f"{service}-service", settings)
    except ConfigError as exc:
        print(f"tessera-{service}: configuration error: {exc}", file=sys.stderr)
        return 2

    def not_migrated(exc: QueueNotMigrated) -> int:
        log.error("%s; exiting", exc, extra={"queue": exc.queue, "queue_type": exc.configured,
                                             "found_queue_type": exc.found, "command": MIGRATE_COMMAND,
                                             "exit_code": EXIT_QUEUES_NOT_MIGRATED})
        return EXIT_QUEUES_NOT_MIGRATED

    async def main() -> int:
        try:
            server = await start_service(root, settings)
        except QueueNotMigrated as exc:
            return not_migrated(exc)
        except Exception as exc:
            if not cannot_connect(exc):
                raise
            log.error("cannot use the database at start; exiting", extra={
                "database": database_location(settings.database_url), "error": first_line(exc),
                "exit_code": EXIT_DATABASE_UNAVAILABLE})
            return EXIT_DATABASE_UNAVAILABLE
        try:
            await serve_until_signalled(server, _announce(service, settings.grpc_host))
        except QueueNotMigrated as exc:  # found once the broker could be reached, after the start
            return not_migrated(exc)
        return 0

    return asyncio.run(main())
