"""A request whose bytes are no valid message of its type (a string field that is not UTF-8, a cut message) is
INVALID_ARGUMENT with ErrorInfo, like any other bad input, not UNKNOWN with the parser's exception text."""

from __future__ import annotations

import grpc
import pytest
from tessera.user.v1 import user_service_pb2, user_service_pb2_grpc

from tessera_runtime.clients import error_details
from tessera_runtime.server import ServiceModule, create_server

SERVICE = "tessera.user.v1.UserService"
DOMAIN = "user.tessera.dev"


class _Users(user_service_pb2_grpc.UserServiceServicer):
    async def GetUser(self, request, context):
        raise AssertionError("a request that could not be read reached the servicer")


@pytest.fixture
async def served():
    outcomes: list[tuple[str, grpc.StatusCode]] = []
    module = ServiceModule(
        service_names=(SERVICE,), domain=DOMAIN,
        register=lambda server: user_service_pb2_grpc.add_UserServiceServicer_to_server(_Users(), server),
        rpc_observers=(lambda method, code, _duration: outcomes.append((method, code)),))
    server, port = await create_server(module)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield channel, outcomes
    await server.stop()


@pytest.mark.parametrize("payload", [
    b"\x0a\x02\xff\xfe",  # field 1 (id), a string, holding bytes that are not UTF-8
    b"\x0a\x20abc",  # field 1 says 32 bytes follow; 3 do
], ids=["not utf-8", "cut short"])
async def test_a_request_that_cannot_be_read_is_invalid_argument_with_error_info(served, payload):
    channel, outcomes = served
    call = channel.unary_unary(f"/{SERVICE}/GetUser", request_serializer=bytes,
                               response_deserializer=user_service_pb2.GetUserResponse.FromString)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call(payload, timeout=10, metadata=(("x-request-id", "req-malformed"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert "DecodeError" not in err.value.details()
    info, _ = error_details(err.value)
    assert info is not None and info.reason == "MALFORMED_REQUEST" and info.domain == DOMAIN
    assert dict(err.value.trailing_metadata())["x-request-id"] == "req-malformed"
    assert outcomes == [(f"/{SERVICE}/GetUser", grpc.StatusCode.INVALID_ARGUMENT)]
