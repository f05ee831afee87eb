"""BENCHMARKS.md (and a JSON twin) from one run's results: summary, memory, missed targets, every segment."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path

from bench.harness import Config, MemoryRow, ScenarioResult, Segment
from bench.scenarios.memory import IDLE_TARGET_MB

FINDINGS = Path(__file__).resolve().parent / "FINDINGS.md"


def _num(value: float, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    return f"{value:,.{digits}f}"


def _met(met: bool | None) -> str:
    return {True: "yes", False: "**NO**", None: "—"}[met]


def _per_process(values: dict[str, float], digits: int) -> str:
    return " · ".join(f"{label} {value:.{digits}f}" for label, value in sorted(values.items())) or "—"


def _summary(results: Sequence[ScenarioResult]) -> list[str]:
    lines = ["| # | scenario | baseline | subject | ratio | target | met |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if r.skipped:
            lines.append(f"| {r.number} | {r.title} | — | — | — | {r.target_text} | not run |")
            continue
        lines.append(f"| {r.number} | {r.title} | {_num(r.baseline_value)} {r.unit} | "
                     f"{_num(r.subject_value)} {r.unit} | {_num(r.ratio, 2)}× | {r.target_text} | {_met(r.met)} |")
        for f in r.findings:
            if f.target != "—":
                lines.append(f"| {r.number} | ↳ {f.name} | | {f.value} | | {f.target} | {_met(f.met)} |")
    return lines


def _memory(rows: Sequence[MemoryRow]) -> list[str]:
    lines = ["| service | idle RSS (MB) | peak RSS under load (MB) | under | idle ≤ 120 MB |",
             "|---|---|---|---|---|"]
    for row in rows:
        met = None if math.isnan(row.idle_mb) else row.idle_mb <= IDLE_TARGET_MB
        lines.append(f"| {row.service} | {_num(row.idle_mb, 1)} | {_num(row.load_mb, 1)} | "
                     f"{row.load_context or '—'} | {_met(met)} |")
    return lines


def _missed(results: Sequence[ScenarioResult], memory: Sequence[MemoryRow]) -> list[str]:
    lines = []
    for r in results:
        if r.skipped:
            lines.append(f"- Scenario {r.number} was not run: {r.skipped}")
            continue
        if r.met is not False:
            continue
        if r.ratio < r.target_ratio:
            lines.append(f"- Scenario {r.number} misses its target: {r.subject} reached {_num(r.ratio, 2)}× "
                         f"{r.baseline} ({_num(r.subject_value)} vs {_num(r.baseline_value)} {r.unit}); "
                         f"the target is {r.target_text}.")
        for f in r.findings:
            if f.met is False:
                lines.append(f"- Scenario {r.number} misses a target: {f.name} is {f.value}; the target is "
                             f"{f.target}.")
    for row in memory:
        if not math.isnan(row.idle_mb) and row.idle_mb > IDLE_TARGET_MB:
            lines.append(f"- {row.service} idles at {row.idle_mb:.1f} MB RSS; the target is ≤ {IDLE_TARGET_MB:.0f} MB.")
    return lines or ["- None: every scenario that ran met its target."]


def _cpu_per_request(segment: Segment) -> str:
    """CPU of every metered process (servers, PostgreSQL, broker; not the load generator) per request served
    while it was metered (warm-up included, like the CPU)."""
    if not segment.load.completed:
        return "—"
    return f"{1000 * sum(segment.cpu_s.values()) / segment.load.completed:.2f}"


def _details(r: ScenarioResult) -> list[str]:
    lines = [f"### {r.number}. {r.title}", ""]
    if r.skipped:
        return [*lines, f"Not run: {r.skipped}", ""]
    lines += [f"Baseline: {r.baseline}. Subject: {r.subject}. Target: {r.target_text}.", ""]
    if r.segments:
        lines += [f"| round | side | load | {r.unit} | p50 ms | p99 ms | errors | gRPC outcomes (server) | "
                  "CPU s per process | CPU ms per request | peak RSS MB per process | load generator CPU s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for s in r.segments:
            codes = "—" if s.rpc_codes is None else (" ".join(f"{k} {v}" for k, v in sorted(s.rpc_codes.items()))
                                                      or "none")
            lines.append(
                f"| {s.round} | {s.role}: {s.name} | {s.load.tool} | {_num(s.load.rps)} | {_num(s.load.p50_ms, 2)} "
                f"| {_num(s.load.p99_ms, 2)} | {s.load.errors} | {codes} | {_per_process(s.cpu_s, 2)} | "
                f"{_cpu_per_request(s)} | {_per_process(s.rss_mb, 0)} | {s.load.loadgen_cpu_s:.2f} |")
        lines.append("")
    for f in r.findings:
        lines.append(f"- {f.name}: {f.value}" + (f" (target {f.target}: {_met(f.met)})" if f.target != "—" else ""))
    for note in r.notes:
        lines.append(f"- {note}")
    if r.profile:
        lines += ["", f"py-spy profile of the {r.profiled} (an extra, unmeasured segment):", "", "```",
                  *r.profile, "```"]
    lines.append("")
    return lines


def write(path: Path, results: Sequence[ScenarioResult], memory: Sequence[MemoryRow], env: dict[str, str],
          config: Config, revision: str, elapsed: float, notes: Sequence[str] = ()) -> None:
    measured = (f"{config.requests} requests per segment" if config.requests
                else f"{config.seconds:g} s measured per segment after {config.warmup:g} s of warm-up")
    lines = [
        "# Benchmarks",
        "",
        f"Written by `make bench` (`python -m bench`) on {env.get('date', '?')} at revision {revision}, in "
        f"{elapsed:.0f} s. Do not edit by hand: run it again.",
        "",
        "A benchmark reports; it never fails the build on a timing. Each scenario runs its baseline in the same "
        f"run, alternating baseline and subject for {config.rounds} rounds ({measured}), so that the machine's "
        "noise falls on both. Ratios are subject ÷ baseline, each side's requests summed over its segments. "
        "Everything runs on 127.0.0.1; the machine is shared and noisy (2 cores), so compare ratios, not "
        "absolute numbers, and expect a few percent of drift between runs.",
        "",
        "## Summary",
        "",
        *_summary(results),
        "",
        "## Memory",
        "",
        "Idle: each service started alone on its own PostgreSQL database, RSS after it serves and settles. Under "
        "load: the largest RSS sampled during the scenario named.",
        "",
        *_memory(memory),
        "",
        "## Targets missed",
        "",
        *_missed(results, memory),
        *[f"- {note}" for note in notes],
        "",
        "## Machine and versions",
        "",
        "| | |",
        "|---|---|",
        *[f"| {key} | {value} |" for key, value in env.items()],
        "",
        "## Scenarios in detail",
        "",
        "CPU seconds are per process over the whole segment, warm-up included (`postgres`: the backends of the "
        "scenario's database, summed); CPU ms per request divides every metered process's CPU (not the load "
        "generator's) by the requests completed in that time, the figure least disturbed by other work on the "
        "machine; peak RSS is sampled every 50 ms. gRPC outcomes are "
        "the server's own counts (`grpc_server_handled_total` from its /metrics) over the whole segment, warm-up "
        "included, since h2load only sees HTTP status 200; CANCELLED are the streams a load generator abandons "
        "when its time is up.",
        "",
    ]
    for r in results:
        lines += _details(r)
    lines += _analysis()
    path.write_text("\n".join(lines))


def _analysis() -> list[str]:
    if not FINDINGS.exists():
        return []
    return ["## Analysis", "", "Written by hand from the runs and profiles above (bench/FINDINGS.md).", "",
            FINDINGS.read_text().strip(), ""]


def refresh_analysis(path: Path) -> None:
    """Replaces the Analysis section of a written report with bench/FINDINGS.md as it is now; the numbers stay."""
    text = path.read_text()
    measured = text.split("\n## Analysis\n", 1)[0].rstrip("\n")
    path.write_text("\n".join([measured, "", *_analysis()]))


def write_json(path: Path, results: Sequence[ScenarioResult], memory: Sequence[MemoryRow], env: dict[str, str],
               config: Config, resources: dict[str, list[str]]) -> None:
    def encode(obj: object) -> object:
        if dataclasses.is_dataclass(obj):
            data = dataclasses.asdict(obj)  # type: ignore[arg-type]
            if isinstance(obj, ScenarioResult):
                data["ratio"] = obj.ratio
                data["met"] = obj.met
            return data
        raise TypeError(type(obj))

    payload = {"config": dataclasses.asdict(config), "environment": env,
               "scenarios": [encode(r) for r in results], "memory": [encode(m) for m in memory],
               "resources": resources}
    path.write_text(json.dumps(payload, indent=2, default=str, allow_nan=True))
