"""The CreateOrder saga on the runtime's saga engine: its steps, what its end publishes, and its coordinator.

The engine (tessera_runtime/saga.py) runs the steps forward and compensates them in reverse, persisting each move.
Here are the steps (reserve the stock, take the payment, confirm the order), each with its compensating call and
how its errors are judged, what the write that ends the saga publishes and counts, and the coordinator that runs
it in the order service.

VALIDATE_CUSTOMER and CREATE_ORDER run in CreateOrder's handler before the order is stored, so the saga starts with
both done: CREATE_ORDER is undone by ending the order (Order.finish_compensation), VALIDATE_CUSTOMER has nothing to
undo. The Order aggregate keeps the saga's state (tessera_runtime.saga.SagaState) and the order repository stores
it, fenced by the saga's lease (tessera_runtime.saga.SagaStore, see adapters/repository.py). Steps are safe to
repeat because every mutating call carries an idempotency key derived from the order id, so a saga interrupted
anywhere, by a crash or a lost lease, is resumed by simply running its current step again. A resumed saga runs as
the caller whose CreateOrder started it, in a `resume order saga` span continuing that call's trace (the engine's
docstring says why a child span).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.message import Message

from tessera_order import mapping
from tessera_order.adapters.repository import OrderRepository
from tessera_order.domain.model import Failure, Order, OrderStatus, StepName, StepStatus
from tessera_order.service_layer.ports import Downstream, DownstreamError, Inventory, Payments
from tessera_runtime import metrics
from tessera_runtime import saga as engine
from tessera_runtime.saga import Checkpoint, Execution, SagaRecovery, StepFailed, Undo, UowFactory, current_caller

__all__ = ["AGGREGATE", "RESUME_SPAN", "Checkpoint", "ConfirmOrder", "CreateOrderSaga", "Execution", "ProcessPayment",
           "ReserveStock", "SagaCoordinator", "SagaPolicy", "SagaRecovery", "StepFailed", "Undo", "UowFactory",
           "current_caller", "payment_key", "refund_key"]

log = logging.getLogger("tessera.order.saga")

AGGREGATE = "order"
RESUME_SPAN = "resume order saga"
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
class SagaPolicy(engine.SagaPolicy):
    """Retry and lease settings of the saga, and how long its stock reservations hold."""

    reservation_ttl_seconds: int = 900


class OrderStep(engine.SagaStep[Order]):
    """A step of the CreateOrder saga: a call to another service through the Downstream port, whose errors
    (DownstreamError) are judged the same way for every step unless the step says otherwise."""

    errors = (DownstreamError,)

    def __init__(self, downstream: Downstream, policy: SagaPolicy) -> None:
        self.downstream = downstream
        self.policy = policy

    def waits(self, err: DownstreamError) -> bool:
        return err.reason == _IN_PROGRESS

    def retryable(self, err: DownstreamError) -> bool:
        return err.transient or err.outcome_unknown

    def may_have_acted(self, err: DownstreamError) -> bool:
        return _may_have_acted(err)

    def failure(self, err: DownstreamError, order: Order) -> tuple[Failure, bool]:
        return _failure(self.name, err, order)

    def compensation_retryable(self, err: DownstreamError) -> bool:
        return err.transient or err.outcome_unknown

    def compensation_error(self, err: DownstreamError) -> str:
        return f"{err.reason}: {err.message}"

    def describe(self, err: DownstreamError) -> str:
        return err.describe()


class ReserveStock(OrderStep):
    name = StepName.RESERVE_STOCK

    async def execute(self, order: Order) -> Mapping[str, str]:
        reservation = await self.downstream.inventory.reserve_stock(
            order.id, [(i.product_id, i.quantity) for i in order.items], self.policy.reservation_ttl_seconds)
        if reservation.status != "ACTIVE":
            # A repeat after a long pause found the reservation no longer holding the stock.
            raise StepFailed(_reservation_lost(self.name, reservation.id, reservation.status),
                             reservation_id=reservation.id)
        return {"reservation_id": reservation.id}

    async def compensate(self, order: Order) -> Undo:
        if order.steps[StepName.CONFIRM_ORDER].status is StepStatus.COMPENSATED:
            return Undo(True)  # undoing the confirmation already released this reservation
        inventory = self.downstream.inventory
        reservation_id = order.reservation_id
        if not reservation_id:
            # The reservation call's outcome is unknown and only ReserveStock can look a reservation up by order:
            # a repeat returns the reservation if one was made, and we release whatever it returns.
            try:
                reservation = await inventory.reserve_stock(
                    order.id, [(i.product_id, i.quantity) for i in order.items], self.policy.reservation_ttl_seconds)
            except DownstreamError as err:
                if err.answered and not err.transient:
                    return Undo(False)  # refused: no reservation exists for the order
                raise
            order.reservation_id = reservation.id
            reservation_id = reservation.id
        await _release_reservation(inventory, reservation_id, _undo_reason(order))
        return Undo(True)


class ProcessPayment(OrderStep):
    name = StepName.PROCESS_PAYMENT

    async def execute(self, order: Order) -> Mapping[str, str]:
        payment = await self.downstream.payments.process_payment(
            order_id=order.id, customer_id=order.customer_id, amount_minor=order.total_minor,
            currency_code=order.currency_code, payment_method=order.payment_method,
            idempotency_key=payment_key(order.id))
        if payment.status != "SUCCEEDED":
            raise StepFailed(Failure("PAYMENT_FAILED", f"the payment is {payment.status.lower()}", self.name,
                                     {"payment_id": payment.id}))
        return {"payment_id": payment.id}

    def retryable(self, err: DownstreamError) -> bool:
        # A charge that timed out is not repeated: the order fails with PAYMENT_TIMEOUT and compensation finds out
        # whether money was taken after all.
        return err.transient

    def failure(self, err: DownstreamError, order: Order) -> tuple[Failure, bool]:
        # A charge that failed may still be made by a repeat under the order's key when the payment service did not
        # refuse it for good (a FAILED payment, PAYMENT_FAILED, is charged by the next ProcessPayment with its key),
        # and a runner that lost its lease without knowing may yet send that repeat. Compensation then voids the
        # key's payment, as it does after a charge of unknown outcome.
        failure, unknown = _failure(self.name, err, order)
        return failure, unknown or err.transient

    async def compensate(self, order: Order) -> Undo:
        payments: Payments = self.downstream.payments
        reason = _undo_reason(order)
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
            return Undo(True, {"payment_id": payment_id})
        return Undo(False)  # VOIDED (or DECLINED): no money was taken, and none will be


class ConfirmOrder(OrderStep):
    name = StepName.CONFIRM_ORDER

    async def execute(self, order: Order) -> Mapping[str, str]:
        reservation = await self.downstream.inventory.commit_reservation(order.reservation_id)
        if reservation.status != "COMMITTED":
            raise StepFailed(_reservation_lost(self.name, reservation.id, reservation.status))
        return {}

    async def compensate(self, order: Order) -> Undo:
        # Releasing a COMMITTED reservation returns its units to stock; releasing one that a commit of unknown
        # outcome left ACTIVE frees them. Either way the stock comes back.
        await _release_reservation(self.downstream.inventory, order.reservation_id, _undo_reason(order))
        return Undo(True)


class CreateOrderSaga(engine.Saga[Order]):
    """Reserve the stock, take the payment, confirm the order; compensated in reverse. Its end publishes
    OrderConfirmed, OrderFailed, OrderCancelled or OrderCompensationFailed with the order's last state."""

    aggregate = AGGREGATE
    noun = "order"
    resume_span = RESUME_SPAN
    recovery_name = "order.saga_recovery"
    log = log

    def __init__(self, downstream: Downstream, policy: SagaPolicy) -> None:
        super().__init__((ReserveStock(downstream, policy), ProcessPayment(downstream, policy),
                          ConfirmOrder(downstream, policy)))

    def store(self, uow: Any) -> OrderRepository:
        return uow.orders

    def ending_events(self, order: Order) -> Sequence[Message]:
        status = order.status
        if status is OrderStatus.CONFIRMED:
            return (mapping.order_confirmed(order),)
        if status is OrderStatus.COMPENSATION_FAILED:
            return [mapping.order_compensation_failed(order, s) for s in order.compensation_failures()]
        if status is OrderStatus.CANCELLED:
            return (mapping.order_cancelled(order),)
        return (mapping.order_failed(order),)

    def ended(self, order: Order) -> None:
        status = order.status
        if status is OrderStatus.CONFIRMED:
            metrics.ORDERS_CONFIRMED.inc()
            metrics.SAGA_DURATION.labels("confirmed").observe(_age(order))
            log.info("order confirmed", extra={"order_id": order.id})
            return
        if order.failure is not None:  # a failed placement; a cancellation is not a saga failure
            metrics.ORDERS_FAILED.labels(order.failure.reason).inc()
            if status is OrderStatus.FAILED:
                metrics.ORDERS_COMPENSATED.inc()
            metrics.SAGA_DURATION.labels("compensated" if status is OrderStatus.FAILED else "failed").observe(
                _age(order))
        log.info("saga ended", extra={"order_id": order.id, "status": status.value})


class SagaCoordinator(engine.SagaRunner[Order]):
    """Starts, resumes and fences the CreateOrder sagas of one order-service process (`kwargs`: SagaRunner's owner,
    clock, sleep and checkpoint)."""

    def __init__(self, uow_factory: UowFactory, downstream: Downstream, policy: SagaPolicy, **kwargs) -> None:
        super().__init__(CreateOrderSaga(downstream, policy), uow_factory, policy, **kwargs)
        self.downstream = downstream


def _undo_reason(order: Order) -> str:
    if order.cancellation:
        text = f"Order {order.id} cancelled" + (f": {order.cancel_reason}" if order.cancel_reason else "")
    else:
        assert order.failure is not None
        text = f"Order {order.id} failed: {order.failure.reason}"
    return text[:MAX_RELEASE_REASON]


def _pick(metadata: dict[str, str], *keys: str) -> dict[str, str]:
    return {k: metadata[k] for k in keys if k in metadata}


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
            return Failure("PAYMENT_DECLINED", err.message, step, _pick(md, "payment_id", "decline_code")), False
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


def _age(order: Order) -> float:
    return max(0.0, (order.update_time - order.create_time).total_seconds())


def _may_have_acted(err: DownstreamError) -> bool:
    """Whether the failed call may have had its effect after all: its answer was lost, or it was a charge still in
    progress, which may yet succeed. Compensation must find out and undo it."""
    return err.outcome_unknown or err.reason == _IN_PROGRESS


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
