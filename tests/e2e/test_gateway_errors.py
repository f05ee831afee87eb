"""The error golden table: for each error class, the request and the exact status and JSON body the gateway
returns (request ids aside, which differ per call and are checked against the x-request-id header)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from tessera_gateway import tokens
from tests.support.gateway import SECURITY_HEADERS, Gateway, HttpResponse, unique

REQUEST_ID = "<x-request-id>"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
BAD_REQUEST = "type.googleapis.com/google.rpc.BadRequest"
GATEWAY = "gateway.tessera.dev"
USER = "user.tessera.dev"
UUID_HINT = "must be a UUID such as 0b6f7d2c-3c1e-4d1a-9a59-6f1d1b9f1e2a"
ADMIN_ID = "00000000-0000-4000-8000-00000000a001"


def gateway_error(code: int, message: str, reason: str, violations: list[tuple[str, str]] | None = None,
                  **metadata: str) -> dict[str, Any]:
    details: list[dict[str, Any]] = [{"@type": ERROR_INFO, "reason": reason, "domain": GATEWAY,
                                      "metadata": {"request_id": REQUEST_ID, **metadata}}]
    if violations:
        details.append({"@type": BAD_REQUEST, "fieldViolations": [
            {"field": f, "description": d} for f, d in violations]})
    return {"code": code, "message": message, "details": details}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[Gateway, dict[str, Any]], HttpResponse]
    status: int
    body: Callable[[dict[str, Any]], dict[str, Any]]
    strict: bool = False  # sent to the strict gateway (tiny buckets, 1 s write timeout, slow link)


def _drained(gw: Gateway, ctx: dict[str, Any]) -> HttpResponse:
    token = gw.mint(unique("drain"), "admin")
    for _ in range(4):  # the strict read bucket holds 4 and refills once a minute
        assert gw.call("GET", "/v1/users?pageSize=1", token=token).status == 200
    return gw.call("GET", "/v1/users?pageSize=1", token=token)


def _slow(gw: Gateway, ctx: dict[str, Any]) -> HttpResponse:
    ctx["link"].delay = 2.5
    try:
        return gw.call("DELETE", f"/v1/users/{uuid.uuid4()}", token=gw.mint(unique("slow"), "admin"))
    finally:
        ctx["link"].delay = 0.0


UNKNOWN = "unknown field: the request has no field of this name"
CASES = [
    # -- produced by the gateway ---------------------------------------------------------------------------------
    Case("malformed JSON",
         lambda gw, c: gw.call("POST", "/v1/users?requestId=golden-1", token=c["admin"], raw_body=b'{"email":',
                               headers={"content-type": "application/json"}),
         400, lambda c: gateway_error(3, "the request could not be read: Unexpected end of string. Expected a "
                                         "value. ^", "MALFORMED_REQUEST")),
    Case("wrong JSON type",
         lambda gw, c: gw.call("POST", "/v1/users?requestId=golden-2", token=c["admin"],
                               body={"email": "x@example.com", "displayName": ["not", "a", "string"]}),
         400, lambda c: gateway_error(3, "the request could not be read: user: Proto field is not repeating, "
                                         "cannot start list.", "MALFORMED_REQUEST")),
    Case("unknown query parameter",
         lambda gw, c: gw.call("GET", "/v1/users?pageSize=1&colour=red", token=c["admin"]),
         400, lambda c: gateway_error(3, "invalid request: unknown query parameter colour", "UNKNOWN_QUERY_PARAMETER",
                                      [("colour", "unknown query parameter: the request has no field of this name")],
                                      field="colour")),
    Case("unknown body field",
         lambda gw, c: gw.call("POST", "/v1/users?requestId=golden-3", token=c["admin"],
                               body={"email": "x@example.com", "displayName": "X", "nickname": "x",
                                     "profile": {"locale": "en", "shoeSize": 44}}),
         400, lambda c: gateway_error(3, "invalid request: unknown fields user.nickname, user.profile.shoeSize",
                                      "UNKNOWN_FIELD", [("user.nickname", UNKNOWN), ("user.profile.shoeSize", UNKNOWN)],
                                      field="user.nickname")),
    Case("unknown field in a list item",
         lambda gw, c: gw.call("POST", "/v1/orders", token=c["admin"], body={
             "customerId": ADMIN_ID, "currencyCode": "EUR", "paymentMethod": "pm_sandbox_ok", "requestId": "g",
             "items": [{"productId": "p", "quantity": 1}, {"productId": "q", "quantity": 1, "colour": "red"}]}),
         400, lambda c: gateway_error(3, "invalid request: unknown field items[1].colour", "UNKNOWN_FIELD",
                                      [("items[1].colour", UNKNOWN)], field="items[1].colour")),
    Case("unknown path",
         lambda gw, c: gw.call("GET", "/v9/things?x=1", token=c["admin"]),
         404, lambda c: gateway_error(5, "no REST route matches GET /v9/things", "ROUTE_NOT_FOUND")),
    Case("method without a route",
         lambda gw, c: gw.call("PUT", "/v1/users", token=c["admin"], body={}),
         404, lambda c: gateway_error(5, "no REST route matches PUT /v1/users", "ROUTE_NOT_FOUND")),
    Case("payload too large",
         lambda gw, c: gw.call("POST", "/v1/users?requestId=golden-4", token=c["admin"],
                               body={"email": "x@example.com", "displayName": "x" * (1024 * 1024)}),
         413, lambda c: gateway_error(8, "the request body is larger than 1048576 bytes", "PAYLOAD_TOO_LARGE")),
    Case("no token",
         lambda gw, c: gw.call("GET", f"/v1/users/{ADMIN_ID}"),
         401, lambda c: gateway_error(16, "this route needs a bearer token: send Authorization: Bearer <JWT>",
                                      "TOKEN_MISSING")),
    Case("expired token",
         lambda gw, c: gw.call("GET", f"/v1/users/{ADMIN_ID}",
                               token=gw.mint(ADMIN_ID, "admin", ttl=600, now=time.time() - 3600)),
         401, lambda c: gateway_error(16, "the bearer token has expired", "TOKEN_EXPIRED")),
    Case("wrong issuer",
         lambda gw, c: gw.call("GET", f"/v1/users/{ADMIN_ID}",
                               token=gw.mint(ADMIN_ID, "admin", issuer="https://elsewhere.example")),
         401, lambda c: gateway_error(16, "the bearer token was refused: Jwt issuer is not configured",
                                      "TOKEN_INVALID")),
    Case("wrong audience",
         lambda gw, c: gw.call("GET", f"/v1/users/{ADMIN_ID}", token=gw.mint(ADMIN_ID, "admin", audience="other")),
         401, lambda c: gateway_error(16, "the bearer token was refused: Audiences in Jwt are not allowed",
                                      "TOKEN_INVALID")),
    Case("forged signature",
         lambda gw, c: gw.call("GET", f"/v1/users/{ADMIN_ID}", token=gw.mint(ADMIN_ID, "admin", key=tokens.SigningKey(
             private_pem=c["forger"].private_pem, kid=gw.key.kid))),
         401, lambda c: gateway_error(16, "the bearer token was refused: Jwt verification fails", "TOKEN_INVALID")),
    Case("unknown signing key",
         lambda gw, c: gw.call("GET", f"/v1/users/{ADMIN_ID}", token=gw.mint(ADMIN_ID, "admin", key=c["forger"])),
         401, lambda c: gateway_error(16, "the bearer token was refused: Jwks doesn't have key to match kid or alg "
                                          "from Jwt", "TOKEN_INVALID")),
    Case("not a JWT",
         lambda gw, c: gw.call("GET", f"/v1/users/{ADMIN_ID}", headers={"authorization": "Bearer not-a-jwt"}),
         401, lambda c: gateway_error(16, "the bearer token was refused: Jwt is not in the form of "
                                          "Header.Payload.Signature with two dots and 3 sections", "TOKEN_INVALID")),
    Case("missing scope",
         lambda gw, c: gw.call("GET", f"/v1/users/{ADMIN_ID}", token=gw.mint(ADMIN_ID, "user:readonly order:read")),
         403, lambda c: gateway_error(7, "the token has none of the scopes this method needs: user:read admin",
                                      "MISSING_SCOPE", required_scopes="user:read admin")),
    Case("rate limited", _drained,
         429, lambda c: gateway_error(8, "too many requests in route class read; retry after 60 s", "RATE_LIMITED",
                                      route_class="read"), strict=True),
    Case("upstream unavailable",
         lambda gw, c: gw.call("GET", f"/v1/products/{uuid.uuid4()}", token=gw.mint(unique("down"), "admin")),
         503, lambda c: gateway_error(14, "the inventory service is unavailable; retry later", "UPSTREAM_UNAVAILABLE",
                                      service="inventory"), strict=True),
    Case("upstream timeout", _slow,
         504, lambda c: gateway_error(4, "the user service did not answer within 1 s", "UPSTREAM_TIMEOUT",
                                      service="user"), strict=True),
    # -- produced by the service, transcoded with their details ------------------------------------------------------
    Case("invalid argument",
         lambda gw, c: gw.call("GET", "/v1/users/not-a-uuid", token=c["admin"]),
         400, lambda c: {"code": 3, "message": f"invalid request: id: {UUID_HINT}", "details": [
             {"@type": ERROR_INFO, "reason": "INVALID_ARGUMENT", "domain": USER, "metadata": {}},
             {"@type": BAD_REQUEST, "fieldViolations": [{"field": "id", "description": UUID_HINT, "reason": ""}]}]}),
    Case("not found",
         lambda gw, c: gw.call("GET", f"/v1/users/{c['missing']}", token=c["admin"]),
         404, lambda c: {"code": 5, "message": f"user {c['missing']} not found", "details": [
             {"@type": ERROR_INFO, "reason": "USER_NOT_FOUND", "domain": USER,
              "metadata": {"user_id": c["missing"]}}]}),
    Case("another customer's account",
         lambda gw, c: gw.call("GET", f"/v1/users/{c['user']['id']}", token=gw.mint(str(uuid.uuid4()), "user:read")),
         403, lambda c: {"code": 7, "message": "you may only act on your own account", "details": [
             {"@type": ERROR_INFO, "reason": "PERMISSION_DENIED", "domain": USER,
              "metadata": {"user_id": c["user"]["id"]}}]}),
    Case("already exists",
         lambda gw, c: gw.call("POST", f"/v1/users?requestId={unique('dup')}", token=c["admin"],
                               body={"email": c["user"]["email"], "displayName": "Again"}),
         409, lambda c: {"code": 6, "message": "a user with this e-mail address already exists", "details": [
             {"@type": ERROR_INFO, "reason": "EMAIL_ALREADY_EXISTS", "domain": USER,
              "metadata": {"field": "user.email"}}]}),
]


@pytest.fixture(scope="module")
def golden_context(gateway, strict_gateway, slow_user_link, tmp_path_factory):
    admin = gateway.mint(unique("golden-admin"), "admin")
    created = gateway.call("POST", f"/v1/users?requestId={unique('golden')}", token=admin,
                           body={"email": f"{unique('golden')}@example.com", "displayName": "Golden"})
    assert created.status == 200, created.body
    return {
        "admin": admin,
        "user": created.json()["user"],
        "missing": str(uuid.uuid4()),
        "link": slow_user_link,
        "forger": tokens.ensure_keys(tmp_path_factory.mktemp("forger")),
    }


def _with_request_id(value: Any, request_id: str) -> Any:
    if isinstance(value, dict):
        return {k: _with_request_id(v, request_id) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_request_id(v, request_id) for v in value]
    return request_id if value == REQUEST_ID else value


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_error_golden_table(case: Case, gateway, strict_gateway, golden_context):
    gw = strict_gateway if case.strict else gateway
    response = case.send(gw, golden_context)
    request_id = response.header("x-request-id")
    assert request_id
    assert (response.status, response.json()) == (case.status, _with_request_id(case.body(golden_context),
                                                                                 request_id))
    # No correlation id was sent: the gateway's own error returns the one it made, the request id.
    assert response.header("x-correlation-id") == request_id
    assert response.header("content-type") == "application/json"
    assert response.grpc_headers == []
    for name, value in SECURITY_HEADERS.items():
        assert response.header(name) == value, name
    if case.status == 429:
        assert response.header("retry-after") == "60"
    if case.status == 401:
        assert response.header("www-authenticate", ).startswith("Bearer")


def test_golden_table_covers_every_error_the_gateway_makes():
    from tessera_gateway import errors

    covered = {c.body({"user": {"id": "", "email": ""}, "missing": ""})["details"][0]["reason"] for c in CASES}
    assert {e.reason for e in errors.GATEWAY_ERRORS} - covered == {"GATEWAY_ERROR"}
