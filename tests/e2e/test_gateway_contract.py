"""Contract test: schemathesis generates requests from the gateway's own OpenAPI document and sends them through
the real gateway to the real services. No response may be a 5xx, and every response (status, content type,
headers, body) must match the document.

schemathesis's pytest plugin does not run under this pytest, so each operation is driven through Hypothesis
directly with schemathesis's strategy and checks.
"""

from __future__ import annotations

import pytest
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
# gateway's own. The notification service is kept away from the suite (it needs a broker): its two operations
# would answer 503 by design.
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


def test_every_operation_but_the_notification_services_is_exercised():
    every = {(method.upper(), path) for path, item in _DOCUMENT["paths"].items() for method, op in item.items()
             if "NotificationService" not in op["tags"]}
    assert set(OPERATIONS) == every
    assert len([op for op in OPERATIONS if op[1].startswith("/v1/users")]) == 7
    assert len(OPERATIONS) == 27  # 7 user, 11 inventory, 4 payment, 4 order, the OpenAPI document


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
