"""The order aggregate's saga transitions, its failure-to-error mapping, and the order service's settings."""

from __future__ import annotations

import datetime as dt

import grpc
import pytest

from tessera_order.domain.model import (
    Failure,
    Order,
    OrderItem,
    OrderStatus,
    SagaStateError,
    StepName,
    StepStatus,
    failure_error,
)
from tessera_order.settings import OrderSettings
from tessera_runtime.config import ConfigError

NOW = dt.datetime(2026, 3, 1, 12, tzinfo=dt.UTC)


def new_order() -> Order:
    items = (OrderItem("p1", "Pen", "PEN-1", 2, 150), OrderItem("p2", "Ink", "INK-1", 1, 99))
    return Order.place(customer_id="c1", items=items, currency_code="EUR", payment_method="pm", request_id="r1",
                       request_hash="h", now=NOW)


def statuses(order: Order) -> list[str]:
    return [order.steps[s].status.value for s in StepName]


def run_forward(order: Order, through: StepName) -> None:
    for step in (StepName.RESERVE_STOCK, StepName.PROCESS_PAYMENT):
        order.start_step(step, NOW)
        order.complete_step(step, NOW, reservation_id="res-1" if step is StepName.RESERVE_STOCK else "",
                            payment_id="pay-1" if step is StepName.PROCESS_PAYMENT else "")
        if step is through:
            return
    order.start_step(StepName.CONFIRM_ORDER, NOW)
    order.confirm(NOW)


def test_a_new_order_has_validated_its_customer_and_is_stored():
    order = new_order()
    assert order.status is OrderStatus.PENDING and order.total_minor == 399
    assert statuses(order) == ["SUCCEEDED", "SUCCEEDED", "PENDING", "PENDING", "PENDING"]
    assert order.next_step() is StepName.RESERVE_STOCK and order.current_step is StepName.RESERVE_STOCK
    assert order.items[0].line_total_minor == 300


def test_forward_steps_run_in_order_and_confirm():
    order = new_order()
    order.start_step(StepName.RESERVE_STOCK, NOW)
    order.start_step(StepName.RESERVE_STOCK, NOW)
    assert order.steps[StepName.RESERVE_STOCK].attempts == 2
    order.complete_step(StepName.RESERVE_STOCK, NOW, reservation_id="res-1")
    assert order.next_step() is StepName.PROCESS_PAYMENT and order.reservation_id == "res-1"
    run_forward(order, StepName.CONFIRM_ORDER)
    assert order.status is OrderStatus.CONFIRMED and order.confirm_time == NOW and order.finished
    assert order.next_step() is None and order.next_compensation() is None
    with pytest.raises(SagaStateError):
        order.start_step(StepName.CONFIRM_ORDER, NOW)


def test_compensation_runs_latest_first_and_skips_what_never_happened():
    order = new_order()
    run_forward(order, StepName.PROCESS_PAYMENT)
    order.start_step(StepName.CONFIRM_ORDER, NOW)
    order.fail(StepName.CONFIRM_ORDER, Failure("RESERVATION_EXPIRED", "expired", StepName.CONFIRM_ORDER), NOW)
    assert order.status is OrderStatus.COMPENSATING and not order.cancellation
    assert order.next_compensation() is StepName.PROCESS_PAYMENT
    order.start_compensation(StepName.PROCESS_PAYMENT, NOW)
    order.compensated(StepName.PROCESS_PAYMENT, NOW, undone=True)
    assert order.next_compensation() is StepName.RESERVE_STOCK
    order.start_compensation(StepName.RESERVE_STOCK, NOW)
    order.compensated(StepName.RESERVE_STOCK, NOW, undone=True)
    assert order.next_compensation() is None
    assert order.finish_compensation(NOW) is OrderStatus.FAILED
    assert statuses(order) == ["SUCCEEDED", "COMPENSATED", "COMPENSATED", "COMPENSATED", "FAILED"]
    assert order.refunded_payment_id == "pay-1"


def test_a_step_of_unknown_outcome_is_compensated_and_stays_failed_when_nothing_happened():
    order = new_order()
    run_forward(order, StepName.RESERVE_STOCK)
    order.start_step(StepName.PROCESS_PAYMENT, NOW)
    order.fail(StepName.PROCESS_PAYMENT, Failure("PAYMENT_TIMEOUT", "slow", StepName.PROCESS_PAYMENT), NOW,
               outcome_unknown=True)
    assert order.next_compensation() is StepName.PROCESS_PAYMENT
    order.start_compensation(StepName.PROCESS_PAYMENT, NOW)
    order.compensated(StepName.PROCESS_PAYMENT, NOW, undone=False)
    pay = order.steps[StepName.PROCESS_PAYMENT]
    assert pay.status is StepStatus.FAILED and not pay.outcome_unknown and order.payment_id == ""
    assert order.next_compensation() is StepName.RESERVE_STOCK


def test_an_attempt_of_unknown_outcome_is_remembered_until_the_step_succeeds():
    order = new_order()
    run_forward(order, StepName.RESERVE_STOCK)
    order.start_step(StepName.PROCESS_PAYMENT, NOW)
    order.note_error(StepName.PROCESS_PAYMENT, "UNAVAILABLE: no answer", NOW, outcome_unknown=True)
    order.start_step(StepName.PROCESS_PAYMENT, NOW)
    order.note_error(StepName.PROCESS_PAYMENT, "UNAVAILABLE: refused", NOW)
    order.start_step(StepName.PROCESS_PAYMENT, NOW)
    order.fail(StepName.PROCESS_PAYMENT, Failure("DEPENDENCY_UNAVAILABLE", "down", StepName.PROCESS_PAYMENT), NOW)
    assert order.steps[StepName.PROCESS_PAYMENT].outcome_unknown
    assert order.next_compensation() is StepName.PROCESS_PAYMENT
    # A step that succeeds after such an attempt has a known outcome.
    again = new_order()
    again.start_step(StepName.RESERVE_STOCK, NOW)
    again.note_error(StepName.RESERVE_STOCK, "DEADLINE_EXCEEDED: no answer", NOW, outcome_unknown=True)
    again.start_step(StepName.RESERVE_STOCK, NOW)
    again.complete_step(StepName.RESERVE_STOCK, NOW, reservation_id="res-1")
    assert not again.steps[StepName.RESERVE_STOCK].outcome_unknown


def test_attempts_shown_are_the_compensation_attempts_once_compensating():
    order = new_order()
    run_forward(order, StepName.RESERVE_STOCK)
    order.start_step(StepName.PROCESS_PAYMENT, NOW)
    order.fail(StepName.PROCESS_PAYMENT, Failure("PAYMENT_DECLINED", "no", StepName.PROCESS_PAYMENT), NOW)
    reserve = order.steps[StepName.RESERVE_STOCK]
    assert reserve.shown_attempts == 1
    for _ in range(3):
        order.start_compensation(StepName.RESERVE_STOCK, NOW)
    assert reserve.shown_attempts == 3


def test_cancellation_undoes_confirmation_payment_and_reservation():
    order = new_order()
    run_forward(order, StepName.CONFIRM_ORDER)
    order.begin_cancel("changed my mind", NOW)
    assert order.cancellation and order.status is OrderStatus.COMPENSATING
    assert order.next_compensation() is StepName.CONFIRM_ORDER
    for step in (StepName.CONFIRM_ORDER, StepName.PROCESS_PAYMENT, StepName.RESERVE_STOCK):
        assert order.next_compensation() is step
        order.start_compensation(step, NOW)
        order.compensated(step, NOW, undone=True)
    assert order.finish_compensation(NOW) is OrderStatus.CANCELLED
    assert order.cancel_time == NOW and order.failure is None


def test_a_compensation_given_up_leaves_the_order_compensation_failed():
    order = new_order()
    run_forward(order, StepName.CONFIRM_ORDER)
    order.begin_cancel("", NOW)
    order.start_compensation(StepName.CONFIRM_ORDER, NOW)
    order.compensated(StepName.CONFIRM_ORDER, NOW, undone=True)
    order.start_compensation(StepName.PROCESS_PAYMENT, NOW)
    order.compensation_failed(StepName.PROCESS_PAYMENT, "REFUND_FAILED: processor down", NOW)
    assert order.next_compensation() is StepName.RESERVE_STOCK, "the other steps are still undone"
    order.start_compensation(StepName.RESERVE_STOCK, NOW)
    order.compensated(StepName.RESERVE_STOCK, NOW, undone=True)
    assert order.finish_compensation(NOW) is OrderStatus.COMPENSATION_FAILED
    assert [s.name for s in order.compensation_failures()] == [StepName.PROCESS_PAYMENT]
    assert order.steps[StepName.CREATE_ORDER].status is StepStatus.SUCCEEDED and order.cancellation


def test_transitions_that_the_state_does_not_allow_are_refused():
    order = new_order()
    with pytest.raises(SagaStateError):
        order.begin_cancel("too early", NOW)
    with pytest.raises(SagaStateError):
        order.start_compensation(StepName.RESERVE_STOCK, NOW)
    with pytest.raises(SagaStateError):
        order.complete_step(StepName.CONFIRM_ORDER, NOW)
    run_forward(order, StepName.RESERVE_STOCK)
    order.start_step(StepName.PROCESS_PAYMENT, NOW)
    order.fail(StepName.PROCESS_PAYMENT, Failure("PAYMENT_DECLINED", "no", StepName.PROCESS_PAYMENT), NOW)
    with pytest.raises(SagaStateError):
        order.finish_compensation(NOW)  # the reservation is still held


@pytest.mark.parametrize(("reason", "code"), [
    ("CUSTOMER_NOT_FOUND", grpc.StatusCode.NOT_FOUND),
    ("CUSTOMER_INACTIVE", grpc.StatusCode.FAILED_PRECONDITION),
    ("INSUFFICIENT_STOCK", grpc.StatusCode.FAILED_PRECONDITION),
    ("PAYMENT_DECLINED", grpc.StatusCode.FAILED_PRECONDITION),
    ("PAYMENT_FAILED", grpc.StatusCode.UNAVAILABLE),
    ("PAYMENT_TIMEOUT", grpc.StatusCode.DEADLINE_EXCEEDED),
    ("RESERVATION_EXPIRED", grpc.StatusCode.FAILED_PRECONDITION),
    ("DEPENDENCY_UNAVAILABLE", grpc.StatusCode.UNAVAILABLE),
])
def test_failures_become_the_contract_s_status_with_the_order_id(reason, code):
    error = failure_error(Failure(reason, "why", StepName.RESERVE_STOCK, {"k": "v"}), "order-1")
    assert (error.code, error.reason, error.domain) == (code, reason, "order.tessera.dev")
    assert error.metadata == {"k": "v", "order_id": "order-1"}


def test_failure_keeps_the_contract_s_limits():
    failure = Failure("X", "m" * 2000, StepName.RESERVE_STOCK, {f"k{i}": "v" for i in range(30)})
    assert len(failure.message) == 1000 and len(failure.metadata) == 20


BASE_ENV = {"TESSERA_DATABASE_URL": "sqlite+aiosqlite:///x.db"}


def test_settings_defaults():
    s = OrderSettings.from_env("order", 50054, BASE_ENV)
    assert (s.grpc_port, s.user_service_addr, s.inventory_service_addr, s.payment_service_addr) == (
        50054, "127.0.0.1:50051", "127.0.0.1:50052", "127.0.0.1:50053")
    assert s.crash_after_step is None and s.recovery_enabled and s.reservation_ttl_seconds == 900
    assert s.messaging.outbox_relay


@pytest.mark.parametrize(("env", "variable"), [
    ({"TESSERA_ORDER_CRASH_AFTER_STEP": "SOMEWHERE"}, "TESSERA_ORDER_CRASH_AFTER_STEP"),
    ({"TESSERA_ORDER_CRASH_AFTER_STEP": "RESERVE_STOCK", "TESSERA_ENV": "production"},
     "TESSERA_ORDER_CRASH_AFTER_STEP"),
    ({"TESSERA_ORDER_RETRY_INITIAL_BACKOFF_SECONDS": "2", "TESSERA_ORDER_RETRY_MAX_BACKOFF_SECONDS": "1"},
     "TESSERA_ORDER_RETRY_MAX_BACKOFF_SECONDS"),
    ({"TESSERA_ORDER_RESERVATION_TTL_SECONDS": "30"}, "TESSERA_ORDER_RESERVATION_TTL_SECONDS"),
    ({"TESSERA_ORDER_STEP_MAX_ATTEMPTS": "zero"}, "TESSERA_ORDER_STEP_MAX_ATTEMPTS"),
])
def test_bad_settings_stop_the_service_naming_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        OrderSettings.from_env("order", 50054, {**BASE_ENV, **env})


def test_the_crash_hook_is_accepted_outside_production():
    s = OrderSettings.from_env("order", 50054, {**BASE_ENV, "TESSERA_ORDER_CRASH_AFTER_STEP": "PROCESS_PAYMENT"})
    assert s.crash_after_step == "PROCESS_PAYMENT"
