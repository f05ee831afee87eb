"""Outgoing calls through tessera_runtime.clients against a real user server: deadline, metadata, breaker."""

from __future__ import annotations

import asyncio
import time
import uuid

import grpc
import pytest
from tessera.user.v1 import user_pb2, user_service_pb2_grpc
from tessera.user.v1 import user_service_pb2 as svc

from tessera_runtime import context as callctx
from tessera_runtime.clients import error_details, open_channel
from tessera_runtime.errors import DeadlineExceeded
from tessera_runtime.logs import request_id_var
from tessera_runtime.resilience import CircuitBreaker, State
from tessera_runtime.server import create_server
from tests.integration.conftest import settings_for
from tests.support.tcp_proxy import TcpProxy

USER_SERVICE = svc.DESCRIPTOR.services_by_name["UserService"]


@pytest.fixture
async def sqlite_user(tmp_path):
    from tessera_user import bootstrap

    url = f"sqlite+aiosqlite:///{tmp_path / 'u.db'}"
    server, port = await create_server(await bootstrap.build(settings_for("user", url)))
    yield server, port, url
    await server.stop()


async def test_ids_and_identity_follow_the_call(sqlite_user):
    _, port, _ = sqlite_user
    channel = open_channel(f"127.0.0.1:{port}", [USER_SERVICE])
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    ada = (await stub.CreateUser(svc.CreateUserRequest(
        user=user_pb2.User(email="ada@example.com", display_name="Ada"), request_id="a"))).user
    tokens = (request_id_var.set("outer-request"),
              callctx.principal_var.set(callctx.Principal("someone-else", frozenset({"user:read"}))))
    try:
        call = stub.GetUser(svc.GetUserRequest(id=ada.id))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # x-user-id reached the server
        assert dict(err.value.trailing_metadata())["x-request-id"] == "outer-request"
    finally:
        request_id_var.reset(tokens[0])
        callctx.principal_var.reset(tokens[1])
    await channel.close()


async def test_the_callers_remaining_deadline_bounds_the_call(sqlite_user):
    _, port, _ = sqlite_user
    proxy = TcpProxy("127.0.0.1", port, delay=1.0).start()
    channel = open_channel(f"127.0.0.1:{proxy.port}", [USER_SERVICE], default_deadline=30)
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    try:
        token = callctx.deadline_var.set(time.monotonic() + 0.4)
        try:
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.GetUser(svc.GetUserRequest(id=str(uuid.uuid4())))
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 25, "the 30 s default was used instead of the caller's deadline"
        finally:
            callctx.deadline_var.reset(token)
        expired = callctx.deadline_var.set(time.monotonic() - 1)
        try:
            with pytest.raises(DeadlineExceeded):
                await stub.GetUser(svc.GetUserRequest(id=str(uuid.uuid4())))
        finally:
            callctx.deadline_var.reset(expired)
    finally:
        await channel.close()
        proxy.close()


async def test_circuit_opens_while_the_dependency_is_down_and_closes_when_it_returns(sqlite_user):
    from tessera_user import bootstrap

    server, port, url = sqlite_user
    breaker = CircuitBreaker("user", failure_threshold=3, reset_seconds=0.5)
    channel = open_channel(f"127.0.0.1:{port}", [USER_SERVICE], default_deadline=2, breaker=breaker)
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    await stub.ListUsers(svc.ListUsersRequest())
    await server.stop()
    for _ in range(3):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.ListUsers(svc.ListUsersRequest())
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert breaker.state is State.OPEN
    with pytest.raises(grpc.aio.AioRpcError) as fast:
        await stub.ListUsers(svc.ListUsersRequest())
    assert error_details(fast.value)[0].reason == "CIRCUIT_OPEN"

    restarted, _ = await create_server(await bootstrap.build(settings_for("user", url)), f"127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                await stub.ListUsers(svc.ListUsersRequest(), wait_for_ready=True)
                break
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.3)
        assert breaker.state is State.CLOSED
    finally:
        await channel.close()
        await restarted.stop()
