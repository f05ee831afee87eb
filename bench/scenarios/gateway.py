"""Scenario 3: GetUser over gRPC straight to the service vs REST through the Envoy gateway with JWT auth on."""

from __future__ import annotations

import http.client
import importlib.util
import json
import socket
import statistics
from typing import Any

import psutil

from bench.harness import Finding, Run, ScenarioResult, Side, processes_of
from bench.load import Budget, LoadResult, paced_h2load, wrk
from bench.scenarios.common import (
    GET_USER,
    GRPC_HEADERS,
    check_get_user,
    get_user_body,
    h2load_side,
    postgres_of,
    seeded_user_id,
    user_service,
)

SERVICES = ("user", "inventory", "payment", "order", "notification")
# The rate limits are part of the gateway, but the benchmark measures throughput: the read class gets a bucket
# no load here can drain, so every request still passes through the limiter and is never refused by it.
VALUES = {"route_classes": {"read": {"burst": 1_000_000, "refill": 1_000_000, "refill_interval_seconds": 1}}}
WRK_CONNECTIONS = 32
HALF_LOAD_CLIENTS = 8


def gateway_available() -> bool:
    try:
        return importlib.util.find_spec("tessera_gateway.generate") is not None
    except ModuleNotFoundError:
        return False


class BenchGateway:
    """The dev profile's Envoy on ephemeral ports with a private signing key, in front of the bench's services."""

    def __init__(self, run: Run, addresses: dict[str, str]) -> None:
        from tessera_gateway import description, generate, process, tokens

        self.tokens = tokens
        workdir = run.workdir / "gateway"
        workdir.mkdir(parents=True, exist_ok=True)
        self.keys_dir = workdir / "keys"
        self._dead = socket.socket()  # services the bench does not start: a port that refuses connections
        self._dead.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{self._dead.getsockname()[1]}"
        overrides = description.deep_merge({
            "upstreams": {"addresses": {name: addresses.get(name, dead) for name in SERVICES}},
            "listener": {"address": "127.0.0.1", "port": 0},
            "admin": {"address": "127.0.0.1", "port": 0},
            "jwt": {"jwks_file": str(self.keys_dir / tokens.JWKS_FILE)},
            "access_log": str(workdir / "access.log"),
        }, VALUES)
        self.generated = generate.generate("dev", overrides)
        config = generate.write(self.generated, workdir / "envoy.yaml")
        self.key = tokens.ensure_keys(self.keys_dir)
        self.envoy = process.EnvoyProcess(config, workdir / "envoy.log")
        self.port = 0

    def start(self, healthy: list[str]) -> BenchGateway:
        self.envoy.start()
        self.envoy.wait_healthy(healthy)
        self.port = self.envoy.listener_port()
        return self

    def mint(self, subject: str, scopes: list[str]) -> str:
        jwt = self.generated.description.jwt
        return self.tokens.mint(self.key, subject=subject, scopes=scopes, issuer=jwt.issuer,
                                audience=jwt.audiences[0], ttl_seconds=3600)

    @property
    def pid(self) -> int:
        assert self.envoy.proc is not None
        return self.envoy.proc.pid

    def stop(self) -> None:
        self.envoy.stop()
        self._dead.close()


def check_rest(port: int, path: str, token: str, user_id: str) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"authorization": f"Bearer {token}"})
        response = conn.getresponse()
        body = response.read()
    finally:
        conn.close()
    if response.status != 200 or json.loads(body)["user"]["id"] != user_id:
        raise RuntimeError(f"REST GetUser through the gateway answered {response.status}: {body[:300]!r}")


def rest_vs_grpc(run: Run) -> ScenarioResult:
    result = ScenarioResult("3", "REST GetUser through the Envoy gateway (JWT auth on) vs gRPC straight to the "
                            "service", baseline="gRPC GetUser direct (h2load)",
                            subject="REST GET /v1/users/{id} via Envoy, JWT + scopes + rate limiter (wrk)",
                            target_ratio=0.8, target_text="≥ 0.8× direct throughput; added p50 ≤ 0.3 ms at half "
                                                          "load")
    if not gateway_available():
        result.skipped = "the Envoy gateway (gateway-envoy/tessera_gateway) is not in this checkout"
        return result
    user = user_service(run)
    user_id = seeded_user_id(run)
    check_get_user(user.address, user_id)
    gateway = BenchGateway(run, {"user": user.address}).start(["user"])
    try:
        return _measure(run, result, user, user_id, gateway)
    finally:
        gateway.stop()


def _measure(run: Run, result: ScenarioResult, user: Any, user_id: str, gateway: BenchGateway) -> ScenarioResult:
    # A customer reading their own account: the token's subject is the user, with the user:read scope.
    token = gateway.mint(user_id, ["user:read"])
    path = f"/v1/users/{user_id}"
    check_rest(gateway.port, path, token, user_id)
    auth = f"authorization: Bearer {token}"
    rest_url = f"http://127.0.0.1:{gateway.port}{path}"
    envoy = psutil.Process(gateway.pid)

    def rest_load(budget: Budget, _seed: str) -> LoadResult:
        return wrk(rest_url, budget=budget, connections=WRK_CONNECTIONS, headers=(auth,))

    direct = h2load_side(run, "baseline", "gRPC direct", user, GET_USER, get_user_body(user_id), label="user")
    via_gateway = Side("subject", "REST via Envoy", rest_load,
                       lambda: {**processes_of("user", user), "envoy": envoy, **postgres_of(user)}, direct.rpc)
    run.warm([direct, via_gateway])
    result.segments = run.alternate([direct, via_gateway])
    result.set_rates_from_segments()

    # Half load: both paths at the same fixed rate, half of what the direct path sustained; h2load paces both
    # (REST as HTTP/1.1 GETs) with evenly spaced arrivals so that the latencies compare like for like.
    rate = result.baseline_value / 2
    budget = run.config.budget

    def paced_direct(b: Budget, _seed: str) -> LoadResult:
        return paced_h2load(f"http://{user.address}{GET_USER}", budget=b, rate=rate, clients=HALF_LOAD_CLIENTS,
                            body=get_user_body(user_id), headers=GRPC_HEADERS)

    def paced_rest(b: Budget, _seed: str) -> LoadResult:
        return paced_h2load(rest_url, budget=b, rate=rate, clients=HALF_LOAD_CLIENTS, headers=(auth,),
                            http1=True)

    half = run.alternate([
        Side("baseline", "gRPC direct, half load", paced_direct, direct.processes, direct.rpc),
        Side("subject", "REST via Envoy, half load", paced_rest, via_gateway.processes, direct.rpc),
    ])
    result.segments += half
    if budget.requests == 0:
        p50 = {role: _median([s.load.p50_ms for s in half if s.role == role]) for role in ("baseline", "subject")}
        added = p50["subject"] - p50["baseline"]
        result.findings.append(Finding(
            f"added p50 at half load ({rate:,.0f} requests/s)", f"{added:+.2f} ms (p50 {p50['baseline']:.2f} → "
            f"{p50['subject']:.2f} ms)", "≤ 0.3 ms", added <= 0.3))
    envoy_cpu = [s.cpu_s.get("envoy", 0.0) / s.load.requests * 1000 for s in result.segments
                 if s.role == "subject" and s.load.requests]
    if envoy_cpu:
        result.findings.append(Finding("Envoy CPU per request at full load", f"{min(envoy_cpu):.3f} ms", "—", None))
    result.notes.append(f"wrk with {WRK_CONNECTIONS} keep-alive connections and one token; the read class's rate "
                        "limit is raised so that the limiter runs but never refuses. Half-load rows: h2load at a "
                        f"fixed rate from {HALF_LOAD_CLIENTS} clients on both paths, the clients started "
                        "1/rate apart so that requests arrive evenly spaced rather than in bursts of "
                        f"{HALF_LOAD_CLIENTS}; the added p50 compares the medians of the rounds' p50s.")
    if result.met is False:
        run.profile(result, user.processes()[0], via_gateway.load, "user service under REST GetUser")
    return result


def _median(values: list[float]) -> float:
    """The median of the rounds' values; with two rounds, their mean (taking the upper of the two made each side's
    figure its worse round, so the added p50 compared two outliers)."""
    return statistics.median(values) if values else float("nan")
