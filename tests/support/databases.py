"""A service's schema on a test database, as the Database its repositories use."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tessera_runtime.db import Database
from tessera_runtime.migrations import upgrade_async


@contextlib.asynccontextmanager
async def migrated(migrations: Path, url: str) -> AsyncIterator[Database]:
    """Runs `migrations` on the database at `url`, then yields a Database on it, disposed at the end."""
    await upgrade_async(migrations, url)
    db = Database(url)
    try:
        yield db
    finally:
        await db.dispose()


async def execute(url: str, statement: Any) -> None:
    """Runs one statement in a transaction of its own: a row edited by hand, as an operator might."""
    db = Database(url)
    try:
        async with db.engine.begin() as conn:
            await conn.execute(statement)
    finally:
        await db.dispose()
