"""Who may reach a canary: the gateway forwards the `canary` header only for a token that may ask for one.

The mesh sends a request carrying `canary: true` to a service's v2 (k8s/README.md, "Canary workflow"). Behind the
real Envoy here is a real gRPC server standing in for the user service, which records the metadata of every
GetUser it answers: what it records is exactly what the mesh would route on.
"""

from __future__ import annotations

import http.client
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from tessera.user.v1 import user_pb2
from tessera.user.v1 import user_service_pb2 as user_api
from tessera.user.v1 import user_service_pb2_grpc as user_grpc

from tests.support.gateway import SERVICES, Gateway

USER_SERVICE = "tessera.user.v1.UserService"
TIMEOUT = 30.0


class RecordingUsers(user_grpc.UserServiceServicer):
    """Answers GetUser with the id asked for, and keeps the metadata of each call by that id."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seen: dict[str, list[tuple[str, str]]] = {}

    def GetUser(self, request, context):
        with self._lock:
            self._seen[request.id] = [(k, v) for k, v in context.invocation_metadata() if isinstance(v, str)]
        return user_api.GetUserResponse(user=user_pb2.User(id=request.id, display_name="recorded"))

    def canary_values(self, call_id: str) -> list[str]:
        """The values of every `canary` key the call with this id reached the service with."""
        with self._lock:
            assert call_id in self._seen, f"call {call_id} never reached the service"
            return [v for k, v in self._seen[call_id] if k == "canary"]


@pytest.fixture(scope="module")
def recording_users() -> Iterator[tuple[RecordingUsers, int]]:
    users = RecordingUsers()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    user_grpc.add_UserServiceServicer_to_server(users, server)
    checks = health.HealthServicer()
    checks.set(USER_SERVICE, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(checks, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield users, port
    server.stop(grace=None)


@pytest.fixture(scope="module")
def canary_gateway(gateway_workdir, recording_users, dead_port) -> Iterator[Gateway]:
    """The dev profile's gateway with the recording server as the user service; every other upstream is down."""
    addresses = {name: f"127.0.0.1:{dead_port}" for name in SERVICES}
    addresses["user"] = f"127.0.0.1:{recording_users[1]}"
    gw = Gateway(gateway_workdir, "canary", addresses, {"graphql": {"address": f"127.0.0.1:{dead_port}"}})
    gw.start(["user"])
    yield gw
    gw.stop()


def rest_get_user(gateway: Gateway, token: str, headers: list[tuple[str, str]]) -> str:
    """GET /v1/users/{id} over HTTP/1.1 with the headers exactly as listed (names as spelt, repeats kept)."""
    call_id = str(uuid.uuid4())
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=TIMEOUT)
    try:
        conn.putrequest("GET", f"/v1/users/{call_id}", skip_accept_encoding=True)
        conn.putheader("authorization", f"Bearer {token}")
        for name, value in headers:
            conn.putheader(name, value)
        conn.endheaders()
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200, (response.status, body)
    finally:
        conn.close()
    return call_id


def grpc_get_user(gateway: Gateway, token: str, headers: list[tuple[str, str]]) -> str:
    """GetUser over native gRPC through the gateway, with the metadata as listed (repeats kept)."""
    call_id = str(uuid.uuid4())
    with grpc.insecure_channel(gateway.address) as channel:
        reply = user_grpc.UserServiceStub(channel).GetUser(
            user_api.GetUserRequest(id=call_id), timeout=TIMEOUT,
            metadata=[("authorization", f"Bearer {token}"), *headers])
    assert reply.user.id == call_id
    return call_id


@pytest.mark.parametrize("headers", [
    [("canary", "true")],
    [("Canary", "true")],
    [("CANARY", "TRUE")],
    [("canary", "true"), ("canary", "true")],
    [("canary", "false"), ("Canary", "true")],
    [("canary", "yes")],
    [("canary", "")],
    [("canary", "true, true")],
], ids=["plain", "capitalised", "upper-case", "repeated", "repeated-mixed", "other-value", "empty", "list"])
@pytest.mark.parametrize("scopes", [["user:read"], ["user:read", "canaryx"], ["user:read", "canary:read"],
                                    ["user:read", "xcanary"], ["user:read", "x\tcanary"], ["user:read", "canary\tx"]],
                         ids=["no-canary", "prefix", "context", "suffix", "tab-before", "tab-after"])
def test_rest_canary_header_of_a_token_without_the_scope_never_reaches_the_service(canary_gateway, recording_users,
                                                                                   headers, scopes):
    """Whatever its spelling, repeats or value: removed, for a token without `canary` (or admin) as a whole
    scope. A scope only looking like it (a prefix, a suffix, glued on by a tab) is not it."""
    token = canary_gateway.mint("tester", scopes)
    call_id = rest_get_user(canary_gateway, token, headers)
    assert recording_users[0].canary_values(call_id) == []


@pytest.mark.parametrize("headers", [
    [("canary", "true")],
    [("canary", "true"), ("canary", "true")],
    [("canary", "false")],
], ids=["plain", "repeated", "other-value"])
@pytest.mark.parametrize("scopes", ["user:read", "user:read canaryx"])
def test_grpc_canary_metadata_of_a_token_without_the_scope_never_reaches_the_service(canary_gateway, recording_users,
                                                                                     headers, scopes):
    token = canary_gateway.mint("tester", scopes)
    call_id = grpc_get_user(canary_gateway, token, headers)
    assert recording_users[0].canary_values(call_id) == []


@pytest.mark.parametrize("scopes", ["user:read canary", "canary user:read", "user:read admin", "admin"])
def test_canary_header_of_a_token_with_the_scope_reaches_the_service(canary_gateway, recording_users, scopes):
    """`canary` (or `admin`, which every route accepts) lets the header through, over REST and native gRPC, as
    sent: the mesh's route decides what it means (only `true` reaches v2)."""
    token = canary_gateway.mint("tester", scopes)
    assert recording_users[0].canary_values(rest_get_user(canary_gateway, token, [("canary", "true")])) == ["true"]
    assert recording_users[0].canary_values(rest_get_user(canary_gateway, token, [("Canary", "true")])) == ["true"]
    assert recording_users[0].canary_values(grpc_get_user(canary_gateway, token, [("canary", "true")])) == ["true"]
    # Without the header the call is an ordinary one: the gateway adds none.
    assert recording_users[0].canary_values(rest_get_user(canary_gateway, token, [])) == []
    assert recording_users[0].canary_values(grpc_get_user(canary_gateway, token, [])) == []


def test_the_canary_scope_alone_grants_no_route(canary_gateway):
    """`canary` lets a caller choose the version of a call it may make; it makes no call allowed."""
    token = canary_gateway.mint("tester", "canary")
    response = canary_gateway.call("GET", f"/v1/users/{uuid.uuid4()}", token=token, headers={"canary": "true"})
    assert response.status == 403
    assert response.json()["details"][0]["reason"] == "MISSING_SCOPE"


def test_a_browser_may_send_the_canary_header(canary_gateway):
    """A tester's browser asks first (CORS preflight); the gateway allows `canary` from its allowed origins, and
    the scope check above decides whether it goes on."""
    response = canary_gateway.call("OPTIONS", f"/v1/users/{uuid.uuid4()}", headers={
        "origin": "http://localhost:3000", "access-control-request-method": "GET",
        "access-control-request-headers": "authorization, canary"})
    assert response.status == 200
    assert response.header("access-control-allow-origin") == "http://localhost:3000"
    allowed = {h.strip() for h in response.header("access-control-allow-headers").split(",")}
    assert {"authorization", "canary"} <= allowed
