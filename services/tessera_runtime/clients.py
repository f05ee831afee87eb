"""Outgoing gRPC channels: deadlines, propagated ids, identity and canary flag, and retries only for idempotent
methods."""

from __future__ import annotations

import json
from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import ServiceDescriptor
from google.rpc import error_details_pb2, status_pb2

from tessera_runtime import context as callctx
from tessera_runtime import telemetry
from tessera_runtime.config import CircuitSettings
from tessera_runtime.discovery.model import DiscoverySettings, is_discovery_target
from tessera_runtime.errors import DeadlineExceeded
from tessera_runtime.metrics import ClientMetricsInterceptor
from tessera_runtime.resilience import CircuitBreaker, CircuitBreakerInterceptor

RETRYABLE_LEVELS = (
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS,
    descriptor_pb2.MethodOptions.IDEMPOTENT,
)
RETRYABLE_CODES = ("UNAVAILABLE", "RESOURCE_EXHAUSTED", "ABORTED")
# ErrorInfo reasons this process's own client gives for a call it did not send (the dependency's circuit is open,
# discovery found no healthy instance of it): no service answered.
NOT_SENT_REASONS = frozenset({"CIRCUIT_OPEN", "NO_HEALTHY_INSTANCE"})


def retryable_methods(service: ServiceDescriptor) -> list[str]:
    """Methods whose contract marks them read-only or idempotent: the only ones a client may retry."""
    return [m.name for m in service.methods if m.GetOptions().idempotency_level in RETRYABLE_LEVELS]


def service_config(services: Iterable[ServiceDescriptor], *, max_attempts: int = 4) -> str:
    """gRPC service config with a retry policy per idempotent method, derived from the contracts."""
    names = [{"service": s.full_name, "method": m} for s in services for m in retryable_methods(s)]
    # round_robin spreads calls over every address the name resolves to (a headless Service's pods, or several
    # local workers); in the mesh, Istio balances per request on top of it.
    config: dict = {"loadBalancingConfig": [{"round_robin": {}}], "methodConfig": []}
    if names:
        config["methodConfig"].append({
            "name": names,
            "retryPolicy": {
                "maxAttempts": max_attempts,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": list(RETRYABLE_CODES),
            },
        })
    return json.dumps(config)


class _CallContextInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Gives every outgoing call the caller's remaining deadline (or a default), its ids and identity, and
    `canary: true` when the call being served came with it (context.outgoing_metadata)."""

    def __init__(self, default_deadline: float) -> None:
        self.default_deadline = default_deadline

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        timeout = client_call_details.timeout or self.default_deadline
        remaining = callctx.remaining_seconds()
        if remaining is not None:
            if remaining <= 0:
                raise DeadlineExceeded("the caller's deadline passed before the call was made",
                                       reason="DEADLINE_EXCEEDED")
            timeout = min(timeout, remaining)
        given = tuple(client_call_details.metadata or ())
        if given:
            present = {key for key, _ in given}
            pairs = [*given, *[(key, value) for key, value in callctx.outgoing_metadata() if key not in present]]
        else:
            pairs = callctx.outgoing_metadata()
        if not callctx.sendable("".join([value for _, value in pairs if value.__class__ is str])):
            # gRPC refuses such a value inside the call's task, and through interceptors the call then never ends,
            # not even at its deadline (grpc/grpc#41371): it fails here, before it is made.
            key = next(key for key, value in pairs if value.__class__ is str and not callctx.sendable(value))
            raise grpc.aio.AioRpcError(
                grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                details=f"the call was not made: its metadata {key!r} holds characters other than printable ASCII, "
                        "which gRPC cannot send")
        metadata = grpc.aio.Metadata(*pairs)
        details = grpc.aio.ClientCallDetails(
            method=client_call_details.method,
            timeout=timeout,
            metadata=metadata,
            credentials=client_call_details.credentials,
            wait_for_ready=client_call_details.wait_for_ready,
        )
        return await continuation(details, request)


def open_channel(address: str, services: Iterable[ServiceDescriptor], *, default_deadline: float = 5.0,
                 extra_interceptors: Iterable[grpc.aio.ClientInterceptor] = (),
                 breaker: CircuitBreaker | None = None,
                 circuit: CircuitSettings = CircuitSettings(),
                 discovery: DiscoverySettings | None = None) -> grpc.aio.Channel:
    """An insecure (mesh-encrypted in production) channel to another Tessera service, with a circuit breaker
    as `circuit` describes (a process passes its settings' `circuit`), unless `breaker` is given.

    A discovery address (`static:///...`, `registry:///<service>`; tessera_runtime.discovery) gives a channel
    that balances each call over the healthy instances, `discovery` (a process passes its settings' `discovery`)
    saying where the registry is and how instances are checked and weighed; the same interceptors, the breaker
    one per dependency. Any other address is a gRPC target, as it always was."""
    breaker = breaker or CircuitBreaker.configured(address, circuit)
    options = [
        ("grpc.service_config", service_config(services)),
        ("grpc.enable_retries", 1),
        ("grpc.keepalive_time_ms", 30_000),
    ]
    # Metrics outermost (they count calls refused before leaving); tracing innermost, so the client span covers
    # the call as sent, with the metadata every other interceptor added. The extra interceptors (the GraphQL API's
    # scope check) come before the breaker: a call they refuse is refused for what it asks, open circuit or not,
    # and is no call to the dependency. So does the caller's deadline: a call made once it has passed is the
    # caller's DEADLINE_EXCEEDED whatever the circuit's state, and no call to the dependency either.
    interceptors = [ClientMetricsInterceptor(), *extra_interceptors, _CallContextInterceptor(default_deadline),
                    CircuitBreakerInterceptor(breaker), *telemetry.client_interceptors()]
    if is_discovery_target(address):
        from tessera_runtime.discovery import balanced_channel

        return balanced_channel(address, discovery or DiscoverySettings(), interceptors, options)
    return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)


def error_details(err: grpc.aio.AioRpcError) -> tuple[error_details_pb2.ErrorInfo | None,
                                                      error_details_pb2.BadRequest | None]:
    """The ErrorInfo and BadRequest details of a failed call, when the server sent them."""
    info = bad = None
    for key, value in err.trailing_metadata() or ():
        if key != "grpc-status-details-bin":
            continue
        status = status_pb2.Status.FromString(value)
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
    return info, bad


def dependency_check(name: str, channel: grpc.aio.Channel, timeout: float = 1.0):
    """A non-critical readiness check of a service this one calls: its gRPC health answers SERVING. A dependency
    being down degrades this service (the /health report says so) but never takes it out of rotation. The check
    passes the channel's circuit breaker by (tessera_runtime.resilience.CircuitBreakerInterceptor)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from tessera_runtime.server import HealthCheck

    stub = health_pb2_grpc.HealthStub(channel)

    async def check() -> bool:
        reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    return HealthCheck(name=name, check=check, critical=False)
