"""Use cases of the notification service: keep the recipient copy, send what events call for, read the record.

Sending one notification for one event delivery is three steps, so that no database transaction is open while
the mail server is talked to (SQLite would hold its write lock that long):

1. In one transaction: skip a duplicate (event id already applied), find the recipient, create the notification
   PENDING (or find it, from an earlier attempt, its row locked) and take a short lease on it, so that a concurrent
   delivery of the same event waits instead of sending it too.
2. Send the e-mail, with a Message-ID fixed per notification.
3. In one transaction, if the lease is still this attempt's (an attempt that outlived it leaves the record to the
   delivery that took over): record the outcome (SENT; FAILED when refused for good; PENDING with the next attempt
   time, or DEAD_LETTERED after the last attempt), publish NotificationSent / NotificationFailed through the
   outbox, and, once the notification is final, record the event id as applied.

A transient failure is raised again after step 3, so that the consumer framework retries the message with a
delay and dead-letters it after the last attempt: the notification is never lost. A crash between steps 2 and 3
sends the e-mail again when the message is redelivered (after the lease): delivery is at least once, and the
repeated e-mail has the same Message-ID.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from typing import Any, Protocol

from tessera_notification import DOMAIN, mapping
from tessera_notification.adapters.mail import Mailer, MailError, OutgoingMail, PermanentMailError
from tessera_notification.adapters.repository import (
    DuplicateNotification,
    NotificationFilter,
    NotificationRepository,
    RecipientRepository,
)
from tessera_notification.domain.content import render
from tessera_notification.domain.model import Notification, Recipient, message_id_for
from tessera_notification.service_layer import commands
from tessera_runtime import pagination
from tessera_runtime.context import current_principal
from tessera_runtime.db import utcnow
from tessera_runtime.errors import NotFound, PermissionDenied, Violations, check_uuid
from tessera_runtime.messaging import DUPLICATE, EventMeta, HandlerResult, RetryLater

log = logging.getLogger("tessera.notification")

AGGREGATE = "notification"


class UnitOfWork(Protocol):
    notifications: NotificationRepository
    recipients: RecipientRepository

    async def __aenter__(self) -> UnitOfWork: ...
    async def __aexit__(self, *exc: object) -> None: ...
    def reading(self) -> UnitOfWork: ...
    def add_event(self, aggregate_type: str, aggregate_id: str, message: Any) -> object: ...
    async def claim(self, meta: EventMeta) -> bool: ...
    async def processed(self, meta: EventMeta) -> bool: ...
    async def commit(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class Dispatch:
    """What sending needs: a unit of work per transaction, the mailer, and the Message-ID domain."""

    uow: Callable[[], UnitOfWork]
    mailer: Mailer
    mail_domain: str
    lease: dt.timedelta
    clock: Callable[[], dt.datetime] = utcnow


# -- the recipient copy --------------------------------------------------------------------------------------

async def _record(uow: UnitOfWork, cmd: commands.RecordUser, now: dt.datetime) -> None:
    incoming = Recipient(user_id=cmd.user_id, email=cmd.email, display_name=cmd.display_name, locale=cmd.locale,
                         order_update_emails=cmd.order_update_emails, version=cmd.version, deleted=False,
                         update_time=now)
    # Locked: the copy is replaced only by a newer one, so a concurrent change (a deletion) must be seen first.
    current = await uow.recipients.get(cmd.user_id, lock=True)
    if current is None or incoming.newer_than(current):
        await uow.recipients.put(incoming)


async def record_user(cmd: commands.RecordUser, meta: EventMeta, uow_factory: Callable[[], UnitOfWork],
                      clock: Callable[[], dt.datetime] = utcnow) -> HandlerResult:
    async with uow_factory() as uow:
        if not await uow.claim(meta):
            return DUPLICATE
        await _record(uow, cmd, clock())
        await uow.commit()
    return None


async def forget_user(cmd: commands.ForgetUser, meta: EventMeta, uow_factory: Callable[[], UnitOfWork],
                      clock: Callable[[], dt.datetime] = utcnow) -> HandlerResult:
    async with uow_factory() as uow:
        if not await uow.claim(meta):
            return DUPLICATE
        current = await uow.recipients.get(cmd.user_id, lock=True)
        if current is None or not current.deleted:
            await uow.recipients.put(Recipient.tombstone(cmd.user_id, clock()))
        await uow.commit()
    return None


# -- sending -------------------------------------------------------------------------------------------------

async def notify(cmd: commands.Notify, meta: EventMeta, d: Dispatch) -> HandlerResult:
    kind = cmd.content.kind
    now = d.clock()
    async with d.uow() as uow:
        if await uow.processed(meta):
            return DUPLICATE
        if cmd.user is not None:
            await _record(uow, cmd.user, now)
        recipient = await uow.recipients.get(cmd.user_id)
        if recipient is None:
            raise RetryLater(f"user {cmd.user_id} is not known here yet: its UserCreated has not been applied")
        if not recipient.wants(kind):
            await uow.claim(meta)
            await uow.commit()
            log.info("notification not sent: the user is deleted or does not want it",
                     extra={"kind": kind.value, "user_id": cmd.user_id, "event_id": meta.event_id})
            return None
        rendered = render(cmd.content, recipient)
        # Locked: a concurrent delivery of the same event waits here until this one has taken the lease (or not),
        # then sees it, instead of both finding the notification free and both sending it.
        notification = await uow.notifications.get_by_event(meta.event_id, kind, lock=True)
        if notification is None:
            notification = Notification.create(kind=kind, user_id=cmd.user_id, recipient=recipient.email,
                                               subject=rendered.subject, event_id=meta.event_id,
                                               event_type=meta.event_type, order_id=cmd.content.order_id, now=now)
            try:
                await uow.notifications.add(notification)
            except DuplicateNotification:
                raise RetryLater("another delivery of this event is sending the notification") from None
        elif notification.status.final:
            await uow.claim(meta)
            await uow.commit()
            return DUPLICATE
        elif notification.leased(now):
            raise RetryLater("another delivery of this event is sending the notification")
        notification.begin_attempt(now, d.lease)
        await uow.notifications.save(notification)
        await uow.commit()

    mail = OutgoingMail(
        message_id=message_id_for(notification.id, d.mail_domain), to_address=notification.recipient,
        to_name=recipient.display_name, subject=notification.subject, body=rendered.body,
        headers=(("X-Tessera-Notification-Id", notification.id), ("X-Tessera-Event-Id", meta.event_id)))
    error: str | None = None
    permanent = False
    try:
        await d.mailer.send(mail)
    except PermanentMailError as exc:
        error, permanent = str(exc), True
    except MailError as exc:
        error = str(exc) or type(exc).__name__
    except Exception as exc:  # whatever went wrong, this attempt did not send it: record it and retry
        log.exception("sending the notification failed unexpectedly", extra={"notification_id": notification.id})
        error = f"unexpected error ({type(exc).__name__})"

    async with d.uow() as uow:
        current = await uow.notifications.get(notification.id, lock=True)
        assert current is not None, "notifications are never deleted"
        if current.lease_until != notification.lease_until:
            # This attempt outlived its lease and another delivery took the notification over: that one records the
            # outcome. What this one did is only logged (an e-mail it sent is sent again, with the same Message-ID).
            log.warning("notification attempt ended after its lease; another delivery took over", extra={
                "notification_id": current.id, "event_id": meta.event_id, "error": error})
            if error is None or permanent:
                return None
            raise RetryLater(f"mail not delivered: {error}")
        done = d.clock()
        if error is None:
            current.sent(done, mail.message_id)
            uow.add_event(AGGREGATE, current.id, mapping.notification_sent(current))
            await uow.claim(meta)
        elif permanent:
            current.refused(done, error)
            uow.add_event(AGGREGATE, current.id, mapping.notification_failed(current, done))
            await uow.claim(meta)
        else:
            current.attempt_failed(done, error, meta.retry_delay)
            if meta.final_attempt:
                uow.add_event(AGGREGATE, current.id, mapping.notification_failed(current, done))
        await uow.notifications.save(current)
        await uow.commit()
    extra = {"notification_id": current.id, "kind": kind.value, "event_id": meta.event_id,
             "attempts": current.attempts, "status": current.status.value}
    if error is None:
        log.info("notification sent", extra=extra)
    elif permanent:
        log.warning("notification refused by the mail server: %s", error, extra=extra)
    else:
        raise RetryLater(f"mail not delivered: {error}")
    return None


# -- reading -------------------------------------------------------------------------------------------------

async def get_notification(cmd: commands.GetNotification, uow: UnitOfWork) -> Notification:
    v = Violations(DOMAIN)
    check_uuid(cmd.notification_id, "id", v)
    v.raise_if_any()
    async with uow.reading():
        notification = await uow.notifications.get(cmd.notification_id.lower())
    if notification is None:
        raise NotFound(f"notification {cmd.notification_id} not found", reason="NOTIFICATION_NOT_FOUND",
                       domain=DOMAIN, metadata={"notification_id": cmd.notification_id})
    principal = current_principal()
    if principal is not None and not principal.may_act_for(notification.user_id):
        raise PermissionDenied("you may only read your own notifications", reason="PERMISSION_DENIED",
                               domain=DOMAIN, metadata={"notification_id": cmd.notification_id})
    return notification


async def list_notifications(cmd: commands.ListNotifications, uow: UnitOfWork) -> tuple[list[Notification], str]:
    v = Violations(DOMAIN)
    check_uuid(cmd.user_id, "user_id", v, required=False)
    check_uuid(cmd.order_id, "order_id", v, required=False)
    if cmd.unknown_kind is not None:
        v.add("kind", f"{cmd.unknown_kind} is not a NotificationKind")
    if cmd.unknown_status is not None:
        v.add("status", f"{cmd.unknown_status} is not a NotificationStatus")
    if cmd.page_size < 0:
        v.add("page_size", "must not be negative")
    v.raise_if_any()
    user_id = cmd.user_id.lower()
    principal = current_principal()
    if principal is not None and not principal.is_admin:
        if user_id and user_id != principal.subject:
            raise PermissionDenied("you may only list your own notifications", reason="PERMISSION_DENIED",
                                   domain=DOMAIN, metadata={"user_id": cmd.user_id})
        user_id = principal.subject
    where = NotificationFilter(user_id=user_id, order_id=cmd.order_id.lower(), kind=cmd.kind, status=cmd.status)
    size = pagination.page_size(cmd.page_size, DOMAIN)
    filters = {"user_id": where.user_id, "order_id": where.order_id,
               "kind": where.kind.value if where.kind else None,
               "status": where.status.value if where.status else None}
    after = pagination.decode_time_key(cmd.page_token, "ListNotifications", filters, DOMAIN)
    async with uow.reading():  # one statement: no transaction needed
        rows = await uow.notifications.list_before(after, size + 1, where)
    rows, token = pagination.next_page(rows, size, "ListNotifications", filters)
    return rows, token
