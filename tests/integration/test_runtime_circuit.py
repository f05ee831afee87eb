"""The circuit breaker of tessera_runtime.clients channels against real gRPC servers that fail part of their calls,
and its state as a real /metrics endpoint shows it."""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from tessera.user.v1 import user_pb2, user_service_pb2_grpc
from tessera.user.v1 import user_service_pb2 as svc

from tessera_runtime import context as callctx
from tessera_runtime.clients import error_details, open_channel
from tessera_runtime.config import CircuitSettings
from tessera_runtime.errors import DeadlineExceeded
from tessera_runtime.metrics import MetricsServer

USER_SERVICE = svc.DESCRIPTOR.services_by_name["UserService"]


class EveryOtherCallFails(user_service_pb2_grpc.UserServiceServicer):
    """A user service of which one pod in two is down, with nothing in front to eject it: every second CreateUser
    is refused UNAVAILABLE. (CreateUser has side effects, so the channel does not retry it.)"""

    def __init__(self) -> None:
        self.calls = 0
        self.healthy = False

    async def CreateUser(self, request, context):
        self.calls += 1
        if not self.healthy and self.calls % 2 == 0:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the pod behind this call is down")
        return svc.CreateUserResponse(user=user_pb2.User(id=f"u-{self.calls}", email=request.user.email))


@pytest.fixture
async def flaky() -> AsyncIterator[Callable[[], Awaitable[tuple[EveryOtherCallFails, str]]]]:
    """Starts real grpc.aio servers on port 0 whose servicer fails every other call: each gives its servicer and
    address."""
    servers: list[grpc.aio.Server] = []

    async def start() -> tuple[EveryOtherCallFails, str]:
        servicer = EveryOtherCallFails()
        server = grpc.aio.server()
        user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        servers.append(server)
        return servicer, f"127.0.0.1:{port}"

    yield start
    for server in servers:
        await server.stop(None)


@pytest.fixture
def metrics_port() -> Iterator[int]:
    server = MetricsServer("127.0.0.1", 0)
    port = server.start()
    yield port
    server.stop()


async def circuit_metrics(port: int, dependency: str) -> dict[str, float]:
    """tessera_circuit_state and the transitions into each state of one dependency, from a real scrape."""
    def fetch() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            return reply.read().decode()

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(await asyncio.to_thread(fetch)):
        for sample in family.samples:
            if sample.labels.get("dependency") != dependency:
                continue
            if sample.name == "tessera_circuit_state":
                found["state"] = sample.value
            elif sample.name == "tessera_circuit_transitions_total":
                found[sample.labels["state"]] = sample.value
    return found


async def outcome(stub: user_service_pb2_grpc.UserServiceStub) -> str:
    """One CreateUser: OK, UNAVAILABLE from the server, or the ErrorInfo reason of a refusal."""
    try:
        await stub.CreateUser(svc.CreateUserRequest(user=user_pb2.User(email="a@example.com", display_name="A")))
    except grpc.aio.AioRpcError as err:
        info, _ = error_details(err)
        assert err.code() == grpc.StatusCode.UNAVAILABLE, err
        return info.reason if info is not None else "UNAVAILABLE"
    return "OK"


async def test_a_dependency_failing_every_other_call_opens_the_circuit_on_its_error_rate(flaky, metrics_port):
    servicer, address = await flaky()
    # The defaults: 5 failures in a row, or at least 50 % of at least 20 calls in 10 s; an open time long enough
    # for the refusals below, short enough to wait for the trial.
    rate = open_channel(address, [USER_SERVICE], default_deadline=5, circuit=CircuitSettings(open_seconds=2.0))
    # The same dependency behind a breaker with only the consecutive condition (no window ever holds enough calls).
    control_servicer, control_address = await flaky()
    control = open_channel(control_address, [USER_SERVICE], default_deadline=5,
                           circuit=CircuitSettings(min_calls=100_000))
    try:
        assert await circuit_metrics(metrics_port, address) == {"state": 0.0}
        stub = user_service_pb2_grpc.UserServiceStub(rate)
        outcomes = [await outcome(stub) for _ in range(20)]
        assert outcomes == ["OK", "UNAVAILABLE"] * 10  # the 20th call makes 10 failures of 20: 50 %
        assert servicer.calls == 20
        started = time.monotonic()
        refused = [await outcome(stub) for _ in range(5)]
        assert refused == ["CIRCUIT_OPEN"] * 5
        assert servicer.calls == 20, "a refused call reached the server"
        assert time.monotonic() - started < 1.5, "the refusals waited for something"
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.CreateUser(svc.CreateUserRequest())
        assert err.value.details() == f"{address} is unavailable (circuit open)"
        assert error_details(err.value)[0].metadata["dependency"] == address
        assert await circuit_metrics(metrics_port, address) == {"state": 2.0, "open": 1.0}

        control_stub = user_service_pb2_grpc.UserServiceStub(control)
        assert [await outcome(control_stub) for _ in range(40)] == ["OK", "UNAVAILABLE"] * 20
        assert control_servicer.calls == 40, "the consecutive condition alone never opens on this dependency"
        assert await circuit_metrics(metrics_port, control_address) == {"state": 0.0}

        servicer.healthy = True  # the pod is back: the trial call after the open time closes the circuit
        deadline = time.monotonic() + 10
        while (result := await outcome(stub)) == "CIRCUIT_OPEN":
            assert time.monotonic() < deadline, "no trial call was let through"
            await asyncio.sleep(0.1)
        assert result == "OK" and time.monotonic() - started >= 2.0
        assert await circuit_metrics(metrics_port, address) == {"state": 0.0, "open": 1.0, "half_open": 1.0,
                                                                "closed": 1.0}
    finally:
        await rate.close()
        await control.close()


class SlowOrDown(user_service_pb2_grpc.UserServiceServicer):
    """CreateUser for "slow@..." answers once `release` is set; for anyone else it is refused UNAVAILABLE at once."""

    def __init__(self) -> None:
        self.waiting = 0
        self.release = asyncio.Event()

    async def CreateUser(self, request, context):
        if request.user.email != "slow@example.com":
            await context.abort(grpc.StatusCode.UNAVAILABLE, "down")
        self.waiting += 1
        await self.release.wait()
        return svc.CreateUserResponse(user=user_pb2.User(id="u", email=request.user.email))


async def test_answers_in_flight_when_the_circuit_opened_do_not_close_it():
    servicer = SlowOrDown()
    server = grpc.aio.server()
    user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = open_channel(f"127.0.0.1:{port}", [USER_SERVICE], default_deadline=10,
                           circuit=CircuitSettings(failure_threshold=2, open_seconds=60))
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    try:
        async def slow_call() -> svc.CreateUserResponse:
            return await stub.CreateUser(svc.CreateUserRequest(user=user_pb2.User(email="slow@example.com")))

        slow = [asyncio.create_task(slow_call()) for _ in range(3)]
        deadline = time.monotonic() + 10
        while servicer.waiting < 3:
            assert time.monotonic() < deadline, "the slow calls never arrived"
            await asyncio.sleep(0.02)
        assert [await outcome(stub) for _ in range(3)] == ["UNAVAILABLE", "UNAVAILABLE", "CIRCUIT_OPEN"]
        servicer.release.set()
        assert all(reply.user.id == "u" for reply in await asyncio.gather(*slow))
        # Three answers from calls let through before the circuit opened: it stays open for its 60 s.
        assert await outcome(stub) == "CIRCUIT_OPEN"
    finally:
        await channel.close()
        await server.stop(None)


async def test_a_services_own_unavailable_and_deadline_answers_never_open_its_circuit(db_url):
    """The payment service answers UNAVAILABLE (PAYMENT_FAILED) for a charge its processor could not make and
    DEADLINE_EXCEEDED (PROCESSOR_TIMEOUT) for one its processor did not answer in time: answers about one payment,
    in a few hundred milliseconds, from a service that is up. However many come in a row, the circuit stays closed
    and the next customer's payment is charged; only a service that cannot serve (here: stopped) opens it."""
    from tessera.payment.v1 import payment_pb2, payment_service_pb2_grpc
    from tessera.payment.v1 import payment_service_pb2 as pay

    from tessera_runtime.resilience import CircuitBreaker, State
    from tests.integration.conftest_payment import payment_request, payment_service

    env = {"TESSERA_PAYMENT_PROCESSOR_TIMEOUT_SECONDS": "0.2", "TESSERA_PAYMENT_PROCESSOR_MAX_ATTEMPTS": "1"}
    async with payment_service(db_url, **env) as (_, server, port):
        address = f"127.0.0.1:{port}"
        breaker = CircuitBreaker(address, failure_threshold=3, reset_seconds=60)
        channel = open_channel(address, [pay.DESCRIPTOR.services_by_name["PaymentService"]], default_deadline=10,
                               breaker=breaker)
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        try:
            answers = []
            for method in ("pm_sandbox_transient", "pm_sandbox_timeout", "pm_sandbox_transient") * 2:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.ProcessPayment(payment_request(method))
                answers.append((err.value.code(), error_details(err.value)[0].reason))
            failed = (grpc.StatusCode.UNAVAILABLE, "PAYMENT_FAILED")
            assert answers == [failed, (grpc.StatusCode.DEADLINE_EXCEEDED, "PROCESSOR_TIMEOUT"), failed] * 2
            assert breaker.state is State.CLOSED and breaker.window.totals() == (6, 0)
            paid = (await stub.ProcessPayment(payment_request("pm_sandbox_ok"))).payment
            assert paid.status == payment_pb2.PAYMENT_STATUS_SUCCEEDED

            await server.stop()  # down: nothing answers, and the circuit opens as before
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.GetPayment(pay.GetPaymentRequest(id=paid.id))
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and error_details(err.value)[0] is None
            assert breaker.state is State.OPEN
        finally:
            await channel.close()


async def test_an_open_circuit_whose_open_time_passed_shows_half_open_before_any_call_comes(flaky, metrics_port):
    """Once its open time has passed, an open circuit lets the next call through as its trial: it is half-open,
    and /metrics says so (1) without waiting for a call, so that an alert on 2 (open) ends with the open time of a
    service that is called rarely (before, it showed 2 until the next call came, however long that took)."""
    servicer, address = await flaky()
    # Open for 2 s: long enough that a loaded host still scrapes /metrics before the open time passes.
    channel = open_channel(address, [USER_SERVICE], default_deadline=5,
                           circuit=CircuitSettings(failure_threshold=1, open_seconds=2.0))
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    try:
        assert [await outcome(stub) for _ in range(3)] == ["OK", "UNAVAILABLE", "CIRCUIT_OPEN"]
        assert (await circuit_metrics(metrics_port, address))["state"] == 2.0
        servicer.healthy = True
        await asyncio.sleep(2.1)
        assert await circuit_metrics(metrics_port, address) == {"state": 1.0, "open": 1.0}
        assert await outcome(stub) == "OK"
        assert await circuit_metrics(metrics_port, address) == {"state": 0.0, "open": 1.0, "half_open": 1.0,
                                                                "closed": 1.0}
    finally:
        await channel.close()


async def test_a_call_whose_callers_deadline_passed_is_deadline_exceeded_whatever_the_circuits_state(flaky):
    """A call made after the deadline of the call being served has passed is refused DEADLINE_EXCEEDED (reason
    DEADLINE_EXCEEDED) before it is sent, open circuit or not: the caller ran out of time, whatever the dependency's
    state (before, an open circuit answered it UNAVAILABLE CIRCUIT_OPEN, which a caller retries later)."""
    servicer, address = await flaky()
    channel = open_channel(address, [USER_SERVICE], default_deadline=5,
                           circuit=CircuitSettings(failure_threshold=1, open_seconds=60))
    stub = user_service_pb2_grpc.UserServiceStub(channel)
    try:
        assert [await outcome(stub) for _ in range(3)] == ["OK", "UNAVAILABLE", "CIRCUIT_OPEN"]
        token = callctx.deadline_var.set(time.monotonic() - 1)
        try:
            with pytest.raises(DeadlineExceeded) as refused:
                await outcome(stub)
        finally:
            callctx.deadline_var.reset(token)
        assert refused.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert refused.value.reason == "DEADLINE_EXCEEDED"
        assert servicer.calls == 2
        assert await outcome(stub) == "CIRCUIT_OPEN"  # the refused call changed nothing of the circuit
    finally:
        await channel.close()
