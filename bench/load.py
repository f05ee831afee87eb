"""Load generators: h2load for gRPC (and HTTP/1.1 at a fixed rate), wrk for REST, bench.grpcload for unique
requests. Each returns requests, errors, latency percentiles and its own CPU and memory."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import psutil

from bench.meter import MB

H2LOAD = "h2load"
WRK = "wrk"


@dataclasses.dataclass(frozen=True)
class Budget:
    """How long one measured segment runs, or (smoke runs) how many requests it sends."""

    seconds: float = 4.0
    warmup: float = 1.0
    requests: int = 0


@dataclasses.dataclass
class LoadResult:
    tool: str
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    loadgen_cpu_s: float = 0.0
    loadgen_rss_mb: float = 0.0
    # Every request completed while the generator ran, warm-up included: what the servers' CPU was spent on.
    completed: int = 0

    def __post_init__(self) -> None:
        self.completed = max(self.completed, self.requests)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


class LoadError(RuntimeError):
    """A load generator failed to run or its output could not be read."""


def percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))]


def grpc_frame(message: bytes) -> bytes:
    """One gRPC length-prefixed message: no compression flag, 4-byte big-endian length, the bytes."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def run_measured(argv: Sequence[str], timeout: float) -> tuple[str, float, float]:
    """Runs a load generator; returns its stdout, CPU seconds (its own and its children's) and peak RSS."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    peak = [0.0]
    stop = threading.Event()

    def sample() -> None:
        try:
            ps = psutil.Process(proc.pid)
            while not stop.wait(0.05):
                rss = ps.memory_info().rss + sum(c.memory_info().rss for c in ps.children(recursive=True))
                peak[0] = max(peak[0], rss / MB)
        except psutil.Error:
            return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise LoadError(f"{argv[0]} did not finish within {timeout:.0f}s") from None
    finally:
        stop.set()
        sampler.join()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise LoadError(f"{argv[0]} exited with {proc.returncode}: {err.decode(errors='replace')[-1500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return out.decode(errors="replace"), cpu, peak[0]


def _h2load_latencies(log_path: Path, measured: int) -> tuple[list[float], int]:
    """Per-request latencies (ms) from h2load's log without the warm-up requests (the earliest ones), and the
    number of requests the log holds (warm-up included)."""
    rows = []
    for line in log_path.read_text().splitlines():
        start_us, _status, duration_us = line.split("\t")[:3]
        rows.append((int(start_us), int(duration_us)))
    rows.sort()
    return (sorted(d / 1000 for _, d in rows[-measured:]) if measured else []), len(rows)


def _duration(seconds: float) -> str:
    """h2load's durations are integers with a unit."""
    return f"{round(seconds * 1000)}ms"


def _request_args(tmp: str, body: bytes | None, headers: Sequence[str], http1: bool) -> list[str]:
    """h2load's arguments for what each request carries: the body (from a file), the headers, HTTP/1.1."""
    argv: list[str] = []
    if body is not None:
        body_path = Path(tmp) / "body"
        body_path.write_bytes(body)
        argv += ["-d", str(body_path)]
    for header in headers:
        argv += ["-H", header]
    if http1:
        argv.append("--h1")
    return argv


def h2load(url: str, *, budget: Budget, clients: int, streams: int, body: bytes | None = None,
           headers: Sequence[str] = (), http1: bool = False) -> LoadResult:
    """Runs h2load against one URL. gRPC: pass the framed body and the gRPC headers. REST: http1=True. For a fixed
    request rate use paced_h2load (h2load's --rps alone sends bursts)."""
    with tempfile.TemporaryDirectory(prefix="tessera-h2load-") as tmp:
        log_path = Path(tmp) / "requests.log"
        argv = [H2LOAD, "-t", "1", "-c", str(clients), "-m", "1" if http1 else str(streams),
                "--log-file", str(log_path), *_request_args(tmp, body, headers, http1)]
        if budget.requests:
            argv += ["-n", str(budget.requests)]
        else:
            argv += ["-D", _duration(budget.seconds)]
            if budget.warmup:
                argv += ["--warm-up-time", _duration(budget.warmup)]
        argv.append(url)
        out, cpu, rss = run_measured(argv, timeout=budget.seconds + budget.warmup + 60)
        finished = re.search(r"finished in ([\d.]+)(ms|s),", out)
        counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                           r"(\d+) errored, (\d+) timeout", out)
        if not finished or not counts:
            raise LoadError(f"unexpected h2load output: {out[-1500:]}")
        elapsed = float(finished.group(1)) / (1000 if finished.group(2) == "ms" else 1)
        if not budget.requests:
            elapsed -= budget.warmup  # "finished in" includes the warm-up; the counts do not
        succeeded = int(counts.group(3))
        errors = int(counts.group(4)) + int(counts.group(5)) + int(counts.group(6)) + \
            (int(counts.group(1)) - int(counts.group(2)))
        latencies, logged = _h2load_latencies(log_path, int(counts.group(2)))
    return LoadResult("h2load" + (" --h1" if http1 else ""), succeeded, errors, elapsed,
                      percentile(latencies, 0.50), percentile(latencies, 0.99), cpu, rss, logged)


_WRK_SCRIPT = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format('WRKJSON {"requests": %d, "duration_us": %d, "socket_errors": %d, "status_errors": %d, '
    .. '"p50_us": %d, "p99_us": %d}\\n', summary.requests, summary.duration,
    e.connect + e.read + e.write + e.timeout, e.status, latency:percentile(50), latency:percentile(99)))
end
"""


def paced_h2load(url: str, *, budget: Budget, rate: float, clients: int, body: bytes | None = None,
                 headers: Sequence[str] = (), http1: bool = False) -> LoadResult:
    """h2load at a fixed total rate whose requests arrive evenly spaced, one every 1/rate seconds.

    `h2load --rps` alone starts every client at once and each client's timer then fires in step with the
    others, so the "fixed rate" is really a burst of `clients` requests every clients/rate seconds: the last of
    a burst queues behind the others in a one-loop Python service, and the p50 measures that queue (8.8 ms at
    381 requests/s for a call that takes about 1.5 ms). Here h2load's rate mode opens the clients one
    `--rate-period` apart (1/rate, whole milliseconds: h2load's resolution), so each client's timer keeps its
    own phase and the arrivals interleave (above 1,000 requests/s the 1 ms step spreads them less evenly). Rate
    mode cannot run for a duration, so the budget becomes a request count (warm-up included) and the warm-up
    requests, the earliest started, are dropped from the latencies.
    """
    per_client = rate / clients
    stagger_ms = max(1, round(1000 / rate))
    warmup = 0 if budget.requests else round(rate * budget.warmup)
    total = budget.requests or warmup + round(rate * budget.seconds)
    total = max(total, clients)
    with tempfile.TemporaryDirectory(prefix="tessera-h2load-") as tmp:
        log_path = Path(tmp) / "requests.log"
        argv = [H2LOAD, "-t", "1", "-c", str(clients), "-m", "1", "-n", str(total), "--rps", f"{per_client:.3f}",
                "-r", "1", "--rate-period", f"{stagger_ms}ms", "--log-file", str(log_path),
                *_request_args(tmp, body, headers, http1), url]
        out, cpu, rss = run_measured(argv, timeout=total / rate + 60)
        counts = re.search(r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
                           r"(\d+) errored, (\d+) timeout", out)
        if not counts:
            raise LoadError(f"unexpected h2load output: {out[-1500:]}")
        rows = sorted((int(start), int(status), int(duration)) for start, status, duration, *_ in
                      (line.split("\t") for line in log_path.read_text().splitlines()))
    measured = rows[warmup:]
    if not measured:
        raise LoadError("h2load logged no request after the warm-up")
    # The measured window: from the first measured request's start to the last one's end.
    seconds = (max(s + d for s, _, d in measured) - measured[0][0]) / 1e6
    latencies = sorted(d / 1000 for _, _, d in measured)
    succeeded = sum(1 for _, status, _ in measured if 200 <= status < 300)
    errors = int(counts.group(4)) + int(counts.group(5)) + int(counts.group(6)) + \
        (int(counts.group(1)) - int(counts.group(2)))
    return LoadResult("h2load " + ("--h1 " if http1 else "") + "(evenly paced)", succeeded, errors, seconds,
                      percentile(latencies, 0.50), percentile(latencies, 0.99), cpu, rss, len(rows))


def wrk(url: str, *, budget: Budget, connections: int, threads: int = 1, headers: Sequence[str] = ()) -> LoadResult:
    """Runs wrk (HTTP/1.1 keep-alive) for the budget's duration after a separate warm-up run."""
    with tempfile.TemporaryDirectory(prefix="tessera-wrk-") as tmp:
        script = Path(tmp) / "report.lua"
        script.write_text(_WRK_SCRIPT)
        base = [WRK, "-t", str(threads), "-c", str(connections), "-s", str(script)]
        for header in headers:
            base += ["-H", header]
        warm = 0
        if budget.warmup:
            out, _, _ = run_measured([*base, "-d", f"{max(1, round(budget.warmup))}s", url],
                                     timeout=budget.warmup + 30)
            warm = _wrk_report(out)["requests"]
        out, cpu, rss = run_measured([*base, "-d", f"{max(1, round(budget.seconds))}s", url],
                                     timeout=budget.seconds + 30)
    data = _wrk_report(out)
    errors = data["socket_errors"] + data["status_errors"]
    return LoadResult("wrk", data["requests"] - data["status_errors"], errors, data["duration_us"] / 1e6,
                      data["p50_us"] / 1000, data["p99_us"] / 1000, cpu, rss, warm + data["requests"])


def _wrk_report(out: str) -> dict:
    found = re.search(r"WRKJSON (\{.*\})", out)
    if not found:
        raise LoadError(f"unexpected wrk output: {out[-1500:]}")
    return json.loads(found.group(1))


def grpcload(target: str, method: str, factory: str, *, budget: Budget, seed: str, concurrency: int,
             rate: float = 0.0, connections: int = 1) -> LoadResult:
    """Runs bench.grpcload: unique requests built by `factory`, closed loop or at a fixed rate."""
    argv = [sys.executable, "-m", "bench.grpcload", "--target", target, "--method", method, "--factory", factory,
            "--seed", seed, "--concurrency", str(concurrency), "--connections", str(connections),
            "--rate", str(rate)]
    if budget.requests:
        argv += ["--requests", str(budget.requests), "--warmup", "0"]
    else:
        argv += ["--duration", str(budget.seconds), "--warmup", str(budget.warmup)]
    out, cpu, rss = run_measured(argv, timeout=budget.seconds + budget.warmup + 120)
    data = json.loads(out.strip().splitlines()[-1])
    return LoadResult("grpcload", data["ok"], data["requests"] - data["ok"], data["seconds"], data["p50_ms"],
                      data["p99_ms"], cpu, rss, data["completed"])


def tools_missing() -> list[str]:
    return [tool for tool in (H2LOAD, WRK) if shutil.which(tool) is None]
