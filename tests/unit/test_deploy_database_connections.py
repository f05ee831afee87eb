"""How the deployment checks read a PostgreSQL container's max_connections."""

from __future__ import annotations

import pytest

from tessera_deploy.checks import POSTGRES_DEFAULT_MAX_CONNECTIONS, _max_connections_setting


@pytest.mark.parametrize(("container", "expected"), [
    ({"args": ["-c", "max_connections=300"]}, 300),
    ({"args": ["-c", "shared_buffers=128MB", "-c", "max_connections = 42"]}, 42),
    ({"args": ["-cmax_connections=77"]}, 77),
    ({"command": ["postgres", "-c", "max_connections=500"]}, 500),
    ({"args": ["-c", "max_wal_senders=20"]}, POSTGRES_DEFAULT_MAX_CONNECTIONS),
    ({"args": ["-c", "max_connections=lots"]}, POSTGRES_DEFAULT_MAX_CONNECTIONS),
    ({}, POSTGRES_DEFAULT_MAX_CONNECTIONS),
])
def test_max_connections_is_read_from_the_arguments_or_is_postgresqls_default(container, expected):
    assert _max_connections_setting(container) == expected
