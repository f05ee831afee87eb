"""The benchmark run: settings, the processes it starts, A/B alternation with per-process metering, results."""

from __future__ import annotations

import dataclasses
import math
import socket
import subprocess
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
from prometheus_client.parser import text_string_to_metric_families

from bench import infra
from bench.load import Budget, LoadResult
from bench.meter import Meter, Processes, rss_mb
from bench.procs import ROOT, ManagedProcess, python_module


@dataclasses.dataclass(frozen=True)
class Config:
    """How a run measures: segment length (or request count), rounds of alternation, load shape."""

    seconds: float = 4.0
    warmup: float = 1.0
    requests: int = 0  # > 0: each segment sends this many requests instead of running for `seconds`
    rounds: int = 2  # 2 rounds: baseline, subject, baseline, subject
    clients: int = 4  # h2load connections
    streams: int = 8  # h2load concurrent streams per connection
    concurrency: int = 32  # grpcload calls in flight
    profile: bool = True  # py-spy the subject of a scenario that misses its target
    profile_seconds: float = 3.0
    relay_events: int = 100_000  # the outbox backlog scenario 6 drains
    services: tuple[str, ...] = ("user", "inventory", "payment", "order", "notification", "analytics")

    @property
    def budget(self) -> Budget:
        return Budget(seconds=self.seconds, warmup=self.warmup, requests=self.requests)


@dataclasses.dataclass
class Segment:
    """One measured stretch of load on one side."""

    role: str  # "baseline" or "subject"
    name: str
    round: int
    load: LoadResult
    cpu_s: dict[str, float]
    rss_mb: dict[str, float]
    rpc_codes: dict[str, int] | None = None  # gRPC outcomes the server counted, when it exposes them
    # Seconds the CPU was metered over: the load's warm-up and its measured stretch (load.seconds is the latter).
    wall_s: float = 0.0


@dataclasses.dataclass
class Finding:
    """A number with its own target, beyond the headline ratio (e.g. added latency at half load)."""

    name: str
    value: str
    target: str
    met: bool | None


@dataclasses.dataclass
class ScenarioResult:
    number: str
    title: str
    baseline: str
    subject: str
    unit: str = "requests/s"
    target_ratio: float = 0.0
    target_text: str = ""
    segments: list[Segment] = dataclasses.field(default_factory=list)
    baseline_value: float = math.nan
    subject_value: float = math.nan
    findings: list[Finding] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    skipped: str | None = None
    profile: list[str] = dataclasses.field(default_factory=list)
    profiled: str = ""

    @property
    def ratio(self) -> float:
        if not self.baseline_value or math.isnan(self.baseline_value):
            return math.nan
        return self.subject_value / self.baseline_value

    @property
    def met(self) -> bool | None:
        if self.skipped or math.isnan(self.ratio):
            return None
        return self.ratio >= self.target_ratio and all(f.met is not False for f in self.findings)

    def side_rate(self, role: str) -> float:
        chosen = [s for s in self.segments if s.role == role]
        seconds = sum(s.load.seconds for s in chosen)
        return sum(s.load.requests for s in chosen) / seconds if seconds else math.nan

    def set_rates_from_segments(self) -> None:
        self.baseline_value = self.side_rate("baseline")
        self.subject_value = self.side_rate("subject")


@dataclasses.dataclass
class MemoryRow:
    service: str
    idle_mb: float = math.nan
    load_mb: float = math.nan
    load_context: str = ""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RpcCounter:
    """Reads grpc_server_handled_total from a Tessera server's /metrics: the gRPC outcomes of measured calls
    (h2load only sees HTTP 200, whatever the grpc-status trailer says)."""

    def __init__(self, urls: Sequence[str], method: str) -> None:
        self.urls = list(urls)
        self.service, _, self.method = method.lstrip("/").rpartition("/")

    def read(self) -> Counter[str] | None:
        codes: Counter[str] = Counter()
        for url in self.urls:
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    text = response.read().decode()
            except OSError:
                return None
            for family in text_string_to_metric_families(text):
                if family.name != "grpc_server_handled":
                    continue
                for sample in family.samples:
                    labels = sample.labels
                    if (sample.name == "grpc_server_handled_total" and labels.get("grpc_service") == self.service
                            and labels.get("grpc_method") == self.method):
                        codes[labels["grpc_code"]] += int(sample.value)
        return codes


@dataclasses.dataclass
class Side:
    """One side of a comparison: how to load it, which processes to meter, how to count its gRPC outcomes."""

    role: str
    name: str
    load: Callable[[Budget, str], LoadResult]
    processes: Callable[[], Processes]
    rpc: RpcCounter | None = None


class Run:
    """One benchmark run: settings, working folder, databases and every process it started (stopped at close)."""

    def __init__(self, config: Config, workdir: Path) -> None:
        self.config = config
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dbs = infra.Databases()
        self.started: list[ManagedProcess] = []
        self.memory: dict[str, MemoryRow] = {}
        self.shared: dict[str, object] = {}
        self.cpu_count = psutil.cpu_count() or 1
        self._vhost: infra.Vhost | None = None
        self.vhosts: list[str] = []  # every vhost this run made, deleted or not
        self._seq = 0

    @property
    def amqp_url(self) -> str:
        """The run's private RabbitMQ vhost, created on first use."""
        if self._vhost is None:
            self._vhost = infra.Vhost()
            self.vhosts.append(self._vhost.name)
        return self._vhost.url

    # processes -------------------------------------------------------------------------------------------

    def start(self, label: str, argv: Sequence[str], env: dict[str, str] | None = None,
              **kwargs) -> ManagedProcess:
        self._seq += 1
        process = ManagedProcess(label, argv, env or {}, self.workdir / f"{self._seq:02d}-{label}.log", **kwargs)
        self.started.append(process)
        return process.start()

    def stop(self, process: ManagedProcess) -> None:
        process.stop()
        if process in self.started:
            self.started.remove(process)

    def tessera(self, service: str, database_url: str, *, workers: int = 1, label: str | None = None,
                env: dict[str, str] | None = None) -> ManagedProcess:
        """Starts `tessera serve <service>` on an ephemeral port with its metrics endpoint on."""
        metrics_port = free_port() if workers == 1 else _free_port_range(workers)
        process = self.start(label or service, python_module("tessera_runtime.cli", "serve", service), {
            "TESSERA_DATABASE_URL": database_url, "TESSERA_AMQP_URL": self.amqp_url, "TESSERA_GRPC_PORT": "0",
            "TESSERA_WORKERS": str(workers),
            "TESSERA_METRICS_PORT": str(metrics_port), "TESSERA_DRAIN_SECONDS": "0",
            "TESSERA_GRACE_SECONDS": "5", **(env or {}),
        })
        process.metrics_urls = [f"http://127.0.0.1:{metrics_port + i}/metrics" for i in range(workers)]
        return process

    def close(self) -> None:
        try:
            for process in reversed(self.started):
                process.stop()
        finally:
            self.started.clear()
            try:
                self.dbs.drop_all()
            finally:
                if self._vhost is not None:
                    self._vhost.delete()
                    self._vhost = None

    # measuring -------------------------------------------------------------------------------------------

    def alternate(self, sides: Sequence[Side], rounds: int | None = None) -> list[Segment]:
        """Runs the sides in turn, round after round (ABAB...), metering each segment."""
        segments = []
        for round_ in range(1, (rounds or self.config.rounds) + 1):
            for side in sides:
                before = side.rpc.read() if side.rpc else None
                with Meter(side.processes) as meter:
                    result = side.load(self.config.budget, f"{side.name}-{round_}-{time.monotonic_ns()}")
                after = side.rpc.read() if side.rpc else None
                codes = None
                if before is not None and after is not None:
                    codes = {k: after[k] - before.get(k, 0) for k in after if after[k] - before.get(k, 0)}
                segments.append(Segment(side.role, side.name, round_, result, meter.cpu_s, meter.rss_peak_mb,
                                        codes, meter.wall_s))
        return segments

    def warm(self, sides: Sequence[Side]) -> None:
        """A short, unmeasured load on each side: connections, pools and caches are up before measuring."""
        budget = Budget(seconds=1.0, warmup=0.0, requests=min(self.config.requests, 100))
        for side in sides:
            side.load(budget, f"warm-{side.name}-{time.monotonic_ns()}")

    def profile(self, result: ScenarioResult, process: psutil.Process, load: Callable[[Budget, str], LoadResult],
                label: str) -> None:
        """py-spy samples `process` under the subject's load (an extra segment, not counted) and keeps the
        functions where it spent its time."""
        if not self.config.profile:
            return
        from bench.profile import record

        budget = Budget(seconds=self.config.profile_seconds, warmup=0.5, requests=self.config.requests)
        result.profile = record(process.pid, lambda: load(budget, f"profile-{time.monotonic_ns()}"),
                                self.workdir / f"profile-{result.number}.txt", budget.seconds + budget.warmup)
        result.profiled = label

    def note_memory(self, service: str, *, idle_mb: float | None = None, load_mb: float | None = None,
                    context: str = "") -> None:
        row = self.memory.setdefault(service, MemoryRow(service))
        if idle_mb is not None:
            row.idle_mb = idle_mb
        if load_mb is not None and (math.isnan(row.load_mb) or load_mb > row.load_mb):
            row.load_mb = load_mb
            row.load_context = context


def _free_port_range(count: int) -> int:
    for _ in range(50):
        base = free_port()
        if base + count > 65535:
            continue
        try:
            holders = []
            for i in range(count):
                sock = socket.socket()
                holders.append(sock)
                sock.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for sock in holders:
                sock.close()
    raise RuntimeError("no free range of ports for the workers' metrics")


def processes_of(label: str, process: ManagedProcess) -> dict[str, psutil.Process]:
    """The process to meter under `label`; a multi-worker service's workers as `label` w1, w2, ..."""
    procs = process.processes()
    if len(procs) <= 1:
        return {label: procs[0]} if procs else {}
    return {f"{label} w{i}": p for i, p in enumerate(procs[1:], 1)}


def idle_rss(process: ManagedProcess, settle: float = 1.0) -> float:
    """RSS (MB) of a started, unloaded service; for several workers, the largest one."""
    time.sleep(settle)
    procs = process.processes()
    workers = procs[1:] or procs
    return max(rss_mb(p) for p in workers)


def git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return f"{out}{' + uncommitted changes' if dirty else ''}" if out else "unknown"
