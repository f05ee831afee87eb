"""The order aggregate with the state of its placement saga, and the rules an order's fields obey."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import uuid
from collections.abc import Mapping

from tessera_order import DOMAIN
from tessera_runtime.errors import (
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
    Violations,
    check_uuid,
    is_blank,
)
from tessera_runtime.money import is_iso_currency

MAX_ITEMS = 50
MAX_QUANTITY = 1000
MAX_PAYMENT_METHOD = 255
MAX_REQUEST_ID = 64
MAX_CANCEL_REASON = 500
MAX_ERROR = 1000
MAX_FAILURE_MESSAGE = 1000
MAX_FAILURE_METADATA = 20


class OrderStatus(enum.Enum):
    PENDING = "PENDING"
    CONFIRMED = "CONFIRMED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    COMPENSATING = "COMPENSATING"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"


# Statuses in which a saga still has work to do: the recovery loop resumes orders in these.
UNFINISHED = (OrderStatus.PENDING, OrderStatus.COMPENSATING)


class StepName(enum.Enum):
    """The placement saga's steps, in execution order."""

    VALIDATE_CUSTOMER = "VALIDATE_CUSTOMER"
    CREATE_ORDER = "CREATE_ORDER"
    RESERVE_STOCK = "RESERVE_STOCK"
    PROCESS_PAYMENT = "PROCESS_PAYMENT"
    CONFIRM_ORDER = "CONFIRM_ORDER"


STEPS: tuple[StepName, ...] = tuple(StepName)
# Steps undone by a call to another service, latest first. CREATE_ORDER is undone by ending the order and
# VALIDATE_CUSTOMER has nothing to undo.
COMPENSABLE: tuple[StepName, ...] = (StepName.CONFIRM_ORDER, StepName.PROCESS_PAYMENT, StepName.RESERVE_STOCK)


class StepStatus(enum.Enum):
    PENDING = "PENDING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    COMPENSATED = "COMPENSATED"
    COMPENSATION_FAILED = "COMPENSATION_FAILED"


@dataclasses.dataclass
class SagaStep:
    name: StepName
    status: StepStatus = StepStatus.PENDING
    attempts: int = 0
    compensation_attempts: int = 0
    error: str = ""
    # An attempt of the step ended without learning whether the other service acted (a timeout, a lost
    # connection), or a charge failed in a way that a repeat under the order's key may still overcome (the saga
    # sets it then: a runner that lost its lease may send that repeat). Kept through the step's later attempts,
    # whose answers say nothing of what that one did: a step that then fails is compensated by first finding out,
    # and undoing what did happen (for a charge: voiding its payment, or refunding it if it took money).
    outcome_unknown: bool = False
    update_time: dt.datetime | None = None

    @property
    def shown_attempts(self) -> int:
        """What the contract calls attempts: of the step, or of its compensation once that started."""
        return self.compensation_attempts or self.attempts


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why placement failed: an ErrorReason name, a customer-safe message, the step and its ErrorInfo metadata."""

    reason: str
    message: str
    step: StepName
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "message", self.message[:MAX_FAILURE_MESSAGE])
        object.__setattr__(self, "metadata", dict(list(self.metadata.items())[:MAX_FAILURE_METADATA]))


# How each failure reason is returned to the caller (the contract's ErrorReason table).
FAILURE_ERRORS: dict[str, type[DomainError]] = {
    "CUSTOMER_NOT_FOUND": NotFound,
    "CUSTOMER_INACTIVE": FailedPrecondition,
    "PRODUCT_NOT_FOUND": NotFound,
    "CURRENCY_MISMATCH": FailedPrecondition,
    "INSUFFICIENT_STOCK": FailedPrecondition,
    "PAYMENT_DECLINED": FailedPrecondition,
    "PAYMENT_FAILED": Unavailable,
    "PAYMENT_TIMEOUT": DeadlineExceeded,
    "RESERVATION_EXPIRED": FailedPrecondition,
    "DEPENDENCY_UNAVAILABLE": Unavailable,
    "PERMISSION_DENIED": PermissionDenied,
}


def failure_error(failure: Failure, order_id: str | None) -> DomainError:
    """The error CreateOrder returns for a failure; once the order exists its metadata carries order_id."""
    metadata = dict(failure.metadata)
    if order_id is not None:
        metadata["order_id"] = order_id
    error_class = FAILURE_ERRORS.get(failure.reason, Unavailable)
    return error_class(failure.message, reason=failure.reason, domain=DOMAIN, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class OrderItem:
    """One priced order line; name, SKU and price are copies taken from the inventory when the order was priced."""

    product_id: str
    product_name: str
    sku: str
    quantity: int
    unit_price_minor: int

    @property
    def line_total_minor(self) -> int:
        return self.unit_price_minor * self.quantity


class SagaStateError(Exception):
    """A transition that the order's current state does not allow; a bug in the caller, never user input."""


@dataclasses.dataclass
class Order:
    """An order and the state of its CreateOrder saga, as the saga engine reads and moves it
    (tessera_runtime.saga.SagaState)."""

    id: str
    customer_id: str
    items: tuple[OrderItem, ...]
    currency_code: str
    payment_method: str
    request_id: str
    request_hash: str
    status: OrderStatus
    steps: dict[StepName, SagaStep]
    current_step: StepName
    create_time: dt.datetime
    update_time: dt.datetime
    version: int = 1
    payment_id: str = ""
    reservation_id: str = ""
    failure: Failure | None = None
    cancel_reason: str = ""
    confirm_time: dt.datetime | None = None
    cancel_time: dt.datetime | None = None
    # The saga steps as the database last had them, kept by the repository that read or wrote the order: a save
    # writes only the steps that differ (a saga transition changes one or two of them). Empty: write them all.
    stored_steps: dict[StepName, SagaStep] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def place(cls, *, customer_id: str, items: tuple[OrderItem, ...], currency_code: str, payment_method: str,
              request_id: str, request_hash: str, now: dt.datetime) -> Order:
        """A new PENDING order: the customer was validated and the items priced, so both first steps are done."""
        steps = {name: SagaStep(name, update_time=now) for name in STEPS}
        for done in (StepName.VALIDATE_CUSTOMER, StepName.CREATE_ORDER):
            steps[done].status = StepStatus.SUCCEEDED
            steps[done].attempts = 1
        return cls(id=str(uuid.uuid4()), customer_id=customer_id, items=items, currency_code=currency_code,
                   payment_method=payment_method, request_id=request_id, request_hash=request_hash,
                   status=OrderStatus.PENDING, steps=steps, current_step=StepName.RESERVE_STOCK,
                   create_time=now, update_time=now)

    @property
    def total_minor(self) -> int:
        return sum(item.line_total_minor for item in self.items)

    @property
    def finished(self) -> bool:
        return self.status not in UNFINISHED

    @property
    def compensating(self) -> bool:
        return self.status is OrderStatus.COMPENSATING

    @property
    def cancellation(self) -> bool:
        """True when compensation was asked for by CancelOrder rather than caused by a failed step."""
        return self.failure is None and self.status in (
            OrderStatus.COMPENSATING, OrderStatus.CANCELLED, OrderStatus.COMPENSATION_FAILED)

    @property
    def refunded_payment_id(self) -> str:
        return self.payment_id if self.steps[StepName.PROCESS_PAYMENT].status is StepStatus.COMPENSATED else ""

    def _touch(self, step: StepName, now: dt.datetime) -> None:
        self.steps[step].update_time = now
        self.update_time = now

    def _require(self, status: OrderStatus, action: str) -> None:
        if self.status is not status:
            raise SagaStateError(f"cannot {action} order {self.id} in status {self.status.value}")

    # Forward.

    def next_step(self) -> StepName | None:
        """The step to run next while the order is being placed."""
        if self.status is not OrderStatus.PENDING:
            return None
        return next((s for s in STEPS if self.steps[s].status is StepStatus.PENDING), None)

    def start_step(self, step: StepName, now: dt.datetime) -> None:
        self._require(OrderStatus.PENDING, f"run {step.value} of")
        self.steps[step].attempts += 1
        self.current_step = step
        self._touch(step, now)

    def note_error(self, step: StepName, error: str, now: dt.datetime, *, outcome_unknown: bool = False) -> None:
        """Records an error that will be retried; the step stays where it is. An error of unknown outcome is
        remembered until the step succeeds: a retry refused later does not undo what this attempt may have done."""
        s = self.steps[step]
        s.error = error[:MAX_ERROR]
        s.outcome_unknown = s.outcome_unknown or outcome_unknown
        self._touch(step, now)

    def complete_step(self, step: StepName, now: dt.datetime, *, reservation_id: str = "",
                      payment_id: str = "") -> None:
        self._require(OrderStatus.PENDING, f"complete {step.value} of")
        if step is StepName.CONFIRM_ORDER:
            raise SagaStateError("CONFIRM_ORDER completes through confirm()")
        self.steps[step].status = StepStatus.SUCCEEDED
        self.steps[step].outcome_unknown = False
        self.reservation_id = reservation_id or self.reservation_id
        self.payment_id = payment_id or self.payment_id
        self.current_step = self.next_step() or step
        self._touch(step, now)

    def confirm(self, now: dt.datetime) -> None:
        self._require(OrderStatus.PENDING, "confirm")
        self.steps[StepName.CONFIRM_ORDER].status = StepStatus.SUCCEEDED
        self.steps[StepName.CONFIRM_ORDER].outcome_unknown = False
        self.status = OrderStatus.CONFIRMED
        self.confirm_time = now
        self.current_step = StepName.CONFIRM_ORDER
        self._touch(StepName.CONFIRM_ORDER, now)

    # The saga engine's name for it (tessera_runtime.saga.SagaState): the last step succeeded.
    complete = confirm

    def fail(self, step: StepName, failure: Failure, now: dt.datetime, *, outcome_unknown: bool = False,
             reservation_id: str = "") -> None:
        """The step failed for good: compensation of the completed steps starts. Its outcome is unknown when the
        last attempt's is, or an earlier attempt's was (see note_error)."""
        self._require(OrderStatus.PENDING, f"fail {step.value} of")
        s = self.steps[step]
        s.status = StepStatus.FAILED
        s.outcome_unknown = s.outcome_unknown or outcome_unknown
        s.error = f"{failure.reason}: {failure.message}"[:MAX_ERROR]
        self.reservation_id = reservation_id or self.reservation_id
        self.failure = failure
        self.status = OrderStatus.COMPENSATING
        self.current_step = step
        self._touch(step, now)

    # Cancellation and compensation.

    def begin_cancel(self, reason: str, now: dt.datetime) -> None:
        self._require(OrderStatus.CONFIRMED, "cancel")
        self.status = OrderStatus.COMPENSATING
        self.cancel_reason = reason
        self.update_time = now

    def next_compensation(self) -> StepName | None:
        """The latest step still to undo: one that completed, or one that failed with an unknown outcome."""
        if self.status is not OrderStatus.COMPENSATING:
            return None
        for step in COMPENSABLE:
            s = self.steps[step]
            if s.status is StepStatus.SUCCEEDED or (s.status is StepStatus.FAILED and s.outcome_unknown):
                return step
        return None

    def start_compensation(self, step: StepName, now: dt.datetime) -> None:
        self._require(OrderStatus.COMPENSATING, f"compensate {step.value} of")
        self.steps[step].compensation_attempts += 1
        self.current_step = step
        self._touch(step, now)

    def compensated(self, step: StepName, now: dt.datetime, *, undone: bool, payment_id: str = "") -> None:
        """The step's effect is gone. `undone` is False when a step of unknown outcome turned out to have had no
        effect: it stays FAILED. A payment found and refunded that way becomes the order's payment."""
        self._require(OrderStatus.COMPENSATING, f"record compensation of {step.value} of")
        s = self.steps[step]
        if s.status is StepStatus.SUCCEEDED or undone:
            s.status = StepStatus.COMPENSATED
        s.outcome_unknown = False
        self.payment_id = payment_id or self.payment_id
        self._touch(step, now)

    def compensation_failed(self, step: StepName, error: str, now: dt.datetime) -> None:
        self._require(OrderStatus.COMPENSATING, f"give up compensating {step.value} of")
        s = self.steps[step]
        s.status = StepStatus.COMPENSATION_FAILED
        s.outcome_unknown = False
        s.error = error[:MAX_ERROR]
        self._touch(step, now)

    def compensation_failures(self) -> list[SagaStep]:
        return [s for s in self.steps.values() if s.status is StepStatus.COMPENSATION_FAILED]

    def finish_compensation(self, now: dt.datetime) -> OrderStatus:
        """Ends the order once nothing is left to undo: FAILED, CANCELLED, or COMPENSATION_FAILED."""
        self._require(OrderStatus.COMPENSATING, "finish compensating")
        if self.next_compensation() is not None:
            raise SagaStateError(f"order {self.id} still has steps to compensate")
        if self.compensation_failures():
            self.status = OrderStatus.COMPENSATION_FAILED
            self.update_time = now
            return self.status
        self.steps[StepName.CREATE_ORDER].status = StepStatus.COMPENSATED
        self.current_step = StepName.CREATE_ORDER
        self._touch(StepName.CREATE_ORDER, now)
        if self.failure is None:
            self.status = OrderStatus.CANCELLED
            self.cancel_time = now
        else:
            self.status = OrderStatus.FAILED
        return self.status


# Request rules.

def check_items(items: list[tuple[str, int]], v: Violations) -> None:
    if not items:
        v.add("items", "must contain at least one item")
        return
    if len(items) > MAX_ITEMS:
        v.add("items", f"must contain at most {MAX_ITEMS} items")
    seen: set[str] = set()
    for i, (product_id, quantity) in enumerate(items):
        check_uuid(product_id, f"items[{i}].product_id", v)
        if product_id and product_id.lower() in seen:
            v.add(f"items[{i}].product_id", "names a product that an earlier item already names")
        seen.add(product_id.lower())
        if not 1 <= quantity <= MAX_QUANTITY:
            v.add(f"items[{i}].quantity", f"must be between 1 and {MAX_QUANTITY}")


def check_payment_method(value: str, v: Violations) -> None:
    # Checked as the payment service checks it: a method it would refuse must not become an order first.
    if is_blank(value):
        v.add("payment_method", "is required")
    elif len(value) > MAX_PAYMENT_METHOD or not value.isprintable():
        v.add("payment_method", f"must be 1 to {MAX_PAYMENT_METHOD} printable characters")


def check_currency(code: str, v: Violations) -> None:
    if not code:
        v.add("currency_code", "is required")
    elif not is_iso_currency(code):
        v.add("currency_code", "must be an ISO 4217 currency code in upper case, such as EUR")


def check_request_id(value: str, v: Violations) -> None:
    if not value:
        v.add("request_id", "is required")
    elif len(value) > MAX_REQUEST_ID or not value.isprintable():
        v.add("request_id", f"must be 1 to {MAX_REQUEST_ID} printable characters")


def new_violations() -> Violations:
    return Violations(DOMAIN)
