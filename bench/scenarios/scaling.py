"""Scenario 7: the user service on 2 worker processes (SO_REUSEPORT) against the same service on 1."""

from __future__ import annotations

import statistics

from bench.harness import Finding, Run, ScenarioResult
from bench.scenarios.common import (
    GET_USER,
    check_get_user,
    get_user_body,
    h2load_side,
    seeded_user_id,
    user_database,
    user_service,
)

# SO_REUSEPORT spreads connections, not requests: many connections keep the split between workers even.
CLIENTS = 16
STREAMS = 4


def two_workers_vs_one(run: Run) -> ScenarioResult:
    result = ScenarioResult("7", "Scaling: GetUser on 2 worker processes (TESSERA_WORKERS=2) vs 1",
                            baseline="user service, 1 process", subject="user service, 2 workers on one port",
                            target_ratio=1.7, target_text="≥ 1.7× one process (when the load generator is not "
                                                          "the bottleneck)")
    single = user_service(run)
    user_id = seeded_user_id(run)
    double = run.tessera("user", user_database(run), workers=2, label="user-2w")
    check_get_user(single.address, user_id)
    check_get_user(double.address, user_id)
    body = get_user_body(user_id)
    sides = [h2load_side(run, "baseline", "1 process", single, GET_USER, body, label="user",
                         clients=CLIENTS, streams=STREAMS),
             h2load_side(run, "subject", "2 workers", double, GET_USER, body, label="user-2w",
                         clients=CLIENTS, streams=STREAMS)]
    run.warm(sides)
    result.segments = run.alternate(sides)
    result.set_rates_from_segments()
    subject = [s for s in result.segments if s.role == "subject"]
    # CPU seconds (the services' and h2load's) count the load's warm-up too: they are divided by the time metered.
    loadgen = statistics.fmean(s.load.loadgen_cpu_s / s.wall_s for s in subject) if subject else 0.0
    busy = statistics.fmean(sum(s.cpu_s.values()) / s.wall_s for s in subject) if subject else 0.0
    result.findings.append(Finding(
        "cores busy during the 2-worker segments (workers + PostgreSQL + h2load)",
        f"{busy + loadgen:.2f} of {run.cpu_count} (h2load {loadgen:.2f})", "—", None))
    baseline = [s for s in result.segments if s.role == "baseline"]
    if baseline and subject:
        # Throughput follows the CPU the service gets: what 1.7× would need is 1.7 times one process's cores.
        def service_cores(segments: list) -> float:
            return statistics.fmean(sum(v for k, v in s.cpu_s.items() if k.startswith("user")) / s.wall_s
                                    for s in segments)

        one, two = service_cores(baseline), service_cores(subject)
        result.findings.append(Finding("cores the service itself used: 1 process vs 2 workers",
                                       f"{one:.2f} vs {two:.2f} ({two / one:.2f}×)", "—", None))
    result.notes.append(f"h2load with {CLIENTS} connections × {STREAMS} streams on both sides; the kernel "
                        "assigns each connection to one worker.")
    for i in (1, 2):
        label = f"user-2w w{i}"
        run.note_memory(f"user (worker {i} of 2)", load_mb=max((s.rss_mb.get(label, 0.0) for s in subject),
                                                               default=0.0), context="GetUser at full load (7)")
    run.stop(double)
    return result
