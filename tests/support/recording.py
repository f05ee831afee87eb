"""A server interceptor for tests that keeps the metadata every call reached a real Tessera server with."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

Metadata = tuple[tuple[str, str], ...]


class MetadataRecorder(grpc.aio.ServerInterceptor):
    """Records (method, metadata) of each unary call before the service's handler runs. Given to a server after
    the runtime's interceptor, which builds its handler once per method: so it wraps the handler it is given,
    and the wrapper is what runs for every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Metadata]] = []

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        method, inner = handler_call_details.method, handler.unary_unary

        async def record(request: Any, context: grpc.aio.ServicerContext) -> Any:
            self.calls.append((method, tuple((k, v) for k, v in context.invocation_metadata() or ()
                                             if isinstance(v, str))))
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(record, request_deserializer=handler.request_deserializer,
                                                   response_serializer=handler.response_serializer)

    def of(self, key: str, value: str) -> list[tuple[str, Metadata]]:
        """The calls whose metadata holds `key: value` (a correlation id, say), in the order they came."""
        return [(m, md) for m, md in self.calls if (key, value) in md]


def values(metadata: Metadata, key: str) -> list[str]:
    return [v for k, v in metadata if k == key]


def method_name(method: str) -> str:
    """`GetUser` of `/tessera.user.v1.UserService/GetUser`."""
    return method.rsplit("/", 1)[-1]
