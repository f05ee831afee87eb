"""Composition root of the inventory service: the one place that wires database, unit of work, servicer and
the reservation sweeper."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

from tessera.inventory.v1 import inventory_service_pb2, inventory_service_pb2_grpc

from tessera_inventory import DOMAIN
from tessera_inventory.adapters.orm import outbox
from tessera_inventory.entrypoints.grpc_servicer import InventoryServicer
from tessera_inventory.entrypoints.reservation_sweeper import ReservationSweeper
from tessera_inventory.service_layer.unit_of_work import InventoryUnitOfWork
from tessera_runtime.config import ConfigError, Env, ServiceSettings
from tessera_runtime.db import Database
from tessera_runtime.messaging import MessagingServiceSettings, attach_outbox_relay
from tessera_runtime.migrations import upgrade_async
from tessera_runtime.server import ServiceModule

SERVICE = "inventory"
DEFAULT_PORT = 50052
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SERVICE_NAME = inventory_service_pb2.DESCRIPTOR.services_by_name["InventoryService"].full_name


@dataclasses.dataclass(frozen=True)
class InventorySettings(MessagingServiceSettings):
    """MessagingServiceSettings plus the reservation sweeper's. The defaults are the contract's (15 minute
    reservations)."""

    # How often the sweeper looks for ACTIVE reservations past their expire_time.
    reservation_sweep_seconds: float = 5.0
    # Lifetime of a reservation whose ReserveStock left ttl unset.
    reservation_default_ttl_seconds: float = 900.0
    # Reservations expired per sweep transaction batch.
    reservation_sweep_batch: int = 100

    @classmethod
    def extra_from_env(cls, env: Env) -> dict[str, Any]:
        values = super().extra_from_env(env)
        ttl = env.float("TESSERA_RESERVATION_DEFAULT_TTL_SECONDS", 900.0, minimum=0.1)
        if ttl > 86_400:
            raise ConfigError(f"TESSERA_RESERVATION_DEFAULT_TTL_SECONDS must be <= 86400, got {ttl}")
        return values | dict(
            reservation_sweep_seconds=env.float("TESSERA_RESERVATION_SWEEP_SECONDS", 5.0, minimum=0.05),
            reservation_default_ttl_seconds=ttl,
            reservation_sweep_batch=env.int("TESSERA_RESERVATION_SWEEP_BATCH", 100, minimum=1, maximum=10_000),
        )


SETTINGS = InventorySettings


async def build(settings: ServiceSettings, *, migrate: bool = True) -> ServiceModule:
    settings = InventorySettings.of(settings)  # plain ServiceSettings: the inventory defaults apply
    db = Database(settings.database_url, pool_size=settings.database_pool_size)

    def unit_of_work() -> InventoryUnitOfWork:
        return InventoryUnitOfWork(db)

    sweeper = ReservationSweeper(unit_of_work, settings.reservation_sweep_seconds, settings.reservation_sweep_batch)

    async def start() -> None:
        if migrate:
            await upgrade_async(MIGRATIONS, settings.database_url)
        sweeper.start()

    servicer = InventoryServicer(unit_of_work,
                                 default_ttl=dt.timedelta(seconds=settings.reservation_default_ttl_seconds))
    module = ServiceModule(
        service_names=(SERVICE_NAME,),
        register=lambda server: inventory_service_pb2_grpc.add_InventoryServiceServicer_to_server(servicer, server),
        domain=DOMAIN,
        readiness_checks=(db.ping,),
        on_start=(start,),
        on_stop=(db.dispose, sweeper.stop),  # run in reverse: the sweeper stops before the database closes
    )
    attach_outbox_relay(module, db, outbox, settings)
    return module
