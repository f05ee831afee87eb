"""`python -m bench.quiet_relay`: what the outbox relay costs per event when each commit is published on a pass of
its own.

Scenario 6 measures the relay draining a backlog, 500 rows a batch, where a pass's fixed costs are shared by
hundreds of events. A service under ordinary load is the other case: its commits come a few milliseconds apart,
and the relay wakes for each one (after TESSERA_OUTBOX_GATHER_MS) and publishes it on a pass of its own. In the
saga (scenario 5) every order makes five events in four services this way, and the relay's passes were about a
quarter of the saga's CPU.

This tool runs that case in one process, on a throwaway PostgreSQL database and RabbitMQ vhost: a writer commits
one event every `--gap-ms` milliseconds, `--events` of them, with the relay running (every event is published and
marked), then the same writes with the relay stopped; the difference is the relay's. It alternates the two
`--rounds` times and prints, per round, the relay's CPU per event in this process (its event-loop side and the
publisher's thread) and in the database's PostgreSQL backends. Everything runs on 127.0.0.1 and is dropped at the
end (about 10 s per round with the defaults). bench/FINDINGS.md quotes it."""

from __future__ import annotations

import argparse
import asyncio
import itertools
import resource
import time
from collections.abc import Callable

import asyncpg
import psutil
from sqlalchemy import MetaData
from tessera.user.v1 import user_events_pb2

from bench import infra
from bench.meter import cpu_seconds
from tessera_runtime.db import Database
from tessera_runtime.messaging import MessagingSettings
from tessera_runtime.messaging.relay import OutboxRelay
from tessera_runtime.outbox import PendingEvent, notify_committed, outbox_table, write_events


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of the process: the loop and pika's
    return usage.ru_utime + usage.ru_stime


async def _until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for _ in itertools.count():
        if condition():
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


class _Backends:
    """CPU seconds of the PostgreSQL backends connected to one database, summed (backends that ended are lost, so
    the tool keeps its connections open throughout)."""

    def __init__(self, admin: asyncpg.Connection, database: str) -> None:
        self.admin = admin
        self.database = database

    async def cpu(self) -> float:
        total = 0.0
        for record in await self.admin.fetch(infra.BACKENDS, self.database):
            try:
                total += cpu_seconds(psutil.Process(record["pid"]))
            except psutil.NoSuchProcess:
                continue
        return total


async def _measure(url: str, amqp_url: str, events: int, gap: float, rounds: int) -> list[tuple[float, float]]:
    metadata = MetaData()
    table = outbox_table(metadata)
    db, writer = Database(url), Database(url)  # the writer's engine is not the relay's
    admin = await asyncpg.connect(infra.PG_ADMIN_DSN)
    backends = _Backends(admin, url.rsplit("/", 1)[1])
    try:
        async with db.engine.begin() as conn:
            await conn.run_sync(metadata.create_all)

        async def write(count: int) -> None:
            """Commits `count` events, `gap` apart."""
            for i in range(count):
                async with writer.sessionmaker() as session, session.begin():
                    await write_events(session, table, [
                        PendingEvent("user", "quiet", user_events_pb2.UserActivated(user_id=str(i)))])
                notify_committed(table)
                await asyncio.sleep(gap)

        async def cpu() -> tuple[float, float]:
            return _process_cpu(), await backends.cpu()

        results = []
        for _ in range(rounds):
            relay = OutboxRelay(db, table, service="quiet-relay", amqp_url=amqp_url, settings=MessagingSettings())
            await relay.start()
            try:
                await _until(lambda relay=relay: relay.publisher.ready, "the relay to connect to the broker")
                await write(20)  # warm: the relay's connection, its statements, the channel
                await _until(lambda relay=relay: relay.published_total >= 20, "the warm-up events to be published")
                start = await cpu()
                await write(events)
                # The segment ends with the pass that published the last event.
                await _until(lambda relay=relay: relay.published_total >= 20 + events, "every event to be published")
                with_relay = await cpu()
            finally:
                await relay.stop()
            alone = await cpu()
            await write(events)
            end = await cpu()
            results.append(tuple((w - s - (e - a)) / events  # type: ignore[misc]
                                 for s, w, a, e in zip(start, with_relay, alone, end, strict=True)))
        return results
    finally:
        await admin.close()
        await writer.dispose()
        await db.dispose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quiet_relay", description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=400, help="events per segment")
    parser.add_argument("--gap-ms", type=float, default=10.0, help="time between commits")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    databases = infra.Databases(prefix="tessera_quiet_relay")
    vhost = infra.Vhost(prefix="tessera-quiet-relay")
    try:
        results = asyncio.run(_measure(databases.create("outbox"), vhost.url, args.events, args.gap_ms / 1000,
                                       args.rounds))
    finally:
        try:
            databases.drop_all()
        finally:
            vhost.delete()
    print(f"outbox relay, one event per pass ({args.events} events {args.gap_ms:g} ms apart): CPU ms per event")
    print("| round | process | postgresql | total |")
    for round_, (process, postgres) in enumerate(results, 1):
        print(f"| {round_} | {1000 * process:.3f} | {1000 * postgres:.3f} | {1000 * (process + postgres):.3f} |")


if __name__ == "__main__":
    main()
