"""Settings are read once and fail fast with the name of the bad variable."""

from __future__ import annotations

import dataclasses

import pytest

from tessera_runtime.config import CircuitSettings, ConfigError, ServiceSettings


def test_defaults_are_embedded_sqlite_and_dev():
    s = ServiceSettings.from_env("user", 50051, {})
    assert s.database_url.startswith("sqlite+aiosqlite:///") and s.database_url.endswith("user.db")
    assert s.grpc_port == 50051 and not s.production and not s.require_identity


def test_settings_are_frozen():
    s = ServiceSettings.from_env("user", 50051, {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.grpc_port = 1  # type: ignore[misc]


def test_production_requires_identity_by_default():
    assert ServiceSettings.from_env("user", 1, {"TESSERA_ENV": "production"}).require_identity


@pytest.mark.parametrize(("env", "name"), [
    ({"TESSERA_GRPC_PORT": "http"}, "TESSERA_GRPC_PORT"),
    ({"TESSERA_GRPC_PORT": "70000"}, "TESSERA_GRPC_PORT"),
    ({"TESSERA_DRAIN_SECONDS": "-1"}, "TESSERA_DRAIN_SECONDS"),
    ({"TESSERA_ENV": "staging"}, "TESSERA_ENV"),
    ({"TESSERA_REQUIRE_IDENTITY": "maybe"}, "TESSERA_REQUIRE_IDENTITY"),
    ({"TESSERA_DATABASE_URL": "mysql://x"}, "TESSERA_DATABASE_URL"),
    ({"TESSERA_LOG_LEVEL": "LOUD"}, "TESSERA_LOG_LEVEL"),
    ({"TESSERA_DATABASE_POOL_SIZE": "0"}, "TESSERA_DATABASE_POOL_SIZE"),
    ({"TESSERA_DATABASE_POOL_SIZE": "many"}, "TESSERA_DATABASE_POOL_SIZE"),
    # Numbers that are no amount of seconds: a drain of nan or inf seconds never ends, so SIGTERM would never
    # stop the process; a readiness interval of nan would never check again.
    ({"TESSERA_DRAIN_SECONDS": "nan"}, "TESSERA_DRAIN_SECONDS"),
    ({"TESSERA_DRAIN_SECONDS": "inf"}, "TESSERA_DRAIN_SECONDS"),
    ({"TESSERA_GRACE_SECONDS": "1e999"}, "TESSERA_GRACE_SECONDS"),
    ({"TESSERA_READINESS_INTERVAL_SECONDS": "NaN"}, "TESSERA_READINESS_INTERVAL_SECONDS"),
    ({"TESSERA_DEFAULT_DEADLINE_SECONDS": "infinity"}, "TESSERA_DEFAULT_DEADLINE_SECONDS"),
    # A breaker that opens after no failure, or stays open for no time (or for ever), is no breaker.
    ({"TESSERA_CIRCUIT_FAILURE_THRESHOLD": "0"}, "TESSERA_CIRCUIT_FAILURE_THRESHOLD"),
    ({"TESSERA_CIRCUIT_FAILURE_THRESHOLD": "-3"}, "TESSERA_CIRCUIT_FAILURE_THRESHOLD"),
    ({"TESSERA_CIRCUIT_FAILURE_THRESHOLD": "five"}, "TESSERA_CIRCUIT_FAILURE_THRESHOLD"),
    ({"TESSERA_CIRCUIT_FAILURE_THRESHOLD": "2.5"}, "TESSERA_CIRCUIT_FAILURE_THRESHOLD"),
    ({"TESSERA_CIRCUIT_FAILURE_THRESHOLD": "1001"}, "TESSERA_CIRCUIT_FAILURE_THRESHOLD"),
    ({"TESSERA_CIRCUIT_OPEN_SECONDS": "0"}, "TESSERA_CIRCUIT_OPEN_SECONDS"),
    ({"TESSERA_CIRCUIT_OPEN_SECONDS": "-1"}, "TESSERA_CIRCUIT_OPEN_SECONDS"),
    ({"TESSERA_CIRCUIT_OPEN_SECONDS": "10s"}, "TESSERA_CIRCUIT_OPEN_SECONDS"),
    ({"TESSERA_CIRCUIT_OPEN_SECONDS": "nan"}, "TESSERA_CIRCUIT_OPEN_SECONDS"),
    ({"TESSERA_CIRCUIT_OPEN_SECONDS": "inf"}, "TESSERA_CIRCUIT_OPEN_SECONDS"),
    # A rate over no calls or no time, or a share of failures no window can reach, is no condition.
    ({"TESSERA_CIRCUIT_ERROR_PERCENT": "0"}, "TESSERA_CIRCUIT_ERROR_PERCENT"),
    ({"TESSERA_CIRCUIT_ERROR_PERCENT": "101"}, "TESSERA_CIRCUIT_ERROR_PERCENT"),
    ({"TESSERA_CIRCUIT_ERROR_PERCENT": "50%"}, "TESSERA_CIRCUIT_ERROR_PERCENT"),
    ({"TESSERA_CIRCUIT_ERROR_PERCENT": "nan"}, "TESSERA_CIRCUIT_ERROR_PERCENT"),
    ({"TESSERA_CIRCUIT_ERROR_PERCENT": "inf"}, "TESSERA_CIRCUIT_ERROR_PERCENT"),
    ({"TESSERA_CIRCUIT_WINDOW_SECONDS": "0"}, "TESSERA_CIRCUIT_WINDOW_SECONDS"),
    ({"TESSERA_CIRCUIT_WINDOW_SECONDS": "0.5"}, "TESSERA_CIRCUIT_WINDOW_SECONDS"),
    ({"TESSERA_CIRCUIT_WINDOW_SECONDS": "3601"}, "TESSERA_CIRCUIT_WINDOW_SECONDS"),
    ({"TESSERA_CIRCUIT_WINDOW_SECONDS": "nan"}, "TESSERA_CIRCUIT_WINDOW_SECONDS"),
    ({"TESSERA_CIRCUIT_WINDOW_SECONDS": "inf"}, "TESSERA_CIRCUIT_WINDOW_SECONDS"),
    ({"TESSERA_CIRCUIT_WINDOW_SECONDS": "10s"}, "TESSERA_CIRCUIT_WINDOW_SECONDS"),
    ({"TESSERA_CIRCUIT_MIN_CALLS": "0"}, "TESSERA_CIRCUIT_MIN_CALLS"),
    ({"TESSERA_CIRCUIT_MIN_CALLS": "-1"}, "TESSERA_CIRCUIT_MIN_CALLS"),
    ({"TESSERA_CIRCUIT_MIN_CALLS": "100001"}, "TESSERA_CIRCUIT_MIN_CALLS"),
    ({"TESSERA_CIRCUIT_MIN_CALLS": "2.5"}, "TESSERA_CIRCUIT_MIN_CALLS"),
    ({"TESSERA_CIRCUIT_MIN_CALLS": "nan"}, "TESSERA_CIRCUIT_MIN_CALLS"),
    # URLs the database and broker clients cannot use.
    ({"TESSERA_DATABASE_URL": "postgresql+asyncpg://tessera@db:port/tessera"}, "TESSERA_DATABASE_URL"),
    ({"TESSERA_DATABASE_URL": "sqlite+aiosqlite://relative.db"}, "TESSERA_DATABASE_URL"),
    ({"TESSERA_DATABASE_URL": "postgresql+asyncpg://tessera@db:99999/tessera"}, "TESSERA_DATABASE_URL.*port"),
    ({"TESSERA_DATABASE_URL": "postgresql+asyncpg://tessera@db:0/tessera"}, "TESSERA_DATABASE_URL.*port"),
    ({"TESSERA_AMQP_URL": "amqp://guest:guest@rabbitmq:port/"}, "TESSERA_AMQP_URL"),
    ({"TESSERA_AMQP_URL": "http://rabbitmq:5672/"}, "TESSERA_AMQP_URL"),
    # Query parameters the broker client refuses: the service would only fail when its relay or consumer starts.
    ({"TESSERA_AMQP_URL": "amqp://guest:guest@rabbitmq:5672/%2F?heartbeat=soon"}, "TESSERA_AMQP_URL"),
    ({"TESSERA_AMQP_URL": "amqp://guest:guest@rabbitmq:5672/%2F?heartbeat_interval=30"}, "TESSERA_AMQP_URL"),
    ({"TESSERA_AMQP_URL": "amqp://guest:guest@rabbitmq:5672/%2F?socket_timeout=0"}, "TESSERA_AMQP_URL"),
])
def test_bad_values_name_the_variable(env, name):
    with pytest.raises(ConfigError, match=name):
        ServiceSettings.from_env("user", 50051, env)


def test_a_broker_url_the_client_refuses_is_named_without_its_password():
    with pytest.raises(ConfigError, match=r"TESSERA_AMQP_URL.*heartbeat") as raised:
        ServiceSettings.from_env("user", 50051, {"TESSERA_AMQP_URL": "amqp://app:s3cret@mq:5672/%2F?heartbeat=x"})
    assert "s3cret" not in str(raised.value)
    settings = ServiceSettings.from_env("user", 50051, {"TESSERA_AMQP_URL": "amqp://app:s3cret@mq/%2F?heartbeat=10"})
    assert settings.amqp_url.endswith("?heartbeat=10")  # what the client accepts is kept as it is


def test_the_database_pool_size_is_read_and_bounds_the_connections_of_a_process():
    from tessera_runtime.db import max_connections

    assert ServiceSettings.from_env("user", 1, {}).database_pool_size == 10
    assert max_connections() == 26  # 10, up to 20 under load, 5 for direct statements and the relay's one
    s = ServiceSettings.from_env("user", 1, {"TESSERA_DATABASE_POOL_SIZE": "4"})
    assert s.database_pool_size == 4 and max_connections(s.database_pool_size) == 11
    assert max_connections(1) == 4  # the direct statements and the relay keep one each however small the pool


def test_the_circuit_breaker_settings_are_read_with_the_documented_defaults():
    s = ServiceSettings.from_env("order", 1, {})
    assert (s.circuit.failure_threshold, s.circuit.open_seconds) == (5, 10.0)
    assert (s.circuit.error_percent, s.circuit.window_seconds, s.circuit.min_calls) == (50, 10.0, 20)
    s = ServiceSettings.from_env("order", 1, {"TESSERA_CIRCUIT_FAILURE_THRESHOLD": "2",
                                              "TESSERA_CIRCUIT_OPEN_SECONDS": "0.5",
                                              "TESSERA_CIRCUIT_ERROR_PERCENT": "25",
                                              "TESSERA_CIRCUIT_WINDOW_SECONDS": "30",
                                              "TESSERA_CIRCUIT_MIN_CALLS": "5"})
    assert s.circuit == CircuitSettings(failure_threshold=2, open_seconds=0.5, error_percent=25,
                                        window_seconds=30.0, min_calls=5)
    # Empty means unset, as for every variable.
    s = ServiceSettings.from_env("order", 1, {name: "" for name in (
        "TESSERA_CIRCUIT_FAILURE_THRESHOLD", "TESSERA_CIRCUIT_OPEN_SECONDS", "TESSERA_CIRCUIT_ERROR_PERCENT",
        "TESSERA_CIRCUIT_WINDOW_SECONDS", "TESSERA_CIRCUIT_MIN_CALLS")})
    assert s.circuit == CircuitSettings() == CircuitSettings(5, 10.0, 50, 10.0, 20)


def test_the_order_services_settings_carry_the_circuit_settings():
    from tessera_order.settings import OrderSettings

    s = OrderSettings.from_env("order", 1, {"TESSERA_CIRCUIT_ERROR_PERCENT": "30", "TESSERA_CIRCUIT_MIN_CALLS": "8"})
    assert (s.circuit.error_percent, s.circuit.min_calls) == (30, 8)
