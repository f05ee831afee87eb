"""Alembic migrations per service, applied at start or by `tessera migrate <service>`."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import MetaData, pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

from tessera_runtime.db import ensure_sqlite_folder

log = logging.getLogger("tessera.migrations")

# The PostgreSQL advisory lock a migration holds for its transaction: replicas that start together against one
# database migrate one after the other, and the later ones find the schema current and do nothing (without it, both
# would create the same tables and one would stop on "already exists").
MIGRATION_LOCK_KEY = int.from_bytes(hashlib.sha256(b"tessera.migrations").digest()[:8], "big", signed=True)


def alembic_config(script_location: Path, database_url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(script_location))
    # The URL travels as an attribute, not an ini option, so '%' in passwords needs no escaping.
    cfg.attributes["database_url"] = database_url
    return cfg


def upgrade(script_location: Path, database_url: str, revision: str = "head") -> None:
    ensure_sqlite_folder(database_url)
    command.upgrade(alembic_config(script_location, database_url), revision)


async def upgrade_async(script_location: Path, database_url: str) -> None:
    """Applies pending migrations from a worker thread (Alembic runs its own event loop there)."""
    await asyncio.to_thread(upgrade, script_location, database_url)
    log.info("migrations applied", extra={"script_location": str(script_location.name)})


def run_env(target_metadata: MetaData) -> None:
    """Body of every service's migrations/env.py."""
    from alembic import context

    url = context.config.attributes.get("database_url") or context.config.get_main_option("sqlalchemy.url")
    if context.is_offline_mode():
        context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
        with context.begin_transaction():
            context.run_migrations()
        return

    def do_run(connection: Connection) -> None:
        if connection.dialect.name == "postgresql":
            # Taken before Alembic reads the schema's version, in the transaction the migrations run in (begun
            # here, so Alembic leaves it to run_async to commit), and released with it.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        context.configure(connection=connection, target_metadata=target_metadata,
                          render_as_batch=connection.dialect.name == "sqlite")
        with context.begin_transaction():
            context.run_migrations()

    async def run_async() -> None:
        engine = create_async_engine(url, poolclass=pool.NullPool)
        try:
            async with engine.connect() as conn:
                await conn.run_sync(do_run)
                await conn.commit()
        finally:
            await engine.dispose()

    asyncio.run(run_async())


def create_outbox(op) -> None:
    """Creates the outbox table of tessera_runtime.outbox; called by each service's first migration."""
    import sqlalchemy as sa

    op.create_table(
        "outbox",
        sa.Column("seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=36), nullable=False),
        sa.Column("aggregate_type", sa.String(length=64), nullable=False),
        sa.Column("aggregate_id", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.String(length=200), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("published_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("seq"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index("ix_outbox_unpublished", "outbox", ["published_at", "seq"], unique=False)


def add_outbox_parking(op) -> None:
    """Adds the columns of a parked outbox event (tessera_runtime.outbox): when the relay parked it and the broker's
    reason; called by a migration of each service that has an outbox. Nullable without a default: an ALTER TABLE
    ADD COLUMN on SQLite and PostgreSQL alike, with no table rewrite, and no existing row is parked."""
    import sqlalchemy as sa

    op.add_column("outbox", sa.Column("parked_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("outbox", sa.Column("parked_reason", sa.Text(), nullable=True))


def drop_outbox_parking(op) -> None:
    """Undoes add_outbox_parking. Parked events become ordinary unpublished ones again, which the relay of the
    older version retries (and is blocked by) as it did before."""
    # Batch mode: on SQLite older than 3.35 a column can only be dropped by copying the table.
    with op.batch_alter_table("outbox") as batch:
        batch.drop_column("parked_reason")
        batch.drop_column("parked_at")


def create_processed_events(op) -> None:
    """Creates the processed_events table of tessera_runtime.messaging.idempotency; called by the migration of
    each service that consumes events."""
    import sqlalchemy as sa

    op.create_table(
        "processed_events",
        sa.Column("consumer", sa.String(length=200), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("event_type", sa.String(length=200), nullable=False),
        sa.Column("processed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("consumer", "event_id"),
    )
    op.create_index("ix_processed_events_processed_at", "processed_events", ["processed_at"], unique=False)
