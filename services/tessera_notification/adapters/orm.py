"""The notification service's tables (SQLAlchemy Core); migrations in tessera_notification/migrations create them."""

from sqlalchemy import Boolean, Column, Index, Integer, MetaData, String, Table, UniqueConstraint

from tessera_runtime.db import UtcDateTime
from tessera_runtime.messaging.idempotency import processed_events_table
from tessera_runtime.outbox import outbox_table

metadata = MetaData()

# The copy of each user, kept from the user events: order and payment events carry no e-mail address.
recipients = Table(
    "recipients",
    metadata,
    Column("user_id", String(36), primary_key=True),
    Column("email", String(254), nullable=False),
    Column("display_name", String(100), nullable=False),
    Column("locale", String(35), nullable=False),
    Column("order_update_emails", Boolean, nullable=False),
    Column("version", Integer, nullable=False),
    Column("deleted", Boolean, nullable=False),
    Column("update_time", UtcDateTime(), nullable=False),
)

notifications = Table(
    "notifications",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("user_id", String(36), nullable=False),
    Column("recipient", String(254), nullable=False),
    Column("kind", String(32), nullable=False),
    Column("channel", String(16), nullable=False),
    Column("subject", String(200), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("event_id", String(64), nullable=False),
    Column("event_type", String(200), nullable=False),
    Column("order_id", String(36), nullable=False),
    Column("last_error", String(1000), nullable=False),
    Column("message_id", String(255), nullable=False),
    Column("create_time", UtcDateTime(), nullable=False),
    Column("update_time", UtcDateTime(), nullable=False),
    Column("sent_time", UtcDateTime(), nullable=True),
    Column("next_attempt_time", UtcDateTime(), nullable=True),
    Column("lease_until", UtcDateTime(), nullable=True),
    # One event causes at most one notification per kind.
    UniqueConstraint("event_id", "kind", name="uq_notifications_event_kind"),
    Index("ix_notifications_create_time_id", "create_time", "id"),
    Index("ix_notifications_user_create_time_id", "user_id", "create_time", "id"),
    Index("ix_notifications_order_id", "order_id"),
)

processed_events = processed_events_table(metadata)
outbox = outbox_table(metadata)
