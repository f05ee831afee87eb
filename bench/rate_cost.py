"""`python -m bench.rate_cost`: GetUser's CPU per call at a few fixed rates, from a trickle to saturation.

The scenarios measure a baseline and a subject each at the rate it can reach. Scenario 5 is different: it measures
the saga against its participants' write throughput taken alone, at saturation, while in the saga each service
answers a few dozen to a few hundred calls a second. This tool measures what that difference costs on this machine:
the same user service (one process, on PostgreSQL, as scenario 1 runs it) answers GetUser at evenly paced rates
(h2load, arrivals spread out as in scenario 3's half-load rows) and then as fast as it can, alternating over the
rounds, and it prints the service's and its PostgreSQL backends' CPU per call at each rate. bench/FINDINGS.md quotes
it. Everything runs on 127.0.0.1 and stops by itself (about 25 s per round with the defaults)."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.harness import Config, Run, Side
from bench.infra import Databases
from bench.load import Budget, LoadResult, h2load, paced_h2load
from bench.scenarios.common import (
    GET_USER,
    GRPC_HEADERS,
    check_get_user,
    get_user_body,
    postgres_of,
    seeded_user_id,
    user_service,
)

RATES = (30, 60, 150, 400)


def measure(rates: tuple[float, ...], rounds: int, seconds: float,
            requests: int = 0) -> list[tuple[str, float, float, float]]:
    """Per rate (0: as fast as it goes), over the rounds: (rate, requests/s, service CPU ms per call, PostgreSQL CPU
    ms per call), each the median of the rounds'."""
    with tempfile.TemporaryDirectory(prefix="tessera-rate-cost-") as tmp:
        run = Run(Config(seconds=seconds, warmup=0.5, requests=requests, rounds=rounds, profile=False), Path(tmp))
        run.dbs = Databases("tessera_rate_cost")
        samples: dict[float, list[tuple[float, float, float]]] = {rate: [] for rate in (*rates, 0)}
        try:
            user = user_service(run)
            user_id = seeded_user_id(run)
            check_get_user(user.address, user_id)  # h2load counts HTTP 200s: one answer is checked first
            url, body = f"http://{user.address}{GET_USER}", get_user_body(user_id)

            def side(rate: float) -> Side:
                def load(budget: Budget, _seed: str) -> LoadResult:
                    if rate:
                        return paced_h2load(url, budget=budget, rate=rate, clients=4, body=body, headers=GRPC_HEADERS)
                    return h2load(url, budget=budget, clients=run.config.clients, streams=run.config.streams,
                                  body=body, headers=GRPC_HEADERS)
                return Side("subject", str(rate), load, lambda: {"user": user.processes(), **postgres_of(user)})

            sides = [side(rate) for rate in samples]
            run.warm(sides)  # the pool and the caches, unmeasured
            for segment in run.alternate(sides):
                result = segment.load
                if result.errors or not result.requests:
                    raise RuntimeError(f"at {segment.name} requests/s: {result.errors} requests failed")
                # The CPU counts the warm-up too, so it is divided by every request completed.
                samples[float(segment.name)].append((result.requests / result.seconds,
                                                     segment.cpu_s.get("user", 0.0) / result.completed * 1000,
                                                     segment.cpu_s.get("postgres", 0.0) / result.completed * 1000))
        finally:
            run.close()
    return [(f"{rate:,.0f}/s" if rate else "as fast as it goes", *(statistics.median(v[i] for v in values)
                                                                   for i in range(3)))
            for rate, values in samples.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rates", default=",".join(str(r) for r in RATES),
                        help="paced rates, requests/s, comma-separated (saturation is always measured too)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--requests", type=int, default=0,
                        help="send this many requests per segment instead of running for --seconds (smoke runs)")
    args = parser.parse_args(argv)
    rates = tuple(float(r) for r in args.rates.split(",") if r)
    if any(rate <= 0 for rate in rates):
        parser.error("--rates must be positive")
    rows = measure(rates, args.rounds, args.seconds, args.requests)
    print(f"GetUser on PostgreSQL, one process, {args.rounds} round(s): CPU per call")
    print("| rate | requests/s | service CPU ms per call | PostgreSQL CPU ms per call |")
    print("|---|---|---|---|")
    for rate, rps, cpu, database in rows:
        print(f"| {rate} | {rps:,.0f} | {cpu:.3f} | {database:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
