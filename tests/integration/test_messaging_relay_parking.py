"""An event the broker refuses for good (larger than its max_message_size) against the real relay, a private broker
node and a real outbox on SQLite and PostgreSQL: it is parked, kept in the outbox, and every later event goes out;
`tessera outbox retry` puts it back in line once the limit is raised. A broker that is away for a while parks
nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select
from tessera.user.v1 import user_events_pb2

from tessera_runtime.cli import main as tessera
from tessera_runtime.db import Database
from tessera_runtime.messaging.relay import OutboxRelay
from tessera_runtime.outbox import PendingEvent
from tests.integration.test_messaging_relay import FAST, outbox_on, relay_log_lines, stop_within, write
from tests.support import rabbitmq
from tests.support.waiting import eventually

LIMIT = 1024 * 1024  # the node's max_message_size: an operator's hardening of the 128 MiB default
QUEUE = "notification.email"  # declared and bound by the relay for UserCreated (topology.publisher_declarations)
SETTINGS = dataclasses.replace(FAST, outbox_batch_size=10, outbox_confirm_timeout_seconds=5.0)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    broker = rabbitmq.PrivateNode(tmp_path_factory.mktemp("rabbitmq"),
                                  rabbit_settings={"max_message_size": LIMIT}).start()
    yield broker
    broker.stop()


@pytest.fixture
async def outbox(db_url):
    async with outbox_on(db_url) as made:
        yield made


def created(user_id: str, padding: int = 0) -> PendingEvent:
    event = user_events_pb2.UserCreated()
    event.user.id, event.user.email = user_id, f"{user_id}@example.com"
    event.user.display_name = "x" * padding  # a large payload; the broker refuses the message, not the contract
    return PendingEvent("user", user_id, event)


def queued(url: str) -> list[tuple[str, int]]:
    """(message id, body size) of each message in the consumer queue, taken out of it."""
    got = []
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        while True:
            method, props, body = channel.basic_get(QUEUE, auto_ack=True)
            if method is None:
                return got
            got.append((props.message_id, len(body)))


async def rows(db: Database, table) -> dict[str, dict]:
    async with db.engine.connect() as conn:
        return {r.event_id: r._asdict() for r in (await conn.execute(select(table).order_by(table.c.seq))).all()}


async def cli(*argv: str) -> int:
    """`tessera ARGV...` (it runs its own event loop: on a thread of its own here)."""
    return await asyncio.to_thread(tessera, list(argv))


def parked_total(service: str) -> float:
    return REGISTRY.get_sample_value("tessera_outbox_events_parked_total",
                                     {"service": service, "event_type": "tessera.user.v1.UserCreated"}) or 0


def parked_gauge(service: str) -> float | None:
    return REGISTRY.get_sample_value("tessera_outbox_parked", {"service": service})


async def test_an_event_larger_than_the_brokers_limit_is_parked_and_every_later_event_is_published(
        node, outbox, capsys, db_url):
    db, table = outbox
    vhost = node.create_vhost()
    url = node.url(vhost)
    service = f"park-{uuid.uuid4().hex[:6]}"
    # Two aggregates; the big event is in the middle of the first batch, with more of its own aggregate behind it,
    # another aggregate's events beside it, and a later batch behind them all.
    before = [created(f"a{i}") for i in range(4)]
    big = created("a-big", padding=2 * LIMIT)
    behind = [created(f"{'a' if i % 2 else 'b'}{i}") for i in range(4, 30)]
    await write(db, table, [*before, big, *behind])
    relay = OutboxRelay(db, table, service=service, amqp_url=url, settings=SETTINGS)
    with relay_log_lines() as logged:
        await relay.start()
        try:
            await eventually(lambda: relay.status()["published_total"] == 30, "every other event to be published",
                             timeout=60)
            await eventually(lambda: relay.status()["parked"] == 1, "the big event to be counted parked")
        finally:
            await stop_within(relay)
    stored = await rows(db, table)
    assert len(stored) == 31  # nothing was deleted
    kept = stored[big.event_id]
    assert kept["published_at"] is None and kept["parked_at"] is not None
    assert "406" in kept["parked_reason"] and "PRECONDITION_FAILED" in kept["parked_reason"]
    assert "larger than configured max size" in kept["parked_reason"]
    others = [e.event_id for e in [*before, *behind]]
    assert all(stored[i]["published_at"] is not None and stored[i]["parked_at"] is None for i in others)
    messages = await asyncio.to_thread(queued, url)
    assert {m for m, _ in messages} == set(others)  # each other event reached its queue, the big one never did

    [line] = [line for line in logged.lines if line["message"].startswith("event parked")]
    assert line["level"] == "ERROR"
    assert (line["event_id"], line["event_type"], line["aggregate_type"], line["aggregate_id"]) == (
        big.event_id, "tessera.user.v1.UserCreated", "user", "a-big")
    assert line["size_bytes"] == len(stored[big.event_id]["payload"]) > LIMIT
    assert "larger than configured max size" in line["reason"]
    assert parked_total(service) == 1 and parked_gauge(service) == 1

    # The operator sees it, raises the limit (a restart of the broker) and puts it back in line.
    assert await cli("outbox", "list", "user", "--database-url", db_url, "--json") == 0
    [listed] = json.loads(capsys.readouterr().out)
    assert (listed["event_id"], listed["aggregate_id"], listed["size_bytes"]) == (
        big.event_id, "a-big", len(kept["payload"]))
    assert "larger than configured max size" in listed["reason"]
    node.stop()
    node.set_rabbit_settings({"max_message_size": 4 * LIMIT})
    await asyncio.to_thread(node.start)
    assert await cli("outbox", "retry", "user", big.event_id, "--database-url", db_url) == 0
    assert capsys.readouterr().out == f"put back in line: {big.event_id}\n"
    relay = OutboxRelay(db, table, service=service, amqp_url=url, settings=SETTINGS)
    await relay.start()
    try:
        await eventually(lambda: relay.status()["published_total"] == 1, "the retried event to be published",
                         timeout=60)
        await eventually(lambda: relay.status()["parked"] == 0, "nothing left parked")
    finally:
        await stop_within(relay)
    stored = await rows(db, table)
    assert stored[big.event_id]["published_at"] is not None and stored[big.event_id]["parked_at"] is None
    assert await asyncio.to_thread(queued, url) == [(big.event_id, len(kept["payload"]))]  # once
    assert parked_gauge(service) == 0
    node.stop()
    node.set_rabbit_settings({"max_message_size": LIMIT})
    await asyncio.to_thread(node.start)


async def test_a_broker_killed_and_restarted_while_events_are_in_flight_parks_nothing(node, outbox):
    db, table = outbox
    vhost = node.create_vhost()
    url = node.url(vhost)
    service = f"park-kill-{uuid.uuid4().hex[:6]}"
    events = [created(f"k{i}") for i in range(3000)]
    await write(db, table, events)
    relay = OutboxRelay(db, table, service=service, amqp_url=url,
                        settings=dataclasses.replace(SETTINGS, outbox_batch_size=100))
    await relay.start()
    try:
        await eventually(lambda: relay.status()["published_total"] >= 300 and relay.status()["in_flight"] > 0,
                         "events in flight")
        node.kill()
        await asyncio.to_thread(node.start)
        await eventually(lambda: relay.status()["published_total"] >= 3000, "every event to be published",
                         timeout=120)
    finally:
        await stop_within(relay)
    stored = await rows(db, table)
    assert all(r["parked_at"] is None and r["published_at"] is not None for r in stored.values())
    assert parked_total(service) == 0
