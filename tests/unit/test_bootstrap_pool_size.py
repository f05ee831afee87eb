"""Every service gives its database the pool size its settings read (TESSERA_DATABASE_POOL_SIZE)."""

from __future__ import annotations

import importlib

import pytest

from tessera_runtime.db import Database

SERVICES = ("user", "inventory", "payment", "order", "notification", "analytics")


@pytest.mark.parametrize("service", SERVICES)
async def test_the_service_database_gets_the_configured_pool_size(service, monkeypatch, tmp_path):
    bootstrap = importlib.import_module(f"tessera_{service}.bootstrap")
    made: list[Database] = []

    class Recorded(Database):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(bootstrap, "Database", Recorded)
    settings = bootstrap.SETTINGS.from_env(service, bootstrap.DEFAULT_PORT, {
        "TESSERA_DATABASE_URL": "postgresql+asyncpg://tessera@127.0.0.1:1/unused", "TESSERA_DATABASE_POOL_SIZE": "3",
        "TESSERA_DATA_DIR": str(tmp_path), "TESSERA_OUTBOX_RELAY": "false"})
    await bootstrap.build(settings, migrate=False)
    try:
        assert [db.engine.pool.size() for db in made] == [3]
        assert [db._direct.size for db in made] == [1]  # nothing connects: the address is never dialled
    finally:
        for db in made:
            await db.dispose()
