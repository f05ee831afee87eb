"""A gRPC load generator for requests that must differ (CreateUser and CreateOrder carry unique ids).

h2load sends one fixed body, so a create with a request_id would be an idempotent replay after its first call.
This generator builds each request with a factory `module:function(seed, index) -> bytes`, keeps `concurrency`
calls in flight on a sync grpc channel (futures: the C core does the I/O, Python only builds requests), optionally
paces them at a fixed rate, and prints one JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable

import grpc

from bench.load import percentile


def _factory(spec: str) -> Callable[[str, int], bytes]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def run(target: str, method: str, make: Callable[[str, int], bytes], *, seed: str, concurrency: int,
        connections: int, duration: float, warmup: float, rate: float, timeout: float, requests: int = 0) -> dict:
    """Sends requests for warmup + duration seconds (or exactly `requests` of them, with no warm-up) and
    summarises the calls that completed inside the measured window."""
    channels = [grpc.insecure_channel(target, options=(("grpc.use_local_subchannel_pool", 1),))
                for _ in range(max(1, connections))]
    for channel in channels:
        grpc.channel_ready_future(channel).result(timeout=10)
    calls = [channel.unary_unary(method) for channel in channels]
    slots = threading.Semaphore(concurrency)
    lock = threading.Lock()
    codes: Counter[str] = Counter()
    latencies: list[float] = []
    completed = [0]  # every call that finished, warm-up and tail included
    start = time.monotonic()
    measure_from = start + warmup
    stop_at = math.inf if requests else measure_from + duration

    def finished(sent: float, future: grpc.Future) -> None:
        done = time.monotonic()
        code = future.code().name if future.code() is not None else "UNKNOWN"
        with lock:
            completed[0] += 1
            if measure_from <= done <= stop_at:  # completions inside the window, as h2load counts them
                codes[code] += 1
                latencies.append(done - sent)
        slots.release()

    index = 0
    next_at = start
    while True:
        now = time.monotonic()
        if now >= stop_at or (requests and index >= requests):
            break
        if rate:
            if next_at > now:
                time.sleep(next_at - now)
            next_at += 1.0 / rate
        if not slots.acquire(timeout=min(timeout, max(0.0, stop_at - time.monotonic()))):
            break
        body = make(seed, index)
        future = calls[index % len(calls)].future(body, timeout=timeout)
        future.add_done_callback(lambda f, sent=time.monotonic(): finished(sent, f))
        index += 1
    for _ in range(concurrency):  # every call in flight has finished (or timed out)
        slots.acquire(timeout=timeout + 1)
    elapsed = time.monotonic() - measure_from if requests else duration
    for channel in channels:
        channel.close()
    latencies.sort()
    total = sum(codes.values())
    return {
        "requests": total, "ok": codes.get("OK", 0), "completed": completed[0], "codes": dict(codes),
        "seconds": elapsed,
        "rps": total / elapsed, "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True, help="host:port")
    parser.add_argument("--method", required=True, help="/package.Service/Method")
    parser.add_argument("--factory", required=True, help="module:function(seed, index) -> request bytes")
    parser.add_argument("--seed", default="load")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=0.0, help="requests/s (0: as fast as the server answers)")
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--requests", type=int, default=0, help="send exactly this many (no warm-up) and stop")
    args = parser.parse_args(argv)
    result = run(args.target, args.method, _factory(args.factory), seed=args.seed, concurrency=args.concurrency,
                 connections=args.connections, duration=args.duration, warmup=args.warmup, rate=args.rate,
                 timeout=args.timeout, requests=args.requests)
    json.dump(result, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
