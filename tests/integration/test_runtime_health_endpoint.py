"""The /health side door reports the named readiness checks as JSON, next to /metrics."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request

from tessera_runtime.server import HealthCheck, ServiceModule, create_server


class Switch:
    def __init__(self) -> None:
        self.up = True

    async def ping(self) -> bool:
        if not self.up:
            raise ConnectionError("refused")
        return True


def fetch(port: int) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as reply:
            return reply.status, json.loads(reply.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def fetch_metrics(port: int) -> tuple[int, str, bytes]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return reply.status, reply.headers["Content-Type"], reply.read()


async def test_health_endpoint_reports_each_check():
    database, broker = Switch(), Switch()
    module = ServiceModule(service_names=("tessera.x.v1.XService",), register=lambda server: None, domain="x",
                           readiness_checks=(HealthCheck("database", database.ping),
                                             HealthCheck("broker", broker.ping, critical=False)))
    server, _ = await create_server(module, readiness_interval=0.05, metrics_port=0)
    try:
        port = server.metrics.port
        status, body = await asyncio.to_thread(fetch, port)
        assert status == 200 and body["status"] == "UP"
        broker.up = False
        await server.readiness.check_once()
        status, body = await asyncio.to_thread(fetch, port)
        assert status == 200 and body["status"] == "DEGRADED"
        assert body["checks"]["broker"]["status"] == "DOWN" and body["checks"]["database"]["status"] == "UP"
        database.up = False
        await server.readiness.check_once()
        status, body = await asyncio.to_thread(fetch, port)
        assert status == 503 and body["status"] == "DOWN"
        status, content_type, text = await asyncio.to_thread(fetch_metrics, port)
        assert status == 200 and content_type.startswith("text/plain")
        assert b"# TYPE grpc_server_handled_total counter" in text
    finally:
        await server.stop()


async def test_health_endpoint_reports_down_while_the_server_drains():
    """After SIGTERM the gRPC health is NOT_SERVING for the drain period; /health says the same (503), so a
    balancer probing it stops sending work to the draining process."""
    module = ServiceModule(service_names=("tessera.x.v1.XService",), register=lambda server: None, domain="x",
                           readiness_checks=(HealthCheck("database", Switch().ping),))
    server, _ = await create_server(module, readiness_interval=0.05, metrics_port=0, drain_seconds=1.5)
    port = server.metrics.port
    status, body = await asyncio.to_thread(fetch, port)
    assert status == 200 and body["status"] == "UP"
    stopping = asyncio.ensure_future(server.stop())
    try:
        await asyncio.sleep(0.5)  # within the drain period: the gRPC server still answers
        assert not stopping.done()
        status, body = await asyncio.to_thread(fetch, port)
        assert status == 503 and body["status"] == "DOWN", body
    finally:
        await stopping
