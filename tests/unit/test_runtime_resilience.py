"""The circuit breaker's state machine, its rolling window, and the retry policy derived from the contracts."""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
from prometheus_client import REGISTRY
from tessera.order.v1 import order_service_pb2
from tessera.user.v1 import user_service_pb2

from tessera_runtime.clients import error_details, service_config
from tessera_runtime.config import CircuitSettings
from tessera_runtime.resilience import CircuitBreaker, State


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_and_recovers_through_half_open():
    clock = Clock()
    breaker = CircuitBreaker("dep", failure_threshold=3, reset_seconds=10, clock=clock)
    for _ in range(2):
        assert breaker.allow()
        breaker.record(grpc.StatusCode.UNAVAILABLE)
    assert breaker.state is State.CLOSED
    breaker.allow()
    breaker.record(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert breaker.state is State.OPEN and not breaker.allow()
    clock.now = 10
    assert breaker.allow() and breaker.state is State.HALF_OPEN
    assert not breaker.allow(), "only one trial call while half-open"
    breaker.record(grpc.StatusCode.UNAVAILABLE)
    assert breaker.state is State.OPEN and not breaker.allow()
    clock.now = 20
    assert breaker.allow()
    breaker.record(grpc.StatusCode.OK)
    assert breaker.state is State.CLOSED and breaker.allow()


def test_business_errors_are_answers_not_failures():
    breaker = CircuitBreaker("dep", failure_threshold=2)
    for code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                 grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAVAILABLE):
        breaker.record(code)
    assert breaker.state is State.CLOSED


def test_a_breaker_without_settings_has_the_documented_defaults():
    breaker = CircuitBreaker("dep")
    assert (breaker.failure_threshold, breaker.reset_seconds) == (5, 10.0)


def test_a_breaker_has_the_documented_window_defaults_and_takes_the_settings():
    breaker = CircuitBreaker("dep")
    assert (breaker.error_percent, breaker.window_seconds, breaker.min_calls) == (50, 10.0, 20)
    configured = CircuitBreaker.configured("dep", CircuitSettings(failure_threshold=2, open_seconds=3.0,
                                                                  error_percent=40, window_seconds=20.0, min_calls=7))
    assert (configured.failure_threshold, configured.reset_seconds, configured.error_percent,
            configured.window_seconds, configured.min_calls) == (2, 3.0, 40, 20.0, 7)
    assert configured.window.width == 2.0  # ten buckets


OK, FAIL = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE


def _calls(breaker: CircuitBreaker, *codes: grpc.StatusCode) -> None:
    for code in codes:
        assert breaker.allow(), f"refused while {breaker.state}"
        breaker.record(code)


def test_a_dependency_failing_every_other_call_opens_on_the_error_rate_without_two_failures_in_a_row():
    clock = Clock()
    breaker = CircuitBreaker("dep", clock=clock)  # the defaults: 5 in a row, or 50 % of at least 20 calls in 10 s
    for _ in range(9):
        _calls(breaker, OK, FAIL)
        clock.now += 0.4
    _calls(breaker, OK)
    assert breaker.state is State.CLOSED and breaker.window.totals() == (19, 9)
    _calls(breaker, FAIL)  # 10 of 20 calls failed: 50 %
    assert breaker.state is State.OPEN and not breaker.allow()
    assert breaker.failures == 1, "the consecutive condition alone would never have opened it"


@pytest.mark.parametrize(("percent", "opens"), [(33, True), (34, False)])
def test_the_failure_percentage_opens_the_circuit_from_the_threshold_on(percent, opens):
    # One failure in three calls is 33.3 %: at least 33 %, below 34 %.
    breaker = CircuitBreaker("dep", failure_threshold=100, error_percent=percent, min_calls=3, clock=Clock())
    _calls(breaker, OK, OK, FAIL)
    assert (breaker.state is State.OPEN) is opens


def test_exactly_half_the_calls_failed_reaches_fifty_percent():
    breaker = CircuitBreaker("dep", failure_threshold=100, min_calls=10, clock=Clock())
    _calls(breaker, *[OK] * 6, *[FAIL] * 5)  # 5 of 11: 45 %
    assert breaker.state is State.CLOSED
    _calls(breaker, FAIL)  # 6 of 12
    assert breaker.state is State.OPEN


def test_fewer_calls_than_the_minimum_never_open_on_the_rate():
    breaker = CircuitBreaker("dep", failure_threshold=100, min_calls=20, clock=Clock())
    _calls(breaker, *[FAIL] * 19)
    assert breaker.state is State.CLOSED and breaker.window.totals() == (19, 19)
    _calls(breaker, FAIL)
    assert breaker.state is State.OPEN


def test_calls_leave_the_window_a_bucket_at_a_time():
    clock = Clock()
    breaker = CircuitBreaker("dep", failure_threshold=100, window_seconds=10, min_calls=4, clock=clock)
    _calls(breaker, OK, OK, OK, OK)  # bucket [0, 1)
    clock.now = 5.5
    _calls(breaker, FAIL, FAIL)  # bucket [5, 6): 2 of 6
    assert breaker.state is State.CLOSED
    clock.now = 9.99  # the window is the buckets [0, 1) to [9, 10)
    assert breaker.window.totals() == (6, 2)
    clock.now = 10.0  # [1, 2) to [10, 11): the four successes left together
    assert breaker.window.totals() == (2, 2)
    _calls(breaker, FAIL)  # 3 of 3, under the minimum of 4
    assert breaker.state is State.CLOSED
    _calls(breaker, FAIL)  # 4 of 4
    assert breaker.state is State.OPEN


def test_a_bucket_reused_after_a_long_quiet_spell_starts_empty():
    clock = Clock()
    breaker = CircuitBreaker("dep", failure_threshold=100, window_seconds=10, min_calls=3, clock=clock)
    for second in range(10):  # one failure in each bucket's slot, none in a row
        clock.now = second
        _calls(breaker, OK, FAIL, OK, OK)
    assert breaker.state is State.CLOSED and breaker.window.totals() == (40, 10)
    clock.now = 1005.5  # the slot of [5, 6) now holds [1005, 1006); the others hold buckets long gone
    assert breaker.window.totals() == (0, 0)
    _calls(breaker, OK, FAIL)
    assert breaker.window.totals() == (2, 1) and breaker.state is State.CLOSED
    _calls(breaker, FAIL)  # 2 of 3
    assert breaker.state is State.OPEN


def test_business_errors_count_as_calls_and_never_as_failures():
    breaker = CircuitBreaker("dep", failure_threshold=100, min_calls=4, clock=Clock())
    business = (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED)
    _calls(breaker, *business * 10)
    assert breaker.state is State.CLOSED and breaker.window.totals() == (60, 0)
    breaker = CircuitBreaker("dep", failure_threshold=100, min_calls=4, clock=Clock())
    _calls(breaker, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.NOT_FOUND, FAIL)
    assert breaker.state is State.CLOSED  # 1 of 4
    _calls(breaker, grpc.StatusCode.DEADLINE_EXCEEDED, FAIL)  # 3 of 6
    assert breaker.state is State.OPEN


def test_a_services_own_unavailable_or_deadline_answer_is_an_answer_and_its_runtimes_is_a_failure():
    breaker = CircuitBreaker("dep", failure_threshold=2, min_calls=4, clock=Clock())
    for code, reason in ((grpc.StatusCode.UNAVAILABLE, "PAYMENT_FAILED"), (grpc.StatusCode.UNAVAILABLE,
                         "DEPENDENCY_UNAVAILABLE"), (grpc.StatusCode.DEADLINE_EXCEEDED, "PROCESSOR_TIMEOUT")) * 3:
        assert breaker.allow()
        breaker.record(code, reason=reason)
    assert breaker.state is State.CLOSED and breaker.window.totals() == (9, 0)
    for reason in ("DATABASE_UNAVAILABLE", "UNAVAILABLE", "DEADLINE_EXCEEDED"):
        breaker = CircuitBreaker("dep", failure_threshold=2, clock=Clock())
        for _ in range(2):
            assert breaker.allow()
            breaker.record(grpc.StatusCode.UNAVAILABLE, reason=reason)
        assert breaker.state is State.OPEN, reason


def test_either_condition_opens_the_circuit():
    # Down altogether and rarely called: 3 in a row open it long before the window holds 20 calls.
    rare = CircuitBreaker("dep", failure_threshold=3, min_calls=20, clock=Clock())
    _calls(rare, FAIL, FAIL, FAIL)
    assert rare.state is State.OPEN and rare.window.totals() == (3, 3)
    # Failing often but never twice in a row: the rate opens it.
    flaky = CircuitBreaker("dep", failure_threshold=2, min_calls=6, clock=Clock())
    _calls(flaky, FAIL, OK, FAIL, OK, FAIL)
    assert flaky.state is State.CLOSED
    _calls(flaky, OK, FAIL)  # 4 of 7: 57 %
    assert flaky.state is State.OPEN


def _opened_on_the_rate(clock: Clock) -> CircuitBreaker:
    breaker = CircuitBreaker("dep", failure_threshold=100, reset_seconds=1, window_seconds=10, min_calls=4,
                             clock=clock)
    _calls(breaker, OK, FAIL, OK, FAIL)
    assert breaker.state is State.OPEN
    return breaker


def test_a_trial_that_succeeds_closes_the_circuit_with_an_empty_window():
    clock = Clock()
    breaker = _opened_on_the_rate(clock)
    clock.now = 1.0
    assert breaker.allow() and breaker.state is State.HALF_OPEN
    assert not breaker.allow(), "only one trial call while half-open"
    breaker.record(grpc.StatusCode.NOT_FOUND)  # an answer: the dependency is back
    assert breaker.state is State.CLOSED and breaker.window.totals() == (0, 0)
    # The failures before the circuit opened are still within 10 s, but no longer count.
    _calls(breaker, FAIL, OK, FAIL)
    assert breaker.state is State.CLOSED


def test_a_trial_that_fails_opens_the_circuit_again_for_the_whole_open_time():
    clock = Clock()
    breaker = _opened_on_the_rate(clock)
    clock.now = 1.5
    assert breaker.allow() and breaker.state is State.HALF_OPEN
    breaker.record(grpc.StatusCode.DEADLINE_EXCEEDED)
    assert breaker.state is State.OPEN and breaker.opened_at == 1.5
    clock.now = 2.4
    assert not breaker.allow()
    clock.now = 2.5
    assert breaker.allow() and breaker.state is State.HALF_OPEN


def test_calls_in_flight_when_the_circuit_opened_change_nothing_when_they_end():
    # Under concurrency, a dependency failing half its calls has answers in flight when the rate opens the circuit:
    # they must neither close it again nor prolong it, nor pass for the trial once it is half-open.
    clock = Clock()
    breaker = CircuitBreaker("dep", failure_threshold=100, reset_seconds=1, min_calls=4, clock=clock)
    in_flight = []
    for _ in range(6):  # six calls let through at once
        assert breaker.allow()
        in_flight.append(breaker.epoch)
    for code in (OK, FAIL, OK, FAIL):
        breaker.record(code, in_flight.pop())
    assert breaker.state is State.OPEN
    clock.now = 0.5
    breaker.record(OK, in_flight.pop())
    assert breaker.state is State.OPEN and breaker.opened_at == 0.0 and not breaker.allow()
    clock.now = 1.0
    assert breaker.allow() and breaker.state is State.HALF_OPEN
    trial = breaker.epoch
    breaker.record(FAIL, in_flight.pop())  # the last of the six ends during the trial
    assert breaker.state is State.HALF_OPEN and not breaker.allow(), "a second trial was let through"
    breaker.abandon(0)  # one let through while closed, cancelled now: it frees no second trial either
    assert not breaker.allow()
    breaker.record(OK, trial)
    assert breaker.state is State.CLOSED


def test_a_cancelled_trial_lets_another_trial_through():
    clock = Clock()
    breaker = _opened_on_the_rate(clock)
    clock.now = 1.0
    assert breaker.allow()
    breaker.abandon(breaker.epoch)
    assert breaker.state is State.HALF_OPEN and breaker.allow()


def _sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_the_state_gauge_and_transition_counter_follow_the_breaker():
    clock = Clock()
    name = f"dep-{uuid.uuid4().hex[:8]}:50051"
    breaker = CircuitBreaker(name, failure_threshold=2, reset_seconds=1, clock=clock)
    assert _sample("tessera_circuit_state", dependency=name) == 0
    _calls(breaker, FAIL, FAIL)
    assert _sample("tessera_circuit_state", dependency=name) == 2
    clock.now = 1
    assert _sample("tessera_circuit_state", dependency=name) == 1, "the open time passed: the next call is the trial"
    breaker.allow()
    assert _sample("tessera_circuit_state", dependency=name) == 1
    breaker.record(OK)
    assert _sample("tessera_circuit_state", dependency=name) == 0
    transitions = {state: _sample("tessera_circuit_transitions_total", dependency=name, state=state)
                   for state in ("open", "half_open", "closed")}
    assert transitions == {"open": 1, "half_open": 1, "closed": 1}


def test_open_error_carries_error_info():
    err = CircuitBreaker("inventory:50052").open_error()
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    info, _ = error_details(err)
    assert info.reason == "CIRCUIT_OPEN" and info.metadata["dependency"] == "inventory:50052"


def test_retries_only_for_methods_the_contract_marks_safe():
    user = user_service_pb2.DESCRIPTOR.services_by_name["UserService"]
    order = order_service_pb2.DESCRIPTOR.services_by_name["OrderService"]
    config = json.loads(service_config([user, order]))
    names = {(n["service"].rsplit(".", 1)[1], n["method"]) for n in config["methodConfig"][0]["name"]}
    assert ("UserService", "GetUser") in names and ("UserService", "UpdateUser") in names
    assert ("OrderService", "GetOrder") in names and ("OrderService", "CancelOrder") in names
    assert ("UserService", "CreateUser") not in names and ("OrderService", "CreateOrder") not in names
    assert config["methodConfig"][0]["retryPolicy"]["retryableStatusCodes"]
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
