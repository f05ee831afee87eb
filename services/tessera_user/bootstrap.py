"""Composition root of the user service: the one place that wires database, unit of work and servicer."""

from __future__ import annotations

from pathlib import Path

from tessera.user.v1 import user_service_pb2, user_service_pb2_grpc

from tessera_runtime.config import ServiceSettings
from tessera_runtime.db import Database
from tessera_runtime.messaging import MessagingServiceSettings, attach_outbox_relay
from tessera_runtime.migrations import upgrade_async
from tessera_runtime.server import ServiceModule
from tessera_user import DOMAIN
from tessera_user.adapters.orm import outbox
from tessera_user.entrypoints.grpc_servicer import UserServicer
from tessera_user.service_layer.unit_of_work import UserUnitOfWork

SERVICE = "user"
DEFAULT_PORT = 50051
SETTINGS = MessagingServiceSettings
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SERVICE_NAME = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name


async def build(settings: ServiceSettings, *, migrate: bool = True) -> ServiceModule:
    db = Database(settings.database_url, pool_size=settings.database_pool_size)

    async def start() -> None:
        if migrate:
            await upgrade_async(MIGRATIONS, settings.database_url)

    servicer = UserServicer(lambda: UserUnitOfWork(db))
    module = ServiceModule(
        service_names=(SERVICE_NAME,),
        register=lambda server: user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, server),
        domain=DOMAIN,
        readiness_checks=(db.ping,),
        on_start=(start,),
        on_stop=(db.dispose,),
    )
    attach_outbox_relay(module, db, outbox, settings)
    return module
