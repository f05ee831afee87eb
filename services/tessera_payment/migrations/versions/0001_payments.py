"""Payments, the sandbox processor's ledger and the outbox.

Revision ID: 0001
Revises:
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

from tessera_runtime.migrations import create_outbox

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    create_outbox(op)
    op.create_table(
        "payments",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("order_id", sa.String(length=36), nullable=False),
        sa.Column("customer_id", sa.String(length=36), nullable=False),
        sa.Column("currency_code", sa.String(length=3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("payment_method", sa.String(length=255), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("decline_code", sa.String(length=64), nullable=False),
        sa.Column("failure_message", sa.Text(), nullable=False),
        sa.Column("refunded_amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("processor_reference", sa.String(length=255), nullable=False),
        sa.Column("idempotency_key", sa.String(length=64), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("refund_reason", sa.Text(), nullable=False),
        sa.Column("refund_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("refund_reference", sa.String(length=255), nullable=False),
        sa.Column("lease_expire_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("idempotency_key", name="uq_payments_idempotency_key"),
        sa.CheckConstraint("amount_minor > 0", name="ck_payments_amount_positive"),
    )
    op.create_index("ix_payments_create_time_id", "payments", ["create_time", "id"], unique=False)
    op.create_index("ix_payments_order_create_time_id", "payments", ["order_id", "create_time", "id"], unique=False)
    op.create_index("ix_payments_customer_create_time_id", "payments", ["customer_id", "create_time", "id"],
                    unique=False)
    op.create_index("ix_payments_status_lease", "payments", ["status", "lease_expire_time"], unique=False)
    op.create_table(
        "sandbox_charges",
        sa.Column("charge_key", sa.String(length=64), nullable=False),
        sa.Column("reference", sa.String(length=64), nullable=False),
        sa.Column("currency_code", sa.String(length=3), nullable=False),
        sa.Column("amount_minor", sa.BigInteger(), nullable=False),
        sa.Column("payment_method", sa.String(length=255), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("refund_reference", sa.String(length=64), nullable=True),
        sa.Column("refund_idempotency_key", sa.String(length=64), nullable=True),
        sa.Column("refund_time", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("charge_key"),
        sa.UniqueConstraint("reference", name="uq_sandbox_charges_reference"),
    )


def downgrade() -> None:
    op.drop_table("sandbox_charges")
    op.drop_index("ix_payments_status_lease", table_name="payments")
    op.drop_index("ix_payments_customer_create_time_id", table_name="payments")
    op.drop_index("ix_payments_order_create_time_id", table_name="payments")
    op.drop_index("ix_payments_create_time_id", table_name="payments")
    op.drop_table("payments")
    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    op.drop_table("outbox")
