"""Client-side circuit breaking for calls to other services: fail fast while a dependency is down.

gRPC's own retries (service config, idempotent methods only) cover short blips; Istio's outlier detection ejects
bad pods in the mesh. The breaker covers what neither does: a dependency that is down for everyone, where waiting
for each call's deadline would tie up the caller. After `failure_threshold` consecutive transport-level failures
the circuit opens and calls fail at once with UNAVAILABLE (ErrorInfo reason CIRCUIT_OPEN); after `reset_seconds`
one trial call is let through (half-open) and its outcome closes or re-opens the circuit. Business errors
(NOT_FOUND, FAILED_PRECONDITION, ...) are answers, not failures, and never open it. A service's channels take
both from TESSERA_CIRCUIT_FAILURE_THRESHOLD and TESSERA_CIRCUIT_OPEN_SECONDS (5 and 10 s by default).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tessera_runtime.config import CIRCUIT_FAILURE_THRESHOLD, CIRCUIT_OPEN_SECONDS

log = logging.getLogger("tessera.resilience")

FAILURE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    """Consecutive-failure breaker for one dependency. Not thread-safe: one event loop uses it."""

    def __init__(self, name: str, *, failure_threshold: int = CIRCUIT_FAILURE_THRESHOLD,
                 reset_seconds: float = CIRCUIT_OPEN_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self.clock = clock
        self.state = State.CLOSED
        self.failures = 0
        self.opened_at = 0.0
        self._trial_in_flight = False

    def allow(self) -> bool:
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN and self.clock() - self.opened_at >= self.reset_seconds:
            self._transition(State.HALF_OPEN)
        if self.state is State.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record(self, code: grpc.StatusCode) -> None:
        self._trial_in_flight = False
        if code in FAILURE_CODES:
            self.failures += 1
            if self.state is State.HALF_OPEN or self.failures >= self.failure_threshold:
                self.opened_at = self.clock()
                self._transition(State.OPEN)
        else:
            self.failures = 0
            if self.state is not State.CLOSED:
                self._transition(State.CLOSED)

    def _transition(self, state: State) -> None:
        if state is not self.state:
            log.warning("circuit %s: %s -> %s", self.name, self.state.value, state.value,
                        extra={"dependency": self.name, "circuit_state": state.value})
            self.state = state

    def open_error(self) -> grpc.aio.AioRpcError:
        """The error a call gets while the circuit is open: shaped like any other UNAVAILABLE from the wire."""
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason="CIRCUIT_OPEN", domain="tessera.dev",
                                              metadata={"dependency": self.name}))
        status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=f"{self.name} is unavailable (circuit open)",
                                   details=[info])
        return grpc.aio.AioRpcError(
            code=grpc.StatusCode.UNAVAILABLE,
            initial_metadata=grpc.aio.Metadata(),
            trailing_metadata=grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString())),
            details=status.message,
        )


class CircuitBreakerInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Applies a CircuitBreaker to every unary call of a channel."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        if not self.breaker.allow():
            raise self.breaker.open_error()
        try:
            call = await continuation(client_call_details, request)
            await call
        except grpc.aio.AioRpcError as err:
            self.breaker.record(err.code())
            raise
        except BaseException:
            self.breaker._trial_in_flight = False
            raise
        self.breaker.record(grpc.StatusCode.OK)
        return call
