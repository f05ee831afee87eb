"""The W3C trace context of the CreateOrder that started each saga, so that a resumed saga continues its trace.

Both columns are nullable and no existing row is filled in: a saga stored before this revision has no trace
context to continue and resumes in a trace of its own, as it did before.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Adding a nullable column without a default is an ALTER TABLE ADD COLUMN on SQLite and PostgreSQL alike:
    # no table rewrite, no lock held longer than the catalogue change.
    op.add_column("order_sagas", sa.Column("traceparent", sa.String(length=64), nullable=True))
    op.add_column("order_sagas", sa.Column("tracestate", sa.Text(), nullable=True))


def downgrade() -> None:
    # Batch mode: on SQLite older than 3.35 a column can only be dropped by copying the table.
    with op.batch_alter_table("order_sagas") as batch:
        batch.drop_column("tracestate")
        batch.drop_column("traceparent")
