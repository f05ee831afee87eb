"""Composition root of the user service: the one place that wires database, unit of work and servicer."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

from tessera.user.v1 import user_service_pb2, user_service_pb2_grpc

from tessera_runtime.config import Env, ServiceSettings
from tessera_runtime.db import Database
from tessera_runtime.messaging import MessagingServiceSettings, attach_outbox_relay
from tessera_runtime.migrations import upgrade_async
from tessera_runtime.server import ServiceModule
from tessera_user import DOMAIN
from tessera_user.adapters.orm import outbox
from tessera_user.entrypoints.create_request_sweeper import CreateRequestSweeper
from tessera_user.entrypoints.grpc_servicer import UserServicer
from tessera_user.service_layer.unit_of_work import UserUnitOfWork

SERVICE = "user"
DEFAULT_PORT = 50051
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SERVICE_NAME = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name


@dataclasses.dataclass(frozen=True)
class UserSettings(MessagingServiceSettings):
    """MessagingServiceSettings plus how long answered CreateUser calls are kept for their repeats."""

    # A CreateUser repeated with the same request_id within this many seconds gets the first call's answer back.
    create_request_retention_seconds: float = 86_400.0
    # How often the records older than that are forgotten, and how many per round.
    create_request_sweep_seconds: float = 60.0
    create_request_sweep_batch: int = 500

    @classmethod
    def extra_from_env(cls, env: Env) -> dict[str, Any]:
        return super().extra_from_env(env) | dict(
            create_request_retention_seconds=env.float("TESSERA_CREATE_REQUEST_RETENTION_SECONDS", 86_400.0,
                                                       minimum=1.0),
            create_request_sweep_seconds=env.float("TESSERA_CREATE_REQUEST_SWEEP_SECONDS", 60.0, minimum=0.05),
            create_request_sweep_batch=env.int("TESSERA_CREATE_REQUEST_SWEEP_BATCH", 500, minimum=1,
                                               maximum=10_000),
        )


SETTINGS = UserSettings


async def build(settings: ServiceSettings, *, migrate: bool = True) -> ServiceModule:
    settings = UserSettings.of(settings)  # plain ServiceSettings: the user service's defaults apply
    db = Database(settings.database_url, pool_size=settings.database_pool_size)

    def unit_of_work() -> UserUnitOfWork:
        return UserUnitOfWork(db)

    sweeper = CreateRequestSweeper(unit_of_work, dt.timedelta(seconds=settings.create_request_retention_seconds),
                                   settings.create_request_sweep_seconds, settings.create_request_sweep_batch)

    async def start() -> None:
        if migrate:
            await upgrade_async(MIGRATIONS, settings.database_url)
        sweeper.start()

    servicer = UserServicer(unit_of_work)
    module = ServiceModule(
        service_names=(SERVICE_NAME,),
        register=lambda server: user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, server),
        domain=DOMAIN,
        readiness_checks=(db.ping,),
        on_start=(start,),
        on_stop=(db.dispose, sweeper.stop),  # run in reverse: the sweeper stops before the database closes
    )
    attach_outbox_relay(module, db, outbox, settings)
    return module
