"""User settings: how long answered CreateUser calls are kept, read from the environment, a bad value named."""

from __future__ import annotations

import pytest

from tessera_runtime.config import ConfigError, ServiceSettings
from tessera_user import bootstrap


def test_create_request_settings_have_defaults_and_read_the_environment():
    default = bootstrap.SETTINGS.from_env("user", bootstrap.DEFAULT_PORT, {})
    assert (default.grpc_port, default.create_request_retention_seconds, default.create_request_sweep_seconds,
            default.create_request_sweep_batch) == (50051, 86_400.0, 60.0, 500)
    tuned = bootstrap.SETTINGS.from_env("user", 0, {"TESSERA_CREATE_REQUEST_RETENTION_SECONDS": "3600",
                                                    "TESSERA_CREATE_REQUEST_SWEEP_SECONDS": "5",
                                                    "TESSERA_CREATE_REQUEST_SWEEP_BATCH": "50"})
    assert (tuned.create_request_retention_seconds, tuned.create_request_sweep_seconds,
            tuned.create_request_sweep_batch) == (3600.0, 5.0, 50)


@pytest.mark.parametrize(("name", "value"), [
    ("TESSERA_CREATE_REQUEST_RETENTION_SECONDS", "a day"),
    ("TESSERA_CREATE_REQUEST_RETENTION_SECONDS", "0"),
    ("TESSERA_CREATE_REQUEST_SWEEP_SECONDS", "0"),
    ("TESSERA_CREATE_REQUEST_SWEEP_BATCH", "0"),
    ("TESSERA_CREATE_REQUEST_SWEEP_BATCH", "10001"),
])
def test_a_bad_value_stops_the_service_naming_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        bootstrap.SETTINGS.from_env("user", 0, {name: value})


async def test_build_accepts_plain_service_settings_with_the_user_defaults(tmp_path):
    plain = ServiceSettings.from_env("user", 0, {"TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path}/u.db"})
    module = await bootstrap.build(plain)
    assert module.service_names == ("tessera.user.v1.UserService",)
    for stop in reversed(module.on_stop):
        await stop()
