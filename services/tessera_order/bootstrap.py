"""Composition root of the order service: database, downstream channels, saga coordinator, outbox relay and
servicer."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tessera.order.v1 import order_service_pb2, order_service_pb2_grpc

from tessera_order import DOMAIN
from tessera_order.adapters.downstream import (
    DownstreamChannels,
    GrpcCustomerDirectory,
    GrpcInventory,
    GrpcPayments,
)
from tessera_order.adapters.orm import outbox
from tessera_order.entrypoints.grpc_servicer import OrderServicer
from tessera_order.service_layer.ports import Downstream
from tessera_order.service_layer.saga import Checkpoint, SagaCoordinator, SagaPolicy
from tessera_order.service_layer.unit_of_work import OrderUnitOfWork
from tessera_order.settings import OrderSettings
from tessera_runtime.clients import dependency_check
from tessera_runtime.db import Database
from tessera_runtime.messaging import attach_outbox_relay
from tessera_runtime.migrations import upgrade_async
from tessera_runtime.server import HealthCheck, ServiceModule

SERVICE = "order"
DEFAULT_PORT = 50054
SETTINGS = OrderSettings
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SERVICE_NAME = order_service_pb2.DESCRIPTOR.services_by_name["OrderService"].full_name
# Exit code of the crash fault injection: what a shell reports for a process killed by SIGKILL.
CRASH_EXIT_CODE = 137

log = logging.getLogger("tessera.order")


def policy(settings: OrderSettings) -> SagaPolicy:
    return SagaPolicy(
        step_max_attempts=settings.step_max_attempts,
        compensation_max_attempts=settings.compensation_max_attempts,
        initial_backoff_seconds=settings.retry_initial_backoff_seconds,
        max_backoff_seconds=settings.retry_max_backoff_seconds,
        reservation_ttl_seconds=settings.reservation_ttl_seconds,
        lease_seconds=settings.saga_lease_seconds,
        recovery_batch_size=settings.recovery_batch_size,
        recovery_concurrency=settings.recovery_concurrency,
    )


def crash_after(point: str | None) -> Checkpoint | None:
    """TESSERA_ORDER_CRASH_AFTER_STEP: ends the process abruptly, like SIGKILL, once `point` is committed."""
    if point is None:
        return None

    def checkpoint(name: str) -> None:
        if name == point:
            log.critical("fault injection: exiting after %s", name)
            os._exit(CRASH_EXIT_CODE)

    return checkpoint


async def build(settings: OrderSettings, *, migrate: bool = True,
                downstream: Downstream | None = None) -> ServiceModule:
    """Wires the service. `downstream` replaces the gRPC clients of the other services (tests wrap them)."""
    db = Database(settings.database_url, pool_size=settings.database_pool_size)
    channels = None
    if downstream is None:
        channels = DownstreamChannels.from_settings(settings)
        downstream = Downstream(users=GrpcCustomerDirectory(channels.user),
                                inventory=GrpcInventory(channels.inventory),
                                payments=GrpcPayments(channels.payment, settings.payment_deadline_seconds))

    def uow() -> OrderUnitOfWork:
        return OrderUnitOfWork(db)

    sagas = SagaCoordinator(uow, downstream, policy(settings), checkpoint=crash_after(settings.crash_after_step))

    async def start() -> None:
        if migrate:
            await upgrade_async(MIGRATIONS, settings.database_url)
        if settings.recovery_enabled:
            sagas.start_recovery(settings.recovery_interval_seconds)

    async def stop() -> None:
        await sagas.stop()
        if channels is not None:
            await channels.close()
        await db.dispose()

    dependencies = [] if channels is None else [
        dependency_check(f"{name}-service", channel)
        for name, channel in (("user", channels.user), ("inventory", channels.inventory),
                              ("payment", channels.payment))
    ]
    servicer = OrderServicer(uow, sagas)
    module = ServiceModule(
        service_names=(SERVICE_NAME,),
        register=lambda server: order_service_pb2_grpc.add_OrderServiceServicer_to_server(servicer, server),
        domain=DOMAIN,
        readiness_checks=(HealthCheck("database", db.ping), *dependencies),
        on_start=(start,),
        on_stop=(stop,),
    )
    attach_outbox_relay(module, db, outbox, settings)
    return module
