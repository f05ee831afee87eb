"""Payment settings: read once from the environment, a bad value named, plain settings accepted by build()."""

from __future__ import annotations

import pytest

from tessera_payment import bootstrap
from tessera_runtime.config import ConfigError, ServiceSettings


def test_processor_settings_defaults_and_environment():
    default = bootstrap.SETTINGS.from_env("payment", bootstrap.DEFAULT_PORT, {})
    assert default.grpc_port == 50053
    assert default.charge_policy().timeout_seconds == 10.0 and default.charge_policy().max_attempts == 3
    tuned = bootstrap.SETTINGS.from_env("payment", 0, {"TESSERA_PAYMENT_PROCESSOR_TIMEOUT_SECONDS": "0.5",
                                                       "TESSERA_PAYMENT_PROCESSOR_MAX_ATTEMPTS": "1",
                                                       "TESSERA_PAYMENT_LEASE_GRACE_SECONDS": "0.2"})
    policy = tuned.charge_policy()
    assert (policy.timeout_seconds, policy.max_attempts, policy.lease_grace_seconds) == (0.5, 1, 0.2)


@pytest.mark.parametrize(("name", "value"), [
    ("TESSERA_PAYMENT_PROCESSOR_TIMEOUT_SECONDS", "soon"),
    ("TESSERA_PAYMENT_PROCESSOR_TIMEOUT_SECONDS", "0"),
    ("TESSERA_PAYMENT_PROCESSOR_MAX_ATTEMPTS", "0"),
    ("TESSERA_PAYMENT_RECOVERY_SECONDS", "-1"),
])
def test_a_bad_value_stops_the_service_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        bootstrap.SETTINGS.from_env("payment", 0, {name: value})


async def test_build_accepts_plain_service_settings_with_payment_defaults(tmp_path):
    plain = ServiceSettings.from_env("payment", 0, {"TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/p.db"})
    module = await bootstrap.build(plain)
    assert module.service_names == ("tessera.payment.v1.PaymentService",)
    for stop in reversed(module.on_stop):
        await stop()
