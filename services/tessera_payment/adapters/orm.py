"""The payment service's tables (SQLAlchemy Core); migrations in tessera_payment/migrations create them."""

from sqlalchemy import BigInteger, CheckConstraint, Column, Index, Integer, MetaData, String, Table, Text

from tessera_runtime.db import UtcDateTime
from tessera_runtime.outbox import outbox_table

metadata = MetaData()

payments = Table(
    "payments",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("order_id", String(36), nullable=False),
    Column("customer_id", String(36), nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("payment_method", String(255), nullable=False),
    Column("status", String(16), nullable=False),
    Column("decline_code", String(64), nullable=False),
    Column("failure_message", Text, nullable=False),
    Column("refunded_amount_minor", BigInteger, nullable=False),
    Column("processor_reference", String(255), nullable=False),
    # One payment per key: what makes a repeated ProcessPayment charge at most once.
    Column("idempotency_key", String(64), nullable=False, unique=True),
    Column("request_hash", String(64), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("refund_reason", Text, nullable=False),
    Column("refund_time", UtcDateTime(), nullable=True),
    Column("refund_reference", String(255), nullable=False),
    # The idempotency key of the refund claimed (a call is asking the processor to refund, or did and its outcome is
    # not recorded yet), kept once REFUNDED; NULL while no refund was claimed.
    Column("refund_key", String(64), nullable=True),
    Column("lease_expire_time", UtcDateTime(), nullable=True),
    Column("create_time", UtcDateTime(), nullable=False),
    Column("update_time", UtcDateTime(), nullable=False),
    Column("version", BigInteger, nullable=False),
    CheckConstraint("amount_minor > 0", name="ck_payments_amount_positive"),
    Index("ix_payments_create_time_id", "create_time", "id"),
    Index("ix_payments_order_create_time_id", "order_id", "create_time", "id"),
    Index("ix_payments_customer_create_time_id", "customer_id", "create_time", "id"),
    # Recovery looks for PENDING payments whose lease ran out.
    Index("ix_payments_status_lease", "status", "lease_expire_time"),
)

# The sandbox processor's own books. It is a separate party: it writes here in its own transactions, never in the
# payment service's, just as a real processor keeps its ledger on its own side.
sandbox_charges = Table(
    "sandbox_charges",
    metadata,
    Column("charge_key", String(64), primary_key=True),
    Column("reference", String(64), nullable=False, unique=True),
    Column("currency_code", String(3), nullable=False),
    Column("amount_minor", BigInteger, nullable=False),
    Column("payment_method", String(255), nullable=False),
    Column("create_time", UtcDateTime(), nullable=False),
    Column("refund_reference", String(64), nullable=True),
    Column("refund_idempotency_key", String(64), nullable=True),
    Column("refund_time", UtcDateTime(), nullable=True),
)

outbox = outbox_table(metadata)
