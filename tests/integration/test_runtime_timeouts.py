"""A timeout inside a handler (a dependency that did not answer) is UNAVAILABLE; only the caller's own deadline is
DEADLINE_EXCEEDED. Found by the benchmark: an overloaded database's 3 s connect timeout surfaced as DEADLINE_EXCEEDED
on calls that carried no deadline at all."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tessera_runtime.server import ServiceModule, create_server

SERVICE = "tessera.test.v1.Waits"
DOMAIN = "test.tessera.dev"


async def _dependency_times_out(request: bytes, _context) -> bytes:
    async with asyncio.timeout(0.05):  # e.g. a database connect with its own timeout
        await asyncio.sleep(10)
    return request


async def _fails(request: bytes, _context) -> bytes:
    raise KeyError("an internal detail")


async def _sleeps(request: bytes, _context) -> bytes:
    await asyncio.sleep(10)
    return request


def _register(server: grpc.aio.Server) -> None:
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {
        "DependencyTimesOut": grpc.unary_unary_rpc_method_handler(_dependency_times_out),
        "Sleeps": grpc.unary_unary_rpc_method_handler(_sleeps),
        "Fails": grpc.unary_unary_rpc_method_handler(_fails),
    }),))


@pytest.fixture
def outcomes() -> list[tuple[str, grpc.StatusCode]]:
    return []


@pytest.fixture
async def channel(outcomes):
    module = ServiceModule(service_names=(SERVICE,), register=_register, domain=DOMAIN,
                           rpc_observers=(lambda method, code, _duration: outcomes.append((method, code)),))
    server, port = await create_server(module)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel
    await server.stop()


@pytest.mark.parametrize("timeout", [None, 30.0], ids=["no deadline", "distant deadline"])
async def test_a_dependency_timing_out_is_unavailable_with_error_info(channel, timeout):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/DependencyTimesOut")(b"x", timeout=timeout)
    err = caught.value
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    status = rpc_status.from_call(err)
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("UNAVAILABLE", DOMAIN)
    assert len(dict(err.trailing_metadata())["x-request-id"]) == 32  # the ids ride next to the status details


async def test_an_internal_failure_carries_the_calls_ids(channel):
    ids = (("x-request-id", "req-fails"), ("x-correlation-id", "corr-fails"))
    with pytest.raises(grpc.aio.AioRpcError) as internal:
        await channel.unary_unary(f"/{SERVICE}/Fails")(b"x", metadata=ids)
    assert internal.value.code() == grpc.StatusCode.INTERNAL and "internal detail" not in internal.value.details()
    assert rpc_status.from_call(internal.value) is not None
    trailing = dict(internal.value.trailing_metadata())
    assert (trailing["x-request-id"], trailing["x-correlation-id"]) == ("req-fails", "corr-fails")


async def test_the_callers_deadline_passing_is_deadline_exceeded(channel, outcomes):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await channel.unary_unary(f"/{SERVICE}/Sleeps")(b"x", timeout=0.3)
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(100):  # the server's own account of the call, once its handler has ended
        if outcomes:
            break
        await asyncio.sleep(0.05)
    # The server stopped the work at the deadline (or saw the caller cancel first), never calling it UNAVAILABLE.
    assert outcomes and outcomes[0][1] in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
