"""The notification use cases with fakes: what is sent, recorded, retried, dead-lettered and skipped."""

from __future__ import annotations

import datetime as dt

import pytest
from tessera.notification.v1 import notification_events_pb2, notification_pb2

from tessera_notification.adapters.mail import Mailer, OutgoingMail, PermanentMailError, TransientMailError
from tessera_notification.domain.content import OrderFacts, Receipt, Welcome
from tessera_notification.domain.model import NotificationKind, NotificationStatus
from tessera_notification.domain.money import Money
from tessera_notification.service_layer import commands, handlers
from tessera_notification.service_layer.unit_of_work import FakeNotificationUnitOfWork
from tessera_runtime.messaging import DUPLICATE, EventMeta, RetryLater

NOW = dt.datetime(2026, 12, 4, 10, 0, tzinfo=dt.UTC)
ADA = commands.RecordUser(user_id="u-ada", email="ada@example.com", display_name="Ada", locale="en",
                          order_update_emails=True, version=1)


class FakeMailer(Mailer):
    def __init__(self) -> None:
        self.sent: list[OutgoingMail] = []
        self.failures: list[Exception] = []  # raised, in order, by the next sends

    async def send(self, mail: OutgoingMail) -> None:
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append(mail)


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def world():
    uow, mailer, clock = FakeNotificationUnitOfWork(), FakeMailer(), Clock()
    dispatch = handlers.Dispatch(uow=lambda: uow, mailer=mailer, mail_domain="tessera.dev",
                                 lease=dt.timedelta(seconds=120), clock=clock)
    return uow, mailer, clock, dispatch


def meta(event_id: str = "ev-1", attempt: int = 1, max_attempts: int = 3) -> EventMeta:
    delays = {1: 1.0, 2: 5.0}
    return EventMeta(event_id=event_id, event_type="tessera.user.v1.UserCreated", consumer="notification.email",
                     attempt=attempt, max_attempts=max_attempts,
                     retry_delay=None if attempt >= max_attempts else delays[attempt])


def welcome(user: commands.RecordUser = ADA) -> commands.Notify:
    return commands.Notify(user_id=user.user_id, content=Welcome(), user=user)


def receipt(user_id: str = "u-ada") -> commands.Notify:
    order = OrderFacts(order_id="o-1", lines=(), total=Money("EUR", 1000), create_time=NOW)
    return commands.Notify(user_id=user_id, content=Receipt(order=order, payment_id="p-1"))


def only(uow: FakeNotificationUnitOfWork):
    [n] = uow.notifications.items.values()
    return n


async def test_welcome_is_sent_recorded_and_announced_and_the_recipient_kept(world):
    uow, mailer, _, dispatch = world
    assert await handlers.notify(welcome(), meta(), dispatch) is None
    [mail] = mailer.sent
    n = only(uow)
    assert (mail.to_address, mail.to_name, mail.subject) == ("ada@example.com", "Ada", "Welcome to Tessera, Ada")
    assert mail.message_id == f"<{n.id}@tessera.dev>" and ("X-Tessera-Event-Id", "ev-1") in mail.headers
    assert (n.kind, n.status, n.attempts, n.message_id, n.sent_time) == (
        NotificationKind.WELCOME, NotificationStatus.SENT, 1, mail.message_id, NOW)
    assert n.lease_until is None and n.event_type == "tessera.user.v1.UserCreated"
    [(aggregate, aggregate_id, event)] = uow.published
    assert (aggregate, aggregate_id) == ("notification", n.id)
    assert isinstance(event, notification_events_pb2.NotificationSent) and event.message_id == mail.message_id
    assert await uow.recipients.get("u-ada") is not None and ("notification.email", "ev-1") in uow.claimed


async def test_a_duplicate_delivery_sends_nothing(world):
    uow, mailer, _, dispatch = world
    await handlers.notify(welcome(), meta(), dispatch)
    assert await handlers.notify(welcome(), meta(), dispatch) == DUPLICATE
    assert len(mailer.sent) == 1 and len(uow.notifications.items) == 1 and len(uow.published) == 1


async def test_an_order_event_for_an_unknown_user_is_retried_without_a_trace(world):
    uow, mailer, _, dispatch = world
    with pytest.raises(RetryLater, match="not known here yet"):
        await handlers.notify(receipt(), meta("ev-order"), dispatch)
    assert mailer.sent == [] and uow.notifications.items == {} and uow.claimed == set()


async def test_users_who_do_not_want_order_emails_or_are_deleted_get_none(world):
    uow, mailer, _, dispatch = world
    quiet = commands.RecordUser(**{**vars(ADA), "order_update_emails": False})
    await handlers.record_user(quiet, meta("ev-user"), lambda: uow)
    assert await handlers.notify(receipt(), meta("ev-order"), dispatch) is None
    assert mailer.sent == [] and uow.notifications.items == {}
    assert ("notification.email", "ev-order") in uow.claimed  # applied: nothing to do

    await handlers.forget_user(commands.ForgetUser("u-ada"), meta("ev-deleted"), lambda: uow)
    gone = await uow.recipients.get("u-ada")
    assert gone.deleted and gone.email == "" and gone.display_name == ""
    # A late UserCreated (reordered) neither resurrects the user nor greets them.
    assert await handlers.notify(welcome(), meta("ev-created"), dispatch) is None
    assert mailer.sent == [] and (await uow.recipients.get("u-ada")).deleted


async def test_user_updates_apply_in_version_order_only(world):
    uow, _, _, _ = world
    await handlers.record_user(commands.RecordUser(**{**vars(ADA), "version": 3, "display_name": "Ada 3"}),
                               meta("e3"), lambda: uow)
    await handlers.record_user(commands.RecordUser(**{**vars(ADA), "version": 2, "display_name": "Ada 2"}),
                               meta("e2"), lambda: uow)
    assert (await uow.recipients.get("u-ada")).display_name == "Ada 3"
    assert await handlers.record_user(ADA, meta("e3"), lambda: uow) == DUPLICATE


async def test_a_transient_failure_is_recorded_and_retried_until_it_is_sent(world):
    uow, mailer, clock, dispatch = world
    mailer.failures.append(TransientMailError("451 try later"))
    with pytest.raises(RetryLater, match="451 try later"):
        await handlers.notify(welcome(), meta(attempt=1), dispatch)
    n = only(uow)
    assert (n.status, n.attempts, n.last_error) == (NotificationStatus.PENDING, 1, "451 try later")
    assert n.next_attempt_time == NOW + dt.timedelta(seconds=1.0) and n.lease_until is None
    assert uow.claimed == set() and uow.published == []

    clock.now = NOW + dt.timedelta(seconds=1)
    await handlers.notify(welcome(), meta(attempt=2), dispatch)
    n = only(uow)
    assert (n.status, n.attempts, n.last_error, n.next_attempt_time) == (NotificationStatus.SENT, 2, "", None)
    assert len(mailer.sent) == 1


async def test_the_last_failed_attempt_dead_letters_and_a_replay_sends_it(world):
    uow, mailer, _, dispatch = world
    mailer.failures.extend([TransientMailError("down"), RuntimeError("boom")])
    with pytest.raises(RetryLater):
        await handlers.notify(welcome(), meta(attempt=2), dispatch)
    with pytest.raises(RetryLater, match="RuntimeError"):  # any error of the mailer is one failed attempt
        await handlers.notify(welcome(), meta(attempt=3), dispatch)
    n = only(uow)
    # An error that is no MailError is named by its type only: its text (which may name hosts or paths) is logged.
    assert (n.status, n.attempts, n.last_error) == (NotificationStatus.DEAD_LETTERED, 2,
                                                    "unexpected error (RuntimeError)")
    [(_, _, failed)] = uow.published
    assert isinstance(failed, notification_events_pb2.NotificationFailed)
    assert failed.status == notification_pb2.NOTIFICATION_STATUS_DEAD_LETTERED and failed.attempts == 2

    await handlers.notify(welcome(), meta(attempt=1), dispatch)  # replayed from the dead-letter queue
    n = only(uow)
    assert (n.status, n.attempts) == (NotificationStatus.SENT, 3) and len(mailer.sent) == 1


async def test_a_permanent_refusal_is_final_and_not_retried(world):
    uow, mailer, _, dispatch = world
    mailer.failures.append(PermanentMailError("550 no such user"))
    assert await handlers.notify(welcome(), meta(), dispatch) is None
    n = only(uow)
    assert (n.status, n.attempts, n.last_error) == (NotificationStatus.FAILED, 1, "550 no such user")
    assert ("notification.email", "ev-1") in uow.claimed
    assert await handlers.notify(welcome(), meta(), dispatch) == DUPLICATE and mailer.sent == []


async def test_a_delivery_waits_while_another_holds_the_lease(world):
    uow, mailer, clock, dispatch = world
    mailer.failures.append(TransientMailError("first attempt"))
    with pytest.raises(RetryLater):
        await handlers.notify(welcome(), meta(), dispatch)
    n = only(uow)
    n.lease_until = NOW + dt.timedelta(seconds=60)  # another replica is sending it right now
    await uow.notifications.save(n)
    with pytest.raises(RetryLater, match="another delivery"):
        await handlers.notify(welcome(), meta(attempt=2), dispatch)
    assert mailer.sent == []
    clock.now = NOW + dt.timedelta(seconds=61)  # that replica died: its lease ran out
    await handlers.notify(welcome(), meta(attempt=2), dispatch)
    assert len(mailer.sent) == 1 and only(uow).status is NotificationStatus.SENT
