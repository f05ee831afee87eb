"""The GraphQL API's settings and the scopes it asks each RPC for."""

from __future__ import annotations

import pytest

from tessera_graphql.app import GraphQLSettings
from tessera_graphql.upstream import Scopes
from tessera_runtime.config import CircuitSettings, ConfigError


def test_defaults_and_the_environment():
    default = GraphQLSettings.from_env({})
    assert (default.host, default.port, default.max_depth, default.gateway_profile) == ("127.0.0.1", 8090, 10, "dev")
    assert default.addresses == {"user": "127.0.0.1:50051", "inventory": "127.0.0.1:50052",
                                 "order": "127.0.0.1:50054", "analytics": "127.0.0.1:50056"}
    tuned = GraphQLSettings.from_env({"TESSERA_ENV": "production", "TESSERA_GRAPHQL_PORT": "9000",
                                      "TESSERA_ORDER_SERVICE_ADDR": "order:50054", "TESSERA_GRAPHQL_MAX_DEPTH": "4"})
    assert (tuned.port, tuned.addresses["order"], tuned.max_depth, tuned.gateway_profile) == (
        9000, "order:50054", 4, "prod")


def test_the_circuit_breakers_take_the_same_settings_as_the_services():
    assert GraphQLSettings.from_env({}).circuit == CircuitSettings()
    tuned = GraphQLSettings.from_env({"TESSERA_CIRCUIT_FAILURE_THRESHOLD": "3", "TESSERA_CIRCUIT_OPEN_SECONDS": "2",
                                      "TESSERA_CIRCUIT_ERROR_PERCENT": "40", "TESSERA_CIRCUIT_WINDOW_SECONDS": "20",
                                      "TESSERA_CIRCUIT_MIN_CALLS": "10"})
    assert tuned.circuit == CircuitSettings(failure_threshold=3, open_seconds=2.0, error_percent=40,
                                            window_seconds=20.0, min_calls=10)


@pytest.mark.parametrize(("name", "value"), [
    ("TESSERA_GRAPHQL_PORT", "http"),
    ("TESSERA_GRAPHQL_PORT", "70000"),
    ("TESSERA_GRAPHQL_MAX_DEPTH", "1"),
    ("TESSERA_GRAPHQL_MAX_ALIASES", "0"),
    ("TESSERA_GRAPHQL_MAX_TOKENS", "10"),
    ("TESSERA_ENV", "staging"),
    ("TESSERA_DEFAULT_DEADLINE_SECONDS", "0"),
    ("TESSERA_CIRCUIT_FAILURE_THRESHOLD", "0"),
    ("TESSERA_CIRCUIT_OPEN_SECONDS", "nan"),
    ("TESSERA_CIRCUIT_ERROR_PERCENT", "101"),
    ("TESSERA_CIRCUIT_WINDOW_SECONDS", "inf"),
    ("TESSERA_CIRCUIT_MIN_CALLS", "0"),
])
def test_a_bad_value_is_refused_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        GraphQLSettings.from_env({name: value})


def test_each_rpc_asks_the_scope_the_gateway_asks_over_rest():
    scopes = Scopes.from_gateway("dev")
    assert scopes.needed["/tessera.user.v1.UserService/GetUser"] == ("user:read",)
    assert scopes.needed["/tessera.order.v1.OrderService/CreateOrder"] == ("order:write",)
    assert scopes.needed["/tessera.inventory.v1.InventoryService/BatchGetProducts"] == ("inventory:read",)
    assert scopes.needed["/tessera.inventory.v1.InventoryService/ReserveStock"] == ("admin",)
    assert scopes.needed["/tessera.analytics.v1.AnalyticsService/ListDailyMetrics"] == ("analytics:read",)
    assert scopes.admin == "admin"
