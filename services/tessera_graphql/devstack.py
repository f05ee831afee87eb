"""`make run` extension: the GraphQL API over the services the dev stack starts, reached through the gateway."""

from __future__ import annotations

import sys
import urllib.request
from collections.abc import Callable

from tessera_graphql.app import DEFAULT_PORT
from tessera_runtime.devstack import Component, DevStack

NAME = "graphql"


def _ready(url: str) -> Callable[[], bool]:
    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return response.status == 200
        except OSError:
            return False

    return check


def components(stack: DevStack) -> list[Component]:
    services = stack.service_addresses()
    if not {"user", "inventory", "order"} <= services.keys():
        return []  # the graph needs all three
    env = {"TESSERA_GRAPHQL_PORT": str(DEFAULT_PORT),
           **{f"TESSERA_{name.upper()}_SERVICE_ADDR": stack.dependency_address(name) for name in services}}
    query = '{"query":"{ products(pageSize: 3) { products { sku name stockAvailable } } }"}'
    return [Component(
        name=NAME,
        argv=[sys.executable, "-m", "tessera_graphql"],
        env=env,
        ready=_ready(f"http://127.0.0.1:{DEFAULT_PORT}/health"),
        describe=[
            f"{NAME:<13} http://127.0.0.1:8080/graphql via the gateway ($TOKEN as below; each field asks its scope)",
            "    curl -H \"authorization: Bearer $TOKEN\" -H 'content-type: application/json' \\",
            f"         -d '{query}' http://127.0.0.1:8080/graphql",
        ],
    )]
