"""Migrations on PostgreSQL when several replicas start at once against one fresh database."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.support import postgres

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("service", ["user", "order"])
async def test_replicas_that_migrate_one_database_at_once_all_start(service):
    # Four replicas (processes, as in a Deployment) run every migration from nothing at the same moment. One
    # migrates, the others wait for it and then find the schema current: none stops on "already exists" or hangs.
    name, url = await postgres.create_database()
    replicas: list[asyncio.subprocess.Process] = []
    try:
        for _ in range(4):
            replicas.append(await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tessera_runtime.cli", "migrate", service, cwd=ROOT,
                env={"PATH": "/usr/bin:/bin", "TESSERA_DATABASE_URL": url},
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE))
        outcomes = [(r.returncode, err.decode()[-2000:])
                    for r, (_, err) in zip(replicas, await asyncio.wait_for(
                        asyncio.gather(*(r.communicate() for r in replicas)), 120), strict=True)]
        assert [code for code, _ in outcomes] == [0, 0, 0, 0], outcomes
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg", "postgresql"))
        try:
            versions = [r["version_num"] for r in await conn.fetch("SELECT version_num FROM alembic_version")]
        finally:
            await conn.close()
        assert versions == ["0003"]
    finally:
        for replica in replicas:
            if replica.returncode is None:
                replica.kill()
                await replica.wait()
        await postgres.drop_database(name)
