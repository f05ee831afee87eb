"""Outbox events the broker refuses for good are parked: when, and the broker's reason.

The relay passes over a parked event so that the events behind it are published; `tessera outbox retry` puts it
back in line. Both columns are nullable and no existing row is parked.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-05
"""

from alembic import op

from tessera_runtime.migrations import add_outbox_parking, drop_outbox_parking

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add_outbox_parking(op)


def downgrade() -> None:
    drop_outbox_parking(op)
