"""The order service's tables (SQLAlchemy Core); migrations in tessera_order/migrations create them."""

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from tessera_runtime.db import UtcDateTime
from tessera_runtime.outbox import outbox_table

metadata = MetaData()

orders = Table(
    "orders",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("customer_id", String(36), nullable=False),
    # The idempotency key of CreateOrder: a repeat finds the order it placed instead of placing another.
    Column("request_id", String(64), nullable=False, unique=True),
    Column("request_hash", String(64), nullable=False),
    Column("status", String(24), nullable=False),
    Column("currency_code", String(3), nullable=False),
    # Kept so that a saga resumed after a crash can still charge the customer.
    Column("payment_method", String(255), nullable=False),
    Column("payment_id", String(36), nullable=False, default=""),
    Column("reservation_id", String(36), nullable=False, default=""),
    Column("cancel_reason", String(500), nullable=False, default=""),
    Column("failure_reason", String(64), nullable=True),
    Column("failure_message", Text, nullable=True),
    Column("failure_step", String(24), nullable=True),
    Column("failure_metadata", Text, nullable=True),
    Column("create_time", UtcDateTime(), nullable=False),
    Column("update_time", UtcDateTime(), nullable=False),
    Column("confirm_time", UtcDateTime(), nullable=True),
    Column("cancel_time", UtcDateTime(), nullable=True),
    Column("version", Integer, nullable=False),
    Index("ix_orders_create_time_id", "create_time", "id"),
    Index("ix_orders_customer_create_time_id", "customer_id", "create_time", "id"),
    Index("ix_orders_status_create_time_id", "status", "create_time", "id"),
)

order_items = Table(
    "order_items",
    metadata,
    Column("order_id", String(36), ForeignKey("orders.id"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("product_id", String(36), nullable=False),
    Column("product_name", String(200), nullable=False),
    Column("sku", String(64), nullable=False),
    Column("quantity", Integer, nullable=False),
    Column("unit_price_minor", BigInteger, nullable=False),
)

# One row per order: who runs its saga (a lease, renewed by a heartbeat) and the identity it runs with.
order_sagas = Table(
    "order_sagas",
    metadata,
    Column("order_id", String(36), ForeignKey("orders.id"), primary_key=True),
    Column("current_step", String(24), nullable=False),
    Column("lease_owner", String(100), nullable=True),
    Column("lease_expires_at", UtcDateTime(), nullable=True),
    # The caller whose CreateOrder started the saga: a resumed saga calls the other services as that caller.
    Column("principal_subject", String(255), nullable=True),
    Column("principal_scopes", Text, nullable=False, default=""),
    Column("correlation_id", String(128), nullable=True),
    # The W3C trace context of that CreateOrder (its server span): a resumed saga's work continues its trace.
    # NULL for sagas stored before migration 0002, or while tracing is off: those resume in a trace of their own.
    Column("traceparent", String(64), nullable=True),
    Column("tracestate", Text, nullable=True),
)

order_saga_steps = Table(
    "order_saga_steps",
    metadata,
    Column("order_id", String(36), ForeignKey("orders.id"), primary_key=True),
    Column("step", String(24), primary_key=True),
    Column("position", Integer, nullable=False),
    Column("status", String(24), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("compensation_attempts", Integer, nullable=False),
    Column("error", String(1000), nullable=False),
    Column("outcome_unknown", Boolean, nullable=False),
    Column("update_time", UtcDateTime(), nullable=False),
)

outbox = outbox_table(metadata)
