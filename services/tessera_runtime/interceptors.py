"""Server interceptor: the server span, ids, caller identity, deadline, the canary flag, domain errors → rich
statuses, one log line per RPC, in-flight and RED metrics."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from tessera_runtime import context as callctx
from tessera_runtime import metrics
from tessera_runtime.db import database_unavailable
from tessera_runtime.errors import (
    DATABASE_UNAVAILABLE,
    DomainError,
    Unauthenticated,
    Unavailable,
    internal_status,
)
from tessera_runtime.logs import RpcAccessLog, correlation_id_var, request_id_var
from tessera_runtime.telemetry import ServerSpans

log = logging.getLogger("tessera.rpc")
access_log = RpcAccessLog(log)

# Infrastructure services answer without a caller identity: probes and tooling must always reach them.
_IDENTITY_EXEMPT_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

RpcObserver = Callable[[str, grpc.StatusCode, float], None]


class _StatusWithIds(grpc.Status):
    """`status` with the call's ids added to its trailing metadata (abort_with_status replaces what was set)."""

    def __init__(self, status: grpc.Status, ids: tuple[tuple[str, str], ...]) -> None:
        self.code = status.code
        self.details = status.details
        self.trailing_metadata = (*status.trailing_metadata, *ids)


async def _fail(context: grpc.aio.ServicerContext, ids: tuple[tuple[str, str], ...],
                status: status_pb2.Status) -> None:
    """Ends the call with `status` (a google.rpc.Status with its details) and the call's ids."""
    await context.abort_with_status(_StatusWithIds(rpc_status.to_status(status), ids))


class _Undecodable:
    """What the request deserializer gives for bytes that are no valid message of the request's type (gRPC itself
    would end the call with UNKNOWN and the parser's exception text, before the interceptor runs)."""

    __slots__ = ("error",)

    def __init__(self, error: Exception) -> None:
        self.error = error


def _tolerant(deserialize: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def read(data: bytes) -> Any:
        try:
            return deserialize(data)
        except Exception as exc:  # DecodeError: a string field that is not UTF-8, a message cut short, ...
            return _Undecodable(exc)

    return read


class MalformedRequest(DomainError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "MALFORMED_REQUEST"


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary RPC of a Tessera server. Streaming RPCs (health Watch, reflection) pass through.

    It is the server's one interceptor for all of this, tracing included: grpc.aio runs every interceptor's
    `intercept_service` for every call, and this one returns the handler it built for the method the first time.
    The observers are called with each finished call's method, status code and duration, inside its span."""

    def __init__(self, *, domain: str, require_identity: bool = False,
                 observers: tuple[RpcObserver, ...] = ()) -> None:
        self.domain = domain
        self.require_identity = require_identity
        self.observers = observers
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._spans = ServerSpans()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None:
            return cached
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = grpc.unary_unary_rpc_method_handler(
            self._wrap(method, handler.unary_unary),
            request_deserializer=(None if handler.request_deserializer is None
                                  else _tolerant(handler.request_deserializer)),
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = wrapped
        return wrapped

    def _wrap(self, method: str, inner: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]):
        exempt = method.startswith(_IDENTITY_EXEMPT_PREFIXES)
        spans = self._spans
        span_attributes = spans.attributes_for(method)
        in_flight = metrics.server_rpcs_in_flight(method)

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            received = context.invocation_metadata() or ()
            metadata = {k: v for k, v in received if isinstance(v, str)}
            request_id = callctx.clean_id(metadata.get(callctx.REQUEST_ID)) or uuid.uuid4().hex
            correlation_id = callctx.clean_id(metadata.get(callctx.CORRELATION_ID)) or request_id
            principal = callctx.principal_from(metadata)
            remaining = context.time_remaining()
            # Every copy of the key counts (the dict above keeps the last): the mesh matches them all joined.
            canary = callctx.CANARY in metadata and callctx.asks_for_canary(
                [v for k, v in received if k == callctx.CANARY])
            tokens = (
                request_id_var.set(request_id),
                correlation_id_var.set(correlation_id),
                callctx.principal_var.set(principal),
                callctx.deadline_var.set(None if remaining is None else time.monotonic() + remaining),
                callctx.canary_var.set(canary),
            )
            start = time.perf_counter()
            code = grpc.StatusCode.OK
            deadline: asyncio.Timeout | None = None
            # The ids go back in the trailing metadata, which leaves with the status in the call's last batch:
            # as initial metadata they would cost a batch (a round through gRPC's completion queue) of their own.
            ids = ((callctx.REQUEST_ID, request_id), (callctx.CORRELATION_ID, correlation_id))
            context.set_trailing_metadata(ids)
            span = otel_token = None
            if span_attributes is not None:
                span, otel_token = spans.start(method, span_attributes, metadata, context)
            in_flight.inc()
            # A failure's status is sent after the call's line, metrics and span are done (below the finally): the
            # caller that holds the answer can rely on them being recorded.
            failure: status_pb2.Status | None = None
            deadline_passed = False

            try:
                if self.require_identity and principal is None and not exempt:
                    raise Unauthenticated("the call carries no caller identity; call through the gateway",
                                          reason="IDENTITY_MISSING", domain=self.domain)
                if type(request) is _Undecodable:
                    raise MalformedRequest("the request is not a valid message of its type: "
                                           + str(request.error).rsplit(": ", 1)[-1], domain=self.domain)
                if remaining is None:
                    return await inner(request, context)
                if remaining <= 0:
                    raise TimeoutError
                async with asyncio.timeout(remaining) as deadline:
                    return await inner(request, context)
            except DomainError as err:
                code = err.code
                failure = err.to_status()
            except TimeoutError:
                if remaining is not None and (remaining <= 0 or (deadline is not None and deadline.expired())):
                    code = grpc.StatusCode.DEADLINE_EXCEEDED
                    deadline_passed = True
                else:
                    # Something the handler waited on gave up (a database connection not made in time, ...)
                    # before the caller's deadline: the service cannot answer just now, and a retry may succeed.
                    code = grpc.StatusCode.UNAVAILABLE
                    log.warning("timed out waiting for a dependency in %s", method, exc_info=True,
                                extra={"rpc_method": method})
                    failure = Unavailable("a dependency did not answer in time; retry later",
                                          domain=self.domain).to_status()
            except grpc.aio.AbortError:
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED
                raise
            except Exception as exc:
                if database_unavailable(exc):
                    code = grpc.StatusCode.UNAVAILABLE
                    log.warning("the database could not be used in %s", method, exc_info=True,
                                extra={"rpc_method": method})
                    failure = Unavailable("the database is unavailable; retry later", reason=DATABASE_UNAVAILABLE,
                                          domain=self.domain).to_status()
                else:
                    code = grpc.StatusCode.INTERNAL
                    log.exception("unexpected error in %s", method, extra={"rpc_method": method})
                    failure = internal_status(self.domain)
            finally:
                in_flight.dec()
                duration = time.perf_counter() - start
                access_log.info(method, code.name, round(duration * 1000, 3))
                for observe in self.observers:
                    observe(method, code, duration)
                if span is not None:
                    spans.finish(span, otel_token, code, request_id, correlation_id)
                context_vars = (request_id_var, correlation_id_var, callctx.principal_var, callctx.deadline_var,
                                callctx.canary_var)
                for var, token in zip(context_vars, tokens, strict=True):
                    var.reset(token)
            # Only a failure caught above gets here (a return or a raise has left already).
            if deadline_passed:
                await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
            assert failure is not None
            await _fail(context, ids, failure)

        return handle
