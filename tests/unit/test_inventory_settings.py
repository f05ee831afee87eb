"""Inventory settings: read once from the environment, a bad value named, plain settings accepted by build()."""

from __future__ import annotations

import pytest

from tessera_inventory import bootstrap
from tessera_runtime.config import ConfigError, ServiceSettings


def test_reservation_settings_have_the_contracts_defaults_and_read_the_environment():
    default = bootstrap.SETTINGS.from_env("inventory", bootstrap.DEFAULT_PORT, {})
    assert (default.grpc_port, default.reservation_default_ttl_seconds, default.reservation_sweep_seconds) == (
        50052, 900.0, 5.0)
    tuned = bootstrap.SETTINGS.from_env("inventory", 0, {"TESSERA_RESERVATION_DEFAULT_TTL_SECONDS": "2",
                                                         "TESSERA_RESERVATION_SWEEP_SECONDS": "0.5",
                                                         "TESSERA_RESERVATION_SWEEP_BATCH": "7"})
    assert (tuned.reservation_default_ttl_seconds, tuned.reservation_sweep_seconds,
            tuned.reservation_sweep_batch) == (2.0, 0.5, 7)


@pytest.mark.parametrize(("name", "value"), [
    ("TESSERA_RESERVATION_SWEEP_SECONDS", "often"),
    ("TESSERA_RESERVATION_SWEEP_SECONDS", "0"),
    ("TESSERA_RESERVATION_DEFAULT_TTL_SECONDS", "86401"),
    ("TESSERA_RESERVATION_SWEEP_BATCH", "0"),
])
def test_a_bad_value_stops_the_service_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        bootstrap.SETTINGS.from_env("inventory", 0, {name: value})


async def test_build_accepts_plain_service_settings_with_inventory_defaults(tmp_path):
    plain = ServiceSettings.from_env("inventory", 0, {"TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/i.db"})
    module = await bootstrap.build(plain)
    assert module.service_names == ("tessera.inventory.v1.InventoryService",)
    for stop in reversed(module.on_stop):
        await stop()
