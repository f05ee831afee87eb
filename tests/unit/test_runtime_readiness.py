"""Readiness: critical checks decide SERVING; non-critical ones only degrade the report."""

from __future__ import annotations

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from tessera_runtime.server import NOT_SERVING, SERVING, HealthCheck, Readiness


class Switch:
    def __init__(self, up: bool = True) -> None:
        self.up = up

    async def ping(self) -> bool:
        if not self.up:
            raise ConnectionError("connection refused")
        return True


async def status(health: HealthServicer, name: str) -> int:
    class Ctx:
        async def abort(self, *a):  # pragma: no cover - every name asked here is registered
            raise AssertionError(a)

    return (await health.Check(health_pb2.HealthCheckRequest(service=name), Ctx())).status


async def test_critical_failure_is_not_serving_and_non_critical_is_degraded():
    database, broker = Switch(), Switch()
    health = HealthServicer()
    readiness = Readiness(health, ["tessera.x.v1.XService"],
                          [database.ping, HealthCheck("broker", broker.ping, critical=False)], interval=1)
    assert await readiness.check_once()
    assert readiness.report["status"] == "UP"
    assert set(readiness.report["checks"]) == {"switch", "broker"}

    broker.up = False
    assert await readiness.check_once()
    assert await status(health, "tessera.x.v1.XService") == SERVING
    assert readiness.report["status"] == "DEGRADED"
    assert readiness.report["checks"]["broker"] == {"status": "DOWN", "critical": False,
                                                    "error": "ConnectionError: connection refused"}

    database.up = False
    assert not await readiness.check_once()
    assert await status(health, "") == NOT_SERVING
    assert await status(health, "tessera.x.v1.XService") == NOT_SERVING
    assert readiness.report["status"] == "DOWN"


def gauge(name: str, **labels: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value(name, labels)


async def test_each_check_and_the_readiness_are_gauges_for_alerting():
    database, broker = Switch(), Switch()
    readiness = Readiness(HealthServicer(), ["tessera.x.v1.XService"],
                          [HealthCheck("database", database.ping), HealthCheck("broker", broker.ping, critical=False)],
                          interval=1)
    assert await readiness.check_once()
    assert gauge("tessera_ready") == 1
    assert gauge("tessera_health_check_up", check="database", critical="true") == 1
    assert gauge("tessera_health_check_up", check="broker", critical="false") == 1

    broker.up = False
    assert await readiness.check_once()
    assert gauge("tessera_ready") == 1
    assert gauge("tessera_health_check_up", check="broker", critical="false") == 0

    database.up = False
    assert not await readiness.check_once()
    assert gauge("tessera_ready") == 0
    assert gauge("tessera_health_check_up", check="database", critical="true") == 0

    database.up = broker.up = True
    assert await readiness.check_once()
    assert gauge("tessera_ready") == 1
    readiness.leave_rotation()
    assert gauge("tessera_ready") == 0
    assert readiness.report["status"] == "DOWN" and readiness.report["shutting_down"] is True
