"""The saga engine: a saga's steps run forward and are compensated in reverse, each move persisted, leased and
resumable after a crash. A service defines its saga on it (services/README.md, "Sagas"): the steps, the aggregate
that keeps the saga's state (SagaState) and the repository that stores it (SagaStore).

Every move is written with the saga's state and its events in one transaction, fenced by the saga's lease: a save
succeeds only while the runner still holds the lease and nobody changed the state since it was read, so two runners
never both advance one saga. A step must be safe to repeat (every mutating call carries an idempotency key derived
from the saga's id), so that a saga interrupted anywhere, by a crash or a lost lease, is resumed by simply running
its current step again.

A saga resumed by the recovery loop (after a crash, or a runner that stopped renewing its lease) runs as the caller
whose request started it: the store keeps that call's principal, correlation id and W3C trace context
(`SagaCaller`, stored with the saga), and `run(..., caller=...)` restores them. The resumed work is one INTERNAL
span (the definition's `resume_span`, `resume order saga` for the order's) that is a CHILD of that request's server
span, so its database statements, its calls to the other services and the events it writes (whose publish spans
are children of it) are in the request's trace, and its log lines carry the request's correlation id. A child, not
a new root linked to the request as a message consumer's span is (tessera_runtime/telemetry.py), because a resumed
saga is not a new unit of work: it is the rest of the one the request started, whose outcome is the request's
answer (a retry with the same request_id returns it). Even without a crash the saga outlives the request's answer
in a task of its own and its spans are children of the request's; a crash changes who runs the rest, not what it
is. Nor can it mix duplicates into the trace as a redelivered message would: the lease admits one runner at a time,
each going on from the last committed state, and a step repeated after the crash is the same step's retry, as it
would be in-process. As a child it also keeps the request's sampling decision, so a sampled request's saga is
recorded to its end and an unsampled one is not recorded in half. The price is a trace that may stretch over the
time the saga waited (a lease to expire, a service to restart): the resume span's own start time and attributes
(`tessera.saga.runner`, the status and step it resumed from) show where the gap was. A compensation asked for later
(an order's cancellation) and resumed after a crash continues the starting request's trace too: the store keeps
one caller, the one that started the saga. A saga stored without a trace context (tracing disabled, or stored
before the service kept one) resumes in a new trace.

A saga run from the request that started it keeps that request's `canary: true` (tessera_runtime.context), so its
steps call the canary v2 of the services that run one. A resumed saga does not: the store keeps no canary flag, and
the rest of its steps go to each service by that service's canary weights.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import dataclasses
import datetime as dt
import logging
import os
import random
import socket
import uuid
from collections.abc import Awaitable, Callable, Hashable, Iterator, Mapping, Sequence
from typing import Any, Generic, Protocol, TypeVar

from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tessera_runtime import context as callctx
from tessera_runtime import metrics
from tessera_runtime.db import database_unavailable, utcnow
from tessera_runtime.logs import correlation_id_var, request_id_var
from tessera_runtime.periodic import BacklogJob, BacklogKey, cancel
from tessera_runtime.telemetry import tracer

# The store keeps the trace context in the W3C format whatever OTEL_PROPAGATORS says: it is a stored value that a
# later process reads back, not a header for whoever listens.
_W3C = TraceContextTextMapPropagator()


@dataclasses.dataclass(frozen=True)
class SagaPolicy:
    """Retry and lease settings of a saga. A service may subclass it with settings of its own steps."""

    step_max_attempts: int = 4
    # Also bounds the waits for a step's call still in progress elsewhere (SagaStep.waits), per run.
    compensation_max_attempts: int = 12
    initial_backoff_seconds: float = 0.2
    max_backoff_seconds: float = 10.0
    lease_seconds: float = 30.0
    recovery_batch_size: int = 50
    recovery_concurrency: int = 4

    def backoff(self, failures: int) -> float:
        """Exponential backoff with equal jitter, so that sagas failing together do not retry together."""
        base = min(self.max_backoff_seconds, self.initial_backoff_seconds * 2 ** max(0, failures - 1))
        return base / 2 + random.uniform(0, base / 2)


class LeaseLost(Exception):
    """The saga's lease is held by another runner, or its state changed under the caller: stop running it."""


@dataclasses.dataclass(frozen=True)
class Lease:
    owner: str
    expires_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class SagaCaller:
    """Identity, correlation id and W3C trace context (`traceparent`, `tracestate` as the headers spell them) of
    the call that started a saga, used again when the saga is resumed."""

    subject: str | None = None
    scopes: tuple[str, ...] = ()
    correlation_id: str | None = None
    traceparent: str | None = None
    tracestate: str | None = None


class StepFailure(Protocol):
    """What a saga records when a step failed for good: a reason (an ErrorReason name) and a message."""

    reason: str
    message: str


class StepFailed(Exception):
    """A step's call succeeded but its result makes the step fail (for example an expired reservation); `ids` are
    what the step learned all the same (given to SagaState.fail)."""

    def __init__(self, failure: StepFailure, **ids: str) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.ids = ids


@dataclasses.dataclass(frozen=True)
class Undo:
    """What a compensation found: whether it undid something, and ids it learned on the way."""

    undone: bool
    ids: Mapping[str, str] = dataclasses.field(default_factory=dict)


class StepRecord(Protocol):
    """A step's counters as the saga's state keeps them."""

    attempts: int
    compensation_attempts: int


class SagaState(Protocol):
    """What the runner needs from the aggregate that keeps a saga's state. Steps are named by whatever the state
    uses (an enum member); `status` and `current_step` are enum members, whose values the logs and the resume span
    show. Every transition is the aggregate's rule; the runner only decides when to make it."""

    id: str
    status: Any
    current_step: Any
    steps: Mapping[Any, StepRecord]

    @property
    def finished(self) -> bool:
        """Nothing is left to run or to compensate."""

    @property
    def compensating(self) -> bool:
        """The saga is undoing its steps (after a step failed, or because compensation was asked for)."""

    def next_step(self) -> Any | None: ...

    def start_step(self, step: Any, now: dt.datetime) -> None:
        """Counts an attempt of the step (before its call)."""

    def note_error(self, step: Any, error: str, now: dt.datetime, *, outcome_unknown: bool = False) -> None:
        """Records an error that will be retried."""

    def complete_step(self, step: Any, now: dt.datetime, **ids: str) -> None: ...

    def complete(self, now: dt.datetime) -> None:
        """The last step succeeded: the saga ends completed."""

    def fail(self, step: Any, failure: Any, now: dt.datetime, *, outcome_unknown: bool = False,
             **ids: str) -> None:
        """The step failed for good: compensation starts."""

    def next_compensation(self) -> Any | None:
        """The latest step still to undo, or None when compensation is done."""

    def start_compensation(self, step: Any, now: dt.datetime) -> None: ...

    def compensated(self, step: Any, now: dt.datetime, *, undone: bool, **ids: str) -> None: ...

    def compensation_failed(self, step: Any, error: str, now: dt.datetime) -> None:
        """The step's compensation was given up: an operator must look at it."""

    def finish_compensation(self, now: dt.datetime) -> Any:
        """Ends the saga once nothing is left to undo."""


S = TypeVar("S", bound=SagaState)


class SagaStore(Protocol[S]):
    """The persistence port of a saga (a service's repository implements it): the state, its lease and its caller.
    `save` writes the state fenced by the lease and by the state's version, and raises LeaseLost when either fence
    failed (in a unit of work's one_statement() block, its commit raises it)."""

    async def get(self, saga_id: str) -> S | None: ...

    async def save(self, state: S, lease: Lease, *, release: bool = False) -> None: ...

    async def acquire_lease(self, saga_id: str, lease: Lease, now: dt.datetime) -> bool:
        """Takes the lease when it is free, expired, or already lease.owner's."""

    async def renew_lease(self, saga_id: str, lease: Lease) -> bool: ...

    async def release_lease(self, saga_id: str, owner: str) -> None: ...

    async def release_leases(self, owner: str) -> int: ...

    async def claimable(self, now: dt.datetime, limit: int, after: BacklogKey | None = None) -> list[BacklogKey]:
        """(update_time, id) of at most `limit` unfinished sagas whose lease is free or expired, least recently
        changed first, from the one after `after`."""

    async def caller(self, saga_id: str) -> SagaCaller: ...


@dataclasses.dataclass
class LeaseRow:
    """A saga's lease and caller as an in-memory store keeps them."""

    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    caller: SagaCaller = SagaCaller()


class InMemorySagaLeases:
    """The lease and caller half of a SagaStore in memory, with the rules of the SQL stores: the in-memory
    repositories of unit tests extend it. `sagas` maps a saga's id to its LeaseRow."""

    def __init__(self) -> None:
        self.sagas: dict[str, LeaseRow] = {}

    def hold(self, saga_id: str, lease: Lease, caller: SagaCaller = SagaCaller()) -> None:
        """Records a new saga, leased to lease.owner."""
        self.sagas[saga_id] = LeaseRow(lease.owner, lease.expires_at, caller)

    def fence(self, saga_id: str, lease: Lease, same_version: bool, *, release: bool = False) -> None:
        """The fences of a save, `same_version` being the store's own check of the state's version: raises
        LeaseLost unless both hold; extends the lease to lease.expires_at, or with `release` frees it."""
        row = self.sagas.get(saga_id)
        if row is None or row.lease_owner != lease.owner or not same_version:
            raise LeaseLost(saga_id)
        row.lease_expires_at = lease.expires_at
        if release:
            row.lease_owner = row.lease_expires_at = None

    def free(self, saga_id: str, now: dt.datetime) -> bool:
        """Nobody holds the saga's lease, or it expired."""
        row = self.sagas[saga_id]
        return row.lease_owner is None or (row.lease_expires_at or now) < now

    async def acquire_lease(self, saga_id: str, lease: Lease, now: dt.datetime) -> bool:
        row = self.sagas.get(saga_id)
        if row is None:
            return False
        if row.lease_owner not in (None, lease.owner) and row.lease_expires_at is not None \
                and row.lease_expires_at >= now:
            return False
        row.lease_owner, row.lease_expires_at = lease.owner, lease.expires_at
        return True

    async def renew_lease(self, saga_id: str, lease: Lease) -> bool:
        row = self.sagas.get(saga_id)
        if row is None or row.lease_owner != lease.owner:
            return False
        row.lease_expires_at = lease.expires_at
        return True

    async def release_lease(self, saga_id: str, owner: str) -> None:
        row = self.sagas.get(saga_id)
        if row is not None and row.lease_owner == owner:
            row.lease_owner = row.lease_expires_at = None

    async def release_leases(self, owner: str) -> int:
        released = [row for row in self.sagas.values() if row.lease_owner == owner]
        for row in released:
            row.lease_owner = row.lease_expires_at = None
        return len(released)

    async def caller(self, saga_id: str) -> SagaCaller:
        row = self.sagas.get(saga_id)
        return SagaCaller() if row is None else row.caller


class SagaStep(abc.ABC, Generic[S]):
    """One step of a saga: its call (`execute`), its compensating call (`compensate`), and how its errors of the
    types in `errors` are judged. Any other exception stops the run ("interrupted"); the recovery resumes it, and
    passes it over visibly when that resumed run is interrupted too (see SagaRecovery)."""

    # How the saga's state names the step (an enum member); `label` is its text in logs, metrics and checkpoints.
    name: Hashable
    label: str
    errors: tuple[type[Exception], ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            cls.label = str(getattr(cls.name, "value", cls.name))

    @abc.abstractmethod
    async def execute(self, state: S) -> Mapping[str, str]:
        """Runs the step's call; returns the ids it learned (given to SagaState.complete_step). Raises StepFailed
        when the answer makes the step fail for good."""

    @abc.abstractmethod
    async def compensate(self, state: S) -> Undo:
        """Undoes what the step did (or, when its outcome is unknown, finds out and undoes what happened)."""

    @abc.abstractmethod
    def failure(self, err: Exception, state: S) -> tuple[StepFailure, bool]:
        """The failure to record when the step's call failed for good, and whether its outcome is unknown."""

    def waits(self, err: Exception) -> bool:
        """The same call is still in progress elsewhere: wait for it without counting an attempt."""
        return False

    def retryable(self, err: Exception) -> bool:
        return False

    def may_have_acted(self, err: Exception) -> bool:
        """The failed call may have had its effect after all: compensation must find out and undo it."""
        return False

    def compensation_retryable(self, err: Exception) -> bool:
        return self.retryable(err)

    def compensation_error(self, err: Exception) -> str:
        """The error recorded when the compensation was given up."""
        return str(err)

    def describe(self, err: Exception) -> str:
        """The error as logged and noted on a retry."""
        return repr(err)


class Saga(abc.ABC, Generic[S]):
    """A saga's definition: its steps in execution order (compensated in reverse), where its state is stored, and
    what the write that ends it adds (events) and counts (metrics, logs)."""

    aggregate: str  # the outbox aggregate_type of the saga's events
    noun: str  # what the saga's id names, in logs (`<noun>_id`) and span attributes (`tessera.<noun>_id`)
    resume_span: str
    recovery_name: str  # the recovery BacklogJob's name
    log: logging.Logger

    def __init__(self, steps: Sequence[SagaStep[S]]) -> None:
        self.steps = tuple(steps)
        self.step = {s.name: s for s in self.steps}
        self.last = self.steps[-1]

    @abc.abstractmethod
    def store(self, uow: Any) -> SagaStore[S]:
        """The saga's store in a unit of work."""

    def ending_events(self, state: S) -> Sequence[Message]:
        """The events written with the state that ended the saga (completed or compensated)."""
        return ()

    def ended(self, state: S) -> None:
        """Called once the write that ended the saga committed."""


@dataclasses.dataclass
class Execution:
    """A saga being driven by this process."""

    saga_id: str
    task: asyncio.Task[Any] | None = None
    # Set whenever a step or a compensation meets an error it will retry after a pause.
    retrying: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # The last call of the current step or compensation failed and waits to be retried: true from that error until
    # a call of the saga succeeds. A caller that waited for the saga (and cleared `retrying` when it began) tells a
    # dependency that keeps failing from one that is merely slow by it.
    failing: bool = False
    # The step whose attempt the last committed write already counted (the write that stored the saga, or that
    # completed the step before): its call runs at once, without another write of the same state.
    started: Hashable | None = None
    # The lease was freed by the write that ended the saga: nothing is left to release.
    released: bool = False

    def outcome(self) -> Any | None:
        """The state as the saga left it once it ended (as committed), or None while it runs or if it stopped
        without ending (lease lost, interrupted)."""
        task = self.task
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()


Checkpoint = Callable[[str], None]
UowFactory = Callable[[], Any]


def current_caller() -> SagaCaller:
    """The current call as a store keeps it: principal, correlation id, and the W3C trace context of the span
    current now (the request's server span), which a resumed saga's span continues."""
    principal = callctx.current_principal()
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)  # nothing when there is no valid span (tracing disabled)
    return SagaCaller(subject=principal.subject if principal else None,
                      scopes=tuple(sorted(principal.scopes)) if principal else (),
                      correlation_id=correlation_id_var.get(), traceparent=carrier.get("traceparent"),
                      tracestate=carrier.get("tracestate"))


def _stored_trace(caller: SagaCaller) -> otel_context.Context:
    """The context a resumed saga's span starts in: the stored request span as its remote parent, or an empty
    context (a new trace) when none was stored or it does not parse."""
    carrier = {k: v for k, v in (("traceparent", caller.traceparent), ("tracestate", caller.tracestate)) if v}
    return _W3C.extract(carrier, context=otel_context.Context())


class SagaRunner(Generic[S]):
    """Starts, resumes and fences the sagas of one definition in one process."""

    def __init__(self, saga: Saga[S], uow_factory: UowFactory, policy: SagaPolicy, *, owner: str | None = None,
                 clock: Callable[[], dt.datetime] = utcnow,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 checkpoint: Checkpoint | None = None) -> None:
        self.saga = saga
        self.uow = uow_factory
        self.policy = policy
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock = clock
        self.sleep = sleep
        # Fault injection: called with a name after each saga outcome is committed (a step's label when it ended,
        # `<label>_COMPENSATED` when its compensation did).
        self.checkpoint = checkpoint or (lambda _name: None)
        self.log = saga.log
        self._id = f"{saga.noun}_id"
        self._operator = f"compensation failed after all retries; the {saga.noun} needs an operator"
        self._running: dict[str, Execution] = {}
        self._recovery_slots = asyncio.Semaphore(policy.recovery_concurrency)
        self.recovery = SagaRecovery(self)

    # Leases.

    def new_lease(self) -> Lease:
        return Lease(self.owner, self.clock() + dt.timedelta(seconds=self.policy.lease_seconds))

    async def acquire(self, saga_id: str) -> bool:
        async with self.uow() as uow:
            acquired = await self.saga.store(uow).acquire_lease(saga_id, self.new_lease(), self.clock())
            await uow.commit()
        return acquired

    async def release(self, saga_id: str) -> None:
        async with self.uow() as uow:
            await self.saga.store(uow).release_lease(saga_id, self.owner)
            await uow.commit()

    async def _heartbeat(self, saga_id: str) -> None:
        """Keeps the lease while a step waits on a slow call; stops when the lease was taken over."""
        while True:
            await asyncio.sleep(self.policy.lease_seconds / 3)
            try:
                async with self.uow() as uow:
                    renewed = await self.saga.store(uow).renew_lease(saga_id, self.new_lease())
                    await uow.commit()
            except Exception as exc:  # the database hiccuped: try again at the next beat
                self.log.warning("saga lease not renewed: %r", exc, extra={self._id: saga_id})
                continue
            if not renewed:
                self.log.warning("saga lease lost", extra={self._id: saga_id})
                return

    # Running.

    def running(self, saga_id: str) -> Execution | None:
        execution = self._running.get(saga_id)
        return execution if execution is not None and execution.task is not None \
            and not execution.task.done() else None

    def run(self, saga_id: str, *, leased: bool, caller: SagaCaller | None = None, recovery: bool = False,
            state: S | None = None, started: Hashable | None = None) -> Execution:
        """Drives the saga in a task of its own, so that it ends even when the caller gives up. Without `caller`
        the task keeps the current call's identity, ids, canary flag and span; with it (a resumed saga) it takes
        them from the call that started the saga, but for the canary flag, which the store does not keep, and runs
        in the definition's resume span continuing that call's trace (see the module docstring). Either way it does
        not inherit the current call's deadline.

        A caller holding the lease may hand over `state` as it just committed it (the saga then does not read it
        again; the task owns it from now on), and `started`, the step whose attempt that commit counted. With
        `recovery` (from resume(), which took one of the recovery's slots) the task frees that slot when it ends."""
        existing = self.running(saga_id)
        if existing is not None:
            return existing
        execution = Execution(saga_id, started=started)
        context = contextvars.copy_context()
        context.run(_prepare_context, caller)
        execution.task = asyncio.get_running_loop().create_task(
            self._drive(execution, leased=leased, recovery=recovery, state=state, caller=caller),
            name=f"saga-{saga_id}", context=context)
        self._running[saga_id] = execution
        execution.task.add_done_callback(lambda _t: self._forget(execution))
        if recovery:  # the slot resume() took is freed when the task ends, however it ends
            execution.task.add_done_callback(lambda _t: self._recovery_slots.release())
        return execution

    def _forget(self, execution: Execution) -> None:
        if self._running.get(execution.saga_id) is execution:
            del self._running[execution.saga_id]

    async def _drive(self, execution: Execution, *, leased: bool, recovery: bool, state: S | None = None,
                     caller: SagaCaller | None = None) -> S | None:
        # The lease is taken before the span starts: a runner that loses the race adds nothing to the trace.
        if not leased and not await self.acquire(execution.saga_id):
            return None
        if caller is None:
            return await self._drive_leased(execution, recovery=recovery, state=state)
        with self._resume_span(execution.saga_id, caller) as span:
            return await self._drive_leased(execution, recovery=recovery, state=state, span=span)

    @contextlib.contextmanager
    def _resume_span(self, saga_id: str, caller: SagaCaller) -> Iterator[trace.Span]:
        """The span of a resumed saga's work, current while it runs: a child of the stored request span. It ends
        with the saga's outcome; a stop (cancellation) is not an error of the saga, so exceptions are not turned
        into an error status here: `_drive_leased` marks the failures that are."""
        attributes = {f"tessera.{self._id}": saga_id, "tessera.saga.runner": self.owner}
        if (request_id := request_id_var.get()) is not None:
            attributes["tessera.request_id"] = request_id
        if (correlation_id := correlation_id_var.get()) is not None:
            attributes["tessera.correlation_id"] = correlation_id
        with tracer().start_as_current_span(self.saga.resume_span, context=_stored_trace(caller),
                                            kind=SpanKind.INTERNAL, attributes=attributes, record_exception=False,
                                            set_status_on_exception=False) as span:
            yield span

    async def _drive_leased(self, execution: Execution, *, recovery: bool, state: S | None = None,
                            span: trace.Span | None = None) -> S | None:
        """Runs the saga whose lease this runner holds until it ends or stops; frees the lease unless the write
        that ended the saga did. `span`, the resume span, gets the state resumed from and the outcome."""
        saga_id = execution.saga_id
        outcome = "stopped"
        heartbeat = asyncio.create_task(self._heartbeat(saga_id), name=f"saga-heartbeat-{saga_id}")
        try:
            if state is None:
                async with self.uow() as uow:
                    state = await self.saga.store(uow).get(saga_id)
            if state is None:
                return None
            if span is not None:
                span.set_attributes({"tessera.saga.resumed_status": state.status.value,
                                     "tessera.saga.resumed_step": state.current_step.value})
            if recovery and not state.finished:
                self.log.info("resuming saga", extra={self._id: saga_id, "status": state.status.value,
                                                      "step": state.current_step.value})
            while not state.finished:
                if state.compensating:
                    await self._backward(state, execution)
                else:
                    await self._forward(state, execution)
            outcome = state.status.value
            return state
        except LeaseLost:
            outcome = "lease_lost"
            self.log.warning("saga taken over by another runner", extra={self._id: saga_id})
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The lease is freed below and the recovery loop resumes the saga from its last committed state.
            outcome = "interrupted"
            if span is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, "saga interrupted by an unexpected error"))
            if recovery and not database_unavailable(exc):
                # Resumed by the recovery and interrupted again by something of its own (its rows edited by hand
                # into a state a step cannot handle, a defect): most likely it fails the same way every round, so
                # it is counted and logged as the recovery's other poison rows are, for an operator to alert on.
                self.recovery.pass_over(saga_id, "the saga was interrupted by an unexpected error",
                                        **{self._id: saga_id})
            else:
                self.log.exception("saga interrupted by an unexpected error", extra={self._id: saga_id})
            return None
        finally:
            if span is not None:
                span.set_attribute("tessera.saga.outcome", outcome)
            await cancel(heartbeat)
            if not execution.released:
                with contextlib.suppress(Exception):
                    await self.release(saga_id)

    async def _save(self, state: S, *events: Message, ending: Execution | None = None) -> None:
        """Commits the saga's state with its events (on PostgreSQL one statement, the events written only if the
        lease and version fences held). Given `ending`, the execution whose saga this write ends, the same write
        frees the lease."""
        async with self.uow().one_statement() as uow:
            await self.saga.store(uow).save(state, self.new_lease(), release=ending is not None)
            for event in events:
                uow.add_event(self.saga.aggregate, state.id, event)
            await uow.commit()
        if ending is not None:
            ending.released = True

    # Forward.

    async def _forward(self, state: S, execution: Execution) -> None:
        name = state.next_step()
        assert name is not None, "a saga running forward always has a step to run"
        step = self.saga.step[name]
        # An attempt that the last commit counted for this very run has not been made yet.
        started = execution.started == name
        execution.started = None
        attempts_left = max(1, self.policy.step_max_attempts - state.steps[name].attempts + int(started))
        waits = 0
        while True:
            if not started:
                state.start_step(name, self.clock())
                await self._save(state)
            started = False
            try:
                ids = await step.execute(state)
            except StepFailed as failed:
                await self._fail(state, step, failed.failure, outcome_unknown=False, **failed.ids)
                return
            except step.errors as err:
                if step.waits(err) and waits < self.policy.compensation_max_attempts:
                    # The same call is still running (for example started before a restart): waiting for it is
                    # not an attempt. The next call asks for the outcome of the attempt already counted, so it is
                    # not counted (nor stored) either: a saga resumed after a crash during the wait still has its
                    # attempts for real failures. The wait is bounded like a compensation, per run; a crash starts
                    # a new run with a counted call.
                    waits += 1
                    delay = self.policy.backoff(waits)
                    started = True
                else:
                    attempts_left -= 1
                    if attempts_left <= 0 or not step.retryable(err):
                        failure, unknown = step.failure(err, state)
                        await self._fail(state, step, failure, outcome_unknown=unknown)
                        return
                    delay = self.policy.backoff(state.steps[name].attempts)
                self.log.info("saga step will be retried", extra={
                    self._id: state.id, "step": step.label, "error": step.describe(err)})
                # Noted with the error, so that a later refusal, or a crash, cannot make the saga forget it.
                state.note_error(name, step.describe(err), self.clock(), outcome_unknown=step.may_have_acted(err))
                await self._save(state)
                execution.failing = True
                execution.retrying.set()
                await self.sleep(delay)
                continue
            execution.failing = False
            if step is self.saga.last:
                state.complete(self.clock())
                await self._save(state, *self.saga.ending_events(state), ending=execution)
                self.saga.ended(state)
            else:
                now = self.clock()
                state.complete_step(name, now, **ids)
                following = state.next_step()
                if following is not None:
                    # The next step's attempt is counted in the same commit, before its call as always: one
                    # write per step instead of two.
                    state.start_step(following, now)
                    execution.started = following
                await self._save(state)
            self.checkpoint(step.label)
            return

    async def _fail(self, state: S, step: SagaStep[S], failure: StepFailure, *, outcome_unknown: bool,
                    **ids: str) -> None:
        state.fail(step.name, failure, self.clock(), outcome_unknown=outcome_unknown, **ids)
        await self._save(state)
        self.log.warning("saga step failed; compensating", extra={
            self._id: state.id, "step": step.label, "reason": failure.reason, "outcome_unknown": outcome_unknown})
        self.checkpoint(step.label)

    # Compensation.

    async def _backward(self, state: S, execution: Execution) -> None:
        name = state.next_compensation()
        if name is None:
            await self._finish(state, execution)
            return
        step = self.saga.step[name]
        attempts_left = max(1, self.policy.compensation_max_attempts - state.steps[name].compensation_attempts)
        for attempt in range(attempts_left):
            state.start_compensation(name, self.clock())
            await self._save(state)
            try:
                undo = await step.compensate(state)
            except step.errors as err:
                if attempt < attempts_left - 1 and step.compensation_retryable(err):
                    self.log.info("compensation will be retried", extra={
                        self._id: state.id, "step": step.label, "error": step.describe(err)})
                    state.note_error(name, step.describe(err), self.clock())
                    await self._save(state)
                    execution.failing = True
                    execution.retrying.set()
                    await self.sleep(self.policy.backoff(state.steps[name].compensation_attempts))
                    continue
                state.compensation_failed(name, step.compensation_error(err), self.clock())
                await self._save(state)
                metrics.SAGA_COMPENSATION_FAILURES.labels(step.label).inc()
                self.log.error(self._operator, extra={
                    self._id: state.id, "step": step.label, "error": step.describe(err),
                    "attempts": state.steps[name].compensation_attempts})
                self.checkpoint(f"{step.label}_COMPENSATED")
                return
            execution.failing = False
            state.compensated(name, self.clock(), undone=undo.undone, **undo.ids)
            await self._save(state)
            self.checkpoint(f"{step.label}_COMPENSATED")
            return

    async def _finish(self, state: S, execution: Execution) -> None:
        state.finish_compensation(self.clock())
        await self._save(state, *self.saga.ending_events(state), ending=execution)
        self.saga.ended(state)

    # Recovery.

    async def recoverable(self, after: BacklogKey | None, limit: int) -> list[BacklogKey]:
        """(update_time, id) of at most `limit` unfinished sagas nobody runs (free or expired lease), least recently
        changed first, from the one after `after`."""
        async with self.uow() as uow:
            return await self.saga.store(uow).claimable(self.clock(), limit, after)

    async def resume(self, saga_id: str) -> bool:
        """Starts resuming a saga nobody runs, as the caller that started it, once one of the recovery's
        `recovery_concurrency` slots is free: so a long backlog waits here, not in as many tasks. False if this
        process runs the saga already. Raises if the saga's state cannot be read (edited by hand into a state the
        saga cannot load): the recovery passes it over (BacklogJob) rather than a task failing on it unseen."""
        if self.running(saga_id) is not None:
            return False
        async with self.uow() as uow:
            store = self.saga.store(uow)
            caller = await store.caller(saga_id)
            await store.get(saga_id)
        await self._recovery_slots.acquire()
        if self.running(saga_id) is not None:
            self._recovery_slots.release()
            return False
        self.run(saga_id, leased=False, caller=caller, recovery=True)
        return True

    async def recover_once(self) -> int:
        """One batch of the recovery (see SagaRecovery); returns how many sagas were due."""
        return await self.recovery.run_once()

    def start_recovery(self, interval: float) -> None:
        """Resumes unfinished sagas now and then every `interval` seconds, in the background."""
        self.recovery.interval = interval
        self.recovery.start()

    async def stop(self) -> None:
        """Stops recovery and every running saga, and frees their leases so a restart resumes them at once."""
        await self.recovery.stop()
        tasks = [t for t in (e.task for e in self._running.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        async with self.uow() as uow:
            released = await self.saga.store(uow).release_leases(self.owner)
            await uow.commit()
        if released:
            self.log.info("saga leases released", extra={"count": released})

    # Waiting for outcomes.

    async def wait(self, execution: Execution, timeout: float | None, *, until_retry: bool = False) -> None:
        """Waits until the saga ends, or (with until_retry) meets an error it retries later, or timeout."""
        assert execution.task is not None
        waiters: set[asyncio.Future] = {execution.task}
        retry_waiter = None
        if until_retry:
            execution.retrying.clear()  # only a retry met from now on ends this wait
            retry_waiter = asyncio.ensure_future(execution.retrying.wait())
            waiters.add(retry_waiter)
        try:
            await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if retry_waiter is not None:
                retry_waiter.cancel()

    async def poll(self, saga_id: str, timeout: float | None, interval: float = 0.2) -> S | None:
        """Waits until a saga run by another process ends, reading its state, or timeout; returns the state as last
        read (None if it was not read)."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        state = None
        while deadline is None or asyncio.get_running_loop().time() < deadline:
            async with self.uow() as uow:
                state = await self.saga.store(uow).get(saga_id)
            if state is None or state.finished:
                return state
            await asyncio.sleep(interval)
        return state


class SagaRecovery(BacklogJob):
    """Resumes the unfinished sagas nobody runs (a crashed process's, or a runner's that stopped renewing its
    lease), `recovery_batch_size` at a time, at most `recovery_concurrency` of them running at once. One that cannot
    be resumed (its rows edited by hand so that they cannot be read, say) is logged with its id and passed over
    until the next round (see BacklogJob): the sagas behind it are still resumed. So is one that loads but whose
    resumed run is interrupted by an unexpected error (rows edited into a state a step cannot handle, a defect): its
    task, which runs beside the round, logs and counts it the same way (BacklogJob.pass_over) and frees its lease,
    and the next round tries it again from its last committed state, so it is resumed once repaired. A resumed run
    that the database being unavailable interrupts is not passed over: it is logged as interrupted. Several
    processes may recover one database: the lease admits one runner per saga. Its job name is the definition's
    `recovery_name`."""

    def __init__(self, sagas: SagaRunner[Any], interval: float = 5.0) -> None:
        self.name = sagas.saga.recovery_name
        super().__init__(interval, sagas.policy.recovery_batch_size)
        self.sagas = sagas

    async def due(self, after: BacklogKey | None, limit: int) -> list[BacklogKey]:
        return await self.sagas.recoverable(after, limit)

    async def handle(self, item_id: str) -> bool:
        return await self.sagas.resume(item_id)


def _prepare_context(caller: SagaCaller | None) -> None:
    """Runs inside the saga task's context copy before the task starts."""
    callctx.deadline_var.set(None)
    if caller is None:
        return
    # The store keeps no canary flag: a resumed saga's calls go to each service by its canary weights alone.
    callctx.canary_var.set(False)
    principal = None
    if caller.subject:
        principal = callctx.Principal(subject=caller.subject, scopes=frozenset(caller.scopes))
    callctx.principal_var.set(principal)
    request_id_var.set(uuid.uuid4().hex)
    correlation_id_var.set(caller.correlation_id or request_id_var.get())
