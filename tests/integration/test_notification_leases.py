"""The notification's lease on each backend: two deliveries of one event at once send one e-mail, and an attempt
that outlived its lease records nothing over the delivery that took the notification over."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from sqlalchemy import func, select

from tessera_notification import bootstrap
from tessera_notification.adapters.mail import Mailer, OutgoingMail, TransientMailError
from tessera_notification.adapters.orm import outbox
from tessera_notification.adapters.repository import SqlAlchemyNotificationRepository
from tessera_notification.domain.content import Welcome
from tessera_notification.domain.model import NotificationKind, NotificationStatus
from tessera_notification.service_layer import commands, handlers
from tessera_notification.service_layer.unit_of_work import NotificationUnitOfWork
from tessera_runtime.db import Database, utcnow
from tessera_runtime.messaging import DUPLICATE, EventMeta, RetryLater
from tests.support.concurrency import meet_before
from tests.support.databases import migrated

ADA = commands.RecordUser(user_id="2f7e3f3c-6a1b-4d57-9d6f-0f1f6a4a8c11", email="ada@example.com",
                          display_name="Ada", locale="en", order_update_emails=True, version=1)
WELCOME = commands.Notify(user_id=ADA.user_id, content=Welcome(), user=ADA)


class Mailbox(Mailer):
    def __init__(self) -> None:
        self.sent: list[OutgoingMail] = []
        self.failures: list[Exception] = []
        self.before_send = None  # an async callable run as a send begins

    async def send(self, mail: OutgoingMail) -> None:
        if self.before_send is not None:
            await self.before_send()
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(mail)


def meta(attempt: int) -> EventMeta:
    return EventMeta(event_id="0b4d2f3e-9c1a-4e0b-8f6e-3d2c1b0a9f8e", event_type="tessera.user.v1.UserCreated",
                     consumer="notification.email", attempt=attempt, max_attempts=5, retry_delay=1.0)


@pytest.fixture
async def world(db_url):
    async with migrated(bootstrap.MIGRATIONS, db_url) as db:
        mailbox = Mailbox()
        dispatch = handlers.Dispatch(uow=lambda: NotificationUnitOfWork(db), mailer=mailbox,
                                     mail_domain="tessera.dev", lease=dt.timedelta(seconds=120))
        # The first attempt fails for a moment: the notification exists, PENDING, its lease given back.
        mailbox.failures.append(TransientMailError("451 try again later"))
        with pytest.raises(RetryLater):
            await handlers.notify(WELCOME, meta(1), dispatch)
        yield db, mailbox, dispatch


async def stored(db: Database):
    async with NotificationUnitOfWork(db) as uow:
        found = await uow.notifications.get_by_event(meta(1).event_id, NotificationKind.WELCOME)
    assert found is not None
    async with db.engine.connect() as conn:
        events = (await conn.execute(select(outbox.c.event_type, func.count()).group_by(outbox.c.event_type))).all()
    return found, dict(events)


async def test_two_deliveries_of_one_event_at_once_send_one_email(world, monkeypatch):
    """Each delivery, about to take the lease, waits (up to a second) until the other has got as far: unless the
    first read holds the row until its lease is committed, both find it free and both send it."""
    db, mailbox, dispatch = world
    # Without the user's copy in the command (the recipient is known since the first attempt), so that nothing but
    # the notification's own row (no recipient's) can keep the two deliveries apart.
    again = commands.Notify(user_id=ADA.user_id, content=Welcome())
    meet_before(monkeypatch, SqlAlchemyNotificationRepository, "save")
    outcomes = await asyncio.gather(handlers.notify(again, meta(2), dispatch),
                                    handlers.notify(again, meta(2), dispatch), return_exceptions=True)
    assert len(mailbox.sent) == 1
    # The other waits for the lease and retries later, or (SQLite: one writer at a time) finds it sent already.
    [loser] = [o for o in outcomes if o is not None]
    assert loser == DUPLICATE or (isinstance(loser, RetryLater) and "another delivery" in str(loser)), loser
    notification, events = await stored(db)
    assert (notification.status, notification.attempts) == (NotificationStatus.SENT, 2)
    assert events == {"tessera.notification.v1.NotificationSent": 1}


@pytest.mark.parametrize("late", ["failed", "sent"])
async def test_an_attempt_that_outlived_its_lease_records_nothing_over_the_delivery_that_took_over(world, late):
    """While this attempt's mail server hangs, its lease runs out and another delivery takes the notification over
    (a new lease): this attempt's late outcome, whichever, leaves the other's record alone."""
    db, mailbox, dispatch = world

    async def taken_over() -> None:
        async with NotificationUnitOfWork(db) as uow:
            n = await uow.notifications.get_by_event(meta(1).event_id, NotificationKind.WELCOME, lock=True)
            n.begin_attempt(utcnow() + dt.timedelta(seconds=121), dt.timedelta(seconds=120))
            await uow.notifications.save(n)
            await uow.commit()

    mailbox.before_send = taken_over
    if late == "failed":
        mailbox.failures.append(TransientMailError("451 try again later"))
        with pytest.raises(RetryLater, match="451"):
            await handlers.notify(WELCOME, meta(2), dispatch)
    else:
        assert await handlers.notify(WELCOME, meta(2), dispatch) is None
    assert len(mailbox.sent) == (1 if late == "sent" else 0)
    notification, events = await stored(db)
    # As the other delivery left it: PENDING under its lease, the first attempt's failure the only one counted.
    assert (notification.status, notification.attempts) == (NotificationStatus.PENDING, 1)
    assert notification.lease_until is not None and notification.lease_until > utcnow() + dt.timedelta(seconds=200)
    assert events == {}
