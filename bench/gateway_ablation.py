"""`python -m bench.gateway_ablation`: what the Envoy gateway adds to GetUser's latency, and how much of it its
filters account for.

Scenario 3 measures REST through the gateway against gRPC straight to the user service, both paced at half of what
the direct path sustains. This tool runs that same paced load (h2load, arrivals evenly spaced) on four paths to the
same user service, alternating over the rounds, each through an Envoy of its own started from the benchmark's
gateway configuration:

- direct: gRPC straight to the service, as in scenario 3;
- gateway as generated: REST (HTTP/1.1) through every filter the gateway has (security headers, CORS, the Lua error
  mapping, JWT, RBAC scopes, the rate limiter, the transcoder) and its access log, as in scenario 3;
- REST, JWT and transcoder only: the same request with every other filter and the access log removed;
- gRPC through Envoy, router only: the direct path's own call through an Envoy with no filter but the router and no
  access log, i.e. the extra hop alone.

It prints each path's p50 and p99, the p50 it adds to the direct path's (medians over the rounds), and Envoy's CPU per
request. bench/FINDINGS.md quotes it. Everything runs on 127.0.0.1 and stops by itself (about 20 s per round)."""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import yaml

from bench.harness import Config, Run, Side
from bench.infra import Databases
from bench.load import Budget, LoadResult, h2load, paced_h2load
from bench.scenarios.common import GET_USER, GRPC_HEADERS, check_get_user, get_user_body, seeded_user_id, user_service
from bench.scenarios.gateway import HALF_LOAD_CLIENTS, BenchGateway, check_rest

_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
_ROUTER = "envoy.filters.http.router"
_JWT = "envoy.filters.http.jwt_authn"
_TRANSCODER = "envoy.filters.http.grpc_json_transcoder"


def _managers(config: dict[str, Any]) -> list[dict[str, Any]]:
    """The HTTP connection managers of a generated bootstrap (as rendered: camelCase keys)."""
    return [f["typedConfig"] for listener in config["staticResources"]["listeners"]
            for chain in listener["filterChains"] for f in chain["filters"]
            if f.get("typedConfig", {}).get("@type") == _HCM]


def keep_only(config: dict[str, Any], filters: set[str]) -> dict[str, Any]:
    """A copy of the bootstrap whose HTTP filter chains keep only `filters` (and the router), with no access log."""
    config = copy.deepcopy(config)
    managers = _managers(config)
    if not managers:
        raise ValueError("the bootstrap has no HTTP connection manager")
    for manager in managers:
        manager.pop("accessLog", None)
        manager["httpFilters"] = [f for f in manager["httpFilters"] if f["name"] in filters | {_ROUTER}]
    return config


# name -> (how the bootstrap is changed, REST or gRPC)
PATHS: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]] | None, str]] = {
    "direct": (None, "grpc"),
    "gateway as generated": (lambda c: c, "rest"),
    "REST, JWT and transcoder only": (lambda c: keep_only(c, {_JWT, _TRANSCODER}), "rest"),
    "gRPC through Envoy, router only": (lambda c: keep_only(c, set()), "grpc"),
}


def measure(rounds: int, seconds: float, requests: int = 0, rate: float = 0.0,
            workdir: Path | None = None) -> tuple[float, list[tuple[str, float, float, float | None]]]:
    """Runs every path for `rounds` rounds; returns the paced rate and, per path, (name, p50 ms, p99 ms, Envoy CPU
    ms per request or None), the latencies the medians of the rounds'."""
    with tempfile.TemporaryDirectory(prefix="tessera-gateway-ablation-") as tmp:
        run = Run(Config(seconds=seconds, requests=requests, rounds=rounds, profile=False), workdir or Path(tmp))
        run.dbs = Databases("tessera_gateway_ablation")
        envoys = []
        gateway: BenchGateway | None = None
        try:
            user = user_service(run)
            user_id = seeded_user_id(run)
            gateway = BenchGateway(run, {"user": user.address})
            token = gateway.mint(user_id, ["user:read"])
            generated = yaml.safe_load(gateway.envoy.config.read_text())
            auth = f"authorization: Bearer {token}"
            budget = Budget(seconds=seconds, requests=requests)
            if not rate:
                # Half of what the direct path sustains, as scenario 3 paces its half-load rows.
                full = h2load(f"http://{user.address}{GET_USER}", budget=budget, clients=run.config.clients,
                              streams=run.config.streams, body=get_user_body(user_id), headers=GRPC_HEADERS)
                rate = full.requests / full.seconds / 2
            from tessera_gateway import process

            sides = []
            for index, (name, (change, protocol)) in enumerate(PATHS.items()):
                address, metered = user.address, {}
                if change is not None:
                    config = run.workdir / f"envoy-{index}.yaml"
                    config.write_text(yaml.safe_dump(change(generated), sort_keys=False))
                    envoy = process.EnvoyProcess(config, run.workdir / f"envoy-{index}.log")
                    envoys.append(envoy)
                    envoy.start().wait_healthy(["user"])
                    address = f"127.0.0.1:{envoy.listener_port()}"
                    assert envoy.proc is not None
                    metered = {"envoy": psutil.Process(envoy.proc.pid)}
                # h2load counts HTTP 200s: one real call checks the answer on each path first.
                if protocol == "grpc":
                    check_get_user(address, user_id)

                    def load(b: Budget, _seed: str, a: str = address) -> LoadResult:
                        return paced_h2load(f"http://{a}{GET_USER}", budget=b, rate=rate, clients=HALF_LOAD_CLIENTS,
                                            body=get_user_body(user_id), headers=GRPC_HEADERS)
                else:
                    check_rest(int(address.rsplit(":", 1)[1]), f"/v1/users/{user_id}", token, user_id)

                    def load(b: Budget, _seed: str, a: str = address) -> LoadResult:
                        return paced_h2load(f"http://{a}/v1/users/{user_id}", budget=b, rate=rate,
                                            clients=HALF_LOAD_CLIENTS, headers=(auth,), http1=True)
                sides.append(Side("baseline" if change is None else "subject", name, load,
                                  lambda m=metered: m))
            run.warm(sides)  # every path once, unmeasured
            results: dict[str, list[tuple[float, float, float | None]]] = {name: [] for name in PATHS}
            for segment in run.alternate(sides):
                result = segment.load
                if result.errors or not result.requests:
                    raise RuntimeError(f"{segment.name}: {result.errors} of {result.completed} requests failed")
                cpu = segment.cpu_s.get("envoy")
                results[segment.name].append(
                    (result.p50_ms, result.p99_ms, None if cpu is None else cpu / result.completed * 1000))
        finally:
            for envoy in envoys:
                envoy.stop()
            if gateway is not None:
                gateway.stop()  # its own Envoy never started: this closes the port it keeps refusing connections
            run.close()
    rows = []
    for name, values in results.items():
        cpus = [cpu for _, _, cpu in values if cpu is not None]
        rows.append((name, statistics.median(v[0] for v in values), statistics.median(v[1] for v in values),
                     statistics.median(cpus) if cpus else None))
    return rate, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rate", type=float, default=0.0,
                        help="requests/s on every path (default: half of what the direct path sustains)")
    parser.add_argument("--requests", type=int, default=0,
                        help="send this many requests per segment instead of running for --seconds (smoke runs)")
    args = parser.parse_args(argv)
    rate, rows = measure(args.rounds, args.seconds, args.requests, args.rate)
    direct = rows[0][1]
    print(f"GetUser at {rate:,.0f} requests/s, evenly paced, {args.rounds} round(s)")
    print("| path | p50 ms | p99 ms | added p50 ms | Envoy CPU ms per request |")
    print("|---|---|---|---|---|")
    for name, p50, p99, cpu in rows:
        added = "—" if cpu is None else f"{p50 - direct:+.2f}"
        print(f"| {name} | {p50:.2f} | {p99:.2f} | {added} | {'—' if cpu is None else f'{cpu:.3f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
