"""The notification service's copy of a user, on each backend: a deletion and a change applied at the same moment
leave the user deleted, whichever writes last. Each, about to write, waits (up to a second) for the other, and the
change then writes last: unless the copy is held from its read to the commit, the change, having read the user
before the deletion, brings the deleted user back, and order e-mails go to them again."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tessera_notification import bootstrap
from tessera_notification.adapters.repository import SqlAlchemyRecipientRepository
from tessera_notification.service_layer import commands, handlers
from tessera_notification.service_layer.unit_of_work import NotificationUnitOfWork
from tessera_runtime.messaging import EventMeta
from tests.support.concurrency import meet_before
from tests.support.databases import migrated

USER = "5d1c8e2a-7b3f-4c9d-8e1a-2f3b4c5d6e7f"


def user(version: int, email: str) -> commands.RecordUser:
    return commands.RecordUser(user_id=USER, email=email, display_name="Ada", locale="en",
                               order_update_emails=True, version=version)


def meta(event_type: str) -> EventMeta:
    return EventMeta(event_id=str(uuid.uuid4()), event_type=event_type, consumer="notification.users", attempt=1,
                     max_attempts=5, retry_delay=1.0)


@pytest.fixture
async def db(db_url):
    async with migrated(bootstrap.MIGRATIONS, db_url) as database:
        yield database


async def test_a_deletion_and_a_change_at_the_same_moment_leave_the_user_deleted(db, monkeypatch):
    await handlers.record_user(user(1, "ada@example.com"), meta("tessera.user.v1.UserCreated"),
                               lambda: NotificationUnitOfWork(db))
    real = SqlAlchemyRecipientRepository.put

    async def put(self, recipient):
        if not recipient.deleted:
            await asyncio.sleep(0.1)  # the change writes after the deletion
        return await real(self, recipient)

    monkeypatch.setattr(SqlAlchemyRecipientRepository, "put", put)
    meet_before(monkeypatch, SqlAlchemyRecipientRepository, "put")
    await asyncio.gather(
        handlers.forget_user(commands.ForgetUser(USER), meta("tessera.user.v1.UserDeleted"),
                             lambda: NotificationUnitOfWork(db)),
        handlers.record_user(user(2, "ada.l@example.com"), meta("tessera.user.v1.UserUpdated"),
                             lambda: NotificationUnitOfWork(db)))
    async with NotificationUnitOfWork(db) as uow:
        kept = await uow.recipients.get(USER)
    assert kept is not None and kept.deleted and kept.email == ""
