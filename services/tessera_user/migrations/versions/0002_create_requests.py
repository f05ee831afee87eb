"""The CreateUser calls answered move to a table of their own, so that they outlive the account they created.

Until this revision the request_id and request hash of the call that created an account lived on its row: a
repeat got the account as it was at the time of the repeat, and a repeat after the account was deleted created a
second one. Each kept record is copied over with its account's create_time, and the columns are dropped.

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
    op.create_table(
        "user_create_requests",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", sa.String(length=36), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name="pk_user_create_requests_request_id"),
    )
    op.create_index("ix_user_create_requests_create_time", "user_create_requests", ["create_time"], unique=False)
    op.execute(
        "INSERT INTO user_create_requests (request_id, request_hash, user_id, create_time) "
        "SELECT create_request_id, create_request_hash, id, create_time FROM users "
        "WHERE create_request_id IS NOT NULL AND create_request_hash IS NOT NULL")
    # Batch mode: on SQLite a constraint can only be dropped by copying the table.
    with op.batch_alter_table("users") as batch:
        batch.drop_constraint("uq_users_create_request_id", type_="unique")
        batch.drop_column("create_request_hash")
        batch.drop_column("create_request_id")


def downgrade() -> None:
    with op.batch_alter_table("users") as batch:
        batch.add_column(sa.Column("create_request_id", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("create_request_hash", sa.String(length=64), nullable=True))
        batch.create_unique_constraint("uq_users_create_request_id", ["create_request_id"])
    # The records of accounts that still exist go back on their rows; those of deleted accounts are lost, as
    # revision 0001 has nowhere to keep them.
    op.execute(
        "UPDATE users SET "
        "create_request_id = (SELECT r.request_id FROM user_create_requests r WHERE r.user_id = users.id), "
        "create_request_hash = (SELECT r.request_hash FROM user_create_requests r WHERE r.user_id = users.id)")
    op.drop_index("ix_user_create_requests_create_time", table_name="user_create_requests")
    op.drop_table("user_create_requests")
