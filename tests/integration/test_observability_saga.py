"""One CreateOrder across real order, user, inventory and payment servers: one trace, and the saga's metrics."""

from __future__ import annotations

import uuid

import pytest
from prometheus_client import REGISTRY
from tessera.order.v1 import order_pb2
from tessera.order.v1 import order_service_pb2 as svc

from tests.support.order_stack import InProcessOrder, Neighbours
from tests.support.otlp_receiver import ReceivedSpan

ORDER, USER = "tessera.order.v1.OrderService", "tessera.user.v1.UserService"
INVENTORY, PAYMENT = "tessera.inventory.v1.InventoryService", "tessera.payment.v1.PaymentService"


@pytest.fixture(scope="module")
async def neighbours(tmp_path_factory):
    stack = await Neighbours(tmp_path_factory.mktemp("observability-neighbours")).start()
    yield stack
    await stack.stop()


@pytest.fixture
async def order_service(neighbours, tmp_path):
    service = await InProcessOrder.start(neighbours.order_env(f"sqlite+aiosqlite:///{tmp_path / 'order.db'}"))
    yield service
    await service.stop()


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def ancestors(span: ReceivedSpan, by_id: dict[str, ReceivedSpan]) -> list[ReceivedSpan]:
    chain = []
    while span.parent_span_id in by_id:
        span = by_id[span.parent_span_id]
        chain.append(span)
    return chain


async def test_create_order_is_one_trace_through_every_service_it_calls(tracing, neighbours, order_service):
    customer = await neighbours.customer()
    product = await neighbours.product(stock=5)
    confirmed_before = value("tessera_orders_confirmed_total")
    saga_before = value("tessera_saga_duration_seconds_count", outcome="confirmed")
    payments_before = value("grpc_client_handled_total", grpc_service=PAYMENT, grpc_method="ProcessPayment",
                            grpc_code="OK")

    trace_id, edge_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]  # as the gateway would send them
    reply = await order_service.stub.CreateOrder(
        svc.CreateOrderRequest(customer_id=customer, payment_method="pm_sandbox_ok", currency_code="EUR",
                               request_id=uuid.uuid4().hex,
                               items=[svc.CreateOrderRequest.Item(product_id=product, quantity=2)]),
        metadata=(("traceparent", f"00-{trace_id}-{edge_span}-01"),), timeout=30)
    assert reply.order.status == order_pb2.ORDER_STATUS_CONFIRMED

    def servers(r) -> set[str]:
        return {s.attributes.get("rpc.service") for s in r.trace(trace_id) if s.kind == "SERVER"}

    await tracing.wait(lambda r: servers(r) >= {ORDER, USER, INVENTORY, PAYMENT})
    spans = tracing.receiver.trace(trace_id)
    by_id = {s.span_id: s for s in spans}
    [create] = [s for s in spans if s.kind == "SERVER" and s.name == f"/{ORDER}/CreateOrder"]
    assert create.parent_span_id == edge_span
    for span in spans:
        if span.kind == "SERVER" and span.attributes.get("rpc.service") in (USER, INVENTORY, PAYMENT):
            parent = by_id[span.parent_span_id]
            assert parent.kind == "CLIENT" and parent.name == span.name  # the order service's call
            assert create in ancestors(span, by_id)
    assert any(s.scope == "opentelemetry.instrumentation.sqlalchemy" and create in ancestors(s, by_id)
               for s in spans), "the saga's database work is in the trace"

    assert value("tessera_orders_confirmed_total") == confirmed_before + 1
    assert value("tessera_saga_duration_seconds_count", outcome="confirmed") == saga_before + 1
    assert value("grpc_client_handled_total", grpc_service=PAYMENT, grpc_method="ProcessPayment",
                 grpc_code="OK") == payments_before + 1  # one charge, counted on the order service's side
