"""Client-side circuit breaking for calls to other services: fail fast while a dependency is down or failing.

gRPC's own retries (service config, idempotent methods only) cover short blips; Istio's outlier detection ejects
bad pods in the mesh. The breaker covers what neither does: a dependency that is down for everyone, or failing a
large share of its calls (one of two pods down where no mesh ejects it), where waiting for each call's deadline
would tie up the caller. Either of two conditions opens the circuit:

- `failure_threshold` consecutive transport-level failures (UNAVAILABLE, DEADLINE_EXCEEDED): a dependency that is
  simply down opens it within a few calls, however rarely it is called;
- over a rolling window of `window_seconds` (kept in 10 buckets: the calls of a bucket leave the window together
  once ten buckets have begun since), at least `min_calls` calls of which at least `error_percent` % failed,
  checked as each failure is recorded: a dependency that answers only half its calls never fails five in a row.

While open, calls fail at once with UNAVAILABLE (ErrorInfo reason CIRCUIT_OPEN, metadata `dependency`), but for a
call whose caller's deadline has passed already: it is refused DEADLINE_EXCEEDED before it reaches the breaker
(tessera_runtime.clients), whatever the circuit's state, and neither counts nor takes the trial; after
`reset_seconds` one trial call is let through (half-open) and its outcome closes the circuit, with an empty window,
or re-opens it. Business errors (NOT_FOUND, FAILED_PRECONDITION, ...) are answers, not failures: they count as
calls in the window and never open it. So is an UNAVAILABLE or DEADLINE_EXCEEDED that carries the service's own
ErrorInfo reason (the payment service's PAYMENT_FAILED or PROCESSOR_TIMEOUT, the order service's stored failure of
an order): the service is up and decided. Only one without an ErrorInfo (the connection, the call's deadline, a proxy
in between) or with a reason of the runtime saying that the service cannot serve just now (NOT_SERVING_REASONS) is a
failure. The readiness probes of the service's gRPC health (tessera_runtime.clients.dependency_check) pass the
breaker by: they are neither refused nor counted. A call's outcome counts only if the circuit is still in the state
that let the call through: calls in flight when it opened neither close nor prolong it when they end, nor pass for
the trial.

A service's channels, and the GraphQL API's, take the five from tessera_runtime.config.CircuitSettings:

| variable | default | setting |
|---|---|---|
| TESSERA_CIRCUIT_FAILURE_THRESHOLD | 5 | failure_threshold (1-1000) |
| TESSERA_CIRCUIT_OPEN_SECONDS | 10 | reset_seconds (more than 0) |
| TESSERA_CIRCUIT_ERROR_PERCENT | 50 | error_percent (1-100) |
| TESSERA_CIRCUIT_WINDOW_SECONDS | 10 | window_seconds (1-3600) |
| TESSERA_CIRCUIT_MIN_CALLS | 20 | min_calls (1-100000) |

Every transition is logged (a warning naming the dependency, both states, and the window's counts) and counted:
`tessera_circuit_state{dependency}` is 0 closed, 1 half-open (also an open circuit whose open time has passed, whose
next call is the trial), 2 open, and
`tessera_circuit_transitions_total{dependency, state}` counts the transitions into each state (tessera_runtime.metrics).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from tessera_runtime import metrics
from tessera_runtime.config import (
    CIRCUIT_ERROR_PERCENT,
    CIRCUIT_FAILURE_THRESHOLD,
    CIRCUIT_MIN_CALLS,
    CIRCUIT_OPEN_SECONDS,
    CIRCUIT_WINDOW_SECONDS,
    CircuitSettings,
)

log = logging.getLogger("tessera.resilience")

FAILURE_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
# The ErrorInfo reasons (tessera.common.v1.ErrorReason) with which a service's runtime says that it cannot serve just
# now: its database is away, something it waited on did not answer in time, the call's deadline passed inside it;
# and the one with which discovery (tessera_runtime.discovery) says that no instance of it is healthy.
NOT_SERVING_REASONS = frozenset({"UNAVAILABLE", "DATABASE_UNAVAILABLE", "DEADLINE_EXCEEDED", "NO_HEALTHY_INSTANCE"})
# The rolling window is kept in this many buckets, like opossum's rollingCountBuckets default.
WINDOW_BUCKETS = 10


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# The value of tessera_circuit_state for each state.
STATE_VALUES = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}


class RollingWindow:
    """Calls and failures over the last `seconds`, in WINDOW_BUCKETS buckets of seconds / WINDOW_BUCKETS each.

    A bucket is the interval [n * width, (n + 1) * width) of the clock; the window is the current bucket and the
    WINDOW_BUCKETS - 1 before it, so it spans between 9/10 of `seconds` and `seconds`."""

    def __init__(self, seconds: float, clock: Callable[[], float]) -> None:
        self.width = seconds / WINDOW_BUCKETS
        self.clock = clock
        # Per slot: the bucket number it holds, its calls and its failures.
        self._numbers = [-1] * WINDOW_BUCKETS
        self._calls = [0] * WINDOW_BUCKETS
        self._failures = [0] * WINDOW_BUCKETS

    def add(self, failed: bool) -> None:
        number = int(self.clock() // self.width)
        slot = number % WINDOW_BUCKETS
        if self._numbers[slot] != number:  # the slot holds a bucket that left the window: reuse it
            self._numbers[slot], self._calls[slot], self._failures[slot] = number, 0, 0
        self._calls[slot] += 1
        self._failures[slot] += failed

    def totals(self) -> tuple[int, int]:
        """(calls, failures) in the window."""
        oldest = int(self.clock() // self.width) - WINDOW_BUCKETS + 1
        calls = failures = 0
        for number, c, f in zip(self._numbers, self._calls, self._failures, strict=True):
            if number >= oldest:
                calls += c
                failures += f
        return calls, failures

    def clear(self) -> None:
        self._numbers = [-1] * WINDOW_BUCKETS
        self._calls = [0] * WINDOW_BUCKETS
        self._failures = [0] * WINDOW_BUCKETS


class CircuitBreaker:
    """Consecutive-failure and error-rate breaker for one dependency. Not thread-safe: one event loop uses it."""

    def __init__(self, name: str, *, failure_threshold: int = CIRCUIT_FAILURE_THRESHOLD,
                 reset_seconds: float = CIRCUIT_OPEN_SECONDS, error_percent: float = CIRCUIT_ERROR_PERCENT,
                 window_seconds: float = CIRCUIT_WINDOW_SECONDS, min_calls: int = CIRCUIT_MIN_CALLS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.failure_threshold = failure_threshold
        self.reset_seconds = reset_seconds
        self.error_percent = error_percent
        self.window_seconds = window_seconds
        self.min_calls = min_calls
        self.clock = clock
        self.state = State.CLOSED
        self.failures = 0
        self.window = RollingWindow(window_seconds, clock)
        self.opened_at = 0.0
        # Transitions so far: a call's outcome counts only while the breaker is still in the state that let it
        # through (see `admitted`).
        self.epoch = 0
        self._trial_in_flight = False
        # Read at each scrape: an open circuit whose open time has passed shows half-open before a call comes.
        metrics.CIRCUIT_STATE.labels(name).set_function(self._state_value)

    @classmethod
    def configured(cls, name: str, settings: CircuitSettings) -> CircuitBreaker:
        """The breaker a process's settings describe (TESSERA_CIRCUIT_*)."""
        return cls(name, failure_threshold=settings.failure_threshold, reset_seconds=settings.open_seconds,
                   error_percent=settings.error_percent, window_seconds=settings.window_seconds,
                   min_calls=settings.min_calls)

    def allow(self) -> bool:
        if self.state is State.CLOSED:
            return True
        if self.state is State.OPEN and self.clock() - self.opened_at >= self.reset_seconds:
            self._transition(State.HALF_OPEN)
        if self.state is State.HALF_OPEN and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def record(self, code: grpc.StatusCode, epoch: int | None = None, *, reason: str | None = None) -> None:
        """The outcome of a call `allow()` let through when the breaker's epoch was `epoch` (None: the current one),
        with the ErrorInfo reason of its status if it had one. A call let through before the last transition (in
        flight when the circuit opened, or when the trial closed it) changes nothing: its outcome is no evidence
        about the dependency now, and it is not the trial."""
        if epoch is not None and epoch != self.epoch:
            return
        if self.state is State.OPEN:  # only a call recorded without its epoch gets here
            return
        self._trial_in_flight = False
        failed = code in FAILURE_CODES and (reason is None or reason in NOT_SERVING_REASONS)
        if self.state is State.HALF_OPEN:  # the trial call
            if failed:
                self._open()
            else:
                self.failures = 0
                self._transition(State.CLOSED)
                self.window.clear()  # the calls before the circuit opened are no evidence about the dependency now
            return
        self.window.add(failed)
        if not failed:
            self.failures = 0
            return
        self.failures += 1
        if self.failures >= self.failure_threshold or self._error_rate_reached():
            self._open()

    def abandon(self, epoch: int) -> None:
        """A call let through at `epoch` ended with no status (cancelled): if it was the trial, another may go."""
        if epoch == self.epoch:
            self._trial_in_flight = False

    def _state_value(self) -> int:
        """tessera_circuit_state: the state, except that an open circuit whose open time has passed is half-open
        already (its next call is let through as the trial), though no call came yet to move it there."""
        if self.state is State.OPEN and self.clock() - self.opened_at >= self.reset_seconds:
            return STATE_VALUES[State.HALF_OPEN]
        return STATE_VALUES[self.state]

    def _error_rate_reached(self) -> bool:
        calls, failures = self.window.totals()
        return calls >= self.min_calls and failures * 100 >= self.error_percent * calls

    def _open(self) -> None:
        self.opened_at = self.clock()
        self._transition(State.OPEN)

    def _transition(self, state: State) -> None:
        if state is not self.state:
            calls, failures = self.window.totals()
            log.warning("circuit %s: %s -> %s", self.name, self.state.value, state.value,
                        extra={"dependency": self.name, "circuit_state": state.value,
                               "consecutive_failures": self.failures, "window_calls": calls,
                               "window_failures": failures})
            self.state = state
            self.epoch += 1
            metrics.CIRCUIT_TRANSITIONS.labels(self.name, state.value).inc()

    def open_error(self) -> grpc.aio.AioRpcError:
        """The error a call gets while the circuit is open."""
        return unavailable_error(f"{self.name} is unavailable (circuit open)", reason="CIRCUIT_OPEN",
                                 metadata={"dependency": self.name})


def unavailable_error(message: str, *, reason: str, metadata: dict[str, str]) -> grpc.aio.AioRpcError:
    """The UNAVAILABLE a client-side refusal gives a call that was never sent (an open circuit, no healthy instance):
    shaped like any other UNAVAILABLE from the wire, with an ErrorInfo of `reason` in the tessera.dev domain."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain="tessera.dev", metadata=metadata))
    status = status_pb2.Status(code=code_pb2.UNAVAILABLE, message=message, details=[info])
    return grpc.aio.AioRpcError(
        code=grpc.StatusCode.UNAVAILABLE,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(("grpc-status-details-bin", status.SerializeToString())),
        details=status.message,
    )


# The gRPC health service of the service a channel calls: a process's readiness asks it every second with a 1 s
# deadline (tessera_runtime.clients.dependency_check).
HEALTH_METHODS = "/grpc.health.v1.Health/"


class CircuitBreakerInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Applies a CircuitBreaker to every unary call of a channel but the readiness probes of its health: they
    observe the dependency and are no calls to it, so the breaker neither refuses nor counts them (a probe that
    timed out on a slow dependency would open the circuit of calls that have longer to wait; one answered between
    failing calls would keep it closed)."""

    def __init__(self, breaker: CircuitBreaker) -> None:
        self.breaker = breaker

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        method = client_call_details.method
        if (method.decode() if isinstance(method, bytes) else method).startswith(HEALTH_METHODS):
            return await continuation(client_call_details, request)
        if not self.breaker.allow():
            raise self.breaker.open_error()
        epoch = self.breaker.epoch
        try:
            call = await continuation(client_call_details, request)
            await call
        except grpc.aio.AioRpcError as err:
            self.breaker.record(err.code(), epoch, reason=_reason(err))
            raise
        except BaseException:
            self.breaker.abandon(epoch)
            raise
        self.breaker.record(grpc.StatusCode.OK, epoch)
        return call


def _reason(err: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason of a failed call's status, if the server sent one."""
    from tessera_runtime.clients import error_details  # clients imports this module

    try:
        info, _ = error_details(err)
    except Exception:  # details that do not parse: no answer the breaker can read
        return None
    return info.reason if info is not None else None
