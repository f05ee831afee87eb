"""Scenario 6: the outbox relay draining a backlog of events vs a raw pika publisher with batched confirms."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import sys
import time
import uuid
from typing import Any

import asyncpg
import pika
import psutil

from bench import infra
from bench.harness import Finding, Run, ScenarioResult, Segment
from bench.load import LoadResult, run_measured
from bench.meter import Meter
from bench.procs import ManagedProcess
from bench.scenarios.common import postgres_of

SINK_QUEUE = "bench.relay-sink"
ROUTING_KEY = "tessera.user.v1.UserCreated"
DRAIN_TARGET_SECONDS = 60.0
DRAIN_TIMEOUT_SECONDS = 240.0


def relay_available() -> bool:
    try:
        return importlib.util.find_spec("tessera_runtime.messaging.relay") is not None
    except ModuleNotFoundError:
        return False


def _events_exchange() -> str:
    from tessera_runtime.messaging.settings import DEFAULT_EXCHANGE

    return DEFAULT_EXCHANGE


def _sample_rows(count: int) -> tuple[list[str], list[tuple[Any, ...]], int]:
    """`count` outbox rows of UserCreated events, as the user service writes them (columns, records, payload size)."""
    from tessera.user.v1 import user_events_pb2, user_pb2

    from tessera_runtime.outbox import PendingEvent

    rows = []
    for i in range(count):
        user_id = str(uuid.uuid4())
        event = user_events_pb2.UserCreated(user=user_pb2.User(
            id=user_id, email=f"backlog-{i}@bench.example.com", display_name=f"Backlog {i}",
            status=user_pb2.USER_STATUS_ACTIVE, version=1))
        rows.append(PendingEvent("user", user_id, event).row())
    columns = list(rows[0])
    return columns, [tuple(r[c] for c in columns) for r in rows], len(rows[0]["payload"])


async def _copy_backlog(dsn: str, columns: list[str], records: list[tuple[Any, ...]]) -> float:
    """Writes the backlog in one transaction; returns the wall-clock time it became visible (its commit)."""
    conn = await asyncpg.connect(dsn)
    try:
        async with conn.transaction():
            await conn.copy_records_to_table("outbox", records=records, columns=columns)
        return time.time()
    finally:
        await conn.close()


async def _backlog_state(dsn: str) -> tuple[int, float | None]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow("SELECT count(*) FILTER (WHERE published_at IS NULL) AS left, "
                                  "extract(epoch FROM max(published_at)) AS last FROM outbox")
        return row["left"], (float(row["last"]) if row["last"] is not None else None)
    finally:
        await conn.close()


async def _clear_outbox(dsn: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("DELETE FROM outbox")
    finally:
        await conn.close()


def _sink(url: str, *, purge: bool) -> int:
    """The durable queue every event is routed to (so the broker persists each one, as with real consumers)."""
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        channel.exchange_declare(_events_exchange(), exchange_type="topic", durable=True)
        declared = channel.queue_declare(SINK_QUEUE, durable=True)
        channel.queue_bind(SINK_QUEUE, _events_exchange(), "#")
        if purge:
            channel.queue_purge(SINK_QUEUE)
        return declared.method.message_count


def _broker_process() -> psutil.Process | None:
    for proc in psutil.process_iter(["name", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        if proc.info.get("name") == "beam.smp" and any("rabbit" in part for part in cmdline):
            return proc
    return None


def relay_vs_pika(run: Run) -> ScenarioResult:
    result = ScenarioResult("6", "Outbox relay draining a backlog vs raw pika with batched confirms",
                            baseline="raw pika, SelectConnection, 500 unconfirmed in flight",
                            subject="Tessera outbox relay (user service, PostgreSQL)", unit="events/s",
                            target_ratio=0.5, target_text=f"≥ 0.5× pika's publish rate; a 100,000-event backlog "
                                                          f"drained in ≤ {DRAIN_TARGET_SECONDS:.0f} s")
    if not relay_available():
        result.skipped = "the outbox relay (tessera_runtime/messaging/relay.py) is not in this checkout"
        return result
    count = run.config.requests or run.config.relay_events
    database = run.dbs.create("relay")
    dsn = infra.plain_dsn(database)
    service = run.tessera("user", database, label="user-relay")
    _sink(run.amqp_url, purge=True)
    columns, records, payload_size = _sample_rows(count)
    broker = _broker_process()
    extra = {"rabbitmq": broker} if broker else {}

    def pika_round(round_: int, messages: int) -> Segment:
        _sink(run.amqp_url, purge=True)
        argv = [sys.executable, "-m", "bench.baselines.pika_publisher", "--url", run.amqp_url, "--exchange",
                _events_exchange(), "--routing-key", ROUTING_KEY, "--count", str(messages), "--window", "500",
                "--body-size", str(payload_size)]
        with Meter(extra) as meter:
            out, cpu, rss = run_measured(argv, timeout=DRAIN_TIMEOUT_SECONDS)
        data = json.loads(out.strip().splitlines()[-1])
        load = LoadResult("pika", data["messages"], data["nacked"], data["seconds"], math.nan, math.nan, cpu, rss)
        return Segment("baseline", "pika", round_, load, {**meter.cpu_s, "pika": cpu}, meter.rss_peak_mb,
                       wall_s=meter.wall_s)

    def relay_round(round_: int) -> Segment:
        _sink(run.amqp_url, purge=True)
        asyncio.run(_clear_outbox(dsn))
        def processes() -> dict:
            return {"user": service.processes()[0], **extra, **postgres_of(service)}

        with Meter(processes) as meter:
            visible_at = asyncio.run(_copy_backlog(dsn, columns, records))
            left, last = _wait_drained(service, dsn)
        seconds = (last - visible_at) if last is not None and left == 0 else math.nan
        load = LoadResult("relay", count - left, left, seconds, math.nan, math.nan)
        return Segment("subject", "relay", round_, load, meter.cpu_s, meter.rss_peak_mb, wall_s=meter.wall_s)

    # Baseline, subject, baseline: the relay's drain is the long part, so it runs once (a full backlog) and the
    # baseline runs before and after it (half as many messages each), which keeps the run inside its budget.
    result.segments.append(pika_round(1, max(1, count // 2)))
    result.segments.append(relay_round(1))
    result.segments.append(pika_round(2, max(1, count // 2)))
    result.set_rates_from_segments()
    drains = [s.load.seconds for s in result.segments if s.role == "subject"]
    worst = max(drains)
    result.findings.append(Finding(f"time to drain a {count:,}-event backlog", f"{worst:.1f} s (slowest round)",
                                   f"≤ {DRAIN_TARGET_SECONDS:.0f} s" if count >= 100_000 else "—",
                                   (worst <= DRAIN_TARGET_SECONDS) if count >= 100_000 else None))
    queued = _sink(run.amqp_url, purge=True)
    result.notes.append(
        f"Order: pika ({count // 2:,} messages), relay, pika again. The backlog ({count:,} UserCreated rows, "
        f"{payload_size}-byte payloads) is written to the "
        "outbox in one COPY while the service runs; the drain lasts from that commit to the last row's "
        "published_at (the relay marks a row only after the broker confirmed it). Every event is routed to one "
        f"durable queue, persisted by the broker, purged between rounds; {queued:,} were queued after the last "
        "round. pika publishes messages of the same size, persistent, mandatory, to the same exchange.")
    run.note_memory("user", load_mb=max((s.rss_mb.get("user", 0.0) for s in result.segments), default=0.0),
                    context="relay draining the backlog (6)")
    run.stop(service)
    return result


def _wait_drained(service: ManagedProcess, dsn: str) -> tuple[int, float | None]:
    deadline = time.monotonic() + DRAIN_TIMEOUT_SECONDS
    left, last = asyncio.run(_backlog_state(dsn))
    while left and time.monotonic() < deadline:
        if service.proc is not None and service.proc.poll() is not None:
            raise RuntimeError(f"the service exited while draining: {service.log_tail()}")
        time.sleep(0.25)
        left, last = asyncio.run(_backlog_state(dsn))
    return left, last
