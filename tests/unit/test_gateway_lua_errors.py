"""The gateway's error filter (Lua), run in LuaJIT as Envoy runs it: the gRPC twin of every REST error it writes.

A fake stream handle stands in for Envoy's; the end-to-end tests (tests/e2e/test_gateway_grpc_errors.py) send
the same refusals through the real Envoy.
"""

from __future__ import annotations

import base64
import json

import lupa.luajit21 as luajit
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2

from tessera_gateway import errors, generate, lua

# Builds a stand-in for Envoy's response handle from plain tables and runs envoy_on_response with it; returns the
# response headers as the filter left them.
FAKE_HANDLE = """
local function run(response_headers, stored, route, b64, rbac)
  local current = {}
  for k, v in pairs(response_headers) do current[k] = v end
  local headers = {}
  function headers:get(k) return current[k] end
  function headers:add(k, v) current[k] = v end
  function headers:replace(k, v) current[k] = v end
  function headers:remove(k) current[k] = nil end
  local dynamic = {}
  function dynamic:get(ns)
    if ns == "tessera.gateway" then return stored end
    if ns == "envoy.filters.http.rbac" then return rbac end
    return nil
  end
  local info = {}
  function info:dynamicMetadata() return dynamic end
  local route_md = {}
  function route_md:get(k) return route[k] end
  local handle = {}
  function handle:headers() return headers end
  function handle:metadata() return route_md end
  function handle:streamInfo() return info end
  function handle:base64Escape(s) return b64(s) end
  envoy_on_response(handle)
  return current
end
"""
EXPORTS = """
return {run = run, describe = describe, status_json = status_json, status_proto = status_proto,
        percent_encode = percent_encode, percent_decode = percent_decode}
"""
ROUTE = {"service": "user", "route_class": "read", "scopes": "user:read admin", "retry_after": "60",
         "timeout": "5 s"}
GET_USER = "/tessera.user.v1.UserService/GetUser"
REQUEST_ID = "5f0c1d2e-0000-4000-8000-000000000001"


class ErrorFilter:
    """The generated rest_errors filter of the dev profile, loaded into LuaJIT."""

    def __init__(self, source: str) -> None:
        self.runtime = luajit.LuaRuntime(encoding=None, unpack_returned_tuples=True)
        # The filter's functions are chunk locals: the exports appended to the same chunk reach them.
        self.fns = self.runtime.execute(source + FAKE_HANDLE + EXPORTS)

    def table(self, values: dict[str, str]):
        return self.runtime.table_from({k.encode(): v.encode() for k, v in values.items()})

    def on_grpc_response(self, headers: dict[str, str], *, path: str = GET_USER, seen: bool = True,
                         rbac: dict[str, str] | None = None) -> dict[str, str]:
        """The response headers after the filter; seen=False: no filter saw the request (envoy_on_request); rbac:
        the RBAC filters' dynamic metadata."""
        stored = self.table({"protocol": "grpc", "grpc_method": path, "request_id": REQUEST_ID}) if seen else None
        out = self.fns[b"run"](self.table(headers), stored, self.table(ROUTE), lambda raw: base64.b64encode(raw),
                               self.table(rbac) if rbac is not None else None)
        return {k.decode(): v.decode() for k, v in out.items()}

    def rest_body(self, status: int, text: str, *, path: str = "/v1/users/x") -> dict:
        info = self.table({"protocol": "rest", "method": "GET", "path": path, "request_id": REQUEST_ID})
        error = self.fns[b"describe"](status, text.encode(), info, self.table(ROUTE))
        return json.loads(self.fns[b"status_json"](error))

    def grpc_status(self, status: int, text: str, *, path: str = GET_USER) -> bytes:
        info = self.table({"protocol": "grpc", "path": path, "request_id": REQUEST_ID})
        return self.fns[b"status_proto"](self.fns[b"describe"](status, text.encode(), info, self.table(ROUTE)))


@pytest.fixture(scope="module")
def errors_filter(tmp_path_factory) -> ErrorFilter:
    keys = tmp_path_factory.mktemp("lua-keys")
    dev = generate.generate("dev", {"jwt": {"jwks_file": str(keys / "jwks.json")}})
    return ErrorFilter(lua.rest_errors_source(dev.description))


def status_dict(raw: bytes) -> dict:
    return json_format.MessageToDict(status_pb2.Status.FromString(raw))


def local_reply(http_status: int, grpc_status: str, message: str | None) -> dict[str, str]:
    """A gRPC local reply as Envoy hands it to the filter: trailers-only, marked with its HTTP status."""
    headers = {":status": "200", "content-type": "application/grpc", "grpc-status": grpc_status,
               lua.LOCAL_REPLY_HEADER: str(http_status)}
    if message is not None:
        headers["grpc-message"] = message
    return headers


CLAIMS_DENIED = lua.TOKEN_CLAIMS_PREFIX + "enforced_engine_result"
CLAIMS_POLICY = lua.TOKEN_CLAIMS_PREFIX + "enforced_effective_policy_id"


@pytest.mark.parametrize(("rbac", "code", "reason", "why"), [
    ({CLAIMS_DENIED: "denied", CLAIMS_POLICY: lua.CONTROL_CHARACTERS_POLICY}, 16, "TOKEN_INVALID",
     "its scope claim holds a control character"),
    ({CLAIMS_DENIED: "denied", CLAIMS_POLICY: lua.SCOPE_NOT_A_STRING_POLICY}, 16, "TOKEN_INVALID",
     "its scope claim is not a string"),
    ({"enforced_engine_result": "denied", CLAIMS_DENIED: "allowed"}, 7, "MISSING_SCOPE", None),
], ids=["control characters", "scope not a string", "scopes"])
def test_an_rbac_refusal_is_an_invalid_token_only_from_the_token_claims_check(errors_filter, rbac, code, reason, why):
    headers = errors_filter.on_grpc_response(local_reply(403, "7", "RBAC: access denied"), rbac=rbac)
    details = status_dict(base64.b64decode(headers["grpc-status-details-bin"]))
    assert (headers["grpc-status"], details["details"][0]["reason"]) == (str(code), reason)
    if reason == "TOKEN_INVALID":
        assert details["message"] == f"the bearer token was refused: {why}"
        assert headers["www-authenticate"] == 'Bearer realm="tessera", error="invalid_token"'


# (what happened, HTTP status of the local reply, Envoy's grpc-status and grpc-message, expected code and reason)
GRPC_REFUSALS = [
    ("no token", 401, "16", "Jwt is missing", 16, "TOKEN_MISSING"),
    ("expired token", 401, "16", "Jwt is expired", 16, "TOKEN_EXPIRED"),
    ("bad signature", 401, "16", "Jwt verification fails", 16, "TOKEN_INVALID"),
    ("wrong audience", 403, "7", "Audiences in Jwt are not allowed", 16, "TOKEN_INVALID"),
    ("missing scope", 403, "7", "RBAC: access denied", 7, "MISSING_SCOPE"),
    ("rate limited", 429, "8", "local_rate_limited", 8, "RATE_LIMITED"),
    ("too large", 413, "2", "Payload Too Large", 8, "PAYLOAD_TOO_LARGE"),
    ("unknown method", 404, "12", None, 12, "ROUTE_NOT_FOUND"),
    ("upstream down", 503, "14", "no healthy upstream", 14, "UPSTREAM_UNAVAILABLE"),
    ("upstream reset", 503, "14", "upstream connect error or disconnect/reset before headers. reset reason: "
                                  "connection failure", 14, "UPSTREAM_UNAVAILABLE"),
    ("upstream timeout", 504, "14", "upstream request timeout", 4, "UPSTREAM_TIMEOUT"),
    ("anything else", 500, "13", "something odd", 13, "GATEWAY_ERROR"),
]


@pytest.mark.parametrize(("case", "http_status", "grpc_status", "message", "code", "reason"), GRPC_REFUSALS,
                         ids=[c[0] for c in GRPC_REFUSALS])
def test_a_grpc_refusal_carries_the_status_of_its_rest_twin(errors_filter, case, http_status, grpc_status,
                                                            message, code, reason):
    headers = errors_filter.on_grpc_response(local_reply(http_status, grpc_status, message))
    details = status_dict(base64.b64decode(headers["grpc-status-details-bin"]))
    twin_status = 401 if case == "wrong audience" else http_status
    rest = errors_filter.rest_body(twin_status, message or "")
    assert details["details"][0]["reason"] == reason
    assert details["details"][0]["domain"] == "gateway.tessera.dev"
    assert details["details"][0]["metadata"]["request_id"] == REQUEST_ID
    assert headers["grpc-status"] == str(code) == str(details["code"])
    assert errors_filter.fns[b"percent_decode"](headers["grpc-message"].encode()).decode() == details["message"]
    # Everything but the code of an unknown method (gRPC says UNIMPLEMENTED, REST 404 NOT_FOUND) and its
    # message (which names the gRPC method, not a REST path) is the REST body.
    if reason == "ROUTE_NOT_FOUND":
        assert (rest["code"], details["code"]) == (5, 12)
        assert details["message"] == f"no route matches the gRPC method {GET_USER}"
        rest["code"], rest["message"] = details["code"], details["message"]
    assert details == rest
    assert lua.LOCAL_REPLY_HEADER not in headers


def test_a_rate_limited_grpc_call_says_when_to_retry(errors_filter):
    headers = errors_filter.on_grpc_response(local_reply(429, "8", "local_rate_limited"))
    assert headers["retry-after"] == "60"
    assert base64.b64decode(headers["grpc-status-details-bin"])


def test_the_wrong_audience_is_an_invalid_token_over_grpc_too(errors_filter):
    headers = errors_filter.on_grpc_response(local_reply(403, "7", "Audiences in Jwt are not allowed"))
    assert headers["grpc-status"] == "16"
    assert headers["www-authenticate"] == 'Bearer realm="tessera", error="invalid_token"'


def test_a_services_error_with_details_passes_untouched(errors_filter):
    service_details = base64.b64encode(status_pb2.Status(code=3, message="invalid request").SerializeToString())
    sent = {":status": "200", "content-type": "application/grpc", "grpc-status": "3",
            "grpc-message": "invalid%20request", "grpc-status-details-bin": service_details.decode()}
    assert errors_filter.on_grpc_response(sent) == sent


def test_a_services_error_without_details_is_not_claimed_by_the_gateway(errors_filter):
    # No local-reply mark: the service answered (e.g. a server-side deadline), and only it knows why.
    sent = {":status": "200", "content-type": "application/grpc", "grpc-status": "4", "grpc-message": "Deadline"}
    assert errors_filter.on_grpc_response(sent) == sent


def test_successful_grpc_responses_pass_untouched(errors_filter):
    sent = {":status": "200", "content-type": "application/grpc"}
    assert errors_filter.on_grpc_response(sent) == sent


def test_the_local_reply_mark_never_leaves_the_gateway(errors_filter):
    # A local reply that is not an error (the OpenAPI document's direct response) loses the mark too.
    headers = errors_filter.on_grpc_response({":status": "200", "content-type": "application/grpc",
                                              "grpc-status": "0", lua.LOCAL_REPLY_HEADER: "200"})
    assert headers == {":status": "200", "content-type": "application/grpc", "grpc-status": "0"}


def test_a_grpc_request_refused_before_any_filter_ran_still_gets_details(errors_filter):
    # The connection manager's own refusals (an escaped slash in the path) skip envoy_on_request.
    headers = errors_filter.on_grpc_response(local_reply(400, "13", None), seen=False)
    details = status_dict(base64.b64decode(headers["grpc-status-details-bin"]))
    assert headers["grpc-status"] == "3"
    assert details["message"] == "the request could not be read"
    assert details["details"][0]["reason"] == "MALFORMED_REQUEST"


def test_a_reply_to_an_unseen_request_that_is_not_grpc_only_loses_the_mark(errors_filter):
    sent = {":status": "400", "content-type": "text/plain", lua.LOCAL_REPLY_HEADER: "400"}
    assert errors_filter.on_grpc_response(sent, seen=False) == {":status": "400", "content-type": "text/plain"}


def test_bad_request_details_have_the_same_shape_in_both_encodings(errors_filter):
    text = 'Could not find field "colour" in the type "tessera.user.v1.ListUsersRequest".'
    rest = errors_filter.rest_body(400, text)
    proto = status_pb2.Status.FromString(errors_filter.grpc_status(400, text))
    assert status_dict(proto.SerializeToString()) == rest
    bad = error_details_pb2.BadRequest()
    assert proto.details[1].Unpack(bad)
    assert [(v.field, v.description) for v in bad.field_violations] == [
        ("colour", "unknown query parameter: the request has no field of this name")]


def test_long_and_non_ascii_messages_survive_both_encodings(errors_filter):
    # Lengths of 128 bytes and more take two varint bytes, 16384 and more three.
    for size in (127, 128, 300, 16384, 70000):
        text = "é" + "x" * size + "%20 100% \u2603"
        raw = errors_filter.grpc_status(500, text)
        assert status_pb2.Status.FromString(raw).message == text
        assert errors_filter.rest_body(500, text)["message"] == text
    encoded = errors_filter.fns[b"percent_encode"]("100% sûr\n".encode()).decode()
    assert encoded == "100%25 s%C3%BBr%0A"
    assert errors_filter.fns[b"percent_decode"](encoded.encode()).decode() == "100% sûr\n"


def test_the_catalogue_says_what_grpc_clients_see():
    over_grpc = {e.reason: e.code_over_grpc for e in errors.GATEWAY_ERRORS}
    assert over_grpc["ROUTE_NOT_FOUND"] == "UNIMPLEMENTED"
    assert {r for r, code in over_grpc.items() if code is None} == {"UNKNOWN_FIELD", "UNKNOWN_QUERY_PARAMETER"}
    assert all(code == errors.BY_REASON[r].code for r, code in over_grpc.items()
               if code is not None and r != "ROUTE_NOT_FOUND")
    table = errors.markdown_table(grpc=True)
    assert "| 404 | 5 NOT_FOUND | 12 UNIMPLEMENTED | `ROUTE_NOT_FOUND` |" in table
    assert "gRPC code" not in errors.markdown_table()
