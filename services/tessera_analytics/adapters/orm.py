"""The analytics service's tables (SQLAlchemy Core); migrations in tessera_analytics/migrations create them."""

from sqlalchemy import BigInteger, Column, MetaData, String, Table

from tessera_runtime.messaging.idempotency import processed_events_table

metadata = MetaData()

# One row per (UTC day, metric, key): the key is a currency code for amounts, a failure reason for failed orders,
# and empty otherwise. Events only add to `value`, so the order they are applied in does not matter.
daily_counters = Table(
    "daily_counters",
    metadata,
    Column("day", String(10), primary_key=True),  # "YYYY-MM-DD": sorts as the dates do
    Column("metric", String(40), primary_key=True),
    Column("key", String(100), primary_key=True),
    Column("value", BigInteger, nullable=False),
)

processed_events = processed_events_table(metadata)
