"""Composition root of the analytics service: database, event consumer and servicer."""

from __future__ import annotations

from pathlib import Path

from tessera.analytics.v1 import analytics_service_pb2, analytics_service_pb2_grpc

from tessera_analytics import DOMAIN, subscriptions
from tessera_analytics.adapters.orm import processed_events
from tessera_analytics.entrypoints import event_consumer
from tessera_analytics.entrypoints.grpc_servicer import AnalyticsServicer
from tessera_analytics.service_layer.unit_of_work import AnalyticsUnitOfWork
from tessera_runtime.db import Database
from tessera_runtime.messaging import MessagingServiceSettings, attach_consumer
from tessera_runtime.migrations import upgrade_async
from tessera_runtime.server import ServiceModule

SERVICE = "analytics"
DEFAULT_PORT = 50056
SETTINGS = MessagingServiceSettings
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SERVICE_NAME = analytics_service_pb2.DESCRIPTOR.services_by_name["AnalyticsService"].full_name
# The queues this service consumes from (`tessera dlq list` shows their dead-letter queues).
CONSUMER_QUEUES = tuple(subscriptions.ROUTES)


async def build(settings: MessagingServiceSettings, *, migrate: bool = True) -> ServiceModule:
    db = Database(settings.database_url, pool_size=settings.database_pool_size)

    async def start() -> None:
        if migrate:
            await upgrade_async(MIGRATIONS, settings.database_url)

    def uow() -> AnalyticsUnitOfWork:
        return AnalyticsUnitOfWork(db)

    servicer = AnalyticsServicer(uow)
    module = ServiceModule(
        service_names=(SERVICE_NAME,),
        register=lambda server: analytics_service_pb2_grpc.add_AnalyticsServiceServicer_to_server(servicer, server),
        domain=DOMAIN,
        readiness_checks=(db.ping,),
        on_start=(start,),
        on_stop=(db.dispose,),
    )
    attach_consumer(module, settings, event_consumer.subscription(uow), processed=(db, processed_events))
    return module
