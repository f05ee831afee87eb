"""One REST CreateOrder through the real Envoy gateway and every service process: one trace, linked consumer,
correlated logs and metrics, all collected by a real OTLP/gRPC receiver and real /metrics endpoints."""

from __future__ import annotations

import dataclasses
import json
import socket
import urllib.request
import uuid
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import rabbitmq
from tests.support.gateway import Gateway, wait_for
from tests.support.otlp_receiver import OtlpReceiver, ReceivedSpan
from tests.support.processes import ServiceProcess

SERVICES = ("user", "inventory", "payment", "order", "notification")
ORDER_CONFIRMED = "tessera.order.v1.OrderConfirmed"
CREATE_ORDER = "/tessera.order.v1.OrderService/CreateOrder"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@dataclasses.dataclass
class ObservedStack:
    receiver: OtlpReceiver
    gateway: Gateway
    processes: dict[str, ServiceProcess]
    metrics_ports: dict[str, int]

    def log_lines(self, service: str) -> list[dict]:
        lines = []
        for raw in self.processes[service].log_text().splitlines():
            if raw.startswith("{"):
                lines.append(json.loads(raw))
        return lines


@pytest.fixture(scope="module")
def observed(tmp_path_factory):
    workdir: Path = tmp_path_factory.mktemp("observability")
    receiver = OtlpReceiver().start()
    vhost = rabbitmq.create_vhost("tessera-observability")
    processes: dict[str, ServiceProcess] = {}
    metrics_ports: dict[str, int] = {}
    gateway = None
    try:
        for name in SERVICES:
            metrics_ports[name] = free_port()
            env = {
                "TESSERA_ENV": "production",
                "TESSERA_DATA_DIR": str(workdir),
                "TESSERA_AMQP_URL": rabbitmq.amqp_url(vhost),
                "TESSERA_METRICS_PORT": str(metrics_ports[name]),
                "TESSERA_OUTBOX_POLL_SECONDS": "0.2",
                "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                "OTEL_BSP_SCHEDULE_DELAY": "100",
                **{f"TESSERA_{other.upper()}_SERVICE_ADDR": p.address for other, p in processes.items()},
            }
            processes[name] = ServiceProcess(name, env, workdir / f"{name}.log").start(timeout=60)
        gateway = Gateway(workdir, "observed", {name: p.address for name, p in processes.items()},
                          {"tracing": {"otlp_endpoint": f"127.0.0.1:{receiver.port}"}}).start(list(SERVICES))
        yield ObservedStack(receiver, gateway, processes, metrics_ports)
    finally:
        if gateway is not None:
            gateway.stop()
        for process in reversed(list(processes.values())):
            process.stop()
        rabbitmq.delete_vhost(vhost)
        receiver.stop()


def _by_service(spans: list[ReceivedSpan]) -> dict[str, list[ReceivedSpan]]:
    grouped: dict[str, list[ReceivedSpan]] = {}
    for span in spans:
        grouped.setdefault(span.service, []).append(span)
    return grouped


def test_rest_create_order_is_one_trace_from_the_edge_through_every_service(observed):
    gw = observed.gateway
    admin = gw.mint(f"ops-{uuid.uuid4().hex[:6]}", "admin")
    user = gw.call("POST", f"/v1/users?requestId={uuid.uuid4().hex}", token=admin,
                   body={"email": f"obs-{uuid.uuid4().hex[:8]}@example.com", "displayName": "Observed"})
    assert user.status == 200, user.body
    customer = user.json()["user"]["id"]
    product = gw.call("POST", f"/v1/products?requestId={uuid.uuid4().hex}", token=admin, body={
        "sku": f"OBS-{uuid.uuid4().hex[:8]}", "name": "Observed thing", "stockOnHand": "5",
        "price": {"currencyCode": "EUR", "amountMinor": "1250"}})
    assert product.status == 200, product.body
    # The welcome e-mail proves the notification consumer is bound before the order's events are published.
    wait_for(lambda: processed(observed, "tessera.user.v1.UserCreated") >= 1, timeout=30)

    request_id = f"obs-{uuid.uuid4().hex}"
    order = {"customerId": customer, "paymentMethod": "pm_sandbox_ok", "currencyCode": "EUR",
             "requestId": uuid.uuid4().hex, "items": [{"productId": product.json()["product"]["id"], "quantity": 2}]}
    created = gw.call("POST", "/v1/orders", token=gw.mint(customer, "order:write"),
                      headers={"x-request-id": request_id}, body=order)
    assert created.status == 200, created.body
    assert created.json()["order"]["status"] == "ORDER_STATUS_CONFIRMED"
    assert created.header("x-request-id") == request_id

    # The gateway's access log ties the request id to the trace Envoy started.
    access = wait_for(lambda: [line for line in gw.access_log_lines() if line.get("request_id") == request_id])
    trace_id = access[0]["trace_id"]
    assert trace_id and len(trace_id) == 32

    expected = {"tessera-gateway", "order-service", "user-service", "inventory-service", "payment-service"}
    observed.receiver.wait_for(lambda r: expected <= {s.service for s in r.trace(trace_id)}, timeout=60)
    spans = observed.receiver.trace(trace_id)
    by_id = {s.span_id: s for s in spans}
    services = _by_service(spans)
    [create] = [s for s in services["order-service"] if s.kind == "SERVER" and s.name == CREATE_ORDER]
    assert by_id[create.parent_span_id].service == "tessera-gateway"  # Envoy's upstream span called the order service
    assert create.attributes["tessera.request_id"] == request_id
    for name in ("user-service", "inventory-service", "payment-service"):
        servers = [s for s in services[name] if s.kind == "SERVER"]
        assert servers, f"no server span of {name}"
        for span in servers:
            caller = by_id[span.parent_span_id]
            assert (caller.service, caller.kind) == ("order-service", "CLIENT")
    # ONE trace: no server span of this request landed in another trace.
    of_request = observed.receiver.spans(lambda s: s.attributes.get("tessera.request_id") == request_id)
    assert {s.trace_id for s in of_request if s.kind == "SERVER"} == {trace_id}

    # The notification consumer's span starts its own trace, linked to the publish of OrderConfirmed in this one.
    def consumer_span(r) -> ReceivedSpan | None:
        return next((s for s in r.spans(lambda s: s.service == "notification-service" and s.kind == "CONSUMER"
                                        and s.name == f"process {ORDER_CONFIRMED}")
                     if any(link[0] == trace_id for link in s.links)), None)

    observed.receiver.wait_for(lambda r: consumer_span(r) is not None, timeout=60)
    consumer = consumer_span(observed.receiver)
    assert consumer.trace_id != trace_id and consumer.parent_span_id is None
    [(_, linked_span)] = consumer.links
    publish = by_id.get(linked_span) or next(s for s in observed.receiver.trace(trace_id) if s.span_id == linked_span)
    assert (publish.service, publish.kind, publish.name) == ("order-service", "PRODUCER", f"publish {ORDER_CONFIRMED}")

    # Logs: every line the order service wrote for this request carries its trace id and request id; the
    # consumer's lines carry the request id with their own trace.
    order_lines = [line for line in observed.log_lines("order") if line.get("request_id") == request_id]
    assert order_lines and all(line["trace_id"] == trace_id for line in order_lines)
    notification_lines = wait_for(lambda: [line for line in observed.log_lines("notification")
                                           if line.get("request_id") == request_id])
    assert {line["trace_id"] for line in notification_lines} == {consumer.trace_id}

    # Metrics: the order service counted one confirmed order, the call it served and the payment it made.
    order_metrics = scrape(observed.metrics_ports["order"])
    assert order_metrics[("tessera_orders_confirmed_total", ())] == 1
    served = (("grpc_code", "OK"), ("grpc_method", "CreateOrder"), ("grpc_service", "tessera.order.v1.OrderService"))
    paid = (("grpc_code", "OK"), ("grpc_method", "ProcessPayment"),
            ("grpc_service", "tessera.payment.v1.PaymentService"))
    assert order_metrics[("grpc_server_handled_total", served)] == 1
    assert order_metrics[("grpc_client_handled_total", paid)] == 1
    assert order_metrics[("tessera_saga_duration_seconds_count", (("outcome", "confirmed"),))] == 1
    wait_for(lambda: processed(observed, ORDER_CONFIRMED) == 1, timeout=30)


def test_the_gateway_continues_a_callers_traceparent(observed):
    gw = observed.gateway
    admin = gw.mint(f"ops-{uuid.uuid4().hex[:6]}", "admin")
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    reply = gw.call("GET", "/v1/users?pageSize=1", token=admin,
                    headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert reply.status == 200, reply.body
    observed.receiver.wait_for(lambda r: {"tessera-gateway", "user-service"} <= {s.service for s in r.trace(trace_id)},
                               timeout=60)
    spans = observed.receiver.trace(trace_id)
    ingress = [s for s in spans if s.service == "tessera-gateway" and s.parent_span_id == parent]
    assert ingress, "the gateway's span is a child of the caller's"
    [server] = [s for s in spans if s.service == "user-service" and s.kind == "SERVER"]
    assert {s.service for s in spans if s.span_id == server.parent_span_id} == {"tessera-gateway"}


def processed(observed: ObservedStack, event_type: str) -> float:
    """Messages of one type the notification service handled, over all its consumers."""
    return sum(value for (name, labels), value in scrape(observed.metrics_ports["notification"]).items()
               if name == "tessera_consumer_processed_total" and dict(labels).get("event_type") == event_type)
