"""The Python client through the real Envoy gateway: its bearer token is what lets calls in, on sync and asyncio."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid

import grpc
import pytest
from tessera.user.v1 import user_pb2
from tessera.user.v1 import user_service_pb2 as user_api

from tessera_client import RpcFailure, aio_connect, connect
from tests.support.processes import ROOT

QUICKSTART = ROOT / "clients" / "python" / "examples" / "quickstart.py"


def create_request() -> user_api.CreateUserRequest:
    tag = uuid.uuid4().hex[:10]
    return user_api.CreateUserRequest(user=user_pb2.User(email=f"gw-{tag}@example.com", display_name="Gateway"),
                                      request_id=f"gw-{tag}")


def test_token_opens_the_gateway_and_its_identity_reaches_the_service(gateway, gateway_services):
    with connect(gateway.address, token=gateway.mint("ops", "user:write")) as staff:
        user = staff.users.CreateUser(create_request()).user
    assert user.status == user_pb2.USER_STATUS_ACTIVE

    with connect(gateway.address, token=gateway.mint(user.id, "user:read")) as own:
        assert own.users.GetUser(user_api.GetUserRequest(id=user.id)).user == user
        # The gateway passes the token's subject on; the service lets a customer read only their own account.
        with pytest.raises(grpc.RpcError) as foreign:
            own.users.GetUser(user_api.GetUserRequest(id=str(uuid.uuid4())))
        failure = RpcFailure.of(foreign.value)
        assert failure.code == grpc.StatusCode.PERMISSION_DENIED and failure.reason == "PERMISSION_DENIED"

    with connect(gateway.address) as anonymous, pytest.raises(grpc.RpcError) as refused:
        anonymous.users.GetUser(user_api.GetUserRequest(id=user.id))
    assert RpcFailure.of(refused.value).code == grpc.StatusCode.UNAUTHENTICATED

    with connect(gateway.address, token=gateway.mint(user.id, "order:read")) as scopeless, \
            pytest.raises(grpc.RpcError) as forbidden:
        scopeless.users.GetUser(user_api.GetUserRequest(id=user.id))
    assert RpcFailure.of(forbidden.value).code == grpc.StatusCode.PERMISSION_DENIED

    # In production mode the service itself refuses a call that did not come through the gateway.
    with connect(gateway_services.addresses()["user"]) as direct, pytest.raises(grpc.RpcError) as bypass:
        direct.users.GetUser(user_api.GetUserRequest(id=user.id))
    failure = RpcFailure.of(bypass.value)
    assert failure.code == grpc.StatusCode.UNAUTHENTICATED and failure.reason == "IDENTITY_MISSING"


async def test_asyncio_client_sends_its_token_through_the_gateway(gateway):
    async with aio_connect(gateway.address, token=gateway.mint("ops", "user:write")) as staff:
        user = (await staff.users.CreateUser(create_request())).user
    async with aio_connect(gateway.address, token=gateway.mint(user.id, "user:read")) as own:
        assert (await own.users.GetUser(user_api.GetUserRequest(id=user.id))).user == user
    async with aio_connect(gateway.address) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await anonymous.users.GetUser(user_api.GetUserRequest(id=user.id))
    assert RpcFailure.of(refused.value).code == grpc.StatusCode.UNAUTHENTICATED


def test_the_python_quickstart_runs_through_the_gateway_with_the_token_its_docstring_names(gateway):
    # The example's own instructions: the token command it prints, then its gateway form.
    [scopes] = re.findall(r'--scope "([^"]+)"', QUICKSTART.read_text())
    run = subprocess.run([sys.executable, str(QUICKSTART), "--target", gateway.address,
                          "--token", gateway.mint("ops", scopes)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert run.returncode == 0, run.stderr
    assert "unknown id: NOT_FOUND USER_NOT_FOUND (user.tessera.dev)" in run.stdout.splitlines()
