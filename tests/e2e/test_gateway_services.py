"""The other services through the gateway: the order saga over REST (the `make demo` scenario), scopes and
ownership on orders, payments and products."""

from __future__ import annotations

import uuid

import pytest

from tessera_gateway import demo
from tests.support.gateway import unique

SAGA = ("inventory", "payment", "order")


@pytest.fixture(scope="module")
def saga_gateway(gateway, gateway_services):
    missing = [name for name in SAGA if name not in gateway_services.processes]
    assert not missing, f"services not in this tree: {missing}"
    return gateway


def test_the_demo_scenario_runs_through_the_gateway(saga_gateway, capsys):
    api = demo.Api(f"http://{saga_gateway.address}")
    demo.scenario(api, lambda subject, scopes: saga_gateway.mint(subject, scopes))
    out = capsys.readouterr().out
    assert "ORDER_STATUS_CONFIRMED" in out and "PAYMENT_DECLINED" in out
    assert "RESERVE_STOCK=COMPENSATED" in out
    assert "5. The same, as one GraphQL query" in out and ": CONFIRMED " in out and ": FAILED " in out


@pytest.fixture(scope="module")
def placed_order(saga_gateway):
    gw = saga_gateway
    admin = gw.mint(unique("ops"), "admin")
    customer = gw.call("POST", f"/v1/users?requestId={unique('c')}", token=admin,
                       body={"email": f"{unique('c')}@example.com", "displayName": "Carol"}).json()["user"]
    product = gw.call("POST", f"/v1/products?requestId={unique('p')}", token=admin, body={
        "sku": unique("SKU"), "name": "Kettle", "price": {"currencyCode": "EUR", "amountMinor": "2500"},
        "stockOnHand": "5"}).json()["product"]
    token = gw.mint(customer["id"], "order:read order:write payment:read")
    order = gw.call("POST", "/v1/orders", token=token, body={
        "customerId": customer["id"], "items": [{"productId": product["id"], "quantity": 1}],
        "paymentMethod": "pm_sandbox_ok", "currencyCode": "EUR", "requestId": unique("o")})
    assert order.status == 200, order.body
    return {"customer": customer, "product": product, "order": order.json()["order"], "token": token,
            "admin": admin}


def test_a_customer_reads_their_own_order_but_not_anothers(saga_gateway, placed_order):
    gw, order = saga_gateway, placed_order["order"]
    assert gw.call("GET", f"/v1/orders/{order['id']}", token=placed_order["token"]).status == 200
    stranger = gw.mint(str(uuid.uuid4()), "order:read")
    refused = gw.call("GET", f"/v1/orders/{order['id']}", token=stranger)
    assert refused.status in (403, 404), refused.body
    assert refused.json()["details"][0]["domain"] == "order.tessera.dev"
    assert gw.call("GET", f"/v1/orders/{order['id']}", token=placed_order["admin"]).status == 200


def test_a_customer_reads_their_own_payment_but_not_anothers(saga_gateway, placed_order):
    gw, payment_id = saga_gateway, placed_order["order"]["paymentId"]
    own = gw.call("GET", f"/v1/payments/{payment_id}", token=placed_order["token"])
    assert own.status == 200 and own.json()["payment"]["status"] == "PAYMENT_STATUS_SUCCEEDED"
    stranger = gw.call("GET", f"/v1/payments/{payment_id}", token=gw.mint(str(uuid.uuid4()), "payment:read"))
    assert stranger.status in (403, 404), stranger.body


def test_route_scopes_of_the_other_services(saga_gateway, placed_order):
    gw = saga_gateway
    customer = placed_order["customer"]["id"]
    reader = gw.mint(customer, "inventory:read order:read payment:read")
    product_id = placed_order["product"]["id"]
    assert gw.call("GET", f"/v1/products/{product_id}", token=reader).status == 200
    # Catalogue changes need inventory:write; charging and refunding by hand need admin.
    for method, path, body in [
        ("POST", f"/v1/products?requestId={unique('x')}", {"sku": unique("S"), "name": "X",
                                                          "price": {"currencyCode": "EUR", "amountMinor": "1"}}),
        ("POST", f"/v1/products/{product_id}:adjustStock", {"delta": "1", "requestId": unique("a")}),
        ("POST", "/v1/payments", {"orderId": placed_order["order"]["id"], "customerId": customer,
                                  "amount": {"currencyCode": "EUR", "amountMinor": "1"},
                                  "paymentMethod": "pm_sandbox_ok", "idempotencyKey": unique("k")}),
        ("POST", f"/v1/payments/{placed_order['order']['paymentId']}:refund", {"idempotencyKey": unique("r")}),
        ("POST", "/v1/reservations", {"orderId": str(uuid.uuid4()), "items": []}),
        ("POST", f"/v1/orders/{placed_order['order']['id']}:cancel", {}),
    ]:
        response = gw.call(method, path, token=reader, body=body)
        assert response.status == 403, (path, response.body)
        assert response.json()["details"][0]["reason"] == "MISSING_SCOPE"
    # The order's owner with order:write cancels it.
    writer = gw.mint(customer, "order:write")
    cancelled = gw.call("POST", f"/v1/orders/{placed_order['order']['id']}:cancel", token=writer,
                        body={"reason": "changed my mind"})
    assert cancelled.status == 200, cancelled.body
    assert cancelled.json()["order"]["status"] == "ORDER_STATUS_CANCELLED"


def test_native_grpc_reaches_every_running_service(saga_gateway, placed_order):
    admin = placed_order["admin"]
    for method, request in [
        ("tessera.inventory.v1.InventoryService/GetProduct", {"id": placed_order["product"]["id"]}),
        ("tessera.order.v1.OrderService/GetOrder", {"id": placed_order["order"]["id"]}),
        ("tessera.payment.v1.PaymentService/GetPayment", {"id": placed_order["order"]["paymentId"]}),
    ]:
        result = saga_gateway.grpcurl(method, request, token=admin)
        assert result.returncode == 0, (method, result.stderr)
