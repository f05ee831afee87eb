"""The GraphQL API on a real HTTP server (port 0) over the real user, inventory, payment and order services."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from tessera_graphql.app import GraphQLSettings, build_app
from tests.support.graphql import CUSTOMER, GraphQL, serving
from tests.support.order_stack import InProcessOrder, Neighbours
from tests.support.processes import ServiceProcess


@pytest.fixture(scope="module")
async def neighbours(tmp_path_factory) -> AsyncIterator[Neighbours]:
    stack = await Neighbours(tmp_path_factory.mktemp("graphql-neighbours")).start()
    yield stack
    await stack.stop()


@pytest.fixture(scope="module")
async def graphql(neighbours, tmp_path_factory) -> AsyncIterator[GraphQL]:
    folder = tmp_path_factory.mktemp("graphql-order")
    order = await InProcessOrder.start(neighbours.order_env(f"sqlite+aiosqlite:///{folder / 'order.db'}"))
    settings = GraphQLSettings.from_env({
        "TESSERA_GRAPHQL_PORT": "0", "TESSERA_USER_SERVICE_ADDR": neighbours.address("user"),
        "TESSERA_INVENTORY_SERVICE_ADDR": neighbours.address("inventory"),
        "TESSERA_ORDER_SERVICE_ADDR": f"127.0.0.1:{order.port}", "TESSERA_GRAPHQL_MAX_DEPTH": "6"})
    async with serving(settings) as client:
        yield client
    await order.stop()


PLACE = """
mutation Place($input: CreateOrderInput!) {
  createOrder(input: $input) { id status total { currencyCode amountMinor } }
}"""

READ = """
query Read($id: ID!) {
  order(id: $id) {
    id status customerId
    customer { id displayName }
    items { sku quantity lineTotal { amountMinor } product { id name stockAvailable } }
    saga { name status }
  }
  me { id }
}"""


def place_input(customer: str, *items: tuple[str, int], method: str = "pm_sandbox_ok") -> dict:
    return {"input": {"customerId": customer, "paymentMethod": method, "currencyCode": "EUR",
                      "requestId": uuid.uuid4().hex,
                      "items": [{"productId": p, "quantity": q} for p, q in items]}}


def graphql_counts() -> dict[tuple[str, ...], float]:
    """The GraphQL API's operation and error counters (the API runs in this process), by name and label values."""
    return {(sample.name, *sample.labels.values()): sample.value for metric in REGISTRY.collect()
            for sample in metric.samples
            if sample.name in ("tessera_graphql_operations_total", "tessera_graphql_errors_total")}


def moved(before: dict[tuple[str, ...], float]) -> dict[tuple[str, ...], float]:
    return {k: v - before.get(k, 0) for k, v in graphql_counts().items() if v != before.get(k, 0)}


def client_calls(method: str) -> float:
    """Calls of `method` the services (in this process) handled: the servers' own RED metrics."""
    return sum(sample.value for metric in REGISTRY.collect() for sample in metric.samples
               if sample.name == "grpc_server_handled_total" and sample.labels.get("grpc_method") == method)


async def test_a_customer_places_an_order_and_reads_it_in_one_graph(graphql, neighbours):
    customer = await neighbours.customer()
    pen, pad, ink = (await neighbours.product(5, price=150), await neighbours.product(5, price=400),
                     await neighbours.product(5, price=90))
    status, body, headers = await graphql.post(PLACE, place_input(customer, (pen, 2), (pad, 1), (ink, 3)),
                                               subject=customer)
    assert status == 200 and "errors" not in body, body
    placed = body["data"]["createOrder"]
    assert placed["status"] == "CONFIRMED" and placed["total"] == {"currencyCode": "EUR", "amountMinor": "970"}
    assert headers["x-request-id"] and headers["x-correlation-id"]

    batches = client_calls("BatchGetProducts")
    status, body, _ = await graphql.post(READ, {"id": placed["id"]}, subject=customer)
    assert status == 200 and "errors" not in body, body
    order = body["data"]["order"]
    assert order["customer"]["id"] == customer == body["data"]["me"]["id"]
    assert [(i["quantity"], i["product"]["id"], i["product"]["stockAvailable"]) for i in order["items"]] == [
        (2, pen, "3"), (1, pad, "4"), (3, ink, "2")]
    assert {s["name"]: s["status"] for s in order["saga"]}["PROCESS_PAYMENT"] == "SUCCEEDED"
    assert client_calls("BatchGetProducts") - batches == 1, "the three products are read in one batch"

    status, body, _ = await graphql.post("query($c: ID!) { user(id: $c) { orders { orders { id } } } }",
                                         {"c": customer}, subject=customer)
    assert [o["id"] for o in body["data"]["user"]["orders"]["orders"]] == [placed["id"]]


async def test_a_declined_payment_is_a_failed_order_with_its_reason(graphql, neighbours):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    status, body, _ = await graphql.post(PLACE, place_input(customer, (product, 1), method="pm_sandbox_decline"),
                                         subject=customer)
    assert status == 200 and body["data"] is None
    [error] = body["errors"]
    assert error["path"] == ["createOrder"]
    assert (error["extensions"]["code"], error["extensions"]["reason"]) == ("FAILED_PRECONDITION", "PAYMENT_DECLINED")
    assert error["extensions"]["domain"] == "order.tessera.dev" and error["extensions"]["metadata"]["order_id"]


async def test_a_scope_the_token_lacks_refuses_that_field_only_and_calls_nothing(graphql, neighbours):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    before = client_calls("CreateOrder")
    status, body, _ = await graphql.post(PLACE, place_input(customer, (product, 1)), subject=customer,
                                         scopes="order:read user:read")
    assert status == 200 and body["data"] is None
    ext = body["errors"][0]["extensions"]
    assert (ext["code"], ext["reason"], ext["metadata"]["scopes"]) == ("PERMISSION_DENIED", "MISSING_SCOPE",
                                                                      "order:write")
    assert client_calls("CreateOrder") == before, "refused before the call left"
    _, body, _ = await graphql.post("query($c: ID!) { user(id: $c) { orders { orders { id } } } }",
                                    {"c": customer}, subject=customer)
    assert body["data"]["user"]["orders"]["orders"] == [], "no order was placed"

    # Partial results: the account is read, the catalogue field is refused (no inventory:read).
    status, body, _ = await graphql.post("query($p: ID!) { me { id } product(id: $p) { name } }",
                                         {"p": product}, subject=customer, scopes="user:read")
    assert body["data"] == {"me": {"id": customer}, "product": None}
    assert [(e["path"], e["extensions"]["reason"]) for e in body["errors"]] == [(["product"], "MISSING_SCOPE")]


async def test_the_services_still_decide_whose_data_it_is(graphql, neighbours):
    owner, stranger, product = await neighbours.customer(), await neighbours.customer(), await neighbours.product(5)
    _, body, _ = await graphql.post(PLACE, place_input(owner, (product, 1)), subject=owner)
    order_id = body["data"]["createOrder"]["id"]
    _, body, _ = await graphql.post(READ, {"id": order_id}, subject=stranger)
    [error] = [e for e in body["errors"] if e["path"] == ["order"]]
    assert (error["extensions"]["code"], error["extensions"]["domain"]) == ("PERMISSION_DENIED", "order.tessera.dev")
    _, body, _ = await graphql.post("query($u: ID!) { user(id: $u) { email } }", {"u": owner}, subject=stranger)
    assert body["errors"][0]["extensions"]["code"] == "PERMISSION_DENIED" and body["data"]["user"] is None
    # Listing every account needs admin (the user service says so); with it, it works.
    _, body, _ = await graphql.post("{ users(pageSize: 1) { users { id } } }", subject=stranger)
    assert (body["errors"][0]["extensions"]["code"], body["errors"][0]["extensions"]["domain"]) == (
        "PERMISSION_DENIED", "user.tessera.dev")
    _, body, _ = await graphql.post("{ users(pageSize: 1) { users { id } } me { id } }", subject="ops",
                                    scopes="admin")
    assert "errors" not in body and len(body["data"]["users"]["users"]) == 1
    assert body["data"]["me"] is None, "a staff token's subject is no account"


async def test_bad_input_names_the_field_and_changes_nothing(graphql, neighbours):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    _, body, _ = await graphql.post(PLACE, place_input(customer, (product, 0)), subject=customer)
    ext = body["errors"][0]["extensions"]
    assert ext["code"] == "INVALID_ARGUMENT"
    assert [(v["field"], v["contractField"]) for v in ext["fieldViolations"]] == [
        ("input.items[0].quantity", "items[0].quantity")]
    assert body["errors"][0]["message"].startswith("invalid request: input.items[0].quantity: must be between 1")
    _, body, _ = await graphql.post("query($p: ID!) { product(id: $p) { stockReserved } }", {"p": product},
                                    subject=customer)
    assert body["data"]["product"]["stockReserved"] == "0"
    # A malformed document or an unknown field is GraphQL's own validation error; nothing is called.
    status, body, _ = await graphql.post("{ me { id password } }", subject=customer)
    assert status == 200 and "password" in body["errors"][0]["message"] and body.get("data") is None


BAD_INPUT = [
    # (query, variables, subject, scopes) → the field violations' (field, contractField)
    (PLACE, lambda c, p: {"input": {**place_input(c, (p, 1))["input"], "customerId": "nobody"}}, None, None,
     [("input.customerId", "customer_id")]),
    (PLACE, lambda c, p: place_input(c, (p, 1), ("not-a-uuid", 2), (p, 0)), None, None,
     [("input.items[1].productId", "items[1].product_id"), ("input.items[2].productId", "items[2].product_id"),
      ("input.items[2].quantity", "items[2].quantity")]),
    (PLACE, lambda c, p: {"input": {**place_input(c, (p, 1))["input"], "currencyCode": "eur", "paymentMethod": "",
                                    "requestId": "", "items": []}}, None, None,
     [("input.items", "items"), ("input.paymentMethod", "payment_method"), ("input.currencyCode", "currency_code"),
      ("input.requestId", "request_id")]),
    ("mutation($id: ID!, $r: String!) { cancelOrder(id: $id, reason: $r) { id } }",
     lambda c, p: {"id": "nope", "r": "x" * 501}, None, None, [("id", "id"), ("reason", "reason")]),
    ("mutation($id: ID!, $n: String!) { updateDisplayName(id: $id, displayName: $n) { id } }",
     lambda c, p: {"id": c, "n": "two\nlines"}, None, None, [("displayName", "user.display_name")]),
    ("mutation($id: ID!) { updateDisplayName(id: $id, displayName: \"Ann\") { id } }",
     lambda c, p: {"id": "nope"}, None, None, [("id", "user.id")]),
    ("query($id: ID!) { user(id: $id) { id } }", lambda c, p: {"id": "nope"}, None, None, [("id", "id")]),
    ("query($id: ID!) { product(id: $id) { id } }", lambda c, p: {"id": "nope"}, None, None, [("id", "id")]),
    ("query($id: ID!) { order(id: $id) { id } }", lambda c, p: {"id": "nope"}, None, None, [("id", "id")]),
    ("query($s: String!) { products(sku: $s, pageSize: -1) { nextPageToken } }", lambda c, p: {"s": "x" * 65},
     None, None, [("pageSize", "page_size")]),
    ("query($s: String!) { products(sku: $s) { nextPageToken } }", lambda c, p: {"s": "x" * 65},
     None, None, [("sku", "sku")]),
    ("{ products(pageToken: \"forged\") { nextPageToken } }", lambda c, p: {}, None, None,
     [("pageToken", "page_token")]),
    ("{ orders(customerId: \"nobody\") { nextPageToken } }", lambda c, p: {}, None, None,
     [("customerId", "customer_id")]),
    ("{ orders(pageSize: -1) { nextPageToken } }", lambda c, p: {}, None, None, [("pageSize", "page_size")]),
    ("{ me { orders(pageToken: \"forged\") { nextPageToken } } }", lambda c, p: {}, None, None,
     [("pageToken", "page_token")]),
    ("{ users(pageSize: -1) { nextPageToken } }", lambda c, p: {}, "ops", "admin", [("pageSize", "page_size")]),
    ("{ users(pageToken: \"forged\") { nextPageToken } }", lambda c, p: {}, "ops", "admin",
     [("pageToken", "page_token")]),
]


@pytest.mark.parametrize(("query", "variables", "subject", "scopes", "expected"), BAD_INPUT)
async def test_field_violations_name_the_argument_the_caller_sent(graphql, neighbours, query, variables, subject,
                                                                  scopes, expected):
    """Each violation's `field` is the path of the GraphQL argument (or input field) the caller sent, list indexes
    included, so a form can mark that input; `contractField` is the contract's name for it, as REST and gRPC say."""
    customer, product = await neighbours.customer(), await neighbours.product(5)
    _, body, _ = await graphql.post(query, variables(customer, product), subject=subject or customer,
                                    scopes=scopes or CUSTOMER)
    [error] = body["errors"]
    ext = error["extensions"]
    assert ext["code"] == "INVALID_ARGUMENT", body
    assert [(v["field"], v["contractField"]) for v in ext["fieldViolations"]] == expected
    assert error["message"] == "invalid request: " + "; ".join(
        f"{v['field']}: {v['description']}" for v in ext["fieldViolations"])


async def test_operations_are_counted_by_outcome_and_their_errors_by_code(graphql, neighbours):
    """An error a service gives is an entry of `errors` in an HTTP 200: the operation counters see it all the same."""
    customer, product = await neighbours.customer(), await neighbours.product(5)
    before = graphql_counts()
    status, body, _ = await graphql.post("{ me { id } }", subject=customer)
    assert status == 200 and "errors" not in body
    assert moved(before) == {("tessera_graphql_operations_total", "query", "ok"): 1}

    before = graphql_counts()  # the account is read, the product refused: data and errors
    status, body, _ = await graphql.post("query($p: ID!) { me { id } product(id: $p) { name } }", {"p": product},
                                         subject=customer, scopes="user:read")
    assert status == 200 and body["data"]["me"] and body["errors"]
    assert moved(before) == {("tessera_graphql_operations_total", "query", "partial"): 1,
                             ("tessera_graphql_errors_total", "PERMISSION_DENIED"): 1}

    before = graphql_counts()  # the order service refuses the input: no data
    status, body, _ = await graphql.post(PLACE, place_input(customer, (product, 0)), subject=customer)
    assert status == 200 and body["data"] is None
    assert moved(before) == {("tessera_graphql_operations_total", "mutation", "error"): 1,
                             ("tessera_graphql_errors_total", "INVALID_ARGUMENT"): 1}

    before = graphql_counts()  # GraphQL's own refusal: nothing is called
    status, body, _ = await graphql.post("{ me { id password } }", subject=customer)
    assert moved(before) == {("tessera_graphql_operations_total", "query", "error"): 1,
                             ("tessera_graphql_errors_total", "GRAPHQL_VALIDATION_FAILED"): 1}

    # Two errors of one code in one answer count the operation once under that code.
    other = await neighbours.customer()
    before = graphql_counts()
    _, body, _ = await graphql.post("query($a: ID!, $b: ID!) { a: user(id: $a) { id } b: user(id: $b) { id } }",
                                    {"a": other, "b": other}, subject=customer)
    assert [e["extensions"]["code"] for e in body["errors"]] == ["PERMISSION_DENIED"] * 2
    assert moved(before) == {("tessera_graphql_operations_total", "query", "error"): 1,
                             ("tessera_graphql_errors_total", "PERMISSION_DENIED"): 1}


async def test_a_violation_list_the_service_cut_short_names_the_arguments_in_its_message(graphql, neighbours):
    """Forty items each with a malformed product id and a quantity of 0: the order service's message lists the first
    few and counts the rest, and its BadRequest lists as many as a status carries. The GraphQL message names the
    inputs the caller sent and keeps the service's count."""
    customer = await neighbours.customer()
    _, body, _ = await graphql.post(PLACE, place_input(customer, *[(f"bad-{i}", 0) for i in range(40)]),
                                    subject=customer)
    [error] = body["errors"]
    violations = error["extensions"]["fieldViolations"]
    assert error["extensions"]["code"] == "INVALID_ARGUMENT" and len(violations) < 80, "the service cut its list"
    assert "more violations not listed" in violations[-1]["description"]
    assert error["message"].startswith("invalid request: input.items[0].productId: must be a UUID")
    assert error["message"].endswith(" more") and "product_id" not in error["message"], error["message"]


async def test_a_request_without_identity_is_refused(graphql):
    status, body, headers = await graphql.post("{ me { id } }", subject=None)
    assert status == 401 and body["errors"][0]["extensions"] == {"code": "UNAUTHENTICATED", "reason": "TOKEN_MISSING"}
    assert headers["x-request-id"]


async def test_a_query_nested_too_deep_is_refused_before_any_call(graphql, neighbours):
    customer = await neighbours.customer()
    before = client_calls("GetUser")
    deep = "{ me { orders { orders { customer { orders { orders { customer { id } } } } } } } }"
    _, body, _ = await graphql.post(deep, subject=customer)
    assert "exceeds maximum operation depth" in body["errors"][0]["message"]
    assert client_calls("GetUser") == before


async def test_ids_reach_the_services_and_come_back(graphql, neighbours):
    customer = await neighbours.customer()
    _, body, headers = await graphql.post("{ me { id } }", subject=customer,
                                          headers={"x-request-id": "req-graphql-1", "x-correlation-id": "corr-7"})
    assert body["data"]["me"]["id"] == customer
    assert (headers["x-request-id"], headers["x-correlation-id"]) == ("req-graphql-1", "corr-7")


def test_the_process_refuses_a_bad_setting_naming_it():
    result = subprocess.run([sys.executable, "-m", "tessera_graphql"], capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/bin:/bin", "TESSERA_GRAPHQL_MAX_DEPTH": "deep"})
    assert result.returncode == 2 and "TESSERA_GRAPHQL_MAX_DEPTH" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_process_serves_and_stops_on_sigterm(tmp_path):
    process = ServiceProcess("graphql", {"TESSERA_GRAPHQL_PORT": "0"}, tmp_path / "graphql.log",
                             argv=[sys.executable, "-m", "tessera_graphql"]).start(timeout=60)
    try:
        with urllib.request.urlopen(f"http://{process.address}/health", timeout=5) as response:
            assert response.status == 200
        assert process.proc is not None
        process.proc.send_signal(signal.SIGTERM)
        assert process.proc.wait(timeout=30) == 0
    finally:
        process.stop()


def test_the_process_reports_itself_ready_in_its_metrics_as_its_health_does(tmp_path):
    """tessera_ready is in the API's /metrics too (it shares the runtime's metrics): 1 while it serves, as /health
    says UP, or TesseraNotReady and TesseraNoReadyInstance would fire for every healthy graphql pod."""
    process = ServiceProcess("graphql", {"TESSERA_GRAPHQL_PORT": "0"}, tmp_path / "graphql.log",
                             argv=[sys.executable, "-m", "tessera_graphql"]).start(timeout=60)
    try:
        with urllib.request.urlopen(f"http://{process.address}/health", timeout=5) as response:
            assert json.loads(response.read())["status"] == "UP"
        with urllib.request.urlopen(f"http://{process.address}/metrics", timeout=5) as response:
            ready = [line for line in response.read().decode().splitlines() if line.startswith("tessera_ready ")]
        assert ready == ["tessera_ready 1.0"]
    finally:
        process.stop()


async def test_one_request_is_one_trace_through_the_api_and_the_services(tracing, graphql, neighbours):
    customer = await neighbours.customer()
    trace_id, parent = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    _, body, _ = await graphql.post("{ me { id } }", subject=customer,
                                    headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert body["data"]["me"]["id"] == customer
    get_user = "/tessera.user.v1.UserService/GetUser"

    def complete(r) -> bool:
        return any(s.kind == "SERVER" and s.name == get_user for s in r.trace(trace_id))

    await tracing.wait(complete)
    spans = tracing.receiver.trace(trace_id)
    [api] = [s for s in spans if s.scope == "tessera.graphql"]
    assert (api.kind, api.name, api.parent_span_id) == ("SERVER", "POST /graphql", parent)
    [client] = [s for s in spans if s.kind == "CLIENT" and s.name == get_user]
    [server] = [s for s in spans if s.kind == "SERVER" and s.name == get_user]
    assert client.parent_span_id == api.span_id and server.parent_span_id == client.span_id


async def test_a_service_down_is_unavailable_without_naming_its_address(unused_tcp_port):
    # Nothing listens on the user service's address: every call fails until this process's circuit breaker opens,
    # and then fails at once. Neither answer names the address, which is the cluster's, not the caller's business.
    address = f"127.0.0.1:{unused_tcp_port}"
    settings = GraphQLSettings.from_env({"TESSERA_GRAPHQL_PORT": "0", "TESSERA_USER_SERVICE_ADDR": address,
                                         "TESSERA_DEFAULT_DEADLINE_SECONDS": "2"})
    runner = web.AppRunner(build_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            client = GraphQL(f"http://127.0.0.1:{runner.addresses[0][1]}/graphql", session)
            reasons = set()
            before = graphql_counts()
            for _ in range(8):
                status, body, _ = await client.post("{ me { id } }", subject=str(uuid.uuid4()))
                assert status == 200 and body["data"] == {"me": None}, body
                [error] = body["errors"]
                assert error["extensions"]["code"] == "UNAVAILABLE"
                assert str(unused_tcp_port) not in repr(error), error
                reasons.add(error["extensions"].get("reason"))
            assert "CIRCUIT_OPEN" in reasons, "the breaker opened (the case that named the address)"
            # The answers are 200s: the operation counters, not the HTTP ones, see the service down.
            assert moved(before) == {("tessera_graphql_operations_total", "query", "error"): 8,
                                     ("tessera_graphql_errors_total", "UNAVAILABLE"): 8}
    finally:
        await runner.cleanup()


async def test_a_field_the_token_lacks_the_scope_for_is_refused_so_while_its_service_is_down(unused_tcp_port):
    # The user service is down and its circuit open: a field the token may read answers CIRCUIT_OPEN, one it has no
    # scope for is refused MISSING_SCOPE, as at any other time (before, the open circuit answered it "retry later").
    settings = GraphQLSettings.from_env({"TESSERA_GRAPHQL_PORT": "0",
                                         "TESSERA_USER_SERVICE_ADDR": f"127.0.0.1:{unused_tcp_port}",
                                         "TESSERA_DEFAULT_DEADLINE_SECONDS": "2",
                                         "TESSERA_CIRCUIT_FAILURE_THRESHOLD": "2"})
    runner = web.AppRunner(build_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        async with aiohttp.ClientSession() as session:
            client = GraphQL(f"http://127.0.0.1:{runner.addresses[0][1]}/graphql", session)

            async def refusal(scopes: str) -> tuple[str, str | None]:
                _, body, _ = await client.post("{ me { id } }", subject=str(uuid.uuid4()), scopes=scopes)
                [error] = body["errors"]
                return error["extensions"]["code"], error["extensions"].get("reason")

            assert [await refusal(CUSTOMER) for _ in range(3)] == [("UNAVAILABLE", None)] * 2 + [
                ("UNAVAILABLE", "CIRCUIT_OPEN")]
            assert await refusal("order:read") == ("PERMISSION_DENIED", "MISSING_SCOPE")
            assert await refusal(CUSTOMER) == ("UNAVAILABLE", "CIRCUIT_OPEN")
    finally:
        await runner.cleanup()


async def test_the_circuit_settings_of_the_apis_environment_govern_its_channels(unused_tcp_port):
    # The TESSERA_CIRCUIT_* of the GraphQL process shape its breakers as they shape a service's: here only the rate
    # condition over at least 3 calls can open the circuit (the default would open it after 5 failures in a row).
    address = f"127.0.0.1:{unused_tcp_port}"
    settings = GraphQLSettings.from_env({"TESSERA_GRAPHQL_PORT": "0", "TESSERA_USER_SERVICE_ADDR": address,
                                         "TESSERA_DEFAULT_DEADLINE_SECONDS": "2",
                                         "TESSERA_CIRCUIT_FAILURE_THRESHOLD": "1000", "TESSERA_CIRCUIT_MIN_CALLS": "3",
                                         "TESSERA_CIRCUIT_ERROR_PERCENT": "100"})
    runner = web.AppRunner(build_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            client = GraphQL(f"{base}/graphql", session)
            reasons = []
            for _ in range(4):
                _, body, _ = await client.post("{ me { id } }", subject=str(uuid.uuid4()))
                [error] = body["errors"]
                assert error["extensions"]["code"] == "UNAVAILABLE", error
                reasons.append(error["extensions"].get("reason"))
            assert reasons == [None, None, None, "CIRCUIT_OPEN"]
            async with session.get(f"{base}/metrics") as response:
                scraped = await response.text()
            assert f'tessera_circuit_state{{dependency="{address}"}} 2.0' in scraped
    finally:
        await runner.cleanup()


async def test_nested_lists_cannot_multiply_one_request_into_thousands_of_calls(neighbours, tmp_path):
    # Each level of `customer { orders }` lists the customer's orders again for every order above it: with n orders,
    # three levels (within the default depth limit) are 1 + n + n² ListOrders and n³ orders in the answer (8 million
    # for a customer with 200 orders). One request's calls are bounded: past the bound, the fields left are refused.
    order = await InProcessOrder.start(neighbours.order_env(f"sqlite+aiosqlite:///{tmp_path / 'order.db'}"))
    settings = GraphQLSettings.from_env({
        "TESSERA_GRAPHQL_PORT": "0", "TESSERA_USER_SERVICE_ADDR": neighbours.address("user"),
        "TESSERA_INVENTORY_SERVICE_ADDR": neighbours.address("inventory"),
        "TESSERA_ORDER_SERVICE_ADDR": f"127.0.0.1:{order.port}"})
    try:
        async with serving(settings) as client:
            customer, product = await neighbours.customer(), await neighbours.product(100, price=10)
            for _ in range(18):
                _, body, _ = await client.post(PLACE, place_input(customer, (product, 1)), subject=customer)
                assert "errors" not in body, body
            before = client_calls("ListOrders")
            nested = ("{ me { orders(pageSize: 200) { orders { customer { orders(pageSize: 200) { orders { customer {"
                      " orders(pageSize: 200) { orders { id } } } } } } } } } }")
            status, body, _ = await client.post(nested, subject=customer)
            calls = client_calls("ListOrders") - before
            assert status == 200 and calls <= 250, f"{calls} ListOrders for one request"
            assert {e["extensions"]["code"] for e in body["errors"]} == {"RESOURCE_EXHAUSTED"}
            assert body["errors"][0]["extensions"]["reason"] == "TOO_MANY_CALLS"
    finally:
        await order.stop()


async def test_one_request_places_at_most_one_order(graphql, neighbours):
    # The gateway's rate limit counts HTTP requests: aliased mutations in one request would run that many sagas
    # (up to the alias limit, 30) for one token of the bucket, past the saga class's own limit over REST. A
    # request with more than one mutation field is refused before anything is called.
    customer, product = await neighbours.customer(), await neighbours.product(5)
    before = client_calls("CreateOrder")
    two = """mutation($a: CreateOrderInput!, $b: CreateOrderInput!) {
      a: createOrder(input: $a) { id } ... on Mutation { b: createOrder(input: $b) { id } } }"""
    status, body, _ = await graphql.post(two, {"a": place_input(customer, (product, 1))["input"],
                                               "b": place_input(customer, (product, 1))["input"]}, subject=customer)
    assert status == 200 and body.get("data") is None, body
    assert "at most one" in body["errors"][0]["message"]
    assert client_calls("CreateOrder") == before, "nothing was called"


@pytest.mark.parametrize("headers", [
    {"x-user-id": "c0ffee00-0000-4000-8000-000000000001", "x-user-scopes": "user:read x\ty"},
    {"x-user-id": "tab\there", "x-user-scopes": "user:read"},
    {"x-user-id": "c0ffee00-0000-4000-8000-000000000001", "x-user-scopes": "user:read caf\u00e9"},
], ids=["tab-in-scopes", "tab-in-subject", "non-ascii-scope"])
async def test_an_identity_no_grpc_metadata_can_carry_is_refused_at_once(graphql, headers):
    """The gateway names the caller in headers it writes from a verified token; a header value that gRPC metadata
    cannot carry (a tab, a character outside ASCII) must be refused as the identity it is, not sent on: the call
    to the service then failed inside gRPC and the HTTP request hung until the client gave up."""
    async with graphql.session.post(graphql.url, json={"query": "{ me { id } }"}, headers=headers,
                                    timeout=aiohttp.ClientTimeout(total=30)) as response:
        status, body = response.status, await response.json()
    assert status == 401, body
    assert body["errors"][0]["extensions"] == {"code": "UNAUTHENTICATED", "reason": "IDENTITY_INVALID"}


def http_counts() -> dict[str, float]:
    """tessera_graphql_requests_total by outcome (the API runs in this process)."""
    return {sample.labels["outcome"]: sample.value for metric in REGISTRY.collect() for sample in metric.samples
            if sample.name == "tessera_graphql_requests_total"}


async def test_a_method_graphql_does_not_answer_counts_and_logs_as_the_callers_error(caplog):
    """PUT /graphql is answered 405 by the router (an exception through the middleware): it is the caller's mistake,
    counted client_error and logged with its 405, never a server_error that TesseraGraphqlServerErrors pages on."""
    runner = web.AppRunner(build_app(GraphQLSettings.from_env({"TESSERA_GRAPHQL_PORT": "0"})))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        before = http_counts()
        caplog.set_level("INFO", logger="tessera.graphql.access")
        async with aiohttp.ClientSession() as session, session.put(
                f"http://127.0.0.1:{runner.addresses[0][1]}/graphql", json={"query": "{ me { id } }"},
                headers={"x-user-id": str(uuid.uuid4()), "x-user-scopes": "user:read"}) as response:
            assert response.status == 405
        after = http_counts()
        assert {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0)} == {"client_error": 1}
        [line] = [r for r in caplog.records if r.getMessage().startswith("PUT /graphql")]
        assert line.http_status == 405
    finally:
        await runner.cleanup()
