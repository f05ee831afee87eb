"""Products, stock adjustments, reservations and the outbox.

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
        "products",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("sku", sa.String(length=64), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("description", sa.Text(), nullable=False),
        sa.Column("currency_code", sa.String(length=3), nullable=False),
        sa.Column("price_minor", sa.BigInteger(), nullable=False),
        sa.Column("stock_on_hand", sa.BigInteger(), nullable=False),
        sa.Column("stock_reserved", sa.BigInteger(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
        sa.Column("delete_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("create_request_id", sa.String(length=64), nullable=True),
        sa.Column("create_request_hash", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("create_request_id", name="uq_products_create_request_id"),
        sa.CheckConstraint("stock_reserved >= 0 AND stock_reserved <= stock_on_hand", name="ck_products_stock"),
    )
    op.create_index("uq_products_sku_live", "products", ["sku"], unique=True,
                    sqlite_where=sa.text("delete_time IS NULL"), postgresql_where=sa.text("delete_time IS NULL"))
    op.create_index("ix_products_create_time_id", "products", ["create_time", "id"], unique=False)
    op.create_table(
        "stock_adjustments",
        sa.Column("request_id", sa.String(length=64), nullable=False),
        sa.Column("request_hash", sa.String(length=64), nullable=False),
        sa.Column("product_id", sa.String(length=36), nullable=False),
        sa.Column("delta", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("request_id"),
    )
    op.create_table(
        "reservations",
        sa.Column("id", sa.String(length=36), nullable=False),
        sa.Column("order_id", sa.String(length=36), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("commit_time", sa.DateTime(timezone=True), nullable=True),
        sa.Column("release_time", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("order_id", name="uq_reservations_order_id"),
    )
    op.create_index("ix_reservations_status_expire_time", "reservations", ["status", "expire_time"], unique=False)
    op.create_table(
        "reservation_items",
        sa.Column("reservation_id", sa.String(length=36), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("product_id", sa.String(length=36), nullable=False),
        sa.Column("quantity", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["reservation_id"], ["reservations.id"], name="fk_reservation_items_reservation"),
        sa.PrimaryKeyConstraint("reservation_id", "position"),
    )


def downgrade() -> None:
    op.drop_table("reservation_items")
    op.drop_index("ix_reservations_status_expire_time", table_name="reservations")
    op.drop_table("reservations")
    op.drop_table("stock_adjustments")
    op.drop_index("ix_products_create_time_id", table_name="products")
    op.drop_index("uq_products_sku_live", table_name="products")
    op.drop_table("products")
    op.drop_index("ix_outbox_unpublished", table_name="outbox")
    op.drop_table("outbox")
