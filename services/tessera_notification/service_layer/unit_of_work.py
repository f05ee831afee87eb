"""Units of work of the notification service: SQLAlchemy for the service, in memory for unit tests."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncSession

from tessera_notification.adapters.orm import outbox, processed_events
from tessera_notification.adapters.repository import (
    InMemoryNotificationRepository,
    InMemoryRecipientRepository,
    NotificationRepository,
    RecipientRepository,
    SqlAlchemyNotificationRepository,
    SqlAlchemyRecipientRepository,
)
from tessera_runtime.db import Database
from tessera_runtime.messaging import EventMeta
from tessera_runtime.messaging.idempotency import claim_event, event_processed
from tessera_runtime.unit_of_work import FakeUnitOfWork, SqlAlchemyUnitOfWork


class NotificationUnitOfWork(SqlAlchemyUnitOfWork):
    notifications: NotificationRepository
    recipients: RecipientRepository

    def __init__(self, db: Database) -> None:
        super().__init__(db, outbox)

    def _open(self, session: AsyncSession) -> None:
        self.notifications = SqlAlchemyNotificationRepository(session)
        self.recipients = SqlAlchemyRecipientRepository(session)

    async def claim(self, meta: EventMeta) -> bool:
        """Records the event as applied, in this transaction; False when it already was."""
        return await claim_event(self.session, processed_events, meta)

    async def processed(self, meta: EventMeta) -> bool:
        return await event_processed(self.session, processed_events, meta.consumer, meta.event_id)


class FakeNotificationUnitOfWork(FakeUnitOfWork):
    """Same interface as NotificationUnitOfWork. One instance is the whole database: every `async with` is a
    transaction whose changes (repositories, claims, events) are kept only if it commits."""

    def __init__(self) -> None:
        super().__init__()
        self.notifications = InMemoryNotificationRepository()
        self.recipients = InMemoryRecipientRepository()
        self.claimed: set[tuple[str, str]] = set()
        self._snapshot: tuple[dict, dict, set] | None = None

    async def __aenter__(self) -> FakeNotificationUnitOfWork:
        await super().__aenter__()
        self._snapshot = (dict(self.notifications.items), dict(self.recipients.items), set(self.claimed))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._snapshot is not None:  # not committed: roll back
            self.notifications.items, self.recipients.items, self.claimed = self._snapshot
        self._snapshot = None
        await super().__aexit__(*exc)

    async def claim(self, meta: EventMeta) -> bool:
        key = (meta.consumer, meta.event_id)
        if key in self.claimed:
            return False
        self.claimed.add(key)
        return True

    async def processed(self, meta: EventMeta) -> bool:
        return (meta.consumer, meta.event_id) in self.claimed

    async def commit(self) -> None:
        await super().commit()
        self._snapshot = None
