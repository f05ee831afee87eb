"""The order service's readiness: its database decides SERVING; the services it calls only degrade it."""

from __future__ import annotations

from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.support.order_stack import InProcessOrder, Neighbours


async def test_a_downstream_outage_degrades_but_keeps_serving(tmp_path):
    neighbours = await Neighbours(tmp_path).start()
    order = await InProcessOrder.start(neighbours.order_env(f"sqlite+aiosqlite:///{tmp_path / 'order.db'}"))
    try:
        readiness = order.server.readiness
        assert await readiness.check_once()
        assert readiness.report["status"] == "UP"
        assert {"database", "user-service", "inventory-service", "payment-service"} == set(readiness.report["checks"])

        payment_server, _ = neighbours.servers.pop("payment")
        await payment_server.stop()
        assert await readiness.check_once(), "a downstream outage must not take the order service out of rotation"
        assert readiness.report["status"] == "DEGRADED"
        assert readiness.report["checks"]["payment-service"]["status"] == "DOWN"
        assert readiness.report["checks"]["user-service"]["status"] == "UP"
        health = health_pb2_grpc.HealthStub(order.channel)
        reply = await health.Check(health_pb2.HealthCheckRequest(service="tessera.order.v1.OrderService"))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await order.stop()
        await neighbours.stop()
