"""In-process Tessera services wired to a test vhost and SMTP server, for the messaging and notification tests."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import AsyncIterator
from typing import Any

import grpc

from tessera_runtime import app
from tessera_runtime.server import TesseraServer, create_server

# Fast retries and reconnects: tests wait for outcomes, never for fixed times.
FAST = {
    "TESSERA_CONSUMER_RETRY_DELAYS": "0.2,0.4",
    "TESSERA_CONSUMER_MAX_ATTEMPTS": "3",
    "TESSERA_OUTBOX_POLL_SECONDS": "0.2",
    "TESSERA_AMQP_RECONNECT_MAX_SECONDS": "0.5",
    "TESSERA_GRACE_SECONDS": "1",
}


def environment(service: str, *, database_url: str, amqp_url: str, smtp_port: int | None = None,
                **extra: str) -> dict[str, str]:
    env = {"TESSERA_DATABASE_URL": database_url, "TESSERA_AMQP_URL": amqp_url, "TESSERA_GRPC_PORT": "0",
           "TESSERA_ENV": "test", **FAST}
    if smtp_port is not None:
        env.update(TESSERA_SMTP_HOST="127.0.0.1", TESSERA_SMTP_PORT=str(smtp_port), TESSERA_SMTP_STARTTLS="false")
    env.update(extra)
    return env


def settings(service: str, env: dict[str, str]) -> Any:
    root = importlib.import_module(app.SERVICES[service])
    return app.load_settings(root, env)


@contextlib.asynccontextmanager
async def running(service: str, env: dict[str, str]) -> AsyncIterator[tuple[TesseraServer, grpc.aio.Channel]]:
    """A service built by its composition root and served on port 0, with a channel to it."""
    root = importlib.import_module(app.SERVICES[service])
    module = await root.build(app.load_settings(root, env))
    server, port = await create_server(module, readiness_interval=0.2)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield server, channel
    finally:
        await server.stop()
