"""Notifications, the recipients they go to, and the rules of their delivery; no I/O."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid

MAX_SUBJECT = 200
MAX_ERROR = 1000
MAX_RECIPIENT = 254


class NotificationKind(enum.Enum):
    WELCOME = "WELCOME"
    ORDER_RECEIPT = "ORDER_RECEIPT"
    ORDER_FAILED = "ORDER_FAILED"
    ORDER_CANCELLED = "ORDER_CANCELLED"
    PAYMENT_REFUNDED = "PAYMENT_REFUNDED"

    @property
    def about_orders(self) -> bool:
        """Receipts, failures, cancellations and refunds: sent only to users who want order e-mails."""
        return self is not NotificationKind.WELCOME


class NotificationStatus(enum.Enum):
    PENDING = "PENDING"
    SENT = "SENT"
    FAILED = "FAILED"
    DEAD_LETTERED = "DEAD_LETTERED"

    @property
    def final(self) -> bool:
        return self in (NotificationStatus.SENT, NotificationStatus.FAILED)


class Channel(enum.Enum):
    EMAIL = "EMAIL"


@dataclasses.dataclass
class Recipient:
    """The notification service's copy of a user: what it needs to e-mail them. Kept from the user events."""

    user_id: str
    email: str
    display_name: str
    locale: str
    order_update_emails: bool
    version: int
    deleted: bool
    update_time: dt.datetime

    def wants(self, kind: NotificationKind) -> bool:
        if self.deleted:
            return False
        return self.order_update_emails or not kind.about_orders

    def newer_than(self, other: Recipient) -> bool:
        """Whether this copy should replace `other`: a deletion is final, otherwise the higher version wins (user
        events may arrive out of order)."""
        if other.deleted:
            return False
        return self.deleted or self.version > other.version

    @classmethod
    def tombstone(cls, user_id: str, now: dt.datetime) -> Recipient:
        """What is kept of a deleted user: nothing personal, only that it is gone (so that late order events are
        skipped rather than retried)."""
        return cls(user_id=user_id, email="", display_name="", locale="", order_update_emails=False, version=0,
                   deleted=True, update_time=now)


@dataclasses.dataclass
class Notification:
    id: str
    user_id: str
    recipient: str
    kind: NotificationKind
    channel: Channel
    subject: str
    status: NotificationStatus
    attempts: int
    event_id: str
    event_type: str
    order_id: str
    last_error: str
    message_id: str
    create_time: dt.datetime
    update_time: dt.datetime
    sent_time: dt.datetime | None = None
    next_attempt_time: dt.datetime | None = None
    # While set and in the future, a delivery is sending this notification; another delivery of the same event
    # (a redelivery, a second replica) waits instead of sending it twice.
    lease_until: dt.datetime | None = None

    @classmethod
    def create(cls, *, kind: NotificationKind, user_id: str, recipient: str, subject: str, event_id: str,
               event_type: str, order_id: str, now: dt.datetime) -> Notification:
        return cls(id=str(uuid.uuid4()), user_id=user_id, recipient=recipient[:MAX_RECIPIENT], kind=kind,
                   channel=Channel.EMAIL, subject=subject[:MAX_SUBJECT], status=NotificationStatus.PENDING,
                   attempts=0, event_id=event_id, event_type=event_type, order_id=order_id, last_error="",
                   message_id="", create_time=now, update_time=now)

    def leased(self, now: dt.datetime) -> bool:
        return self.lease_until is not None and self.lease_until > now

    def begin_attempt(self, now: dt.datetime, lease: dt.timedelta) -> None:
        """Takes the lease for one delivery attempt. A dead-lettered notification being replayed is PENDING
        again."""
        self.status = NotificationStatus.PENDING
        self.lease_until = now + lease
        self.next_attempt_time = None
        self.update_time = now

    def sent(self, now: dt.datetime, message_id: str) -> None:
        self.attempts += 1
        self.status = NotificationStatus.SENT
        self.sent_time = now
        self.message_id = message_id
        self.last_error = ""
        self._settle(now)

    def refused(self, now: dt.datetime, error: str) -> None:
        """The mail server refused it for good (for example the recipient address): not retried."""
        self.attempts += 1
        self.status = NotificationStatus.FAILED
        self.last_error = error[:MAX_ERROR]
        self._settle(now)

    def attempt_failed(self, now: dt.datetime, error: str, retry_in: float | None) -> None:
        """A transient failure: PENDING until the retry `retry_in` seconds from now, or DEAD_LETTERED when this
        was the last attempt."""
        self.attempts += 1
        self.last_error = error[:MAX_ERROR]
        self._settle(now)
        if retry_in is None:
            self.status = NotificationStatus.DEAD_LETTERED
        else:
            self.status = NotificationStatus.PENDING
            self.next_attempt_time = now + dt.timedelta(seconds=retry_in)

    def _settle(self, now: dt.datetime) -> None:
        self.lease_until = None
        self.next_attempt_time = None
        self.update_time = now


def message_id_for(notification_id: str, mail_domain: str) -> str:
    """The RFC 5322 Message-ID of a notification's e-mail: the same on every attempt, so that a duplicate
    delivery (sent, then crashed before recording it) can be recognised by mail systems."""
    return f"<{notification_id}@{mail_domain}>"
