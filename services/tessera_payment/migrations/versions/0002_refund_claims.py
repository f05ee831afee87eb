"""The refund claim: the idempotency key of the refund a call is making, so that one refund at a time reaches the
payment processor, whatever key each call brings.

The column is nullable and no existing row is filled in: a payment stored before this revision has no refund under
way.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A nullable column without a default: an ALTER TABLE ADD COLUMN on SQLite and PostgreSQL alike, no rewrite.
    op.add_column("payments", sa.Column("refund_key", sa.String(length=64), nullable=True))


def downgrade() -> None:
    # Batch mode: on SQLite older than 3.35 a column can only be dropped by copying the table.
    with op.batch_alter_table("payments") as batch:
        batch.drop_column("refund_key")
