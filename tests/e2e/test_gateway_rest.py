"""REST through the real Envoy gateway to the real user service: every user RPC, headers, ids, CORS, OpenAPI."""

from __future__ import annotations

import json
import re
import secrets
import subprocess
import uuid

import pytest

from tests.support.gateway import SECURITY_HEADERS, unique, user_gateway, wait_for

UUID = re.compile(r"^[0-9a-f-]{36}$")


def create_user(gateway, admin: str, name: str = "Ada") -> dict:
    response = gateway.call("POST", f"/v1/users?requestId={unique('create')}", token=admin,
                            body={"email": f"{unique('ada')}@example.com", "displayName": name})
    assert response.status == 200, response.body
    return response.json()["user"]


def test_every_user_rpc_over_rest(gateway):
    admin = gateway.mint(unique("admin"), "admin")
    user = create_user(gateway, admin)
    assert user["status"] == "USER_STATUS_ACTIVE"
    assert user["version"] == "1"  # proto3 JSON: int64 as a string
    assert UUID.match(user["id"])
    customer = gateway.mint(user["id"], "user:read user:write")

    got = gateway.call("GET", f"/v1/users/{user['id']}", token=customer)
    assert got.status == 200 and got.json()["user"] == user

    patched = gateway.call("PATCH", f"/v1/users/{user['id']}?updateMask=displayName,profile.locale", token=customer,
                           body={"displayName": "Ada L.", "profile": {"locale": "en-GB"}})
    assert patched.status == 200, patched.body
    assert patched.json()["user"]["displayName"] == "Ada L."
    assert patched.json()["user"]["profile"]["locale"] == "en-GB"
    assert patched.json()["user"]["version"] == "2"

    listed, token, pages = [], "", 0
    while True:
        page = gateway.call("GET", f"/v1/users?pageSize=200&pageToken={token}", token=admin)
        assert page.status == 200, page.body
        listed += [u["id"] for u in page.json()["users"]]
        token, pages = page.json()["nextPageToken"], pages + 1
        if not token or pages > 50:
            break
    assert user["id"] in listed

    deactivated = gateway.call("POST", f"/v1/users/{user['id']}:deactivate", token=admin, body={"reason": "test"})
    assert deactivated.status == 200 and deactivated.json()["user"]["status"] == "USER_STATUS_INACTIVE"
    inactive = gateway.call("GET", "/v1/users?status=USER_STATUS_INACTIVE&pageSize=200", token=admin)
    assert user["id"] in [u["id"] for u in inactive.json()["users"]]
    activated = gateway.call("POST", f"/v1/users/{user['id']}:activate", token=admin, body={})
    assert activated.status == 200 and activated.json()["user"]["status"] == "USER_STATUS_ACTIVE"

    deleted = gateway.call("DELETE", f"/v1/users/{user['id']}", token=customer)
    assert deleted.status == 200 and deleted.json() == {}
    gone = gateway.call("GET", f"/v1/users/{user['id']}", token=admin)
    assert gone.status == 404
    assert gone.json()["details"][0]["reason"] == "USER_NOT_FOUND"


def test_proto_field_names_are_accepted_as_well_as_json_names(gateway):
    admin = gateway.mint(unique("admin"), "admin")
    response = gateway.call("POST", f"/v1/users?request_id={unique('snake')}", token=admin,
                            body={"email": f"{unique('snake')}@example.com", "display_name": "Snake",
                                  "preferences": {"preferred_currency_code": "EUR"}})
    assert response.status == 200, response.body
    assert response.json()["user"]["preferences"]["preferredCurrencyCode"] == "EUR"


def test_create_repeated_with_the_same_request_id_returns_the_first_account(gateway):
    admin = gateway.mint(unique("admin"), "admin")
    request_id, email = unique("same"), f"{unique('same')}@example.com"
    first = gateway.call("POST", f"/v1/users?requestId={request_id}", token=admin,
                         body={"email": email, "displayName": "Once"})
    again = gateway.call("POST", f"/v1/users?requestId={request_id}", token=admin,
                         body={"email": email, "displayName": "Once"})
    assert first.status == again.status == 200
    assert first.json()["user"]["id"] == again.json()["user"]["id"]


def test_rest_responses_have_security_headers_and_no_grpc_headers(gateway):
    admin = gateway.mint(unique("admin"), "admin")
    user = create_user(gateway, admin)
    responses = {
        "success": gateway.call("GET", f"/v1/users/{user['id']}", token=admin),
        "service error": gateway.call("GET", f"/v1/users/{uuid.uuid4()}", token=admin),
        "gateway error": gateway.call("GET", f"/v1/users/{user['id']}"),
        "unknown path": gateway.call("GET", "/v9/nothing"),
        "openapi": gateway.call("GET", "/openapi.json"),
    }
    assert [r.status for r in responses.values()] == [200, 404, 401, 404, 200]
    for what, response in responses.items():
        for name, value in SECURITY_HEADERS.items():
            assert response.header(name) == value, (what, name)
        assert response.grpc_headers == [], what
        assert response.header("server") is None, what
        assert response.header("content-type") == "application/json", what
        assert not any(h.startswith("x-envoy") for h in response.headers), what


def test_native_grpc_responses_keep_their_grpc_headers_and_get_security_headers(gateway):
    admin = gateway.mint(unique("admin"), "admin")
    result = gateway.grpcurl("tessera.user.v1.UserService/ListUsers", {"page_size": 1}, token=admin, verbose=True)
    assert result.returncode == 0, result.stderr
    headers = result.stdout.split("Response headers received:")[1].split("Response contents:")[0]
    assert "content-type: application/grpc" in headers
    assert "x-content-type-options: nosniff" in headers
    assert '"users"' in result.stdout  # the call completed: grpcurl exits 0 only on grpc-status 0


@pytest.fixture(scope="module")
def prod_gateway(gateway_workdir, gateway_services, dead_port):
    """The prod profile's gateway (its values, HSTS among them) in front of the running user service."""
    gw = user_gateway(gateway_workdir, gateway_services, dead_port, "prod", profile="prod")
    yield gw
    gw.stop()


def test_hsts_on_every_prod_response_and_never_in_dev(prod_gateway, gateway):
    for gw in (prod_gateway, gateway):
        admin = gw.mint(unique("admin"), "admin")
        user = create_user(gw, admin)
        responses = {
            "success": gw.call("GET", f"/v1/users/{user['id']}", token=admin),
            "service error": gw.call("GET", f"/v1/users/{uuid.uuid4()}", token=admin),
            "gateway error": gw.call("GET", f"/v1/users/{user['id']}"),
            "unknown path": gw.call("GET", "/v9/nothing"),
            "openapi": gw.call("GET", "/openapi.json"),
        }
        assert [r.status for r in responses.values()] == [200, 404, 401, 404, 200]
        expected = "max-age=63072000; includeSubDomains" if gw is prod_gateway else None
        for what, response in responses.items():
            assert response.headers.get("strict-transport-security", [None]) == [expected], (gw.name, what)
        native = gw.grpcurl("tessera.user.v1.UserService/GetUser", {"id": user["id"]}, token=admin, verbose=True)
        assert native.returncode == 0, native.stderr
        assert ("strict-transport-security: max-age=63072000; includeSubDomains" in native.stdout) == (
            gw is prod_gateway)


def test_successful_calls_run_only_the_error_filters_request_half_in_lua(gateway):
    # Each Lua coroutine costs the gateway tens of microseconds: a successful GET or native gRPC call runs one
    # (the error filter's request half, which records what the access log needs), a REST write two (with the
    # body check); an error still gets the error filter's response half.
    admin = gateway.mint(unique("admin"), "admin")
    user = create_user(gateway, admin)

    def lua_runs(call) -> int:
        before = gateway.envoy.stat("http.edge.lua.executions") or 0
        call()
        return (gateway.envoy.stat("http.edge.lua.executions") or 0) - before

    def get() -> None:
        assert gateway.call("GET", f"/v1/users/{user['id']}", token=admin).status == 200

    def grpc() -> None:
        result = gateway.grpcurl("tessera.user.v1.UserService/GetUser", {"id": user["id"]}, token=admin)
        assert result.returncode == 0, result.stderr

    def write() -> None:
        create_user(gateway, admin, "Grace")

    def refused() -> None:
        assert gateway.call("GET", f"/v1/users/{user['id']}").status == 401

    assert [lua_runs(c) for c in (get, grpc, write, refused)] == [1, 1, 2, 2]


def test_request_id_is_generated_returned_and_reaches_the_service(gateway, gateway_services):
    admin = gateway.mint(unique("admin"), "admin")
    made = gateway.call("GET", "/v1/users?pageSize=1", token=admin)
    generated = made.header("x-request-id")
    assert generated and UUID.match(generated)
    given = unique("req")
    echoed = gateway.call("GET", "/v1/users?pageSize=1", token=admin, headers={"x-request-id": given})
    assert echoed.header("x-request-id") == given
    failed = gateway.call("GET", "/v1/users?pageSize=1", headers={"x-request-id": unique("bad")})
    assert failed.status == 401
    assert failed.json()["details"][0]["metadata"]["request_id"] == failed.header("x-request-id")

    def logged() -> bool:
        ids = {line.get("request_id") for line in gateway_services.log_lines("user")}
        return generated in ids and given in ids

    wait_for(logged)


# A UTF-8 x-request-id as it goes over the wire (http.client sends str header values as Latin-1 bytes).
NOT_ASCII = "café-".encode().decode("latin-1")


def test_a_request_id_that_is_not_ascii_is_no_internal_error(gateway):
    """gRPC metadata is ASCII: a service that kept such an id could not send it back and failed the call."""
    admin = gateway.mint(unique("admin"), "admin")
    response = gateway.call("GET", "/v1/users?pageSize=1", token=admin,
                            headers={"x-request-id": NOT_ASCII + unique("req")})
    assert response.status == 200, response.body


def test_a_request_id_the_services_would_not_keep_is_replaced(gateway, gateway_services):
    """The gateway keeps the client's x-request-id only where the services keep it too (1 to 128 printable ASCII
    characters, sent once): else it makes a new one, so the response, the access log and the services name one id
    (and the correlation id made from it)."""
    admin = gateway.mint(unique("admin"), "admin")
    made = []
    for odd in ("r" * 129 + unique("long"), f"{unique('tab')}\tx", NOT_ASCII + unique("utf8"), "x" * 8000):
        response = gateway.call("GET", "/v1/users?pageSize=1", token=admin, headers={"x-request-id": odd})
        assert response.status == 200, response.body
        request_id = response.header("x-request-id")
        assert UUID.match(request_id), request_id
        assert response.header("x-correlation-id") == request_id
        made.append(request_id)
    refused = gateway.call("GET", "/v1/users?pageSize=1", headers={"x-request-id": "y" * 200})
    assert refused.status == 401 and UUID.match(refused.header("x-request-id"))
    assert refused.json()["details"][0]["metadata"]["request_id"] == refused.header("x-request-id")
    assert len(set(made)) == len(made)
    kept = "a" * 127 + "~"
    assert gateway.call("GET", "/v1/users?pageSize=1", token=admin,
                        headers={"x-request-id": kept}).header("x-request-id") == kept

    def logged() -> bool:
        pairs = {(line.get("request_id"), line.get("correlation_id")) for line in gateway_services.log_lines("user")}
        in_access_log = {line.get("request_id") for line in gateway.access_log_lines()}
        return all((r, r) in pairs for r in made) and set(made) <= in_access_log

    wait_for(logged)


def test_correlation_id_is_kept_or_made_returned_and_reaches_the_service(gateway, gateway_services):
    admin = gateway.mint(unique("admin"), "admin")
    made = gateway.call("GET", "/v1/users?pageSize=1", token=admin)
    assert made.status == 200
    request_id = made.header("x-request-id")
    assert made.header("x-correlation-id") == request_id
    given = unique("corr")
    kept = gateway.call("GET", "/v1/users?pageSize=1", token=admin, headers={"x-correlation-id": given})
    assert kept.status == 200
    assert kept.header("x-correlation-id") == given and kept.header("x-request-id") != given
    # The gateway's own refusals and the services' errors return it too.
    refused = gateway.call("GET", "/v1/users?pageSize=1", headers={"x-correlation-id": given})
    assert refused.status == 401 and refused.header("x-correlation-id") == given
    missing = gateway.call("GET", f"/v1/users/{uuid.uuid4()}", token=admin, headers={"x-correlation-id": given})
    assert missing.status == 404 and missing.header("x-correlation-id") == given
    assert gateway.call("GET", "/v9/nothing", headers={"x-correlation-id": given}).header("x-correlation-id") == given

    def logged() -> bool:
        pairs = {(line.get("request_id"), line.get("correlation_id")) for line in gateway_services.log_lines("user")}
        return (request_id, request_id) in pairs and (kept.header("x-request-id"), given) in pairs

    wait_for(logged)


def test_a_correlation_id_the_services_would_not_keep_is_replaced_by_the_request_id(gateway, gateway_services):
    """The gateway keeps the client's x-correlation-id only where the services keep it too (at most 128 visible
    characters): else the response, the gateway's access log and the services would name different ids."""
    admin = gateway.mint(unique("admin"), "admin")
    sent = []
    for odd in ("c" * 129 + unique("long"), f"{unique('tab')}\tx", "x" * 8000):
        response = gateway.call("GET", "/v1/users?pageSize=1", token=admin, headers={"x-correlation-id": odd})
        assert response.status == 200, response.body
        request_id = response.header("x-request-id")
        assert response.header("x-correlation-id") == request_id
        sent.append(request_id)
    refused = gateway.call("GET", "/v1/users?pageSize=1", headers={"x-correlation-id": "y" * 200})
    assert refused.status == 401 and refused.header("x-correlation-id") == refused.header("x-request-id")
    kept = "a" * 128
    response = gateway.call("GET", "/v1/users?pageSize=1", token=admin, headers={"x-correlation-id": kept})
    assert response.header("x-correlation-id") == kept

    def logged() -> bool:
        pairs = {(line.get("request_id"), line.get("correlation_id")) for line in gateway_services.log_lines("user")}
        return all((r, r) in pairs for r in sent)

    wait_for(logged)


def test_correlation_id_over_native_grpc(gateway):
    admin = gateway.mint(unique("admin"), "admin")
    given = unique("grpc-corr")
    answered = gateway.grpcurl("tessera.user.v1.UserService/ListUsers", {"page_size": 1}, token=admin,
                               headers={"x-correlation-id": given}, verbose=True)
    assert answered.returncode == 0, answered.stderr
    headers = answered.stdout.split("Response headers received:")[1].split("Response contents:")[0]
    assert f"x-correlation-id: {given}" in headers
    refused = gateway.grpcurl("tessera.user.v1.UserService/ListUsers", {"page_size": 1},
                              headers={"x-correlation-id": given}, verbose=True)
    assert refused.returncode == 64 + 16, refused.stderr  # UNAUTHENTICATED, by the gateway itself
    assert f"x-correlation-id: {given}" in refused.stdout


def test_traceparent_is_propagated_to_the_service(gateway, gateway_services):
    admin = gateway.mint(unique("admin"), "admin")
    trace_id = secrets.token_hex(16)
    traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-01"
    response = gateway.call("GET", "/v1/users?pageSize=1", token=admin, headers={"traceparent": traceparent})
    assert response.status == 200

    def continued() -> bool:
        return any(line.get("trace_id") == trace_id
                   and line.get("rpc_method") == "/tessera.user.v1.UserService/ListUsers"
                   for line in gateway_services.log_lines("user"))

    wait_for(continued)


def test_access_log_is_json_with_the_subject_and_the_rest_path(gateway):
    subject = unique("logged")
    token = gateway.mint(subject, "admin")
    request_id = unique("log")
    gateway.call("GET", "/v1/users?pageSize=1", token=token, headers={"x-request-id": request_id})

    def line():
        return next((entry for entry in gateway.access_log_lines() if entry["request_id"] == request_id), None)

    entry = wait_for(line)
    assert entry["subject"] == subject
    assert entry["correlation_id"] == request_id  # none was sent: the request id
    assert entry["rest_method"] == "GET" and entry["rest_path"] == "/v1/users?pageSize=1"
    assert entry["route"] == "tessera.user.v1.UserService.ListUsers"
    assert entry["status"] == 200 and entry["grpc_status"] == 0
    assert isinstance(entry["upstream_ms"], int) and 0 <= entry["upstream_ms"] <= entry["duration_ms"]


def test_cors_preflight_for_allowed_origins_only(gateway):
    allowed = gateway.call("OPTIONS", "/v1/users", headers={
        "origin": "http://localhost:3000", "access-control-request-method": "POST",
        "access-control-request-headers": "authorization, content-type, x-correlation-id"})
    assert allowed.status == 200
    assert allowed.header("access-control-allow-origin") == "http://localhost:3000"
    allowed_headers = {h.strip() for h in allowed.header("access-control-allow-headers").split(",")}
    assert {"authorization", "content-type", "x-request-id", "x-correlation-id"} <= allowed_headers
    assert "PATCH" in allowed.header("access-control-allow-methods")
    refused = gateway.call("OPTIONS", "/v1/users", headers={
        "origin": "https://elsewhere.example", "access-control-request-method": "POST"})
    assert refused.header("access-control-allow-origin") is None
    admin = gateway.mint(unique("admin"), "admin")
    actual = gateway.call("GET", "/v1/users?pageSize=1", token=admin, headers={"origin": "http://localhost:3000"})
    assert actual.header("access-control-allow-origin") == "http://localhost:3000"
    exposed = {h.strip() for h in actual.header("access-control-expose-headers").split(",")}
    assert {"x-request-id", "x-correlation-id", "retry-after", "x-ratelimit-limit", "x-ratelimit-remaining",
            "x-ratelimit-reset"} <= exposed
    # What the browser may then read: this client's bucket of the read class (the dev profile's 100).
    assert actual.header("x-ratelimit-limit") == "100"


def test_openapi_document_is_served_without_a_token(gateway):
    response = gateway.call("GET", "/openapi.json")
    assert response.status == 200
    assert response.json() == gateway.generated.openapi
    assert response.json()["openapi"] == "3.1.0"


@pytest.mark.parametrize("content_type", ["application/grpc-web", "application/grpcx", "application/grpc-web-text"])
def test_a_content_type_that_only_starts_like_grpc_is_rest(gateway, content_type):
    """Envoy (and the transcoder) take a request for gRPC only when its content-type is application/grpc, +proto,
    +json, ...: anything else is transcoded as REST, so it gets REST's checks and REST's JSON errors."""
    body = {"email": f"{unique('ct')}@example.com", "displayName": "C"}
    refused = gateway.call("POST", f"/v1/users?requestId={unique('ct')}", raw_body=json.dumps(body).encode(),
                           headers={"content-type": content_type})
    assert refused.status == 401 and refused.header("content-type") == "application/json", refused.body
    assert refused.json()["details"][0]["reason"] == "TOKEN_MISSING"
    unknown = gateway.call("POST", f"/v1/users?requestId={unique('ct')}", token=gateway.mint(unique("ct"), "admin"),
                           raw_body=json.dumps({**body, "nickname": "c"}).encode(),
                           headers={"content-type": content_type})
    assert unknown.status == 400, unknown.body
    assert unknown.json()["details"][0]["reason"] == "UNKNOWN_FIELD"


def _path_fields_in_bodies(contracts) -> list[tuple[object, str, list[str]]]:
    """Every REST route whose body may repeat a field its path binds: (rpc, path variable, the body's key path to
    it, with the field's last name spelled as in the contract: proto name and JSON name)."""
    cases = []
    for rpc in contracts.rpcs:
        if not rpc.http.body:
            continue
        prefix = "" if rpc.http.body == "*" else rpc.http.body + "."
        for variable in rpc.http.variables:
            if not variable.startswith(prefix):
                continue
            f = contracts.resolve(rpc.input_type, variable)
            parents = variable[len(prefix):].split(".")[:-1]
            for name in dict.fromkeys((f.name, f.json_name)):
                cases.append((rpc, variable, [*parents, name]))
    return cases


def _request(rpc, variable: str, key: list[str], path_value: str, body_value: str) -> tuple[str, dict]:
    path = rpc.http.path
    for other in rpc.http.variables:
        path = path.replace("{" + other + "}", path_value if other == variable else str(uuid.uuid4()))
    body: dict = {key[-1]: body_value}
    for parent in reversed(key[:-1]):
        body = {parent: body}
    return path, body


def test_a_body_repeating_a_path_field_with_another_value_is_refused_in_either_spelling(gateway):
    """The transcoder refuses a body that gives a path-bound field another value under its proto name
    (product_id) but dropped the same field under its JSON name (productId) silently: both are refused."""
    admin = gateway.mint(unique("bound"), "admin")
    cases = _path_fields_in_bodies(gateway.generated.config.contracts)
    spelled = {".".join(key) for _, _, key in cases}
    assert {"product_id", "productId", "payment_id", "paymentId"} <= spelled, spelled
    for rpc, variable, key in cases:
        path, body = _request(rpc, variable, key, str(uuid.uuid4()), str(uuid.uuid4()))
        refused = gateway.call(rpc.http.method, path, token=admin, body=body)
        assert refused.status == 400, (rpc.full_name, key, refused.body)
        error = refused.json()
        assert error["code"] == 3 and error["details"][0]["domain"] == "gateway.tessera.dev", refused.body
        field = ".".join([rpc.http.body, *key] if rpc.http.body != "*" else key)
        assert field in error["message"], (rpc.full_name, refused.body)
        violations = [d for d in error["details"] if d["@type"].endswith("google.rpc.BadRequest")]
        assert [v["field"] for v in violations[0]["fieldViolations"]] == [field], refused.body
        # The same value is no conflict: the request reaches the service (which may refuse an unknown id).
        same = str(uuid.uuid4())
        path, body = _request(rpc, variable, key, same, same)
        reached = gateway.call(rpc.http.method, path, token=admin, body=body)
        assert reached.json().get("details", [{}])[0].get("domain") != "gateway.tessera.dev", (rpc.full_name,
                                                                                                reached.body)


def test_adjusting_stock_with_the_products_id_in_the_body_too(gateway):
    admin = gateway.mint(unique("stock"), "admin")
    product = gateway.call("POST", f"/v1/products?requestId={unique('p')}", token=admin, body={
        "sku": unique("SKU"), "name": "Kettle", "price": {"currencyCode": "EUR", "amountMinor": "2500"},
        "stockOnHand": "5"}).json()["product"]
    other = gateway.call("POST", f"/v1/products?requestId={unique('p')}", token=admin, body={
        "sku": unique("SKU"), "name": "Teapot", "price": {"currencyCode": "EUR", "amountMinor": "1500"},
        "stockOnHand": "5"}).json()["product"]
    path = f"/v1/products/{product['id']}:adjustStock"
    for spelling in ("productId", "product_id"):
        refused = gateway.call("POST", path, token=admin, body={
            "delta": "1", "reason": "recount", "requestId": unique("a"), spelling: other["id"]})
        assert refused.status == 400, refused.body
        adjusted = gateway.call("POST", path, token=admin, body={
            "delta": "1", "reason": "recount", "requestId": unique("a"), spelling: product["id"]})
        assert adjusted.status == 200, adjusted.body
    stock = {p["id"]: gateway.call("GET", f"/v1/products/{p['id']}", token=admin).json()["product"]["stockOnHand"]
             for p in (product, other)}
    assert stock == {product["id"]: "7", other["id"]: "5"}


@pytest.mark.parametrize("headers", [{"grpc-timeout": "1n"}, {"grpc-timeout": "soon"},
                                     {"grpc-timeout": "1n", "grpc-encoding": "gzip", "grpc-message": "x"}],
                         ids=["expired", "unreadable", "several"])
def test_rest_requests_lose_the_grpc_headers_they_send(gateway, headers):
    """gRPC reserves the grpc-* headers for its own wire protocol; a REST client's would reach the service as if a
    gRPC client sent them (grpc-timeout: 1n came back as a 504 without details). The route's timeout governs REST."""
    admin = gateway.mint(unique("grpc-headers"), "admin")
    response = gateway.call("GET", "/v1/users?pageSize=1", token=admin, headers=headers)
    assert response.status == 200, response.body
    assert "users" in response.json()


def test_native_grpc_clients_keep_their_deadline(gateway):
    """A gRPC client's grpc-timeout still reaches the service, which enforces it: an expired one is refused there."""
    import grpc
    from tessera.user.v1 import user_service_pb2, user_service_pb2_grpc

    admin = gateway.mint(unique("grpc-deadline"), "admin")
    with grpc.insecure_channel(gateway.address) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        metadata = (("authorization", f"Bearer {admin}"),)
        listed = stub.ListUsers(user_service_pb2.ListUsersRequest(page_size=1), metadata=metadata, timeout=30)
        assert isinstance(listed, user_service_pb2.ListUsersResponse)
        # Sent as metadata, not as the call's timeout, so that the client does not enforce it itself.
        with pytest.raises(grpc.RpcError) as expired:
            stub.ListUsers(user_service_pb2.ListUsersRequest(page_size=1), metadata=(*metadata, ("grpc-timeout", "1n")))
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED, expired.value


def test_head_answers_as_get_without_a_body(gateway):
    """HEAD is GET without the body (RFC 9110 9.3.2): same status and headers, on every REST GET route."""
    import http.client

    admin = gateway.mint(unique("head"), "admin")
    user = create_user(gateway, admin)
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        for path, status in ((f"/v1/users/{user['id']}", 200), (f"/v1/users/{uuid.uuid4()}", 404),
                             ("/v1/users?pageSize=1", 200), ("/openapi.json", 200), ("/v9/nothing", 404)):
            get = gateway.call("GET", path, token=admin)
            assert get.status == status, (path, get.body)
            # One keep-alive connection: a body sent after a HEAD's headers would be read as the next response.
            conn.request("HEAD", path, headers={"authorization": f"Bearer {admin}"})
            head = conn.getresponse()
            assert (head.status, head.read()) == (status, b""), path
            assert head.getheader("content-type") == get.header("content-type"), path
        conn.request("GET", f"/v1/users/{user['id']}", headers={"authorization": f"Bearer {admin}"})
        after = conn.getresponse()
        assert after.status == 200 and json.loads(after.read())["user"]["id"] == user["id"]
    finally:
        conn.close()
    # The gateway refuses a HEAD as it refuses the GET.
    refused = gateway.call("HEAD", f"/v1/users/{user['id']}")
    assert refused.status == 401 and refused.body == b""
    # Over HTTP/2 (h2c) too, where a body after a HEAD's headers is a protocol error the client resets.
    for path, token, status in ((f"/v1/users/{user['id']}", admin, "200"), (f"/v1/users/{user['id']}", None, "401"),
                                ("/v9/nothing", None, "404")):
        auth = ["-H", f"authorization: Bearer {token}"] if token else []
        curl = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-I", "-o", "/dev/null", "-w",
                               "%{http_version} %{http_code} %{size_download}", *auth,
                               f"http://{gateway.address}{path}"], capture_output=True, text=True, timeout=30)
        assert (curl.returncode, curl.stdout) == (0, f"2 {status} 0"), (path, curl.stderr)


@pytest.fixture(scope="module")
def deadline_gateway(gateway_workdir, gateway_services, dead_port):
    """A gateway of its own: a failing test of deadlines may leave its link to the user service misreading calls."""
    gw = user_gateway(gateway_workdir, gateway_services, dead_port, "deadlines")
    yield gw
    gw.stop()


def test_a_malformed_grpc_deadline_harms_no_other_call(deadline_gateway, tmp_path):
    """gRPC spells a deadline as 1 to 8 digits and a unit. The services' gRPC library refuses any other grpc-timeout
    with INTERNAL and then misreads the headers of the next calls on the gateway's shared connection, so one client
    failed other clients' calls. The gateway drops such a header: the call runs under the route's timeout."""
    import struct

    import grpc
    from tessera.user.v1 import user_service_pb2, user_service_pb2_grpc

    gw = deadline_gateway
    admin = gw.mint(unique("deadline"), "admin")
    message = user_service_pb2.ListUsersRequest(page_size=1).SerializeToString()
    frame = tmp_path / "request.bin"
    frame.write_bytes(b"\0" + struct.pack(">I", len(message)) + message)
    with grpc.insecure_channel(gw.address) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        for timeout in ("soon", "1", "123456789S", "1s", "soon"):
            # A gRPC client grpcio is not: grpcio checks the header before sending it.
            curl = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null",
                                   "-H", "content-type: application/grpc", "-H", "te: trailers",
                                   "-H", f"grpc-timeout: {timeout}", "-H", f"authorization: Bearer {admin}",
                                   "--data-binary", f"@{frame}",
                                   f"http://{gw.address}/tessera.user.v1.UserService/ListUsers"],
                                  capture_output=True, text=True, timeout=30)
            assert curl.returncode == 0, curl.stderr
            for _ in range(2):  # other clients' calls with a deadline
                stub.ListUsers(user_service_pb2.ListUsersRequest(page_size=1), timeout=30,
                               metadata=(("authorization", f"Bearer {admin}"),))
            assert "grpc-status: 0" in curl.stdout, (timeout, curl.stdout)
