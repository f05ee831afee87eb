"""gateway.yaml as the generator reads it: profiles, conventions, overrides and every way it can be wrong."""

from __future__ import annotations

import re

import pytest

from tessera_gateway import DESCRIPTOR_SET
from tessera_gateway import description as gd
from tessera_gateway.descriptors import Contracts


@pytest.fixture(scope="module")
def contracts() -> Contracts:
    return Contracts.load(DESCRIPTOR_SET)


def rpc(contracts: Contracts, full_name: str):
    for service in contracts.services:
        for r in service.rpcs:
            if r.full_name == full_name:
                return service, r
    raise KeyError(full_name)


@pytest.mark.parametrize("profile", gd.PROFILES)
def test_every_rpc_of_every_service_has_a_valid_policy(profile, contracts):
    d = gd.load(profile)
    d.check_contracts(contracts)
    assert {s.context for s in contracts.services} == {"user", "inventory", "payment", "order", "notification",
                                                       "analytics"}


@pytest.mark.parametrize(("name", "scopes", "route_class"), [
    ("tessera.user.v1.UserService.GetUser", ("user:read",), "read"),
    ("tessera.user.v1.UserService.CreateUser", ("user:write",), "write"),
    ("tessera.user.v1.UserService.UpdateUser", ("user:write",), "write"),
    ("tessera.order.v1.OrderService.ListOrders", ("order:read",), "read"),
    ("tessera.order.v1.OrderService.CreateOrder", ("order:write",), "saga"),
    ("tessera.inventory.v1.InventoryService.AdjustStock", ("inventory:write",), "write"),
    ("tessera.inventory.v1.InventoryService.ReserveStock", ("admin",), "write"),
    ("tessera.inventory.v1.InventoryService.GetReservation", ("admin",), "read"),
    ("tessera.payment.v1.PaymentService.GetPayment", ("payment:read",), "read"),
    ("tessera.payment.v1.PaymentService.ProcessPayment", ("admin",), "write"),
    ("tessera.notification.v1.NotificationService.ListNotifications", ("notification:read",), "read"),
    ("tessera.analytics.v1.AnalyticsService.ListDailyMetrics", ("analytics:read",), "read"),
    ("tessera.analytics.v1.AnalyticsService.GetMetricsSummary", ("analytics:read",), "read"),
])
def test_scopes_and_classes_follow_the_convention_unless_overridden(contracts, name, scopes, route_class):
    service, r = rpc(contracts, name)
    policy = gd.load("dev").policy(r, service)
    assert policy.scopes == scopes
    assert policy.route_class.name == route_class


def test_profiles_differ_only_in_values():
    dev, prod = gd.load("dev"), gd.load("prod")
    assert dev.route_classes.keys() == prod.route_classes.keys()
    assert prod.route_classes["read"].burst == 200 and prod.route_classes["read"].timeout_seconds == 5
    assert dev.jwt.jwks_file is not None and dev.jwt.jwks_uri is None
    assert prod.jwt.jwks_file is None and prod.jwt.jwks_uri.startswith("https://")
    assert str(dev.admin) == str(prod.admin) == "127.0.0.1:9901"
    assert str(dev.upstream_address("order")) == "127.0.0.1:50054"
    assert str(prod.upstream_address("order")) == "order-service.tessera.svc.cluster.local:50054"


def test_only_the_https_profile_sends_hsts():
    dev, prod = dict(gd.load("dev").security_headers), dict(gd.load("prod").security_headers)
    assert "strict-transport-security" not in dev
    hsts = [p.strip() for p in prod.pop("strict-transport-security").split(";")]
    assert int(hsts[0].removeprefix("max-age=")) >= 365 * 24 * 3600 and "includeSubDomains" in hsts
    assert prod == dev  # the other security headers are the same in both


def test_overrides_replace_values_only():
    d = gd.load("dev", overrides={"upstreams": {"addresses": {"user": "127.0.0.1:6001"}},
                                  "route_classes": {"read": {"burst": 3}}})
    assert str(d.upstream_address("user")) == "127.0.0.1:6001"
    assert str(d.upstream_address("payment")) == "127.0.0.1:50053"
    assert d.route_classes["read"].burst == 3 and d.route_classes["read"].refill == 50


def test_deep_merge_merges_mappings_and_replaces_the_rest():
    base = {"a": {"b": 1, "c": [1, 2]}, "d": 1}
    merged = gd.deep_merge(base, {"a": {"c": [3]}, "e": {"f": 1}})
    assert merged == {"a": {"b": 1, "c": [3]}, "d": 1, "e": {"f": 1}}
    assert base == {"a": {"b": 1, "c": [1, 2]}, "d": 1}


@pytest.mark.parametrize(("overrides", "message"), [
    ({"limits": {"max_body": 1}}, "unknown key limits.max_body"),
    ({"limits": {"max_request_body_bytes": 0}}, "limits.max_request_body_bytes must be an integer >= 1"),
    ({"rpcs": {"tessera.user.v1.UserService.Nope": {"scopes": ["admin"]}}}, "names no RPC"),
    ({"rpcs": {"tessera.user.v1.UserService.GetUser": {"scopes": ["user:everything"]}}}, "not in scopes"),
    ({"rpcs": {"tessera.user.v1.UserService.GetUser": {"route_class": "bulk"}}}, "unknown class 'bulk'"),
    ({"rpcs": {"tessera.user.v1.UserService.GetUser": {"route_class": "public"}}}, "is anonymous"),
    ({"rpcs": {"tessera.user.v1.UserService.GetUser": {"scopes": []}}}, "must not be empty"),
    ({"scopes": ["user:read", "Not A Scope", "admin"]}, "is not a valid scope"),
    ({"admin_scope": "root"}, "admin_scope must be one of scopes"),
    ({"canary_scope": "tester"}, "canary_scope must be one of scopes"),
    # The canary scope chooses the version of a call the token may make; it never makes one allowed.
    ({"rpcs": {"tessera.user.v1.UserService.GetUser": {"scopes": ["canary"]}}},
     "tessera.user.v1.UserService.GetUser needs scope 'canary', which is canary_scope: it grants no RPC"),
    ({"jwt": {"jwks_uri": "https://idp.example/jwks"}}, "exactly one of jwks_file and jwks_uri"),
    ({"jwt": {"audiences": []}}, "jwt.audiences must name at least one audience"),
    ({"upstreams": {"addresses": {"user": "no-port"}}}, "upstreams.addresses.user must be HOST:PORT"),
    # A misspelt service would leave the real one at its default address without a word.
    ({"upstreams": {"addresses": {"usr": "127.0.0.1:6000"}}},
     "upstreams.addresses.usr names no service of the contracts "
     "(analytics, inventory, notification, order, payment, user)"),
    ({"listener": {"port": 70000}}, "listener.port must be at most 65535"),
    ({"route_classes": {"public": {"anonymous": False}}}, "one class with anonymous: true"),
    ({"security_headers": {"X-Bad": "1"}}, "is not a lower-case header name"),
    ({"security_headers": {"strict-transport-security": "max-age=31536000"}},
     "security_headers.strict-transport-security needs an https:// public_url"),
    ({"tls": {"cert_file": "/c.crt"}}, "tls.key_file is required"),
    ({"graphql": {"path": "graphql"}}, "graphql.path must be a lower-case absolute path"),
    ({"graphql": {"route_class": "public"}}, "graphql.route_class must name a class that needs a token"),
    ({"graphql": {"route_class": "bulk"}}, "graphql.route_class must name a class that needs a token"),
    ({"graphql": {"address": "nowhere"}}, "graphql.address must be HOST:PORT"),
    ({"graphql": {"depth": 3}}, "unknown key graphql.depth"),
])
def test_bad_values_are_refused_with_the_key_named(contracts, overrides, message):
    with pytest.raises(gd.DescriptionError, match=re.escape(message)):
        gd.load("dev", overrides=overrides).check_contracts(contracts)


def test_prod_refuses_a_plain_http_jwks_uri():
    with pytest.raises(gd.DescriptionError, match="must be an https:// URL"):
        gd.load("prod", overrides={"jwt": {"jwks_uri": "http://idp.example/jwks"}})


def test_an_unknown_profile_is_refused():
    with pytest.raises(gd.DescriptionError, match=r"profiles\.staging is not defined"):
        gd.load("staging")


def test_a_service_without_a_port_needs_an_address(contracts):
    d = gd.load("dev")
    with pytest.raises(gd.DescriptionError, match="shipping"):
        d.upstream_address("shipping")
    assert str(gd.load("dev", overrides={"upstreams": {"addresses": {"shipping": "10.0.0.9:7000"}}})
               .upstream_address("shipping")) == "10.0.0.9:7000"
