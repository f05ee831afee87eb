"""Integration fixtures: real servers on port 0 over real channels, on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from tessera.user.v1 import user_service_pb2_grpc

from tessera_runtime.config import ServiceSettings
from tessera_runtime.messaging import MessagingServiceSettings
from tessera_runtime.server import create_server
from tests.support import postgres


@pytest.fixture(params=["sqlite", "postgres"])
async def db_url(request, tmp_path):
    """A fresh database on each backend Tessera supports."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    name, url = await postgres.create_database()
    yield url
    await postgres.drop_database(name)


def settings_for(service: str, db_url: str, **overrides) -> ServiceSettings:
    # Events are asserted in the outbox here; nothing consumes them, so no relay publishes them to the shared
    # broker unless a test asks for one (TESSERA_OUTBOX_RELAY="true").
    env = {"TESSERA_DATABASE_URL": db_url, "TESSERA_GRPC_PORT": "0", "TESSERA_OUTBOX_RELAY": "false", **overrides}
    return MessagingServiceSettings.from_env(service, 0, env)


@pytest.fixture
async def user_server(db_url):
    from tessera_user import bootstrap

    module = await bootstrap.build(settings_for("user", db_url))
    server, port = await create_server(module, readiness_interval=0.2)
    yield server, port
    await server.stop()


@pytest.fixture
async def user_stub(user_server):
    _, port = user_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield user_service_pb2_grpc.UserServiceStub(channel)
