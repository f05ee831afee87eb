"""End-to-end fixtures: the real Envoy gateway in front of real service processes."""

from tests.support.gateway import (  # noqa: F401 - fixtures
    dead_port,
    gateway,
    gateway_services,
    gateway_workdir,
    graphql_api,
    slow_user_link,
    strict_gateway,
)
