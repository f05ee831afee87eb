"""The inventory service's tables (SQLAlchemy Core); migrations in tessera_inventory/migrations create them."""

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    text,
)

from tessera_runtime.db import UtcDateTime
from tessera_runtime.outbox import outbox_table

metadata = MetaData()

products = Table(
    "products",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("sku", String(64), nullable=False),
    Column("name", String(200), nullable=False),
    Column("description", Text, nullable=False),
    Column("currency_code", String(3), nullable=False),
    Column("price_minor", BigInteger, nullable=False),
    Column("stock_on_hand", BigInteger, nullable=False),
    Column("stock_reserved", BigInteger, nullable=False),
    Column("create_time", UtcDateTime(), nullable=False),
    Column("update_time", UtcDateTime(), nullable=False),
    Column("version", BigInteger, nullable=False),
    # Deleted products stay as rows (reservations and requests refer to them) but are invisible to every API.
    Column("delete_time", UtcDateTime(), nullable=True),
    Column("create_request_id", String(64), nullable=True, unique=True),
    Column("create_request_hash", String(64), nullable=True),
    # The database itself refuses negative stock and more units reserved than on hand, whatever the code does.
    CheckConstraint("stock_reserved >= 0 AND stock_reserved <= stock_on_hand", name="ck_products_stock"),
    # A SKU is unique among products that are not deleted, so a deleted product's SKU can be used again.
    Index("uq_products_sku_live", "sku", unique=True, sqlite_where=text("delete_time IS NULL"),
          postgresql_where=text("delete_time IS NULL")),
    Index("ix_products_create_time_id", "create_time", "id"),
)

stock_adjustments = Table(
    "stock_adjustments",
    metadata,
    # One row per AdjustStock request: what makes a repeated request_id adjust only once.
    Column("request_id", String(64), primary_key=True),
    Column("request_hash", String(64), nullable=False),
    Column("product_id", String(36), nullable=False),
    Column("delta", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
    Column("create_time", UtcDateTime(), nullable=False),
)

reservations = Table(
    "reservations",
    metadata,
    Column("id", String(36), primary_key=True),
    Column("order_id", String(36), nullable=False, unique=True),
    Column("status", String(16), nullable=False),
    Column("expire_time", UtcDateTime(), nullable=False),
    Column("create_time", UtcDateTime(), nullable=False),
    Column("update_time", UtcDateTime(), nullable=False),
    Column("commit_time", UtcDateTime(), nullable=True),
    Column("release_time", UtcDateTime(), nullable=True),
    # The sweeper looks for ACTIVE reservations past their expire_time.
    Index("ix_reservations_status_expire_time", "status", "expire_time"),
)

reservation_items = Table(
    "reservation_items",
    metadata,
    Column("reservation_id", String(36), ForeignKey("reservations.id"), primary_key=True),
    Column("position", Integer, primary_key=True),
    Column("product_id", String(36), nullable=False),
    Column("quantity", BigInteger, nullable=False),
)

outbox = outbox_table(metadata)
