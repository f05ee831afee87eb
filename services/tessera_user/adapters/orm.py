"""The user service's tables (SQLAlchemy Core); migrations in tessera_user/migrations create them."""

from sqlalchemy import Boolean, Column, Index, Integer, MetaData, PrimaryKeyConstraint, String, Table

from tessera_runtime.db import UtcDateTime
from tessera_runtime.outbox import outbox_table

metadata = MetaData()

users = Table(
    "users",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("email", String(254), nullable=False),
    # Uniqueness is case-insensitive on the whole address; the stored email keeps the local part's case.
    Column("email_key", String(254), nullable=False, unique=True),
    Column("display_name", String(100), nullable=False),
    Column("status", String(16), nullable=False),
    Column("given_name", String(100), nullable=False, default=""),
    Column("family_name", String(100), nullable=False, default=""),
    Column("phone_number", String(16), nullable=False, default=""),
    Column("locale", String(35), nullable=False, default=""),
    Column("time_zone", String(64), nullable=False, default=""),
    Column("marketing_emails", Boolean, nullable=False, default=False),
    Column("order_update_emails", Boolean, nullable=False, default=True),
    Column("preferred_currency_code", String(3), nullable=False, default=""),
    Column("create_time", UtcDateTime(), nullable=False),
    Column("update_time", UtcDateTime(), nullable=False),
    Column("version", Integer, nullable=False),
    Index("ix_users_create_time_id", "create_time", "id"),
    Index("ix_users_status_create_time_id", "status", "create_time", "id"),
)

# The CreateUser calls answered, by request_id: a repeat within the retention period gets the first call's answer
# back, even once the account has changed or been deleted. The row is the account's id and time, and a hash of
# the request (the rest of the answer is the request itself); it outlives the account, not the retention period.
create_requests = Table(
    "user_create_requests",
    metadata,
    Column("request_id", String(64), nullable=False),
    Column("request_hash", String(64), nullable=False),
    Column("user_id", String(36), nullable=False),
    Column("create_time", UtcDateTime(), nullable=False),
    # Named for its column: a clash on it is told from one on the e-mail by the constraint's name on PostgreSQL.
    PrimaryKeyConstraint("request_id", name="pk_user_create_requests_request_id"),
    Index("ix_user_create_requests_create_time", "create_time"),
)

outbox = outbox_table(metadata)
