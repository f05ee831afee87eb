"""The order placement saga: runs an order's steps forward and compensates them in reverse, persisting each move.

Every transition is written with the order row, its saga rows and its events in one transaction, fenced by
the saga's lease (see adapters/repository.py). Steps are safe to repeat because every mutating call carries an
idempotency key derived from the order id, so a saga interrupted anywhere, by a crash or a lost lease, is
resumed by simply running its current step again.

A saga resumed by the recovery loop (after a crash, or a runner that stopped renewing its lease) runs as the caller
whose CreateOrder started it: the saga row keeps that call's principal, correlation id and W3C trace context
(`SagaCaller`, stored with the order), and `run(..., caller=...)` restores them. The resumed work is one INTERNAL
span, `resume order saga`, that is a CHILD of that CreateOrder's server span, so its database statements, its calls
to the other services and the events it writes (whose publish spans are children of it) are in the request's
trace, and its log lines carry the request's correlation id. A child, not a new root linked to the request as a
message consumer's span is (tessera_runtime/telemetry.py), because a resumed saga is not a new unit of work: it
is the rest of the one the request started, whose outcome is the request's answer (a retry with the same
request_id returns it). Even without a crash the saga outlives the request's answer in a task of its own and its
spans are children of the request's; a crash changes who runs the rest, not what it is. Nor can it mix duplicates
into the trace as a redelivered message would: the lease admits one runner at a time, each going on from the last
committed state, and a step repeated after the crash is the same step's retry, as it would be in-process. As a
child it also keeps the request's sampling decision, so a sampled request's saga is recorded to its end and an
unsampled one is not recorded in half. The price is a trace that may stretch over the time the saga waited (a
lease to expire, a service to restart): the resume span's own start time and attributes (`tessera.saga.runner`,
the status and step it resumed from) show where the gap was. A cancellation's compensation resumed after a crash
continues the CreateOrder's trace too: the saga row keeps one caller, the one that placed the order. A saga
stored without a trace context (before migration 0002, or with tracing disabled) resumes in a new trace, as before.
"""

from __future__ import annotations

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
from collections.abc import Awaitable, Callable, Iterator

import grpc
from google.protobuf.message import Message
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tessera_order import mapping
from tessera_order.adapters.repository import Lease, LeaseLost, SagaCaller
from tessera_order.domain.model import Failure, Order, OrderStatus, StepName, StepStatus
from tessera_order.service_layer.ports import Downstream, DownstreamError, Inventory, Payments
from tessera_runtime import context as callctx
from tessera_runtime import metrics
from tessera_runtime.db import utcnow
from tessera_runtime.logs import correlation_id_var, request_id_var
from tessera_runtime.periodic import BacklogJob, BacklogKey
from tessera_runtime.telemetry import tracer

log = logging.getLogger("tessera.order.saga")

AGGREGATE = "order"
RESUME_SPAN = "resume order saga"
# The saga row keeps the trace context in the W3C format whatever OTEL_PROPAGATORS says: it is a stored value that a
# later process reads back, not a header for whoever listens.
_W3C = TraceContextTextMapPropagator()
# The payment service's answer while another call with the same idempotency key is still charging.
_IN_PROGRESS = "PAYMENT_IN_PROGRESS"
# The payment service's answer to VoidPayment when the key's payment took money (SUCCEEDED or REFUNDED).
_NOT_VOIDABLE = "PAYMENT_NOT_VOIDABLE"
# The prefix of the inventory's ReservationStatus names, as RESERVATION_EXPIRED's metadata gives them.
RESERVATION_STATUS = "RESERVATION_STATUS_"
MAX_RELEASE_REASON = 500


def payment_key(order_id: str) -> str:
    """Idempotency key of the order's payment: one charge per order, however often the step is repeated."""
    return f"order:{order_id}"


def refund_key(order_id: str) -> str:
    return f"order:{order_id}:refund"


@dataclasses.dataclass(frozen=True)
class SagaPolicy:
    """Retry and lease settings of the saga."""

    step_max_attempts: int = 4
    compensation_max_attempts: int = 12
    initial_backoff_seconds: float = 0.2
    max_backoff_seconds: float = 10.0
    reservation_ttl_seconds: int = 900
    lease_seconds: float = 30.0
    recovery_batch_size: int = 50
    recovery_concurrency: int = 4

    def backoff(self, failures: int) -> float:
        """Exponential backoff with equal jitter, so that sagas failing together do not retry together."""
        base = min(self.max_backoff_seconds, self.initial_backoff_seconds * 2 ** max(0, failures - 1))
        return base / 2 + random.uniform(0, base / 2)


class StepFailed(Exception):
    """A step's call succeeded but its result makes the step fail (for example an expired reservation)."""

    def __init__(self, failure: Failure, **ids: str) -> None:
        super().__init__(failure.message)
        self.failure = failure
        self.ids = ids


@dataclasses.dataclass(frozen=True)
class Undo:
    """What a compensation found: whether it undid something, and ids it learned on the way."""

    undone: bool
    payment_id: str = ""


@dataclasses.dataclass
class Execution:
    """A saga being driven by this process."""

    order_id: str
    task: asyncio.Task[Order | None] | None = None
    # Set whenever a step or a compensation meets an error it will retry after a pause.
    retrying: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)
    # The step whose attempt the last committed write already counted (the write that stored the order, or that
    # completed the step before): its call runs at once, without another write of the same state.
    started: StepName | None = None
    # The lease was freed by the write that ended the saga: nothing is left to release.
    released: bool = False

    def outcome(self) -> Order | None:
        """The order as the saga left it once it ended (as committed), or None while it runs or if it stopped
        without ending (lease lost, interrupted)."""
        task = self.task
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()


Checkpoint = Callable[[str], None]
UowFactory = Callable[[], object]


def current_caller() -> SagaCaller:
    """The current call as a saga row stores it: principal, correlation id, and the W3C trace context of the span
    current now (CreateOrder's server span), which a resumed saga's span continues."""
    principal = callctx.current_principal()
    carrier: dict[str, str] = {}
    _W3C.inject(carrier)  # nothing when there is no valid span (tracing disabled)
    return SagaCaller(subject=principal.subject if principal else None,
                      scopes=tuple(sorted(principal.scopes)) if principal else (),
                      correlation_id=correlation_id_var.get(), traceparent=carrier.get("traceparent"),
                      tracestate=carrier.get("tracestate"))


def _stored_trace(caller: SagaCaller) -> otel_context.Context:
    """The context a resumed saga's span starts in: the stored CreateOrder span as its remote parent, or an empty
    context (a new trace) when none was stored or it does not parse."""
    carrier = {k: v for k, v in (("traceparent", caller.traceparent), ("tracestate", caller.tracestate)) if v}
    return _W3C.extract(carrier, context=otel_context.Context())


def _pick(metadata: dict[str, str], *keys: str) -> dict[str, str]:
    return {k: metadata[k] for k in keys if k in metadata}


class SagaCoordinator:
    """Starts, resumes and fences the sagas of one order-service process."""

    def __init__(self, uow_factory: UowFactory, downstream: Downstream, policy: SagaPolicy, *,
                 owner: str | None = None, clock: Callable[[], dt.datetime] = utcnow,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 checkpoint: Checkpoint | None = None) -> None:
        self.uow = uow_factory
        self.downstream = downstream
        self.policy = policy
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.clock = clock
        self.sleep = sleep
        # Fault injection (OrderSettings.crash_after_step): called with a name after each saga outcome is committed.
        self.checkpoint = checkpoint or (lambda _name: None)
        self._running: dict[str, Execution] = {}
        self._recovery_slots = asyncio.Semaphore(policy.recovery_concurrency)
        self.recovery = SagaRecovery(self)

    # Leases.

    def new_lease(self) -> Lease:
        return Lease(self.owner, self.clock() + dt.timedelta(seconds=self.policy.lease_seconds))

    async def acquire(self, order_id: str) -> bool:
        async with self.uow() as uow:
            acquired = await uow.orders.acquire_lease(order_id, self.new_lease(), self.clock())
            await uow.commit()
        return acquired

    async def release(self, order_id: str) -> None:
        async with self.uow() as uow:
            await uow.orders.release_lease(order_id, self.owner)
            await uow.commit()

    async def _heartbeat(self, order_id: str) -> None:
        """Keeps the lease while a step waits on a slow call; stops when the lease was taken over."""
        while True:
            await asyncio.sleep(self.policy.lease_seconds / 3)
            try:
                async with self.uow() as uow:
                    renewed = await uow.orders.renew_lease(order_id, self.new_lease())
                    await uow.commit()
            except Exception as exc:  # the database hiccuped: try again at the next beat
                log.warning("saga lease not renewed: %r", exc, extra={"order_id": order_id})
                continue
            if not renewed:
                log.warning("saga lease lost", extra={"order_id": order_id})
                return

    # Running.

    def running(self, order_id: str) -> Execution | None:
        execution = self._running.get(order_id)
        return execution if execution is not None and execution.task is not None \
            and not execution.task.done() else None

    def run(self, order_id: str, *, leased: bool, caller: SagaCaller | None = None, recovery: bool = False,
            order: Order | None = None, started: StepName | None = None) -> Execution:
        """Drives the order's saga in a task of its own, so that it ends even when the caller gives up. Without
        `caller` the task keeps the current call's identity, ids and span; with it (a resumed saga) it takes them
        from the call that started the saga, and runs in a `resume order saga` span continuing that call's trace
        (see the module docstring). Either way it does not inherit the current call's deadline.

        A caller holding the lease may hand over `order` as it just committed it (the saga then does not read it
        again; the task owns it from now on), and `started`, the step whose attempt that commit counted. With
        `recovery` (from resume(), which took one of the recovery's slots) the task frees that slot when it ends."""
        existing = self.running(order_id)
        if existing is not None:
            return existing
        execution = Execution(order_id, started=started)
        context = contextvars.copy_context()
        context.run(_prepare_context, caller)
        execution.task = asyncio.get_running_loop().create_task(
            self._drive(execution, leased=leased, recovery=recovery, order=order, caller=caller),
            name=f"saga-{order_id}", context=context)
        self._running[order_id] = execution
        execution.task.add_done_callback(lambda _t: self._forget(execution))
        if recovery:  # the slot resume() took is freed when the task ends, however it ends
            execution.task.add_done_callback(lambda _t: self._recovery_slots.release())
        return execution

    def _forget(self, execution: Execution) -> None:
        if self._running.get(execution.order_id) is execution:
            del self._running[execution.order_id]

    async def _drive(self, execution: Execution, *, leased: bool, recovery: bool, order: Order | None = None,
                     caller: SagaCaller | None = None) -> Order | None:
        # The lease is taken before the span starts: a runner that loses the race adds nothing to the trace.
        if not leased and not await self.acquire(execution.order_id):
            return None
        if caller is None:
            return await self._drive_leased(execution, recovery=recovery, order=order)
        with self._resume_span(execution.order_id, caller) as span:
            return await self._drive_leased(execution, recovery=recovery, order=order, span=span)

    @contextlib.contextmanager
    def _resume_span(self, order_id: str, caller: SagaCaller) -> Iterator[trace.Span]:
        """The span of a resumed saga's work, current while it runs: a child of the stored CreateOrder span. It
        ends with the saga's outcome; a stop (cancellation) is not an error of the saga, so exceptions are not
        turned into an error status here: `_drive_leased` marks the failures that are."""
        attributes = {"tessera.order_id": order_id, "tessera.saga.runner": self.owner}
        if (request_id := request_id_var.get()) is not None:
            attributes["tessera.request_id"] = request_id
        if (correlation_id := correlation_id_var.get()) is not None:
            attributes["tessera.correlation_id"] = correlation_id
        with tracer().start_as_current_span(RESUME_SPAN, context=_stored_trace(caller), kind=SpanKind.INTERNAL,
                                            attributes=attributes, record_exception=False,
                                            set_status_on_exception=False) as span:
            yield span

    async def _drive_leased(self, execution: Execution, *, recovery: bool, order: Order | None = None,
                            span: trace.Span | None = None) -> Order | None:
        """Runs the saga whose lease this runner holds until it ends or stops; frees the lease unless the write
        that ended the saga did. `span`, the resume span, gets the state resumed from and the outcome."""
        order_id = execution.order_id
        outcome = "stopped"
        heartbeat = asyncio.create_task(self._heartbeat(order_id), name=f"saga-heartbeat-{order_id}")
        try:
            if order is None:
                async with self.uow() as uow:
                    order = await uow.orders.get(order_id)
            if order is None:
                return None
            if span is not None:
                span.set_attributes({"tessera.saga.resumed_status": order.status.value,
                                     "tessera.saga.resumed_step": order.current_step.value})
            if recovery and not order.finished:
                log.info("resuming saga", extra={"order_id": order_id, "status": order.status.value,
                                                 "step": order.current_step.value})
            while not order.finished:
                if order.status is OrderStatus.PENDING:
                    await self._forward(order, execution)
                else:
                    await self._backward(order, execution)
            outcome = order.status.value
            return order
        except LeaseLost:
            outcome = "lease_lost"
            log.warning("saga taken over by another runner", extra={"order_id": order_id})
            return None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The lease is freed below and the recovery loop resumes the saga from its last committed state.
            outcome = "interrupted"
            if span is not None:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, "saga interrupted by an unexpected error"))
            log.exception("saga interrupted by an unexpected error", extra={"order_id": order_id})
            return None
        finally:
            if span is not None:
                span.set_attribute("tessera.saga.outcome", outcome)
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            if not execution.released:
                with contextlib.suppress(Exception):
                    await self.release(order_id)

    async def _save(self, order: Order, *events: Message, ending: Execution | None = None) -> None:
        """Commits the order's state with its events (on PostgreSQL one statement, the events written only if the
        lease and version fences held). Given `ending`, the execution whose saga this write ends, the same write
        frees the lease."""
        async with self.uow().one_statement() as uow:
            await uow.orders.save(order, self.new_lease(), release=ending is not None)
            for event in events:
                uow.add_event(AGGREGATE, order.id, event)
            await uow.commit()
        if ending is not None:
            ending.released = True

    # Forward.

    async def _forward(self, order: Order, execution: Execution) -> None:
        step = order.next_step()
        assert step is not None, "a PENDING order always has a step to run"
        # An attempt that the last commit counted for this very run has not been made yet.
        started = execution.started is step
        execution.started = None
        attempts_left = max(1, self.policy.step_max_attempts - order.steps[step].attempts + int(started))
        waits = 0
        while True:
            if not started:
                order.start_step(step, self.clock())
                await self._save(order)
            started = False
            try:
                ids = await self._execute(step, order)
            except StepFailed as failed:
                await self._fail(order, step, failed.failure, outcome_unknown=False, **failed.ids)
                return
            except DownstreamError as err:
                if err.reason == _IN_PROGRESS and waits < self.policy.compensation_max_attempts:
                    # The same charge is still running (for example started before a restart): waiting for it
                    # is not an attempt. The next call asks for the outcome of the attempt already counted, so it
                    # is not counted (nor stored) either: a saga resumed after a crash during the wait still has
                    # its attempts for real failures. The wait is bounded like a compensation, per run; a crash
                    # starts a new run with a counted call.
                    waits += 1
                    delay = self.policy.backoff(waits)
                    started = True
                else:
                    attempts_left -= 1
                    if attempts_left <= 0 or not self._retryable(step, err):
                        failure, unknown = self._failure(step, err, order)
                        await self._fail(order, step, failure, outcome_unknown=unknown or _may_charge_later(step, err))
                        return
                    delay = self.policy.backoff(order.steps[step].attempts)
                log.info("saga step will be retried", extra={
                    "order_id": order.id, "step": step.value, "error": err.describe()})
                # Noted with the error, so that a later refusal, or a crash, cannot make the saga forget it.
                order.note_error(step, err.describe(), self.clock(), outcome_unknown=_may_have_acted(err))
                await self._save(order)
                execution.retrying.set()
                await self.sleep(delay)
                continue
            if step is StepName.CONFIRM_ORDER:
                order.confirm(self.clock())
                await self._save(order, mapping.order_confirmed(order), ending=execution)
                metrics.ORDERS_CONFIRMED.inc()
                metrics.SAGA_DURATION.labels("confirmed").observe(_age(order))
                log.info("order confirmed", extra={"order_id": order.id})
            else:
                now = self.clock()
                order.complete_step(step, now, **ids)
                following = order.next_step()
                if following is not None:
                    # The next step's attempt is counted in the same commit, before its call as always: one
                    # write per step instead of two.
                    order.start_step(following, now)
                    execution.started = following
                await self._save(order)
            self.checkpoint(step.value)
            return

    async def _fail(self, order: Order, step: StepName, failure: Failure, *, outcome_unknown: bool,
                    reservation_id: str = "") -> None:
        order.fail(step, failure, self.clock(), outcome_unknown=outcome_unknown, reservation_id=reservation_id)
        await self._save(order)
        log.warning("saga step failed; compensating", extra={
            "order_id": order.id, "step": step.value, "reason": failure.reason, "outcome_unknown": outcome_unknown})
        self.checkpoint(step.value)

    async def _execute(self, step: StepName, order: Order) -> dict[str, str]:
        if step is StepName.RESERVE_STOCK:
            reservation = await self.downstream.inventory.reserve_stock(
                order.id, [(i.product_id, i.quantity) for i in order.items], self.policy.reservation_ttl_seconds)
            if reservation.status != "ACTIVE":
                # A repeat after a long pause found the reservation no longer holding the stock.
                raise StepFailed(_reservation_lost(step, reservation.id, reservation.status),
                                 reservation_id=reservation.id)
            return {"reservation_id": reservation.id}
        if step is StepName.PROCESS_PAYMENT:
            payment = await self.downstream.payments.process_payment(
                order_id=order.id, customer_id=order.customer_id, amount_minor=order.total_minor,
                currency_code=order.currency_code, payment_method=order.payment_method,
                idempotency_key=payment_key(order.id))
            if payment.status != "SUCCEEDED":
                raise StepFailed(Failure("PAYMENT_FAILED", f"the payment is {payment.status.lower()}", step,
                                         {"payment_id": payment.id}))
            return {"payment_id": payment.id}
        if step is StepName.CONFIRM_ORDER:
            reservation = await self.downstream.inventory.commit_reservation(order.reservation_id)
            if reservation.status != "COMMITTED":
                raise StepFailed(_reservation_lost(step, reservation.id, reservation.status))
            return {}
        raise AssertionError(f"{step.value} runs before the order is stored")

    @staticmethod
    def _retryable(step: StepName, err: DownstreamError) -> bool:
        if step is StepName.PROCESS_PAYMENT:
            # A charge that timed out is not repeated: the order fails with PAYMENT_TIMEOUT and compensation
            # finds out whether money was taken after all.
            return err.transient
        return err.transient or err.outcome_unknown

    @staticmethod
    def _failure(step: StepName, err: DownstreamError, order: Order) -> tuple[Failure, bool]:
        """The order's failure for a step whose call failed for good, and whether its outcome is unknown."""
        md = err.metadata
        if err.answered:
            if err.reason == "INSUFFICIENT_STOCK":
                return Failure("INSUFFICIENT_STOCK", err.message, step,
                               _pick(md, "product_id", "sku", "requested", "available")), False
            if err.reason == "PRODUCT_NOT_FOUND":
                return Failure("PRODUCT_NOT_FOUND", err.message, step, _pick(md, "product_id")), False
            if err.reason == "PAYMENT_DECLINED":
                return Failure("PAYMENT_DECLINED", err.message, step,
                               _pick(md, "payment_id", "decline_code")), False
            if err.reason == "PAYMENT_FAILED":
                return Failure("PAYMENT_FAILED", err.message, step, _pick(md, "payment_id")), False
            if err.reason in ("RESERVATION_EXPIRED", "RESERVATION_NOT_ACTIVE", "RESERVATION_NOT_FOUND"):
                return _reservation_lost(step, order.reservation_id, md.get("status", "EXPIRED")), False
            if err.reason == "PERMISSION_DENIED":
                return Failure("PERMISSION_DENIED", err.message, step), False
        if step is StepName.PROCESS_PAYMENT and err.code is grpc.StatusCode.DEADLINE_EXCEEDED:
            return Failure("PAYMENT_TIMEOUT", "the payment service did not answer in time", step,
                           _pick(md, "payment_id")), True
        metadata = {"service": err.service}
        if err.answered:
            metadata["downstream_reason"] = err.reason
        return Failure("DEPENDENCY_UNAVAILABLE", f"the {err.service} service could not complete the request",
                       step, metadata), _may_have_acted(err)

    # Compensation.

    async def _backward(self, order: Order, execution: Execution) -> None:
        step = order.next_compensation()
        if step is None:
            await self._finish(order, execution)
            return
        attempts_left = max(1, self.policy.compensation_max_attempts - order.steps[step].compensation_attempts)
        for attempt in range(attempts_left):
            order.start_compensation(step, self.clock())
            await self._save(order)
            try:
                undo = await self._undo(step, order)
            except DownstreamError as err:
                if attempt < attempts_left - 1 and (err.transient or err.outcome_unknown):
                    log.info("compensation will be retried", extra={
                        "order_id": order.id, "step": step.value, "error": err.describe()})
                    order.note_error(step, err.describe(), self.clock())
                    await self._save(order)
                    execution.retrying.set()
                    await self.sleep(self.policy.backoff(order.steps[step].compensation_attempts))
                    continue
                order.compensation_failed(step, f"{err.reason}: {err.message}", self.clock())
                await self._save(order)
                metrics.SAGA_COMPENSATION_FAILURES.labels(step.value).inc()
                log.error("compensation failed after all retries; the order needs an operator", extra={
                    "order_id": order.id, "step": step.value, "error": err.describe(),
                    "attempts": order.steps[step].compensation_attempts})
                self.checkpoint(f"{step.value}_COMPENSATED")
                return
            order.compensated(step, self.clock(), undone=undo.undone, payment_id=undo.payment_id)
            await self._save(order)
            self.checkpoint(f"{step.value}_COMPENSATED")
            return

    async def _finish(self, order: Order, execution: Execution) -> None:
        status = order.finish_compensation(self.clock())
        if status is OrderStatus.COMPENSATION_FAILED:
            events: list[Message] = [mapping.order_compensation_failed(order, s)
                                     for s in order.compensation_failures()]
        elif status is OrderStatus.CANCELLED:
            events = [mapping.order_cancelled(order)]
        else:
            events = [mapping.order_failed(order)]
        await self._save(order, *events, ending=execution)
        if order.failure is not None:  # a failed placement; a cancellation is not a saga failure
            metrics.ORDERS_FAILED.labels(order.failure.reason).inc()
            if status is OrderStatus.FAILED:
                metrics.ORDERS_COMPENSATED.inc()
            metrics.SAGA_DURATION.labels("compensated" if status is OrderStatus.FAILED else "failed").observe(
                _age(order))
        log.info("saga ended", extra={"order_id": order.id, "status": status.value})

    def _undo_reason(self, order: Order) -> str:
        if order.cancellation:
            text = f"Order {order.id} cancelled" + (f": {order.cancel_reason}" if order.cancel_reason else "")
        else:
            assert order.failure is not None
            text = f"Order {order.id} failed: {order.failure.reason}"
        return text[:MAX_RELEASE_REASON]

    async def _undo(self, step: StepName, order: Order) -> Undo:
        inventory, payments = self.downstream.inventory, self.downstream.payments
        if step is StepName.CONFIRM_ORDER:
            # Releasing a COMMITTED reservation returns its units to stock; releasing one that a commit of
            # unknown outcome left ACTIVE frees them. Either way the stock comes back.
            await _release_reservation(inventory, order.reservation_id, self._undo_reason(order))
            return Undo(True)
        if step is StepName.PROCESS_PAYMENT:
            return await self._undo_payment(order, payments)
        if step is StepName.RESERVE_STOCK:
            if order.steps[StepName.CONFIRM_ORDER].status is StepStatus.COMPENSATED:
                return Undo(True)  # undoing the confirmation already released this reservation
            reservation_id = order.reservation_id
            if not reservation_id:
                # The reservation call's outcome is unknown and only ReserveStock can look a reservation up by
                # order: a repeat returns the reservation if one was made, and we release whatever it returns.
                try:
                    reservation = await inventory.reserve_stock(
                        order.id, [(i.product_id, i.quantity) for i in order.items],
                        self.policy.reservation_ttl_seconds)
                except DownstreamError as err:
                    if err.answered and not err.transient:
                        return Undo(False)  # refused: no reservation exists for the order
                    raise
                order.reservation_id = reservation.id
                reservation_id = reservation.id
            await _release_reservation(inventory, reservation_id, self._undo_reason(order))
            return Undo(True)
        raise AssertionError(f"{step.value} has no compensating call")

    async def _undo_payment(self, order: Order, payments: Payments) -> Undo:
        reason = self._undo_reason(order)
        if order.steps[StepName.PROCESS_PAYMENT].status is StepStatus.SUCCEEDED:
            await _refund(payments, order.payment_id, refund_key(order.id), reason)
            return Undo(True)
        # The charge failed in a way a repeat may still overcome, or its outcome is unknown (a timeout, a lost
        # connection). Either way a ProcessPayment under the order's key may still charge: a runner that froze past
        # its lease and wakes up sends one. Voiding the key's payment makes it final unless it already took money,
        # and records a VOIDED payment if none was made yet, so that no later call charges; one that took money
        # is refunded. A charge still running answers PAYMENT_IN_PROGRESS, which is waited for (retried).
        try:
            await payments.void_payment(
                order_id=order.id, customer_id=order.customer_id, amount_minor=order.total_minor,
                currency_code=order.currency_code, payment_method=order.payment_method,
                idempotency_key=payment_key(order.id))
        except DownstreamError as err:
            if not (err.answered and err.reason == _NOT_VOIDABLE):
                raise
            payment_id = err.metadata.get("payment_id", "")
            if err.metadata.get("status", "").endswith("SUCCEEDED"):
                await _refund(payments, payment_id, refund_key(order.id), reason)
            return Undo(True, payment_id=payment_id)
        return Undo(False)  # VOIDED (or DECLINED): no money was taken, and none will be

    # Recovery.

    async def recoverable(self, after: BacklogKey | None, limit: int) -> list[BacklogKey]:
        """(update_time, id) of at most `limit` unfinished sagas nobody runs (free or expired lease), least recently
        changed first, from the one after `after`."""
        async with self.uow() as uow:
            return await uow.orders.claimable(self.clock(), limit, after)

    async def resume(self, order_id: str) -> bool:
        """Starts resuming a saga nobody runs, as the caller that started it, once one of the recovery's
        `recovery_concurrency` slots is free: so a long backlog waits here, not in as many tasks. False if this
        process runs the saga already. Raises if the saga's rows cannot be read (edited by hand into a state the
        saga cannot load): the recovery passes it over (BacklogJob) rather than a task failing on it unseen."""
        if self.running(order_id) is not None:
            return False
        async with self.uow() as uow:
            caller = await uow.orders.caller(order_id)
            await uow.orders.get(order_id)
        await self._recovery_slots.acquire()
        if self.running(order_id) is not None:
            self._recovery_slots.release()
            return False
        self.run(order_id, leased=False, caller=caller, recovery=True)
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
            released = await uow.orders.release_leases(self.owner)
            await uow.commit()
        if released:
            log.info("saga leases released", extra={"count": released})

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

    async def poll(self, order_id: str, timeout: float | None, interval: float = 0.2) -> Order | None:
        """Waits until a saga run by another process ends, reading its order, or timeout; returns the order as last
        read (None if it was not read)."""
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        order = None
        while deadline is None or asyncio.get_running_loop().time() < deadline:
            async with self.uow() as uow:
                order = await uow.orders.get(order_id)
            if order is None or order.finished:
                return order
            await asyncio.sleep(interval)
        return order


class SagaRecovery(BacklogJob):
    """Resumes the unfinished sagas nobody runs (a crashed process's, or a runner's that stopped renewing its
    lease), `recovery_batch_size` at a time, at most `recovery_concurrency` of them running at once. One that cannot
    be resumed (its saga or order rows edited by hand so that they cannot be read, say) is logged with its id and
    passed over until the next round (see BacklogJob): the sagas behind it are still resumed. Several processes may
    recover one database: the lease admits one runner per saga."""

    name = "order.saga_recovery"

    def __init__(self, sagas: SagaCoordinator, interval: float = 5.0) -> None:
        super().__init__(interval, sagas.policy.recovery_batch_size)
        self.sagas = sagas

    async def due(self, after: BacklogKey | None, limit: int) -> list[BacklogKey]:
        return await self.sagas.recoverable(after, limit)

    async def handle(self, item_id: str) -> bool:
        return await self.sagas.resume(item_id)


def _age(order: Order) -> float:
    return max(0.0, (order.update_time - order.create_time).total_seconds())


def _may_have_acted(err: DownstreamError) -> bool:
    """Whether the failed call may have had its effect after all: its answer was lost, or it was a charge still in
    progress, which may yet succeed. Compensation must find out and undo it."""
    return err.outcome_unknown or err.reason == _IN_PROGRESS


def _may_charge_later(step: StepName, err: DownstreamError) -> bool:
    """Whether a charge that failed may still be made by a repeat under the order's key: the payment service did not
    refuse it for good (a FAILED payment, PAYMENT_FAILED, is charged by the next ProcessPayment with its key), and a
    runner that lost its lease without knowing may yet send that repeat. Compensation then voids the key's payment,
    as it does after a charge of unknown outcome."""
    return step is StepName.PROCESS_PAYMENT and err.transient


def _reservation_lost(step: StepName, reservation_id: str, status: str) -> Failure:
    """RESERVATION_EXPIRED, as the order contract describes its metadata on every path: "reservation_id" and
    "reservation_status", the inventory's ReservationStatus name (`status` in either the short form the inventory
    client gives a reservation's status in, or the full name an inventory error's metadata gives)."""
    status = status if status.startswith(RESERVATION_STATUS) else RESERVATION_STATUS + status
    if step is StepName.CONFIRM_ORDER:
        what = "expired" if status == RESERVATION_STATUS + "EXPIRED" else "was released"
        message = f"the stock reservation {what} before the order could be confirmed"
    else:
        message = "the stock reservation is no longer active"
    return Failure("RESERVATION_EXPIRED", message, step, {"reservation_id": reservation_id,
                                                          "reservation_status": status})


async def _release_reservation(inventory: Inventory, reservation_id: str, reason: str) -> None:
    try:
        await inventory.release_reservation(reservation_id, reason)
    except DownstreamError as err:
        if err.answered and err.reason == "RESERVATION_NOT_FOUND":
            return  # nothing is held under that id
        raise


async def _refund(payments: Payments, payment_id: str, key: str, reason: str) -> None:
    try:
        await payments.refund_payment(payment_id, key, reason)
    except DownstreamError as err:
        if err.answered and err.reason == "PAYMENT_NOT_REFUNDABLE":
            status = err.metadata.get("status", "")
            if status.endswith("PENDING"):
                # Still being charged: refund once the charge settled.
                raise DownstreamError("payment", grpc.StatusCode.ABORTED, _IN_PROGRESS,
                                      "the payment is still being charged", err.metadata) from None
            return  # DECLINED or FAILED: no money was taken
        raise


def _prepare_context(caller: SagaCaller | None) -> None:
    """Runs inside the saga task's context copy before the task starts."""
    callctx.deadline_var.set(None)
    if caller is None:
        return
    principal = None
    if caller.subject:
        principal = callctx.Principal(subject=caller.subject, scopes=frozenset(caller.scopes))
    callctx.principal_var.set(principal)
    request_id_var.set(uuid.uuid4().hex)
    correlation_id_var.set(caller.correlation_id or request_id_var.get())
