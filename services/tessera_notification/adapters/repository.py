"""Repositories of notifications and recipients: SQLAlchemy for the service, in memory for unit tests."""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
from typing import Any

from sqlalchemy import and_, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from tessera_notification.adapters.orm import notifications, recipients
from tessera_notification.domain.model import (
    Channel,
    Notification,
    NotificationKind,
    NotificationStatus,
    Recipient,
)
from tessera_runtime.db import keyset_page


class DuplicateNotification(Exception):
    """Another delivery of the same event created the notification first."""


@dataclasses.dataclass(frozen=True)
class NotificationFilter:
    user_id: str = ""
    order_id: str = ""
    kind: NotificationKind | None = None
    status: NotificationStatus | None = None

    def matches(self, n: Notification) -> bool:
        return ((not self.user_id or n.user_id == self.user_id)
                and (not self.order_id or n.order_id == self.order_id)
                and (self.kind is None or n.kind is self.kind)
                and (self.status is None or n.status is self.status))


# Sort key of a page: (create_time, id), newest first.
PageKey = tuple[dt.datetime, str]


class NotificationRepository(abc.ABC):
    @abc.abstractmethod
    async def add(self, notification: Notification) -> None: ...

    @abc.abstractmethod
    async def get(self, notification_id: str, *, lock: bool = False) -> Notification | None:
        """With `lock`, the row stays locked until the transaction ends (SELECT ... FOR UPDATE on PostgreSQL; a
        SQLite transaction that writes holds the whole database already)."""

    @abc.abstractmethod
    async def get_by_event(self, event_id: str, kind: NotificationKind, *, lock: bool = False) -> Notification | None:
        ...

    @abc.abstractmethod
    async def save(self, notification: Notification) -> None: ...

    @abc.abstractmethod
    async def list_before(self, key: PageKey | None, limit: int, where: NotificationFilter) -> list[Notification]:
        """Notifications older than key (all when None), newest first."""


class RecipientRepository(abc.ABC):
    @abc.abstractmethod
    async def get(self, user_id: str, *, lock: bool = False) -> Recipient | None:
        """With `lock`, the row stays locked until the transaction ends (as NotificationRepository.get)."""

    @abc.abstractmethod
    async def put(self, recipient: Recipient) -> None: ...


def _notification_row(n: Notification) -> dict[str, Any]:
    row = dataclasses.asdict(n)
    row.update(kind=n.kind.value, channel=n.channel.value, status=n.status.value)
    return row


def _notification(row: Any) -> Notification:
    m = dict(row._mapping)
    m.update(kind=NotificationKind(m["kind"]), channel=Channel(m["channel"]), status=NotificationStatus(m["status"]))
    return Notification(**m)


class SqlAlchemyNotificationRepository(NotificationRepository):
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, notification: Notification) -> None:
        try:
            async with self.session.begin_nested():
                await self.session.execute(insert(notifications).values(**_notification_row(notification)))
        except IntegrityError:
            raise DuplicateNotification(notification.event_id) from None

    async def get(self, notification_id: str, *, lock: bool = False) -> Notification | None:
        return await self._one(notifications.c.id == notification_id, lock)

    async def get_by_event(self, event_id: str, kind: NotificationKind, *, lock: bool = False) -> Notification | None:
        return await self._one(and_(notifications.c.event_id == event_id, notifications.c.kind == kind.value), lock)

    async def _one(self, condition: Any, lock: bool) -> Notification | None:
        query = select(notifications).where(condition)
        row = (await self.session.execute(query.with_for_update() if lock else query)).first()
        return None if row is None else _notification(row)

    async def save(self, notification: Notification) -> None:
        values = _notification_row(notification)
        del values["id"]
        await self.session.execute(update(notifications).where(notifications.c.id == notification.id)
                                   .values(**values))

    async def list_before(self, key: PageKey | None, limit: int, where: NotificationFilter) -> list[Notification]:
        c = notifications.c
        query = select(notifications)
        if where.user_id:
            query = query.where(c.user_id == where.user_id)
        if where.order_id:
            query = query.where(c.order_id == where.order_id)
        if where.kind is not None:
            query = query.where(c.kind == where.kind.value)
        if where.status is not None:
            query = query.where(c.status == where.status.value)
        query = keyset_page(query, notifications, key, limit, newest_first=True)
        return [_notification(r) for r in (await self.session.execute(query)).all()]


class SqlAlchemyRecipientRepository(RecipientRepository):
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, user_id: str, *, lock: bool = False) -> Recipient | None:
        query = select(recipients).where(recipients.c.user_id == user_id)
        row = (await self.session.execute(query.with_for_update() if lock else query)).first()
        return None if row is None else Recipient(**row._mapping)

    async def put(self, recipient: Recipient) -> None:
        values = dataclasses.asdict(recipient)
        result = await self.session.execute(update(recipients).where(recipients.c.user_id == recipient.user_id)
                                            .values(**values))
        if result.rowcount == 0:
            await self.session.execute(insert(recipients).values(**values))


class InMemoryNotificationRepository(NotificationRepository):
    def __init__(self) -> None:
        self.items: dict[str, Notification] = {}

    async def add(self, notification: Notification) -> None:
        if await self.get_by_event(notification.event_id, notification.kind) is not None:
            raise DuplicateNotification(notification.event_id)
        self.items[notification.id] = dataclasses.replace(notification)

    async def get(self, notification_id: str, *, lock: bool = False) -> Notification | None:
        found = self.items.get(notification_id)  # one unit of work at a time: nothing to lock
        return None if found is None else dataclasses.replace(found)

    async def get_by_event(self, event_id: str, kind: NotificationKind, *, lock: bool = False) -> Notification | None:
        for n in self.items.values():
            if n.event_id == event_id and n.kind is kind:
                return dataclasses.replace(n)
        return None

    async def save(self, notification: Notification) -> None:
        self.items[notification.id] = dataclasses.replace(notification)

    async def list_before(self, key: PageKey | None, limit: int, where: NotificationFilter) -> list[Notification]:
        rows = sorted((n for n in self.items.values() if where.matches(n)),
                      key=lambda n: (n.create_time, n.id), reverse=True)
        if key is not None:
            rows = [n for n in rows if (n.create_time, n.id) < key]
        return [dataclasses.replace(n) for n in rows[:limit]]


class InMemoryRecipientRepository(RecipientRepository):
    def __init__(self) -> None:
        self.items: dict[str, Recipient] = {}

    async def get(self, user_id: str, *, lock: bool = False) -> Recipient | None:
        found = self.items.get(user_id)  # one unit of work at a time: nothing to lock
        return None if found is None else dataclasses.replace(found)

    async def put(self, recipient: Recipient) -> None:
        self.items[recipient.user_id] = dataclasses.replace(recipient)
