"""`python -m bench` on a tiny, bounded configuration: the harness runs end to end and reports. Structure only,
never speed: a benchmark never fails the suite on a timing."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys

import asyncpg
import psutil

from tests.support import postgres
from tests.support.processes import ROOT

REQUESTS = 300  # per segment: a few hundred requests, whatever the machine's speed


async def _databases(where: str, argument: object) -> list[str]:
    """Names of the databases that exist and match `where` (on datname, with $1 the argument)."""
    conn = await asyncpg.connect(postgres.ADMIN_DSN)
    try:
        rows = await conn.fetch(f"SELECT datname FROM pg_database WHERE {where}", argument)
    finally:
        await conn.close()
    return [r["datname"] for r in rows]


def _vhost_exists(name: str) -> bool:
    listed = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60)
    return name in listed.stdout.split()


def test_bench_runs_alternating_sides_and_writes_its_report(tmp_path):
    output, data = tmp_path / "BENCHMARKS.md", tmp_path / "bench.json"
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--scenarios", "1,2", "--requests", str(REQUESTS), "--rounds", "2",
         "--services", "user", "--no-profile", "--output", str(output), "--json", str(data),
         "--workdir", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(data.read_text())

    scenarios = {s["number"]: s for s in report["scenarios"]}
    assert set(scenarios) == {"1", "2"}
    for number, scenario in scenarios.items():
        assert scenario["skipped"] is None, scenario["skipped"]
        # Baseline and subject alternate, round after round, in the same run.
        assert [(s["role"], s["round"]) for s in scenario["segments"]] == [
            ("baseline", 1), ("subject", 1), ("baseline", 2), ("subject", 2)], number
        for segment in scenario["segments"]:
            load = segment["load"]
            assert load["requests"] == load["completed"] == REQUESTS and load["errors"] == 0, (number, segment)
            assert load["seconds"] > 0 and load["p50_ms"] > 0 and load["p99_ms"] >= load["p50_ms"]
            assert segment["wall_s"] >= load["seconds"]  # the CPU was metered over the whole load
            assert all(v >= 0 for v in segment["cpu_s"].values()) and segment["cpu_s"]
            assert all(v > 0 for v in segment["rss_mb"].values()) and segment["rss_mb"]
        subject = [s for s in scenario["segments"] if s["role"] == "subject"]
        # The user service itself counted every measured call, each answered OK.
        assert all(s["rpc_codes"] == {"OK": REQUESTS} for s in subject), [s["rpc_codes"] for s in subject]
        assert all("user" in s["cpu_s"] and "postgres" in s["cpu_s"] for s in subject)
        assert math.isfinite(scenario["ratio"]) and scenario["ratio"] > 0
        assert isinstance(scenario["met"], bool)
    assert scenarios["1"]["segments"][0]["load"]["tool"] == "h2load"
    assert scenarios["2"]["segments"][1]["load"]["tool"] == "grpcload"

    memory = {row["service"]: row for row in report["memory"]}
    assert memory["user"]["idle_mb"] > 0 and memory["user"]["load_mb"] > 0

    text = output.read_text()
    for heading in ("## Summary", "## Memory", "## Targets missed", "## Machine and versions",
                    "### 1. ", "### 2. "):
        assert heading in text, heading
    summary = text.split("## Summary", 1)[1].split("## Memory", 1)[0]
    assert summary.count("\n| 1 | ") == 1 and summary.count("\n| 2 | ") == 1
    assert f"{REQUESTS} requests per segment" in text
    assert "PostgreSQL" in report["environment"] and "h2load" in report["environment"]

    # It cleaned up after itself: databases, vhost and every process it started.
    assert report["resources"]["databases"] and report["resources"]["vhosts"]
    assert asyncio.run(_databases("datname = ANY($1::text[])", report["resources"]["databases"])) == []
    assert not any(_vhost_exists(name) for name in report["resources"]["vhosts"])
    leftovers = [p for p in psutil.Process().children(recursive=True)
                 if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == []


def test_the_ablation_serves_every_variant_and_reports_its_cost(tmp_path):
    """`python -m bench.ablation`: four variants of the user service, each answering GetUser for real, metered
    apart; the PostgreSQL variants read through backends of their own (the tool refuses to report one without),
    the in-memory ones have no database column."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = subprocess.run([sys.executable, "-m", "bench.ablation", "--rounds", "1", "--requests", str(REQUESTS)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines()[2:]:
        name, rps, cpu, db_cpu = (cell.strip() for cell in line.strip("|").split("|"))
        rows[name] = (float(rps.replace(",", "")), float(cpu), None if db_cpu == "—" else float(db_cpu))
    assert set(rows) == {"memory, bare", "memory, per-RPC stack", "postgresql, bare", "postgresql, per-RPC stack"}
    for name, (rps, cpu, db_cpu) in rows.items():
        assert rps > 0 and cpu > 0, name
        # A few hundred reads may cost PostgreSQL less than one 10 ms tick of CPU time: only its presence is sure.
        assert (db_cpu is not None and db_cpu >= 0) == name.startswith("postgresql"), (name, db_cpu)
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert after <= before  # every variant stopped
    assert asyncio.run(_databases("datname LIKE $1", "tessera_ablation_%")) == []  # its database was dropped


def test_the_quiet_relay_tool_publishes_each_event_and_reports_its_cost():
    """`python -m bench.quiet_relay`: a real relay publishes every event on the broker (it waits for each to be
    published and marked before it measures the writes alone), and the tool drops its database and vhost."""
    listed = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60)
    vhosts_before = set(listed.stdout.split())
    result = subprocess.run([sys.executable, "-m", "bench.quiet_relay", "--rounds", "1", "--events", "30"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    header, table = result.stdout.splitlines()[0], result.stdout.splitlines()[2:]
    assert "30 events" in header
    assert len(table) == 1
    # Differences of CPU times (PostgreSQL's in 10 ms ticks) over 30 events: their values are noise here, their
    # presence is what is checked.
    _, process, database, total = (float(cell) for cell in table[0].strip("|").split("|"))
    assert math.isfinite(process) and math.isfinite(database)
    assert math.isclose(total, process + database, abs_tol=0.002)
    assert asyncio.run(_databases("datname LIKE $1", "tessera_quiet_relay_%")) == []
    listed = subprocess.run(["rabbitmqctl", "-q", "list_vhosts"], capture_output=True, text=True, timeout=60)
    assert {v for v in set(listed.stdout.split()) - vhosts_before if v.startswith("tessera-quiet-relay")} == set()


def test_the_gateway_ablation_measures_each_path_through_its_own_envoy():
    """`python -m bench.gateway_ablation`: the direct path and three Envoys (the gateway as generated, JWT and
    transcoder only, the router alone), each answering GetUser for real (the tool checks one answer per path before
    the load and refuses a failed request); Envoy's CPU is metered on the Envoy paths only, and every Envoy and the
    tool's database are gone afterwards."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = subprocess.run([sys.executable, "-m", "bench.gateway_ablation", "--rounds", "1", "--requests", "200",
                             "--rate", "200"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    header, table = result.stdout.splitlines()[0], result.stdout.splitlines()[3:]
    assert header.startswith("GetUser at 200 requests/s")
    rows = {}
    for line in table:
        name, p50, p99, added, cpu = (cell.strip() for cell in line.strip("|").split("|"))
        rows[name] = (float(p50), float(p99), added, cpu)
    assert list(rows) == ["direct", "gateway as generated", "REST, JWT and transcoder only",
                          "gRPC through Envoy, router only"]
    for name, (p50, p99, added, cpu) in rows.items():
        assert 0 < p50 <= p99, name
        if name == "direct":
            assert added == cpu == "—"
        else:
            # Latencies on a shared machine are noise here; that each Envoy path was metered is what is checked.
            assert math.isclose(float(added), p50 - rows["direct"][0], abs_tol=0.011), name
            assert float(cpu) >= 0, name  # CPU time counts in 10 ms ticks
    leftovers = [p for p in psutil.Process().children(recursive=True)
                 if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == []
    assert asyncio.run(_databases("datname LIKE $1", "tessera_gateway_ablation_%")) == []


def test_the_rate_cost_tool_meters_getuser_at_each_rate_and_at_saturation():
    """`python -m bench.rate_cost`: the user service answers GetUser at each paced rate and then as fast as it can
    (the tool checks one answer first and refuses a failed request), each metered; its database is dropped."""
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = subprocess.run([sys.executable, "-m", "bench.rate_cost", "--rates", "100", "--rounds", "1",
                             "--requests", "150"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {}
    for line in result.stdout.splitlines()[3:]:
        rate, rps, cpu, database = (cell.strip() for cell in line.strip("|").split("|"))
        rows[rate] = (float(rps.replace(",", "")), float(cpu), float(database))
    assert list(rows) == ["100/s", "as fast as it goes"]
    for rate, (rps, cpu, database) in rows.items():
        assert rps > 0 and cpu > 0 and database >= 0, rate  # values are noise here; that each was metered is not
    leftovers = [p for p in psutil.Process().children(recursive=True)
                 if p.pid not in before and p.status() != psutil.STATUS_ZOMBIE]
    assert leftovers == []
    assert asyncio.run(_databases("datname LIKE $1", "tessera_rate_cost_%")) == []
