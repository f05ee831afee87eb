"""Channels to Tessera with a deadline on every call, contract-derived retries and bearer-token metadata."""

from __future__ import annotations

import collections
import json
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor
from tessera.analytics.v1 import analytics_service_pb2_grpc
from tessera.inventory.v1 import inventory_service_pb2_grpc
from tessera.notification.v1 import notification_service_pb2_grpc
from tessera.order.v1 import order_service_pb2_grpc
from tessera.payment.v1 import payment_service_pb2_grpc
from tessera.user.v1 import user_service_pb2_grpc

from tessera_client.services import SERVICES

if TYPE_CHECKING:
    from tessera.analytics.v1.analytics_service_pb2_grpc import AnalyticsServiceAsyncStub
    from tessera.inventory.v1.inventory_service_pb2_grpc import InventoryServiceAsyncStub
    from tessera.notification.v1.notification_service_pb2_grpc import NotificationServiceAsyncStub
    from tessera.order.v1.order_service_pb2_grpc import OrderServiceAsyncStub
    from tessera.payment.v1.payment_service_pb2_grpc import PaymentServiceAsyncStub
    from tessera.user.v1.user_service_pb2_grpc import UserServiceAsyncStub

# Every Tessera server and the gateway refuse work past the caller's deadline; a client that sets none would wait
# forever on a lost connection, so calls without a timeout get this one.
DEFAULT_TIMEOUT_SECONDS = 5.0
# Transient failures: the server or a link was down (UNAVAILABLE), the gateway's rate limit (RESOURCE_EXHAUSTED),
# a concurrency conflict (ABORTED). Retrying is safe only because the methods retried have no side effects or are
# idempotent by contract.
RETRYABLE_STATUS_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED")
_RETRYABLE_LEVELS = (descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT)
# gRPC caps maxAttempts at 5, the first attempt included.
_MAX_ATTEMPTS_LIMIT = 5


def retryable_methods(service: ServiceDescriptor) -> list[str]:
    """Names of the methods whose contract marks them `NO_SIDE_EFFECTS` or `IDEMPOTENT`."""
    return [m.name for m in service.methods if m.GetOptions().idempotency_level in _RETRYABLE_LEVELS]


def service_config(services: Iterable[ServiceDescriptor] | None = None, *, max_attempts: int = 4) -> str:
    """The gRPC service config (JSON) that retries exactly the idempotent methods of `services` (default: all)."""
    if not 1 <= max_attempts <= _MAX_ATTEMPTS_LIMIT:
        raise ValueError(f"max_attempts must be 1 to {_MAX_ATTEMPTS_LIMIT}, got {max_attempts}")
    descriptors = [s.descriptor for s in SERVICES] if services is None else list(services)
    names = [{"service": d.full_name, "method": m} for d in descriptors for m in retryable_methods(d)]
    config: dict[str, Any] = {"methodConfig": []}
    if names and max_attempts > 1:
        config["methodConfig"].append({
            "name": names,
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": list(RETRYABLE_STATUS_CODES),
            },
        })
    return json.dumps(config)


def _metadata(existing: Iterable[tuple[str, Any]] | None, token: str | None) -> list[tuple[str, Any]]:
    metadata = list(existing or ())
    if token and not any(key == "authorization" for key, _ in metadata):
        metadata.append(("authorization", f"Bearer {token}"))
    return metadata


class _CallDetails(
    collections.namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready",
                                            "compression")),
    grpc.ClientCallDetails,
):
    """The sync API's ClientCallDetails is abstract; interceptors that change a call build their own."""


class _CallDefaults(grpc.UnaryUnaryClientInterceptor):
    """Sets the default timeout on calls that have none and adds the bearer token."""

    def __init__(self, timeout: float, token: str | None) -> None:
        self.timeout = timeout
        self.token = token

    def intercept_unary_unary(self, continuation: Callable[[grpc.ClientCallDetails, Any], Any],
                              client_call_details: grpc.ClientCallDetails, request: Any) -> Any:
        details = _CallDetails(
            client_call_details.method,
            self.timeout if client_call_details.timeout is None else client_call_details.timeout,
            _metadata(client_call_details.metadata, self.token),
            client_call_details.credentials,
            client_call_details.wait_for_ready,
            getattr(client_call_details, "compression", None),
        )
        return continuation(details, request)


class _AsyncCallDefaults(grpc.aio.UnaryUnaryClientInterceptor):
    """The asyncio twin of _CallDefaults."""

    def __init__(self, timeout: float, token: str | None) -> None:
        self.timeout = timeout
        self.token = token

    async def intercept_unary_unary(self, continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
                                    client_call_details: grpc.aio.ClientCallDetails, request: Any) -> Any:
        details = grpc.aio.ClientCallDetails(
            method=client_call_details.method,
            timeout=self.timeout if client_call_details.timeout is None else client_call_details.timeout,
            metadata=grpc.aio.Metadata(*_metadata(client_call_details.metadata, self.token)),
            credentials=client_call_details.credentials,
            wait_for_ready=client_call_details.wait_for_ready,
        )
        return await continuation(details, request)


def _options(max_attempts: int, options: Sequence[tuple[str, Any]]) -> list[tuple[str, Any]]:
    return [
        ("grpc.service_config", service_config(max_attempts=max_attempts)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
        *options,
    ]


def _check(timeout: float) -> None:
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")


class TesseraClient:
    """A channel to Tessera (a service or the gateway) with a typed stub per service. Close it, or use `with`."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel
        self.users = user_service_pb2_grpc.UserServiceStub(channel)
        self.inventory = inventory_service_pb2_grpc.InventoryServiceStub(channel)
        self.payments = payment_service_pb2_grpc.PaymentServiceStub(channel)
        self.orders = order_service_pb2_grpc.OrderServiceStub(channel)
        self.notifications = notification_service_pb2_grpc.NotificationServiceStub(channel)
        self.analytics = analytics_service_pb2_grpc.AnalyticsServiceStub(channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> TesseraClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncTesseraClient:
    """The asyncio twin of TesseraClient: every stub method returns an awaitable call."""

    users: UserServiceAsyncStub
    inventory: InventoryServiceAsyncStub
    payments: PaymentServiceAsyncStub
    orders: OrderServiceAsyncStub
    notifications: NotificationServiceAsyncStub
    analytics: AnalyticsServiceAsyncStub

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.channel = channel
        self.users = user_service_pb2_grpc.UserServiceStub(channel)
        self.inventory = inventory_service_pb2_grpc.InventoryServiceStub(channel)
        self.payments = payment_service_pb2_grpc.PaymentServiceStub(channel)
        self.orders = order_service_pb2_grpc.OrderServiceStub(channel)
        self.notifications = notification_service_pb2_grpc.NotificationServiceStub(channel)
        self.analytics = analytics_service_pb2_grpc.AnalyticsServiceStub(channel)

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncTesseraClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


def connect(target: str, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS,
            max_attempts: int = 4, credentials: grpc.ChannelCredentials | None = None,
            options: Sequence[tuple[str, Any]] = ()) -> TesseraClient:
    """Opens a channel to `target` ("host:port" of a service or of the gateway).

    - timeout: deadline in seconds of every call that passes no `timeout=` of its own.
    - token: a JWT sent as `authorization: Bearer <token>` on every call (the gateway requires one).
    - max_attempts: attempts per call (1 to 5) of the methods the contracts mark NO_SIDE_EFFECTS or IDEMPOTENT,
      on UNAVAILABLE, RESOURCE_EXHAUSTED or ABORTED, within the call's deadline. Other methods (creates, ...)
      are never retried: repeat them yourself with the same request_id.
    - credentials: TLS credentials; without them the channel is plaintext (local and in-mesh use).
    """
    _check(timeout)
    opts = _options(max_attempts, options)
    channel = (grpc.secure_channel(target, credentials, options=opts) if credentials is not None
               else grpc.insecure_channel(target, options=opts))
    return TesseraClient(grpc.intercept_channel(channel, _CallDefaults(timeout, token)))


def aio_connect(target: str, *, token: str | None = None, timeout: float = DEFAULT_TIMEOUT_SECONDS,
                max_attempts: int = 4, credentials: grpc.ChannelCredentials | None = None,
                options: Sequence[tuple[str, Any]] = ()) -> AsyncTesseraClient:
    """`connect()` for asyncio; the same arguments. Use it inside a running event loop."""
    _check(timeout)
    opts = _options(max_attempts, options)
    interceptors = [_AsyncCallDefaults(timeout, token)]
    channel = (grpc.aio.secure_channel(target, credentials, options=opts, interceptors=interceptors)
               if credentials is not None
               else grpc.aio.insecure_channel(target, options=opts, interceptors=interceptors))
    return AsyncTesseraClient(channel)
