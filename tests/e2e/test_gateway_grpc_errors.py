"""The gateway's own refusals over native gRPC: the same google.rpc.Status as over REST, in grpc-status-details-bin.

Each case is a grpcio call through the real Envoy; grpc_status.rpc_status.from_call reads the trailer (and refuses
one whose code or message disagrees with grpc-status / grpc-message). Where the refusal has a REST twin, the twin
is sent too and its JSON body must be the same Status, request ids aside. The services' own errors must cross the
gateway unchanged: byte for byte what the service answers when called directly.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status
from tessera.inventory.v1 import inventory_service_pb2 as inventory_api
from tessera.inventory.v1 import inventory_service_pb2_grpc as inventory_grpc
from tessera.user.v1 import user_pb2
from tessera.user.v1 import user_service_pb2 as user_api
from tessera.user.v1 import user_service_pb2_grpc as user_grpc

from tessera_gateway import lua, tokens
from tests.support.gateway import HttpResponse, unique

GATEWAY = "gateway.tessera.dev"
ERROR_INFO = "type.googleapis.com/google.rpc.ErrorInfo"
REQUEST_ID = "<x-request-id>"
UNKNOWN_METHOD = "/tessera.user.v1.UserService/ExportEveryone"
TIMEOUT = 30.0


@dataclasses.dataclass(frozen=True)
class Refusal:
    """What a native gRPC client saw: the status, the Status from the trailer, and the trailing metadata."""

    code: grpc.StatusCode
    message: str
    status: status_pb2.Status
    trailers: dict[str, str | bytes]

    @property
    def error_info(self) -> error_details_pb2.ErrorInfo:
        info = error_details_pb2.ErrorInfo()
        assert self.status.details and self.status.details[0].Unpack(info), self.status
        return info

    def as_json(self) -> dict[str, Any]:
        """The Status as the REST body prints it, with the request id replaced by a placeholder."""
        return _placeholder(json_format.MessageToDict(self.status), self.trailers["x-request-id"])


def refused(call: Callable[[], Any]) -> Refusal:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    err = caught.value
    status = rpc_status.from_call(err)
    assert status is not None, f"{err.code()}: {err.details()} came without grpc-status-details-bin"
    return Refusal(err.code(), err.details(), status, dict(err.trailing_metadata() or ()))


def _placeholder(body: dict[str, Any], request_id: Any) -> dict[str, Any]:
    """The body with its ErrorInfo's request_id (which must be the response's x-request-id) as a placeholder."""
    for detail in body["details"]:
        if detail["@type"] == ERROR_INFO and "request_id" in detail.get("metadata", {}):
            assert detail["metadata"]["request_id"] == request_id
            detail["metadata"]["request_id"] = REQUEST_ID
    return body


def rest_json(response: HttpResponse) -> dict[str, Any]:
    assert lua.LOCAL_REPLY_HEADER not in response.headers
    return _placeholder(response.json(), response.header("x-request-id"))


def metadata(token: str | None) -> list[tuple[str, str]]:
    return [] if token is None else [("authorization", f"Bearer {token}")]


@pytest.fixture(scope="module")
def channels(gateway, strict_gateway):
    opened = {"main": grpc.insecure_channel(gateway.address), "strict": grpc.insecure_channel(strict_gateway.address)}
    yield opened
    for channel in opened.values():
        channel.close()


@pytest.fixture(scope="module")
def users(channels):
    return user_grpc.UserServiceStub(channels["main"])


@pytest.fixture(scope="module")
def customer(gateway) -> dict[str, Any]:
    created = gateway.call("POST", f"/v1/users?requestId={unique('grpc-errors')}",
                           token=gateway.mint(unique("grpc-errors-admin"), "admin"),
                           body={"email": f"{unique('grpc-errors')}@example.com", "displayName": "Refused"})
    assert created.status == 200, created.body
    return created.json()["user"]


def get_user(users, user_id: str, token: str | None) -> Refusal:
    return refused(lambda: users.GetUser(user_api.GetUserRequest(id=user_id), metadata=metadata(token),
                                         timeout=TIMEOUT))


def assert_gateway_refusal(refusal: Refusal, code: grpc.StatusCode, reason: str, message: str,
                           **extra: str) -> None:
    assert (refusal.code, refusal.message) == (code, message)
    assert refusal.status.code == code.value[0]
    info = refusal.error_info
    assert (info.reason, info.domain) == (reason, GATEWAY)
    assert dict(info.metadata) == {"request_id": refusal.trailers["x-request-id"], **extra}
    # No correlation id was sent: the gateway's refusal returns the one it made, the request id.
    assert refusal.trailers.get("x-correlation-id") == refusal.trailers["x-request-id"]
    assert len(refusal.status.details) == 1
    assert lua.LOCAL_REPLY_HEADER not in refusal.trailers


# -- the gateway's refusals -------------------------------------------------------------------------------------


def test_no_token(gateway, users, customer):
    refusal = get_user(users, customer["id"], None)
    assert_gateway_refusal(refusal, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_MISSING",
                           "this route needs a bearer token: send Authorization: Bearer <JWT>")
    assert refusal.as_json() == rest_json(gateway.call("GET", f"/v1/users/{customer['id']}"))


def test_expired_token(gateway, users, customer):
    token = gateway.mint(customer["id"], "user:read", ttl=600, now=time.time() - 3600)
    refusal = get_user(users, customer["id"], token)
    assert_gateway_refusal(refusal, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_EXPIRED", "the bearer token has expired")
    assert refusal.as_json() == rest_json(gateway.call("GET", f"/v1/users/{customer['id']}", token=token))


@pytest.mark.parametrize(("flaw", "why"), [("wrong audience", "Audiences in Jwt are not allowed"),
                                           ("forged signature", "Jwt verification fails")])
def test_invalid_token(gateway, users, customer, tmp_path, flaw, why):
    if flaw == "wrong audience":
        token = gateway.mint(customer["id"], "user:read", audience="another-api")
    else:
        forger = tokens.ensure_keys(tmp_path / "forger")
        token = gateway.mint(customer["id"], "user:read", key=tokens.SigningKey(forger.private_pem, gateway.key.kid))
    refusal = get_user(users, customer["id"], token)
    # jwt_authn answers a foreign audience with PERMISSION_DENIED; like every invalid token it is UNAUTHENTICATED.
    assert_gateway_refusal(refusal, grpc.StatusCode.UNAUTHENTICATED, "TOKEN_INVALID",
                           f"the bearer token was refused: {why}")
    assert refusal.as_json() == rest_json(gateway.call("GET", f"/v1/users/{customer['id']}", token=token))


def test_missing_scope(gateway, users, customer):
    token = gateway.mint(customer["id"], "user:readonly order:read")
    refusal = get_user(users, customer["id"], token)
    assert_gateway_refusal(refusal, grpc.StatusCode.PERMISSION_DENIED, "MISSING_SCOPE",
                           "the token has none of the scopes this method needs: user:read admin",
                           required_scopes="user:read admin")
    assert refusal.as_json() == rest_json(gateway.call("GET", f"/v1/users/{customer['id']}", token=token))


def test_rate_limited(strict_gateway, channels):
    strict_users = user_grpc.UserServiceStub(channels["strict"])
    token = strict_gateway.mint(unique("grpc-drained"), "admin")
    for _ in range(4):  # the strict read bucket holds 4 and refills once a minute
        strict_users.ListUsers(user_api.ListUsersRequest(page_size=1), metadata=metadata(token), timeout=TIMEOUT)
    refusal = refused(lambda: strict_users.ListUsers(user_api.ListUsersRequest(page_size=1),
                                                     metadata=metadata(token), timeout=TIMEOUT))
    assert_gateway_refusal(refusal, grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED",
                           "too many requests in route class read; retry after 60 s", route_class="read")
    assert refusal.trailers["retry-after"] == "60"
    rest_token = strict_gateway.mint(unique("rest-drained"), "admin")
    for _ in range(4):
        assert strict_gateway.call("GET", "/v1/users?pageSize=1", token=rest_token).status == 200
    assert refusal.as_json() == rest_json(strict_gateway.call("GET", "/v1/users?pageSize=1", token=rest_token))


def test_unknown_method(gateway, channels):
    # No REST twin: over REST the same refusal is 404 NOT_FOUND naming the REST path; gRPC says UNIMPLEMENTED.
    token = gateway.mint(unique("explorer"), "admin")
    method = channels["main"].unary_unary(UNKNOWN_METHOD, request_serializer=None, response_deserializer=None)
    refusal = refused(lambda: method(b"", metadata=metadata(token), timeout=TIMEOUT))
    assert_gateway_refusal(refusal, grpc.StatusCode.UNIMPLEMENTED, "ROUTE_NOT_FOUND",
                           f"no route matches the gRPC method {UNKNOWN_METHOD}")


def test_upstream_unavailable(strict_gateway, channels):
    # Behind the strict gateway every service but user is down.
    token = strict_gateway.mint(unique("down"), "admin")
    product = str(uuid.uuid4())
    inventory = inventory_grpc.InventoryServiceStub(channels["strict"])
    refusal = refused(lambda: inventory.GetProduct(inventory_api.GetProductRequest(id=product),
                                                   metadata=metadata(token), timeout=TIMEOUT))
    assert_gateway_refusal(refusal, grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE",
                           "the inventory service is unavailable; retry later", service="inventory")
    assert refusal.as_json() == rest_json(strict_gateway.call("GET", f"/v1/products/{product}", token=token))


def test_upstream_timeout(strict_gateway, channels, slow_user_link):
    strict_users = user_grpc.UserServiceStub(channels["strict"])
    token = strict_gateway.mint(unique("slow"), "admin")
    slow_user_link.delay = 2.5
    try:
        refusal = refused(lambda: strict_users.DeleteUser(user_api.DeleteUserRequest(id=str(uuid.uuid4())),
                                                          metadata=metadata(token), timeout=TIMEOUT))
    finally:
        slow_user_link.delay = 0.0
    assert_gateway_refusal(refusal, grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT",
                           "the user service did not answer within 1 s", service="user")


def test_request_too_large(gateway, users):
    token = gateway.mint(unique("big"), "admin")
    user = user_pb2.User(email="big@example.com", display_name="x" * (1024 * 1024 + 1))
    refusal = refused(lambda: users.CreateUser(user_api.CreateUserRequest(user=user, request_id=unique("big")),
                                               metadata=metadata(token), timeout=TIMEOUT))
    assert_gateway_refusal(refusal, grpc.StatusCode.RESOURCE_EXHAUSTED, "PAYLOAD_TOO_LARGE",
                           "the request body is larger than 1048576 bytes")


def test_a_request_the_connection_manager_refuses(gateway, channels):
    # An escaped slash in the path is refused before any filter runs (path_with_escaped_slashes_action).
    method = channels["main"].unary_unary("/tessera.user.v1.UserService%2FGetUser", request_serializer=None,
                                          response_deserializer=None)
    refusal = refused(lambda: method(b"", timeout=TIMEOUT))
    assert (refusal.code, refusal.message) == (grpc.StatusCode.INVALID_ARGUMENT, "the request could not be read")
    assert (refusal.error_info.reason, refusal.error_info.domain) == ("MALFORMED_REQUEST", GATEWAY)
    assert lua.LOCAL_REPLY_HEADER not in refusal.trailers


# -- the services' own errors -----------------------------------------------------------------------------------


def direct(gateway_services, subject: str, scopes: str, call: Callable[[user_grpc.UserServiceStub, list], Any]):
    """The same call made to the user service itself, with the identity the gateway would have forwarded."""
    with grpc.insecure_channel(gateway_services.addresses()["user"]) as channel:
        return refused(lambda: call(user_grpc.UserServiceStub(channel),
                                    [("x-user-id", subject), ("x-user-scopes", scopes)]))


SERVICE_ERRORS = {
    # case: (scopes, whose id: "self" for the caller's own (unknown) id, "customer" for someone else's, code)
    "invalid argument": ("admin", "not-a-uuid", grpc.StatusCode.INVALID_ARGUMENT),
    "another customer's account": ("user:read", "customer", grpc.StatusCode.PERMISSION_DENIED),
}


@pytest.mark.parametrize("case", list(SERVICE_ERRORS))
def test_a_services_error_crosses_the_gateway_unchanged(gateway, gateway_services, users, customer, case):
    scopes, target, code = SERVICE_ERRORS[case]
    subject = str(uuid.uuid4())
    user_id = customer["id"] if target == "customer" else target

    def call(stub, md):
        return stub.GetUser(user_api.GetUserRequest(id=user_id), metadata=md, timeout=TIMEOUT)

    through = refused(lambda: call(users, metadata(gateway.mint(subject, scopes))))
    served = direct(gateway_services, subject, scopes, call)
    assert (through.code, through.message, through.status) == (served.code, served.message, served.status)
    assert through.code == code
    assert through.error_info.domain == "user.tessera.dev"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        bad = error_details_pb2.BadRequest()
        assert through.status.details[1].Unpack(bad)
        assert [v.field for v in bad.field_violations] == ["id"]


def test_a_gateway_refusal_and_a_services_permission_error_tell_who_refused(gateway, users, customer):
    # Both are PERMISSION_DENIED; the domain says whether the token lacked a scope or the service said no.
    scopeless = get_user(users, customer["id"], gateway.mint(customer["id"], "order:read"))
    stranger = get_user(users, customer["id"], gateway.mint(str(uuid.uuid4()), "user:read"))
    assert scopeless.code == stranger.code == grpc.StatusCode.PERMISSION_DENIED
    assert (scopeless.error_info.domain, scopeless.error_info.reason) == (GATEWAY, "MISSING_SCOPE")
    assert (stranger.error_info.domain, stranger.error_info.reason) == ("user.tessera.dev", "PERMISSION_DENIED")


def test_the_gateway_leaves_successful_calls_alone(gateway, users, customer):
    response, call = users.GetUser.with_call(user_api.GetUserRequest(id=customer["id"]),
                                             metadata=metadata(gateway.mint(customer["id"], "user:read")),
                                             timeout=TIMEOUT)
    assert response.user.id == customer["id"]
    trailers = dict(call.trailing_metadata() or ())
    assert "grpc-status-details-bin" not in trailers
    assert lua.LOCAL_REPLY_HEADER not in trailers and lua.LOCAL_REPLY_HEADER not in dict(call.initial_metadata())
