"""Contract test: schemathesis generates requests from the gateway's own OpenAPI document and sends them through
the real gateway to the real services. No response may be a 5xx, and every response (status, content type,
headers, body) must match the document.

schemathesis's pytest plugin does not run under this pytest, so each operation is driven through Hypothesis
directly with schemathesis's strategy and checks. Generated requests rarely make valid resources, so a walk through
every operation with real ones also holds each successful answer to the document.
"""

from __future__ import annotations

import uuid

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tessera_gateway import DESCRIPTOR_SET, description, openapi
from tessera_gateway.descriptors import Contracts
from tests.support.gateway import http_call, unique

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance]
# Operations of the services the gateway suite starts (tests/support/gateway.py: SUITE_SERVICES) and the
# gateway's own. The notification and analytics services are kept away from the suite (they need a broker): their
# operations would answer 503 by design (test_gateway_notifications.py and test_gateway_analytics.py run them on
# stacks with a broker of their own).
TAGS = ("UserService", "InventoryService", "PaymentService", "OrderService", "Gateway")
MAX_EXAMPLES = 15

_DOCUMENT = openapi.build(Contracts.load(DESCRIPTOR_SET), description.load("dev"))
OPERATIONS = [(method.upper(), path) for path, item in _DOCUMENT["paths"].items() for method, op in item.items()
              if set(op["tags"]) & set(TAGS)]


@pytest.fixture(scope="module")
def served_schema(gateway):
    document = http_call(gateway.port, "GET", "/openapi.json").json()
    schema = schemathesis.openapi.from_dict(document)
    schema.config.update(base_url=f"http://{gateway.address}")
    return schema


def test_every_operation_but_the_event_consumers_is_exercised():
    every = {(method.upper(), path) for path, item in _DOCUMENT["paths"].items() for method, op in item.items()
             if not {"NotificationService", "AnalyticsService"} & set(op["tags"])}
    assert set(OPERATIONS) == every
    assert len([op for op in OPERATIONS if op[1].startswith("/v1/users")]) == 7
    assert len(OPERATIONS) == 28  # 7 user, 11 inventory, 5 payment, 4 order, the OpenAPI document


@pytest.mark.parametrize(("method", "path"), OPERATIONS, ids=[f"{m} {p}" for m, p in OPERATIONS])
def test_responses_match_the_openapi_document(gateway, served_schema, method, path):
    operation = served_schema[path][method]
    statuses: list[int] = []

    @given(case=operation.as_strategy())
    @settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def run(case):
        # A token with every scope, for a subject of its own: neither authorisation nor a drained bucket hides
        # an operation's own behaviour.
        token = gateway.mint(unique("contract"), "admin")
        response = case.call_and_validate(headers={"authorization": f"Bearer {token}"}, checks=CHECKS, timeout=30)
        statuses.append(response.status_code)

    run()
    assert statuses and max(statuses) < 500


def test_every_operations_success_matches_the_openapi_document(gateway, served_schema):
    """The generated requests above mostly get client errors: this walk makes every operation succeed once, with
    real resources, and holds each 200 (status, headers and body) to the document the gateway serves."""
    admin = gateway.mint(unique("contract-walk"), "admin")
    answered: set[tuple[str, str]] = set()

    def call(method: str, path: str, body: dict | None = None, token: str = admin) -> dict:
        response = requests.request(method, f"http://{gateway.address}{path}", json=body, timeout=30,
                                    headers={"authorization": f"Bearer {token}"})
        assert response.status_code == 200, (method, path, response.text)
        operation = served_schema.find_operation_by_path(method, path.split("?")[0])
        assert operation is not None, (method, path)
        operation.validate_response(response)  # raises on a status, header or body the document does not allow
        answered.add((method, operation.path))
        return response.json()

    money = {"currencyCode": "EUR", "amountMinor": "2500"}
    user = call("POST", f"/v1/users?requestId={unique('walk')}",
                {"email": f"{unique('walk')}@example.com", "displayName": "Walker"})["user"]
    call("GET", f"/v1/users/{user['id']}")
    call("GET", "/v1/users?pageSize=5")
    call("PATCH", f"/v1/users/{user['id']}?updateMask=displayName", {"displayName": "Walker B."})
    call("POST", f"/v1/users/{user['id']}:deactivate", {"reason": "contract walk"})
    call("POST", f"/v1/users/{user['id']}:activate", {})

    product = call("POST", f"/v1/products?requestId={unique('walk')}", {
        "sku": unique("WALK"), "name": "Teapot", "price": money, "stockOnHand": "10"})["product"]
    call("GET", f"/v1/products/{product['id']}")
    call("GET", "/v1/products?pageSize=5")
    call("GET", f"/v1/products:batchGet?ids={product['id']}")
    call("PATCH", f"/v1/products/{product['id']}?updateMask=name", {"name": "Teapot, blue"})
    call("POST", f"/v1/products/{product['id']}:adjustStock",
         {"delta": "2", "reason": "restock", "requestId": unique("walk")})
    items = [{"productId": product["id"], "quantity": 1}]
    released = call("POST", "/v1/reservations", {"orderId": str(uuid.uuid4()), "items": items})["reservation"]
    call("GET", f"/v1/reservations/{released['id']}")
    call("POST", f"/v1/reservations/{released['id']}:release", {})
    committed = call("POST", "/v1/reservations", {"orderId": str(uuid.uuid4()), "items": items})["reservation"]
    call("POST", f"/v1/reservations/{committed['id']}:commit", {})

    customer = gateway.mint(user["id"], "order:read order:write")
    order = call("POST", "/v1/orders", {"customerId": user["id"], "items": items, "paymentMethod": "pm_sandbox_ok",
                                        "currencyCode": "EUR", "requestId": unique("walk")}, token=customer)["order"]
    call("GET", f"/v1/orders/{order['id']}", token=customer)
    call("GET", f"/v1/orders?customerId={user['id']}", token=customer)
    payment = call("POST", "/v1/payments", {"orderId": str(uuid.uuid4()), "customerId": user["id"],
                                            "amount": money, "paymentMethod": "pm_sandbox_ok",
                                            "idempotencyKey": unique("walk")})["payment"]
    call("GET", f"/v1/payments/{payment['id']}")
    call("GET", f"/v1/payments?customerId={user['id']}")
    call("POST", f"/v1/payments/{payment['id']}:refund", {"idempotencyKey": unique("walk")})
    voided = call("POST", "/v1/payments:void", {"orderId": str(uuid.uuid4()), "customerId": user["id"],
                                                "amount": money, "paymentMethod": "pm_sandbox_ok",
                                                "idempotencyKey": unique("walk")})["payment"]
    assert voided["status"] == "PAYMENT_STATUS_VOIDED"
    call("POST", f"/v1/orders/{order['id']}:cancel", {"reason": "contract walk"}, token=customer)

    call("DELETE", f"/v1/products/{product['id']}")
    call("DELETE", f"/v1/users/{user['id']}")
    call("GET", "/openapi.json")
    assert answered == set(OPERATIONS)
