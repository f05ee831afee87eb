"""A throwaway PostgreSQL database per test run on this machine's server, dropped afterwards."""

from __future__ import annotations

import os
import uuid

import asyncpg

ADMIN_DSN = os.environ.get("TESSERA_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")


def _server_part() -> str:
    return ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "")


async def create_database(prefix: str = "tessera_t") -> tuple[str, str]:
    """Creates an empty database; returns (name, SQLAlchemy asyncpg URL)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return name, f"postgresql+asyncpg://{_server_part()}/{name}"


async def drop_database(name: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()
