"""Commands the notification service handles, already translated from protobuf (events and requests)."""

from __future__ import annotations

import dataclasses

from tessera_notification.domain.content import Content
from tessera_notification.domain.model import NotificationKind, NotificationStatus


@dataclasses.dataclass(frozen=True)
class RecordUser:
    """Keep (or refresh) the copy of a user: from UserCreated and UserUpdated."""

    user_id: str
    email: str
    display_name: str
    locale: str
    order_update_emails: bool
    version: int


@dataclasses.dataclass(frozen=True)
class ForgetUser:
    """The user was deleted: keep only a tombstone."""

    user_id: str


@dataclasses.dataclass(frozen=True)
class Notify:
    """Send the notification an event calls for. `user` is set when the event itself carries the recipient
    (UserCreated), which is then recorded in the same transaction."""

    user_id: str
    content: Content
    user: RecordUser | None = None


@dataclasses.dataclass(frozen=True)
class GetNotification:
    notification_id: str


@dataclasses.dataclass(frozen=True)
class ListNotifications:
    page_size: int
    page_token: str
    user_id: str
    order_id: str
    kind: NotificationKind | None
    status: NotificationStatus | None
    # Enum numbers the contract does not define, refused rather than ignored.
    unknown_kind: int | None = None
    unknown_status: int | None = None
