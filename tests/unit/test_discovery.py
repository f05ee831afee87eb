"""The balancers' arithmetic and the discovery settings: addresses, weights and intervals, with errors naming the
variable."""

from __future__ import annotations

import asyncio
import collections
import logging

import pytest

from tessera_graphql.app import GraphQLSettings
from tessera_order.settings import OrderSettings
from tessera_runtime.app import composition_root, load_settings
from tessera_runtime.config import ConfigError
from tessera_runtime.discovery import (
    DiscoverySettings,
    InMemoryRegistry,
    Registration,
    RoundRobinLoadBalancer,
    ServiceInstance,
    WeightedRoundRobinLoadBalancer,
)

pytestmark = pytest.mark.unit


def instances(**weights: int) -> list[ServiceInstance]:
    return [ServiceInstance(id=name, service="s", host=name, port=1, weight=w) for name, w in weights.items()]


def picks(balancer, count: int) -> str:
    return "".join(balancer.pick().host for _ in range(count))


def test_smooth_weighted_round_robin_interleaves_as_nginx_does():
    balancer = WeightedRoundRobinLoadBalancer()
    balancer.update(instances(a=5, b=1, c=1))
    # nginx's example: never a burst of five a's.
    assert picks(balancer, 14) == "aabacaa" * 2
    balancer.update(instances(a=3, b=1))  # c leaves; after whole cycles a and b start again from 0
    assert picks(balancer, 8) == "aaba" * 2


def test_weighted_round_robin_distributes_exactly_by_weight_over_each_cycle():
    balancer = WeightedRoundRobinLoadBalancer()
    balancer.update(instances(a=3, b=1))
    assert picks(balancer, 4) == "aaba"
    balancer.update(instances(a=7, b=2, c=1))
    for _ in range(3):
        assert collections.Counter(picks(balancer, 10)) == {"a": 7, "b": 2, "c": 1}


def test_membership_changes_keep_the_rotation_of_the_others():
    balancer = WeightedRoundRobinLoadBalancer()
    balancer.update(instances(a=1, b=1, c=1))
    assert picks(balancer, 3) == "abc"
    balancer.update(instances(a=1, c=1))  # b left
    assert collections.Counter(picks(balancer, 4)) == {"a": 2, "c": 2}
    balancer.update([])
    assert balancer.pick() is None


def test_round_robin_ignores_weights():
    balancer = RoundRobinLoadBalancer()
    balancer.update(instances(a=5, b=1))
    assert picks(balancer, 4) == "abab"
    balancer.update(instances(a=1))
    assert picks(balancer, 2) == "aa"
    balancer.update([])
    assert balancer.pick() is None


def test_addresses_default_to_fixed_ones_and_accept_the_discovery_forms(tmp_path):
    default = OrderSettings.from_env("order", 50054, {})
    assert default.inventory_service_addr == "127.0.0.1:50052"
    assert default.discovery == DiscoverySettings()
    configured = OrderSettings.from_env("order", 50054, {
        "TESSERA_REGISTRY_DIR": str(tmp_path), "TESSERA_INVENTORY_SERVICE_ADDR": "registry",
        "TESSERA_USER_SERVICE_ADDR": "registry:///accounts",
        "TESSERA_PAYMENT_SERVICE_ADDR": "static:///127.0.0.1:50053;weight=3,[::1]:50063",
        "TESSERA_INSTANCE_WEIGHT": "3", "TESSERA_LOAD_BALANCING": "round_robin"})
    assert configured.inventory_service_addr == "registry:///inventory"
    assert configured.user_service_addr == "registry:///accounts"
    assert configured.payment_service_addr == "static:///127.0.0.1:50053;weight=3,[::1]:50063"
    assert configured.discovery.registry_dir == tmp_path
    assert (configured.discovery.instance_weight, configured.discovery.balancing) == (3, "round_robin")
    graphql = GraphQLSettings.from_env({"TESSERA_REGISTRY_DIR": str(tmp_path),
                                        "TESSERA_ORDER_SERVICE_ADDR": "registry"})
    assert graphql.addresses["order"] == "registry:///order"
    assert graphql.discovery.registry_dir == tmp_path
    assert load_settings(composition_root("inventory"), {"TESSERA_REGISTRY_DIR": str(tmp_path)}) \
        .discovery.registry_dir == tmp_path


@pytest.mark.parametrize(("environ", "message"), [
    ({"TESSERA_INVENTORY_SERVICE_ADDR": "registry"},
     "TESSERA_INVENTORY_SERVICE_ADDR=registry needs a registry: TESSERA_REGISTRY_DIR (one host's directory) or "
     "TESSERA_REGISTRY_URL"),
    ({"TESSERA_REGISTRY_DIR": "/tmp", "TESSERA_REGISTRY_URL": "postgresql://127.0.0.1/registry"},
     "TESSERA_REGISTRY_DIR and TESSERA_REGISTRY_URL are both set"),
    ({"TESSERA_REGISTRY_URL": "mysql://127.0.0.1/registry"},
     "TESSERA_REGISTRY_URL must be postgresql://user@host:port/database, got scheme 'mysql'"),
    ({"TESSERA_REGISTRY_URL": "127.0.0.1:5432"}, "TESSERA_REGISTRY_URL is not a valid URL"),
    ({"TESSERA_REGISTRY_URL": "postgresql://127.0.0.1:99999/registry"}, "TESSERA_REGISTRY_URL is not a valid URL"),
    ({"TESSERA_REGISTRY_URL": "postgresql://127.0.0.1:5432"}, "TESSERA_REGISTRY_URL must name the registry's database"),
    ({"TESSERA_REGISTRY_URL": "postgresql://127.0.0.1/registry", "TESSERA_REGISTRY_CHECK_SECONDS": "20"},
     "TESSERA_REGISTRY_CHECK_SECONDS (20) must be at most half of TESSERA_REGISTRY_DEREGISTER_AFTER_SECONDS (30)"),
    ({"TESSERA_INVENTORY_SERVICE_ADDR": "static:///"}, "TESSERA_INVENTORY_SERVICE_ADDR lists no instance"),
    ({"TESSERA_INVENTORY_SERVICE_ADDR": "static:///h1:50052,h2"},
     "TESSERA_INVENTORY_SERVICE_ADDR: instance 2 'h2' must be host:port"),
    ({"TESSERA_INVENTORY_SERVICE_ADDR": "static:///h1:70000"},
     "TESSERA_INVENTORY_SERVICE_ADDR: instance 1 'h1:70000' port must be 1-65535"),
    ({"TESSERA_INVENTORY_SERVICE_ADDR": "static:///h1:1;weight=0"},
     "TESSERA_INVENTORY_SERVICE_ADDR: instance 1 'h1:1' weight must be 1-1000, got '0'"),
    ({"TESSERA_INVENTORY_SERVICE_ADDR": "static:///h1:1;zone=a"},
     "TESSERA_INVENTORY_SERVICE_ADDR: instance 1 'h1:1' has an unknown option 'zone=a'"),
    ({"TESSERA_INVENTORY_SERVICE_ADDR": "static:///h1:1,h1:1"},
     "TESSERA_INVENTORY_SERVICE_ADDR: instance 2 h1:1 is listed twice"),
    ({"TESSERA_INVENTORY_SERVICE_ADDR": "static:///::1:50052"},
     "TESSERA_INVENTORY_SERVICE_ADDR: instance 1 '::1:50052' an IPv6 host goes in brackets"),
    ({"TESSERA_INVENTORY_SERVICE_ADDR": "static://h1:1"}, "TESSERA_INVENTORY_SERVICE_ADDR must be static:///"),
    ({"TESSERA_REGISTRY_DIR": "/tmp", "TESSERA_USER_SERVICE_ADDR": "registry:///../etc"},
     "TESSERA_USER_SERVICE_ADDR: '../etc' is no service name"),
    ({"TESSERA_INSTANCE_WEIGHT": "0"}, "TESSERA_INSTANCE_WEIGHT must be >= 1"),
    ({"TESSERA_INSTANCE_WEIGHT": "heavy"}, "TESSERA_INSTANCE_WEIGHT must be an integer"),
    ({"TESSERA_LOAD_BALANCING": "random"}, "TESSERA_LOAD_BALANCING must be one of weighted_round_robin, round_robin"),
    ({"TESSERA_REGISTRY_CHECK_SECONDS": "0"}, "TESSERA_REGISTRY_CHECK_SECONDS must be >= 0.05"),
    ({"TESSERA_REGISTRY_DEREGISTER_AFTER_SECONDS": "-1"}, "TESSERA_REGISTRY_DEREGISTER_AFTER_SECONDS must be >="),
])
def test_bad_configuration_names_the_variable(environ, message):
    with pytest.raises(ConfigError) as err:
        OrderSettings.from_env("order", 50054, environ)
    assert message in str(err.value)


def test_a_registry_url_is_read_in_any_postgresql_spelling_and_serves_registry_addresses():
    for given in ("postgresql://reg:pw@db1:5433/registry", "postgres://reg:pw@db1:5433/registry",
                  "postgresql+asyncpg://reg:pw@db1:5433/registry"):
        settings = OrderSettings.from_env("order", 50054, {"TESSERA_REGISTRY_URL": given,
                                                           "TESSERA_INVENTORY_SERVICE_ADDR": "registry"})
        assert settings.discovery.registry_url == "postgresql+asyncpg://reg:pw@db1:5433/registry"
        assert settings.discovery.registry_dir is None
        assert settings.discovery.registry_location == "db1:5433/registry"  # no password in logs
        assert settings.inventory_service_addr == "registry:///inventory"


def test_a_registry_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="TESSERA_REGISTRY_DIR must be a directory"):
        GraphQLSettings.from_env({"TESSERA_REGISTRY_DIR": str(tmp_path / "file")})


class FlakyRegistry(InMemoryRegistry):
    """An in-memory registry whose renewals raise `error` while it is set (a read-only standby after a failover, a
    revoked privilege), and that records its renewals, deregistrations and closing."""

    prunes = True

    def __init__(self) -> None:
        super().__init__()
        self.error: Exception | None = None
        self.renewals = 0
        self.failures = 0
        self.closed = False

    async def renew(self, instance: ServiceInstance) -> bool:
        if self.error is not None:
            self.failures += 1
            raise self.error
        self.renewals += 1
        return await super().renew(instance)

    async def close(self) -> None:
        self.closed = True


async def eventually(condition, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_a_registry_that_fails_otherwise_than_unreachable_keeps_the_renewals_going(caplog):
    registry = FlakyRegistry()
    instance = ServiceInstance(id="users-1", service="user", host="127.0.0.1", port=1)
    ready: list[bool | Exception] = [True]

    def is_ready() -> bool:
        if isinstance(ready[0], Exception):
            raise ready[0]
        return ready[0]

    caplog.set_level(logging.INFO, logger="tessera.discovery")
    kept = Registration(registry, [instance], ready=is_ready, interval=0.01, location="test")
    await kept.start()
    registry.error = RuntimeError("cannot execute UPDATE in a read-only transaction")
    await eventually(lambda: registry.failures >= 5)
    ready[0] = RuntimeError("the readiness check itself failed")
    await asyncio.sleep(0.05)
    ready[0], registry.error = True, None
    renewed = registry.renewals
    await eventually(lambda: registry.renewals > renewed + 2)  # renewing again, as soon as the registry lets it
    failed = [r for r in caplog.records if r.getMessage().startswith("registration renewal failed")]
    assert [r.error for r in failed] == ["cannot execute UPDATE in a read-only transaction",
                                         "the readiness check itself failed"]  # once each, not at every interval
    assert [r.getMessage() for r in caplog.records].count("registration renewed again") == 1

    registry.error = RuntimeError("permission denied for table tessera_service_instances")
    await eventually(lambda: registry.failures >= 10)
    await kept.stop()  # a graceful stop still deregisters and closes the registry
    assert await registry.instances("user") == [] and registry.closed
