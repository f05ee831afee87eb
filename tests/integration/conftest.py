"""Integration fixtures: real servers on port 0 over real channels, on SQLite and PostgreSQL."""

from __future__ import annotations

import grpc
import pytest
from tessera.user.v1 import user_service_pb2_grpc

from tessera_runtime.config import ServiceSettings
from tessera_runtime.messaging import MessagingServiceSettings
from tessera_runtime.messaging.amqp import running_links
from tessera_runtime.server import create_server
from tessera_user import bootstrap
from tests.support import postgres
from tests.support.databases import migrated
from tests.support.smtp import SmtpSink


@pytest.fixture(scope="module", autouse=True)
def no_broker_connection_outlives_its_module():
    """Every AMQP link (outbox relay, consumer) a module's tests start is stopped by the end of the module. One left
    running reconnects for the rest of the session to a vhost that no longer exists, and its relay keeps polling a
    database that was dropped: the leak is stopped here and reported as an error of the module."""
    before = set(running_links())
    yield
    leaked = [link for link in running_links() if link not in before]
    for link in leaked:
        link.stop()
    assert not leaked, f"AMQP links still running after the module's tests: {sorted(link.name for link in leaked)}"


@pytest.fixture(params=["sqlite", "postgres"])
async def db_url(request, tmp_path):
    """A fresh database on each backend Tessera supports."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
        return
    name, url = await postgres.create_database()
    yield url
    await postgres.drop_database(name)


@pytest.fixture
async def user_database(db_url):
    """The user service's schema on each backend, as a Database (the tables tests of the runtime write to)."""
    async with migrated(bootstrap.MIGRATIONS, db_url) as db:
        yield db


def settings_for(service: str, db_url: str, **overrides) -> ServiceSettings:
    # Events are asserted in the outbox here; nothing consumes them, so no relay publishes them to the shared
    # broker unless a test asks for one (TESSERA_OUTBOX_RELAY="true").
    env = {"TESSERA_DATABASE_URL": db_url, "TESSERA_GRPC_PORT": "0", "TESSERA_OUTBOX_RELAY": "false", **overrides}
    return MessagingServiceSettings.from_env(service, 0, env)


@pytest.fixture
async def user_server(db_url):
    module = await bootstrap.build(settings_for("user", db_url))
    server, port = await create_server(module, readiness_interval=0.2)
    yield server, port
    await server.stop()


@pytest.fixture
async def user_stub(user_server):
    _, port = user_server
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield user_service_pb2_grpc.UserServiceStub(channel)


@pytest.fixture
async def smtp():
    """A real SMTP server (aiosmtpd) on an ephemeral port that keeps what it receives."""
    sink = await SmtpSink().start()
    yield sink
    await sink.stop()
