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
from tessera_runtime.clients import dependency_check, error_details, open_channel
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


@pytest.mark.parametrize("principal", [
    callctx.Principal("someone", frozenset({"user:read", "x\ty"})),
    callctx.Principal("caf\u00e9", frozenset({"user:read"})),
    callctx.Principal("line\nbreak", frozenset({"user:read"})),
], ids=["tab-in-a-scope", "non-ascii-subject", "newline-in-subject"])
async def test_a_call_whose_metadata_grpc_cannot_send_fails_at_once_naming_the_key(sqlite_user, principal):
    """gRPC refuses a metadata value outside printable ASCII inside its call task, and through interceptors the
    call then never ends (not even at its deadline): it must fail before it is made, saying which key."""
    _, port, _ = sqlite_user
    channel = open_channel(f"127.0.0.1:{port}", [USER_SERVICE])
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    token = callctx.principal_var.set(principal)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            # The bound only keeps a regression from hanging the suite; the call must fail without waiting.
            await asyncio.wait_for(stub.GetUser(svc.GetUserRequest(id=str(uuid.uuid4())), timeout=2), 30)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "x-user-" in err.value.details() and "printable ASCII" in err.value.details()
    finally:
        callctx.principal_var.reset(token)
        await channel.close()


async def test_metadata_a_caller_gives_that_grpc_cannot_send_fails_the_call_at_once(sqlite_user):
    _, port, _ = sqlite_user
    channel = open_channel(f"127.0.0.1:{port}", [USER_SERVICE])
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await asyncio.wait_for(stub.GetUser(svc.GetUserRequest(id=str(uuid.uuid4())), timeout=2,
                                                metadata=(("x-note", "fine"), ("x-comment", "caf\u00e9"))), 30)
        assert err.value.code() == grpc.StatusCode.INTERNAL and "'x-comment'" in err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:  # printable ASCII metadata of the caller's goes through
            await stub.GetUser(svc.GetUserRequest(id=str(uuid.uuid4())), metadata=(("x-note", "fine"),))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # the server answered (no such user)
    finally:
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


async def _refusal(stub: user_service_pb2_grpc.UserServiceStub, **kw) -> str | None:
    """Calls GetUser on a channel whose server is down: None when the wire refused it, else the ErrorInfo reason
    (CIRCUIT_OPEN when the breaker refused it without trying)."""
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetUser(svc.GetUserRequest(id=str(uuid.uuid4())), **kw)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
    info, _ = error_details(err.value)
    return info.reason if info is not None else None


async def test_the_configured_circuit_settings_govern_the_order_services_channels(sqlite_user):
    """TESSERA_CIRCUIT_FAILURE_THRESHOLD / _OPEN_SECONDS, read by the order service's settings, shape the breakers
    of the channels its composition root opens: a threshold of 2 opens after 2 refused calls (the default after 5),
    and an open time of 1 s lets a trial call through after 1 s (the default after 10)."""
    from tessera_order.adapters.downstream import DownstreamChannels
    from tessera_runtime import app
    from tessera_user import bootstrap

    server, port, url = sqlite_user
    root = app.composition_root("order")

    def channels(**env: str) -> DownstreamChannels:
        return DownstreamChannels.from_settings(app.load_settings(root, {
            "TESSERA_USER_SERVICE_ADDR": f"127.0.0.1:{port}", "TESSERA_DEFAULT_DEADLINE_SECONDS": "2", **env}))

    configured = channels(TESSERA_CIRCUIT_FAILURE_THRESHOLD="2", TESSERA_CIRCUIT_OPEN_SECONDS="1")
    default = channels()
    configured_users = user_service_pb2_grpc.UserServiceStub(configured.user)
    default_users = user_service_pb2_grpc.UserServiceStub(default.user)
    restarted = None
    try:
        await server.stop()
        assert [await _refusal(configured_users) for _ in range(3)] == [None, None, "CIRCUIT_OPEN"]
        opened = time.monotonic()
        assert [await _refusal(default_users) for _ in range(6)] == [None] * 5 + ["CIRCUIT_OPEN"]

        restarted, _ = await create_server(await bootstrap.build(settings_for("user", url)), f"127.0.0.1:{port}")
        while True:  # the configured breaker lets a trial call through once it has been open 1 s
            try:
                await configured_users.GetUser(svc.GetUserRequest(id=str(uuid.uuid4())), wait_for_ready=True)
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND:  # an answer from the server: the circuit closed
                    break
                assert time.monotonic() - opened < 8, f"the 1 s circuit still refuses: {err}"
                await asyncio.sleep(0.1)
        assert time.monotonic() - opened >= 1.0, "a call got through before the circuit had been open 1 s"
        # The default breaker opened after the configured one and stays open 10 s: it still refuses.
        assert await _refusal(default_users, wait_for_ready=True) == "CIRCUIT_OPEN"
    finally:
        await configured.close()
        await default.close()
        if restarted is not None:
            await restarted.stop()


async def test_the_rate_condition_settings_govern_the_order_services_channels(sqlite_user):
    """TESSERA_CIRCUIT_ERROR_PERCENT / _MIN_CALLS / _WINDOW_SECONDS reach the order service's breakers too: with
    consecutive failures out of the way (1000), a user service that is down opens the circuit once the window holds
    3 calls, all failed."""
    from tessera_order.adapters.downstream import DownstreamChannels
    from tessera_runtime import app

    server, port, _ = sqlite_user
    await server.stop()
    channels = DownstreamChannels.from_settings(app.load_settings(app.composition_root("order"), {
        "TESSERA_USER_SERVICE_ADDR": f"127.0.0.1:{port}", "TESSERA_DEFAULT_DEADLINE_SECONDS": "2",
        "TESSERA_CIRCUIT_FAILURE_THRESHOLD": "1000", "TESSERA_CIRCUIT_MIN_CALLS": "3",
        "TESSERA_CIRCUIT_ERROR_PERCENT": "100", "TESSERA_CIRCUIT_WINDOW_SECONDS": "60"}))
    try:
        users = user_service_pb2_grpc.UserServiceStub(channels.user)
        assert [await _refusal(users) for _ in range(4)] == [None, None, None, "CIRCUIT_OPEN"]
    finally:
        await channels.close()


async def test_the_readiness_probe_of_a_slow_dependency_does_not_open_the_circuit_of_its_calls(sqlite_user):
    """A service's readiness asks each service it calls for its gRPC health (dependency_check) every second, with a
    1 s deadline, on the channel its calls use. A dependency that answers in over a second fails every probe, while
    the calls, with their 5 s deadline, are answered. The probes observe the dependency and are no calls to it: they
    never open the circuit (before, three failed probes refused the next call CIRCUIT_OPEN), and a probe answered
    while calls fail does not keep it closed either."""
    _, port, _ = sqlite_user
    proxy = TcpProxy("127.0.0.1", port, delay=0.6).start()
    breaker = CircuitBreaker("user", failure_threshold=3, reset_seconds=60)
    channel = open_channel(f"127.0.0.1:{proxy.port}", [USER_SERVICE], default_deadline=5, breaker=breaker)
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    probe = dependency_check("user-service", channel)
    try:
        await stub.ListUsers(svc.ListUsersRequest())  # connected: the calls below only wait for the proxy
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await probe.check()
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert breaker.state is State.CLOSED
        started = time.monotonic()
        await stub.ListUsers(svc.ListUsersRequest())
        assert time.monotonic() - started > 1.0, "the call was not as slow as the probes"
    finally:
        await channel.close()
        proxy.close()


async def test_a_dependency_whose_calls_fail_opens_its_circuit_though_its_readiness_probe_is_answered(pg_database):
    """The user service's database goes away: its calls fail DATABASE_UNAVAILABLE, while its gRPC health still
    answers (NOT_SERVING). The probes between the calls are answers about its health, not calls that succeeded:
    three failed calls in a row open the circuit, as they do without probes (before, each probe reset the count, so
    a dependency called less often than it was probed never opened its circuit)."""
    from tessera_user import bootstrap

    _, url = pg_database
    proxy = TcpProxy("127.0.0.1", 5432).start()
    proxied = url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}")
    server, port = await create_server(await bootstrap.build(settings_for("user", proxied)), readiness_interval=0.1)
    breaker = CircuitBreaker("user", failure_threshold=3, reset_seconds=60)
    channel = open_channel(f"127.0.0.1:{port}", [USER_SERVICE], default_deadline=5, breaker=breaker)
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    probe = dependency_check("user-service", channel)
    try:
        await stub.ListUsers(svc.ListUsersRequest())
        assert await probe.check()
        proxy.cut()
        for i in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.ListUsers(svc.ListUsersRequest())
            assert error_details(err.value)[0].reason == "DATABASE_UNAVAILABLE"
            assert breaker.state is (State.OPEN if i == 2 else State.CLOSED)
            await probe.check()
        assert breaker.state is State.OPEN
        assert await _refusal(stub) == "CIRCUIT_OPEN"
    finally:
        await channel.close()
        await server.stop()
        proxy.close()
