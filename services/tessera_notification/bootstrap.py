"""Composition root of the notification service: database, mailer, event consumer, outbox relay and servicer."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from tessera.notification.v1 import notification_service_pb2, notification_service_pb2_grpc

from tessera_notification import DOMAIN, subscriptions
from tessera_notification.adapters.mail import FileMailer, Mailer, SmtpMailer
from tessera_notification.adapters.orm import outbox, processed_events
from tessera_notification.entrypoints import event_consumer
from tessera_notification.entrypoints.grpc_servicer import NotificationServicer
from tessera_notification.service_layer.handlers import Dispatch
from tessera_notification.service_layer.unit_of_work import NotificationUnitOfWork
from tessera_notification.settings import MailSettings, NotificationSettings
from tessera_runtime.db import Database
from tessera_runtime.messaging import attach_consumer, attach_outbox_relay
from tessera_runtime.migrations import upgrade_async
from tessera_runtime.server import ServiceModule

SERVICE = "notification"
DEFAULT_PORT = 50055
SETTINGS = NotificationSettings
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SERVICE_NAME = notification_service_pb2.DESCRIPTOR.services_by_name["NotificationService"].full_name
# The queues this service consumes from (`tessera dlq list` shows their dead-letter queues).
CONSUMER_QUEUES = tuple(subscriptions.ROUTES)


def build_mailer(mail: MailSettings) -> Mailer:
    if mail.smtp is not None:
        return SmtpMailer(mail.smtp, mail.sender)
    return FileMailer(mail.mail_dir, mail.sender)


async def build(settings: NotificationSettings, *, migrate: bool = True) -> ServiceModule:
    db = Database(settings.database_url, pool_size=settings.database_pool_size)

    async def start() -> None:
        if migrate:
            await upgrade_async(MIGRATIONS, settings.database_url)

    def uow() -> NotificationUnitOfWork:
        return NotificationUnitOfWork(db)

    dispatch = Dispatch(uow=uow, mailer=build_mailer(settings.mail), mail_domain=settings.mail.mail_domain,
                        lease=dt.timedelta(seconds=settings.mail.lease_seconds))
    servicer = NotificationServicer(uow)
    module = ServiceModule(
        service_names=(SERVICE_NAME,),
        register=lambda server: notification_service_pb2_grpc.add_NotificationServiceServicer_to_server(
            servicer, server),
        domain=DOMAIN,
        readiness_checks=(db.ping,),
        on_start=(start,),
        on_stop=(db.dispose,),
    )
    attach_outbox_relay(module, db, outbox, settings)
    attach_consumer(module, settings, event_consumer.subscription(uow, dispatch), processed=(db, processed_events))
    return module
