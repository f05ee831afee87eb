"""The edge gateway in front of real service processes, for end-to-end tests.

Envoy runs on ephemeral ports with its own signing key (tokens minted here are valid only for that run); the
services run as `tessera serve` processes on port 0 in production mode, so they refuse calls without the
gateway's identity headers. Services that are not started are routed to a bound port that never listens, so
their routes answer 503 at once.
"""

from __future__ import annotations

import dataclasses
import http.client
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tessera_gateway import description as gateway_description
from tessera_gateway import generate, process, tokens
from tests.support.processes import ROOT, ServiceProcess
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_for  # noqa: F401 - also imported from here by tests

SERVICES = ("user", "inventory", "payment", "order", "notification", "analytics")
GRPCURL = str(Path(sys.executable).parent / "grpcurl")
DESCRIPTOR_SET = ROOT / "gen" / "descriptors" / "tessera.pb"
# A broker address where nothing listens: the services keep their events in the outbox, and these tests never
# publish into a broker someone else is using.
NO_BROKER = "amqp://guest:guest@127.0.0.1:1/%2F"
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
}


@dataclasses.dataclass
class HttpResponse:
    status: int
    headers: dict[str, list[str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.headers.get(name.lower())
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def grpc_headers(self) -> list[str]:
        return sorted(h for h in self.headers if h.startswith("grpc-"))


def http_call(port: int, method: str, path: str, *, token: str | None = None, body: Any = None,
              raw_body: bytes | None = None, headers: dict[str, str] | None = None,
              timeout: float = 30.0) -> HttpResponse:
    """One HTTP/1.1 request on a fresh connection; the response exactly as received."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        send_headers = dict(headers or {})
        if token is not None:
            send_headers["authorization"] = f"Bearer {token}"
        data = raw_body
        if body is not None:
            data = json.dumps(body).encode()
            send_headers.setdefault("content-type", "application/json")
        conn.request(method, path, body=data, headers=send_headers)
        response = conn.getresponse()
        collected: dict[str, list[str]] = {}
        for name, value in response.getheaders():
            collected.setdefault(name.lower(), []).append(value)
        return HttpResponse(response.status, collected, response.read())
    finally:
        conn.close()


def closed_port() -> socket.socket:
    """A socket bound to a loopback port that never listens: connections to it are refused. Keep it open."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def available_services() -> list[str]:
    return [name for name in SERVICES if importlib.util.find_spec(f"tessera_{name}") is not None]


class Gateway:
    """One Envoy of a profile (dev unless named) on ephemeral ports, with overridden values and a private signing
    key. The prod profile reads the same local JWKS file and exports no spans, so it runs on this machine too."""

    def __init__(self, workdir: Path, name: str, addresses: dict[str, str], values: dict[str, Any] | None = None,
                 profile: str = "dev"):
        self.workdir = workdir
        self.name = name
        self.keys_dir = workdir / f"{name}-keys"
        self.access_log = workdir / f"{name}-access.log"
        local = {
            "upstreams": {"addresses": addresses},
            "listener": {"address": "127.0.0.1", "port": 0},
            "admin": {"address": "127.0.0.1", "port": 0},
            "jwt": {"jwks_file": str(self.keys_dir / tokens.JWKS_FILE)},
            "access_log": str(self.access_log),
        }
        if profile != "dev":
            local["jwt"]["jwks_uri"] = None
            local["tracing"] = {"otlp_endpoint": None}
        overrides = gateway_description.deep_merge(local, values or {})
        self.generated = generate.generate(profile, overrides)
        self.description = self.generated.description
        self.config = generate.write(self.generated, workdir / f"{name}.yaml")
        self.key = tokens.ensure_keys(self.keys_dir)
        self.envoy = process.EnvoyProcess(self.config, workdir / f"{name}.log")
        self.port = 0

    def start(self, healthy: list[str]) -> Gateway:
        self.envoy.start()
        self.envoy.wait_healthy(healthy)
        self.port = self.envoy.listener_port()
        return self

    def stop(self) -> None:
        self.envoy.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def mint(self, subject: str, scopes: str | list[str], *, ttl: int = 600, issuer: str | None = None,
             audience: str | None = None, now: float | None = None, key: tokens.SigningKey | None = None) -> str:
        jwt = self.description.jwt
        return tokens.mint(key or self.key, subject=subject,
                           scopes=scopes.split() if isinstance(scopes, str) else scopes,
                           issuer=issuer or jwt.issuer, audience=audience or jwt.audiences[0],
                           ttl_seconds=ttl, now=now)

    def call(self, method: str, path: str, **kwargs: Any) -> HttpResponse:
        return http_call(self.port, method, path, **kwargs)

    def grpcurl(self, method: str, request: dict[str, Any] | None = None, *, token: str | None = None,
                headers: dict[str, str] | None = None, verbose: bool = False) -> subprocess.CompletedProcess[str]:
        argv = [GRPCURL, "-plaintext", "-protoset", str(DESCRIPTOR_SET), "-max-time", "20"]
        if verbose:
            argv.append("-v")
        if token is not None:
            argv += ["-H", f"authorization: Bearer {token}"]
        for name, value in (headers or {}).items():
            argv += ["-H", f"{name}: {value}"]
        # The request goes on stdin: an argument is capped at 128 KiB by the kernel.
        argv += ["-d", "@", self.address, method]
        return subprocess.run(argv, input=json.dumps(request or {}), capture_output=True, text=True, timeout=60)

    def access_log_lines(self) -> list[dict[str, Any]]:
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.startswith("{")]


class ServiceStack:
    """Service processes in production mode, each on its own SQLite database in workdir. They reach no broker
    unless given `amqp_url` (a private vhost: tests never publish into a broker someone else is using)."""

    def __init__(self, workdir: Path, amqp_url: str = NO_BROKER) -> None:
        self.workdir = workdir
        self.amqp_url = amqp_url
        self.processes: dict[str, ServiceProcess] = {}

    def start(self, names: list[str]) -> ServiceStack:
        """Starts the services, those without dependencies in parallel, then order (which calls the others)."""
        first = [n for n in names if n != "order"]
        with ThreadPoolExecutor(max(1, len(first))) as pool:
            for future in [pool.submit(self._start, n) for n in first]:
                future.result()
        if "order" in names:
            self._start("order")
        return self

    def _start(self, name: str) -> ServiceProcess:
        env = {
            "TESSERA_ENV": "production",
            "TESSERA_DATA_DIR": str(self.workdir),
            "TESSERA_AMQP_URL": self.amqp_url,
            "TESSERA_LOG_LEVEL": "INFO",
            **{f"TESSERA_{other.upper()}_SERVICE_ADDR": p.address for other, p in list(self.processes.items())
               if p.port},
        }
        process = ServiceProcess(name, env, self.workdir / f"{name}.log")
        self.processes[name] = process
        return process.start(timeout=60)

    def addresses(self) -> dict[str, str]:
        return {name: p.address for name, p in self.processes.items()}

    def log_lines(self, name: str) -> list[dict[str, Any]]:
        lines = []
        for line in self.processes[name].log_text().splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return lines

    def stop(self) -> None:
        for p in reversed(list(self.processes.values())):
            p.stop()


# -- pytest fixtures (imported by tests/e2e/conftest.py) ----------------------------------------------------------


@pytest.fixture(scope="session")
def gateway_workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gateway")


# Services the gateway suite runs: the user service (covered fully) and those the order saga needs. The
# notification service consumes from a broker; these tests keep every service away from one (its routes are
# tested in test_gateway_notifications.py, on a stack of its own with a private vhost).
SUITE_SERVICES = ("user", "inventory", "payment", "order")


@pytest.fixture(scope="session")
def gateway_services(gateway_workdir):
    """The suite's services that exist in this tree, in production mode."""
    names = [n for n in SUITE_SERVICES if n in available_services()]
    stack = ServiceStack(gateway_workdir)
    try:
        stack.start(names)
    except Exception:
        stack.stop()
        raise
    yield stack
    stack.stop()


@pytest.fixture(scope="session")
def dead_port():
    sock = closed_port()
    yield sock.getsockname()[1]
    sock.close()


@pytest.fixture(scope="session")
def graphql_api(gateway_workdir, gateway_services, dead_port):
    """The GraphQL API process (python -m tessera_graphql) over the suite's services, in production mode; the
    services the suite does not run (analytics) are down, never the defaults another stack may listen on."""
    addresses = {name: f"127.0.0.1:{dead_port}" for name in SERVICES}
    addresses.update(gateway_services.addresses())
    process = ServiceProcess("graphql", {
        "TESSERA_ENV": "production", "TESSERA_GRAPHQL_PORT": "0", "TESSERA_LOG_LEVEL": "INFO",
        **{f"TESSERA_{name.upper()}_SERVICE_ADDR": address for name, address in addresses.items()},
    }, gateway_workdir / "graphql.log", argv=[sys.executable, "-m", "tessera_graphql"]).start(timeout=60)
    yield process
    process.stop()


@pytest.fixture(scope="session")
def gateway(gateway_workdir, gateway_services, graphql_api, dead_port):
    """The dev profile's gateway with its real limits, in front of the running services and the GraphQL API."""
    addresses = {name: f"127.0.0.1:{dead_port}" for name in SERVICES}
    addresses.update(gateway_services.addresses())
    gw = Gateway(gateway_workdir, "main", addresses, {"graphql": {"address": graphql_api.address}}).start(
        sorted(gateway_services.addresses()))
    yield gw
    gw.stop()


@pytest.fixture(scope="session")
def slow_user_link(gateway_services):
    """A TCP proxy between the strict gateway and the user service; set .delay to slow every chunk down."""
    host, _, port = gateway_services.addresses()["user"].rpartition(":")
    proxy = TcpProxy(host, int(port)).start()
    yield proxy
    proxy.close()


STRICT_VALUES = {
    # Small buckets that refill once a minute: a test drains one without racing the refill.
    "route_classes": {
        "read": {"burst": 4, "refill": 1, "refill_interval_seconds": 60},
        "write": {"timeout_seconds": 1},
        "public": {"burst": 3, "refill": 1, "refill_interval_seconds": 60},
    },
    # Health checks must not fail while a test slows the link down on purpose.
    "upstream": {"health_check": {"interval_seconds": 60, "timeout_seconds": 30}},
}


@pytest.fixture(scope="session")
def strict_gateway(gateway_workdir, slow_user_link, dead_port):
    """A second gateway with tiny rate limits and a 1 s write timeout, reaching the user service through a
    proxy the tests can slow down; every other service is down."""
    addresses = {name: f"127.0.0.1:{dead_port}" for name in SERVICES}
    addresses["user"] = f"127.0.0.1:{slow_user_link.port}"
    values = gateway_description.deep_merge(STRICT_VALUES, {"graphql": {"address": f"127.0.0.1:{dead_port}"}})
    gw = Gateway(gateway_workdir, "strict", addresses, values).start(["user"])
    yield gw
    gw.stop()


def user_gateway(workdir: Path, services: ServiceStack, dead_port: int, name: str, profile: str = "dev") -> Gateway:
    """A started gateway of its own in front of the running user service, every other upstream down: for tests of
    a profile's values, or that may harm the gateway's link to the service when they fail."""
    addresses = {other: f"127.0.0.1:{dead_port}" for other in SERVICES}
    addresses["user"] = services.addresses()["user"]
    values = {"graphql": {"address": f"127.0.0.1:{dead_port}"}} if profile == "dev" else None
    return Gateway(workdir, name, addresses, values, profile=profile).start(["user"])


def unique(prefix: str) -> str:
    return f"{prefix}-{os.getpid()}-{time.monotonic_ns()}"
