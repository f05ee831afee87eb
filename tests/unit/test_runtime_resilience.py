"""The circuit breaker's state machine and the retry policy derived from the contracts."""

from __future__ import annotations

import json

import grpc
from tessera.order.v1 import order_service_pb2
from tessera.user.v1 import user_service_pb2

from tessera_runtime.clients import error_details, service_config
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
