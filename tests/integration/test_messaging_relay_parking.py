"""An event the broker refuses for good (larger than its max_message_size) against the real relay, a private broker
node and a real outbox on SQLite and PostgreSQL: it is parked, kept in the outbox, and every later event goes out;
`tessera outbox retry` puts it back in line once the limit is raised. A broker that is away for a while parks
nothing."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import uuid

import asyncpg
import pytest
import sqlalchemy as sa
from alembic import command
from prometheus_client import REGISTRY
from sqlalchemy import inspect, select, update
from tessera.user.v1 import user_events_pb2

from tessera_analytics import bootstrap as analytics_bootstrap
from tessera_inventory import bootstrap as inventory_bootstrap
from tessera_notification import bootstrap as notification_bootstrap
from tessera_order import bootstrap as order_bootstrap
from tessera_payment import bootstrap as payment_bootstrap
from tessera_runtime.cli import main as tessera
from tessera_runtime.db import Database, utcnow
from tessera_runtime.messaging.relay import OutboxRelay
from tessera_runtime.migrations import alembic_config, upgrade, upgrade_async
from tessera_runtime.outbox import PendingEvent
from tessera_user import bootstrap as user_bootstrap
from tessera_user.adapters import orm as user_orm
from tests.integration.test_messaging_relay import (
    FAST,
    outbox_on,
    relay_log_lines,
    stop_within,
    until_all_marked,
    write,
)
from tests.support import rabbitmq
from tests.support.databases import migrated
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


@pytest.fixture
async def pg_outbox(pg_database):
    """An outbox on a throwaway PostgreSQL database: several replicas' relays take turns on it."""
    async with outbox_on(pg_database[1]) as made:
        yield made


@pytest.fixture
async def pg_dsn(pg_database):
    """The same database for asyncpg itself (another replica's connection)."""
    return pg_database[1].replace("postgresql+asyncpg://", "postgresql://")


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
    # In outbox order (events published before the refusal and not confirmed were published again: at least once).
    assert list(dict.fromkeys(m for m, _ in messages)) == others

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
        # Every row marked in the outbox (the relay's count can run ahead of a pass's commit).
        await until_all_marked(db, table, "every event to be published", timeout=120)
    finally:
        await stop_within(relay)
    stored = await rows(db, table)
    assert all(r["parked_at"] is None and r["published_at"] is not None for r in stored.values())
    assert parked_total(service) == 0


async def test_a_connection_the_broker_closes_parks_nothing(node, outbox):
    """A connection closed by the broker (CONNECTION_FORCED, an operator or a node going down) with events in
    flight: they are all published again, none parked."""
    db, table = outbox
    vhost = node.create_vhost()
    service = f"park-forced-{uuid.uuid4().hex[:6]}"
    await write(db, table, [created(f"f{i}") for i in range(3000)])
    relay = OutboxRelay(db, table, service=service, amqp_url=node.url(vhost),
                        settings=dataclasses.replace(SETTINGS, outbox_batch_size=100))
    await relay.start()
    try:
        await eventually(lambda: relay.status()["published_total"] >= 300 and relay.status()["in_flight"] > 0,
                         "events in flight")
        [pid] = node.connection_pids(relay.publisher.name)
        node.ctl("close_connection", pid, "closed by the test")
        # Every row marked in the outbox (the relay's count can run ahead of a pass's commit).
        await until_all_marked(db, table, "every event to be published", timeout=120)
    finally:
        await stop_within(relay)
    stored = await rows(db, table)
    assert all(r["parked_at"] is None and r["published_at"] is not None for r in stored.values())
    assert parked_total(service) == 0 and relay.status()["parked_total"] == 0


async def test_a_row_that_cannot_be_made_an_amqp_message_is_parked_and_the_rest_published(node, outbox, db_url,
                                                                                         capsys):
    """Rows the relay cannot turn into a message (stored headers that are no JSON object; a header value pika
    cannot encode) would fail every pass at the same row: each is parked, with the reason, as it is read."""
    db, table = outbox
    vhost = node.create_vhost()
    url = node.url(vhost)
    service = f"park-encode-{uuid.uuid4().hex[:6]}"
    good = [created(f"g{i}") for i in range(6)]
    not_json, not_utf8, long_type = created("bad-json"), created("bad-utf8"), created("bad-type")
    await write(db, table, [good[0], not_json, good[1], good[2], not_utf8, *good[3:5], long_type, good[5]])
    async with db.engine.begin() as conn:
        await conn.execute(update(table).where(table.c.event_id == not_json.event_id).values(headers="{not json"))
        await conn.execute(update(table).where(table.c.event_id == not_utf8.event_id)
                           .values(headers=json.dumps({"x-request-id": "\ud800"})))  # a lone surrogate
        # 200 characters fit the column, 400 bytes do not fit the routing key (an AMQP short string).
        await conn.execute(update(table).where(table.c.event_id == long_type.event_id).values(event_type="é" * 200))
    relay = OutboxRelay(db, table, service=service, amqp_url=url, settings=SETTINGS)
    with relay_log_lines() as logged:
        await relay.start()
        try:
            await eventually(lambda: relay.status()["published_total"] == 6 and relay.status()["parked"] == 3,
                             "the good rows published and the others parked")
        finally:
            await stop_within(relay)
    stored = await rows(db, table)
    assert [m for m, _ in await asyncio.to_thread(queued, url)] == [e.event_id for e in good]
    assert "cannot be made an AMQP message: JSONDecodeError" in stored[not_json.event_id]["parked_reason"]
    assert "cannot be made an AMQP message: UnicodeEncodeError" in stored[not_utf8.event_id]["parked_reason"]
    assert "cannot be made an AMQP message: ShortStringTooLong" in stored[long_type.event_id]["parked_reason"]
    parked_lines = [line for line in logged.lines if line["message"].startswith("event parked")]
    assert [(line["event_id"], line["level"]) for line in parked_lines] == [
        (not_json.event_id, "ERROR"), (not_utf8.event_id, "ERROR"), (long_type.event_id, "ERROR")]
    assert parked_total(service) == 2  # the third is counted under the event type stored in its row

    assert await cli("outbox", "list", "user", "--database-url", db_url) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[1] for line in listed] == [not_json.event_id, not_utf8.event_id, long_type.event_id]
    assert await cli("outbox", "retry", "user", "--all", "--database-url", db_url) == 0
    assert capsys.readouterr().out.splitlines() == [f"put back in line: {not_json.event_id}",
                                                    f"put back in line: {not_utf8.event_id}",
                                                    f"put back in line: {long_type.event_id}"]
    assert await cli("outbox", "list", "user", "--database-url", db_url) == 0
    assert capsys.readouterr().out == "no parked event in the outbox of user\n"


async def test_a_row_two_replicas_set_aside_at_once_is_parked_logged_and_counted_once(pg_outbox):
    """On PostgreSQL a pass parks the rows it set aside after its lock's transaction commits, so another replica's
    pass can read the same row before it is parked and park it too: the row is parked once, with one ERROR line and
    one count, and the second parking keeps the first one's time and reason."""
    db, table = pg_outbox
    service = f"park-twice-{uuid.uuid4().hex[:6]}"
    bad = created("bad-json")
    await write(db, table, [bad])
    async with db.engine.begin() as conn:
        await conn.execute(update(table).where(table.c.event_id == bad.event_id).values(headers="{not json"))
    # Never started: the row makes no message, so nothing is published and no broker is needed.
    first, second = (OutboxRelay(db, table, service=service, amqp_url="amqp://guest:guest@127.0.0.1:1/%2F",
                                 settings=SETTINGS) for _ in range(2))
    park = first._park

    async def the_other_replica_first(parking):
        assert await second.relay_once() == 0  # its pass reads the row, not parked yet, and parks it
        await park(parking)

    first._park = the_other_replica_first
    with relay_log_lines() as logged:
        assert await first.relay_once() == 0
    parked_lines = [line for line in logged.lines if line["message"].startswith("event parked")]
    assert [line["event_id"] for line in parked_lines] == [bad.event_id]
    assert parked_total(service) == 1
    assert first.parked_total + second.parked_total == 1
    stored = (await rows(db, table))[bad.event_id]
    assert stored["parked_at"] is not None and "JSONDecodeError" in stored["parked_reason"]


async def test_a_relay_finding_a_refused_event_waits_for_its_turn_while_another_replica_holds_the_outbox(
        node, pg_outbox, pg_dsn):
    """After a refusal the relay publishes the events in flight one at a time, a pass after the other at once. While
    another replica holds the outbox's lock (its own pass runs, for as long as its backlog lasts) this relay gets no
    pass: it tries again at the next poll, as it always does, not in a loop without a pause."""
    db, table = pg_outbox
    url = node.url(node.create_vhost())
    service = f"park-turn-{uuid.uuid4().hex[:6]}"
    small, big, after = created("t0"), created("t-big", padding=2 * LIMIT), created("t1")
    await write(db, table, [small, big, after])
    relay = OutboxRelay(db, table, service=service, amqp_url=url, settings=SETTINGS)
    other_replica = await asyncpg.connect(pg_dsn)
    held = asyncio.Event()
    tries_while_held = 0
    relay_once = relay.relay_once

    async def one_pass() -> int:
        nonlocal tries_while_held
        if held.is_set():
            tries_while_held += 1
        try:
            return await relay_once()
        finally:
            if relay._isolate_until is not None and not held.is_set():  # the refusal was just seen
                await other_replica.execute("SELECT pg_advisory_lock($1)", relay.lock_key)
                held.set()

    relay.relay_once = one_pass
    try:
        await relay.start()
        try:
            await asyncio.wait_for(held.wait(), 30)
            await asyncio.sleep(1.0)
            tries = tries_while_held
            await other_replica.execute("SELECT pg_advisory_unlock($1)", relay.lock_key)
            await eventually(lambda: relay.status()["published_total"] == 2 and relay.status()["parked"] == 1,
                             "the refused event parked and the others published once the lock is free", timeout=30)
        finally:
            await stop_within(relay)
    finally:
        await other_replica.close()
    # A poll every 0.2 s is about five tries in that second.
    assert tries <= 10, f"{tries} passes tried in 1 s while another replica held the outbox"


@pytest.fixture
async def user_outbox(db_url):
    """The user service's migrated database (its outbox with the parking columns), as (url, Database)."""
    async with migrated(user_bootstrap.MIGRATIONS, db_url) as db:
        yield db_url, db


ANY_ID = "0b5f3a4e-2f7e-4a5c-9d0e-3a1b2c3d4e5f"


@pytest.mark.parametrize(("argv", "said"), [
    (["retry", "user"], "name the event ids to put back in line, or pass --all (not both)"),
    (["retry", "user", ANY_ID, "--all"], "name the event ids to put back in line, or pass --all (not both)"),
    (["retry", "user", "evt-1"], "'evt-1' is not an event id"),
    (["list", "user", "--database-url", "mysql://db/x"], "--database-url must start with sqlite+aiosqlite://"),
    (["list", "user", "--database-url", "postgresql+asyncpg://u@127.0.0.1:port/x"],
     "--database-url is not a valid URL"),
    (["list", "user", "--database-url", "postgresql+asyncpg://postgres@127.0.0.1:1/tessera"],
     "cannot use the database of user at 127.0.0.1:1/tessera"),
    (["list", "user"], "no database file at "),  # TESSERA_DATA_DIR with no user.db in it
])
def test_outbox_commands_refuse_bad_input_in_one_line_with_exit_status_2(capsys, monkeypatch, tmp_path, argv, said):
    monkeypatch.delenv("TESSERA_DATABASE_URL", raising=False)
    monkeypatch.setenv("TESSERA_DATA_DIR", str(tmp_path))
    assert tessera(["outbox", *argv]) == 2
    out, err = capsys.readouterr()
    assert out == "" and said in err and len(err.strip().splitlines()) == 1, err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no database file made on the way


@pytest.mark.parametrize("argv", [["list", "shipping"], ["list", "user", "--limit", "0"], ["retry"]])
def test_outbox_commands_refuse_an_unknown_service_or_limit_as_usage_errors(capsys, argv):
    with pytest.raises(SystemExit) as exit_:
        tessera(["outbox", *argv])
    assert exit_.value.code == 2
    assert "error:" in capsys.readouterr().err


async def test_outbox_commands_on_a_database_without_an_outbox_say_so(capsys, db_url):
    async with migrated(analytics_bootstrap.MIGRATIONS, db_url):
        pass
    assert await cli("outbox", "list", "analytics", "--database-url", db_url) == 2
    err = capsys.readouterr().err
    assert "it has no outbox table" in err and len(err.strip().splitlines()) == 1


async def test_retry_of_an_event_that_is_not_parked_exits_1_and_puts_back_the_others(user_outbox, capsys):
    url, db = user_outbox
    table = user_orm.outbox
    waiting, parked_one, published_one = created("w"), created("p"), created("d")
    await write(db, table, [waiting, parked_one, published_one])
    async with db.engine.begin() as conn:
        await conn.execute(update(table).where(table.c.event_id == parked_one.event_id)
                           .values(parked_at=utcnow(), parked_reason="the broker refused it: 406 ..."))
        await conn.execute(update(table).where(table.c.event_id == published_one.event_id)
                           .values(published_at=utcnow()))
    unknown = str(uuid.uuid4())
    argv = ["outbox", "retry", "user", waiting.event_id, parked_one.event_id, published_one.event_id, unknown,
            "--database-url", url]
    assert await cli(*argv) == 1
    out, err = capsys.readouterr()
    assert out == f"put back in line: {parked_one.event_id}\n"
    assert err.splitlines() == [f"no parked event {i} in the outbox of user"
                                for i in (waiting.event_id, published_one.event_id, unknown)]
    stored = await rows(db, table)
    assert all(r["parked_at"] is None and r["parked_reason"] is None for r in stored.values())
    assert stored[published_one.event_id]["published_at"] is not None


async def test_retry_takes_an_event_id_in_any_spelling_of_the_uuid(user_outbox, capsys):
    """The id check takes any spelling of a UUID (upper case, braces, no hyphens); the outbox stores the canonical
    one, which is the one put back and printed."""
    url, db = user_outbox
    table = user_orm.outbox
    events = [created("upper"), created("braces"), created("bare")]
    await write(db, table, events)
    async with db.engine.begin() as conn:
        await conn.execute(update(table).values(parked_at=utcnow(), parked_reason="the broker refused it: 406 ..."))
    upper, braces, bare = (e.event_id for e in events)
    assert await cli("outbox", "retry", "user", upper.upper(), "{" + braces + "}", bare.replace("-", ""),
                     "--database-url", url) == 0
    out, err = capsys.readouterr()
    assert (out, err) == ("".join(f"put back in line: {e.event_id}\n" for e in events), "")
    assert all(r["parked_at"] is None for r in (await rows(db, table)).values())


async def test_the_parking_migration_keeps_every_waiting_event_in_line_and_can_be_undone(db_url):
    """Every service with an outbox gets the parking columns; rows written before it are not parked."""
    for root in (user_bootstrap, order_bootstrap, payment_bootstrap, inventory_bootstrap, notification_bootstrap):
        async with migrated(root.MIGRATIONS, db_url) as db, db.engine.connect() as conn:
            columns = await conn.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("outbox")})
        assert {"parked_at", "parked_reason"} <= columns, root.__name__
        await asyncio.to_thread(command.downgrade, alembic_config(root.MIGRATIONS, db_url), "base")
    await asyncio.to_thread(upgrade, user_bootstrap.MIGRATIONS, db_url, "0002")  # the revision before parking
    db = Database(db_url)
    try:
        old = sa.table("outbox", *(sa.column(n) for n in ("event_id", "aggregate_type", "aggregate_id", "event_type",
                                                           "payload", "headers", "created_at", "attempts")))
        async with db.engine.begin() as conn:
            await conn.execute(sa.insert(old).values(event_id=str(uuid.uuid4()), aggregate_type="user",
                                                     aggregate_id="u", event_type="t", payload=b"x", headers="{}",
                                                     created_at=utcnow(), attempts=0))
        await upgrade_async(user_bootstrap.MIGRATIONS, db_url)
        async with db.engine.connect() as conn:
            [(parked_at, reason)] = (await conn.execute(sa.text("SELECT parked_at, parked_reason FROM outbox"))).all()
        assert (parked_at, reason) == (None, None)
        await asyncio.to_thread(command.downgrade, alembic_config(user_bootstrap.MIGRATIONS, db_url), "0002")
        async with db.engine.connect() as conn:
            columns = await conn.run_sync(lambda c: {col["name"] for col in inspect(c).get_columns("outbox")})
        assert not {"parked_at", "parked_reason"} & columns
    finally:
        await db.dispose()


async def test_events_the_broker_nacks_are_never_parked(node, outbox):
    """A full queue that rejects publishes makes the broker nack, again and again: the events wait in line (published
    again on every pass), never parked."""
    db, table = outbox
    vhost = node.create_vhost()
    url = node.url(vhost)
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        channel.exchange_declare(SETTINGS.events_exchange, exchange_type="topic", durable=True)
        channel.queue_declare("full", durable=True, arguments={"x-max-length": 3, "x-overflow": "reject-publish"})
        channel.queue_bind("full", SETTINGS.events_exchange, routing_key="#")
    events = [created(f"n{i}") for i in range(6)]
    await write(db, table, events)
    service = f"park-nack-{uuid.uuid4().hex[:6]}"
    relay = OutboxRelay(db, table, service=service, amqp_url=url, settings=SETTINGS)
    await relay.start()
    try:
        await eventually(lambda: (REGISTRY.get_sample_value("tessera_outbox_publish_failures_total",
                                                            {"service": service}) or 0) >= 3,
                         "the broker to refuse three passes")
    finally:
        await stop_within(relay)
    stored = await rows(db, table)
    assert [r["published_at"] is not None for r in stored.values()] == [True] * 3 + [False] * 3
    assert all(r["parked_at"] is None for r in stored.values()) and parked_total(service) == 0


async def test_a_broker_that_refuses_every_publish_for_a_while_parks_nothing(node, outbox):
    """A permission refused (403 ACCESS_REFUSED closes the channel at every publish) refuses every event alike: it is
    never taken for an event's own refusal, and the events go out once the permission is back."""
    db, table = outbox
    vhost = node.create_vhost()
    service = f"park-denied-{uuid.uuid4().hex[:6]}"
    node.ctl("set_permissions", "-p", vhost, rabbitmq.USER, ".*", "^$", ".*")  # may declare, may not publish
    events = [created(f"d{i}") for i in range(25)]
    await write(db, table, events)
    relay = OutboxRelay(db, table, service=service, amqp_url=node.url(vhost), settings=SETTINGS)
    await relay.start()
    try:
        await eventually(lambda: (REGISTRY.get_sample_value("tessera_outbox_publish_failures_total",
                                                            {"service": service}) or 0) >= 3,
                         "the broker to refuse three passes")
        assert relay.status()["published_total"] == 0
        node.ctl("set_permissions", "-p", vhost, rabbitmq.USER, ".*", ".*", ".*")
        await eventually(lambda: relay.status()["published_total"] == 25, "every event to be published")
    finally:
        await stop_within(relay)
    stored = await rows(db, table)
    assert all(r["parked_at"] is None and r["published_at"] is not None for r in stored.values())
    assert parked_total(service) == 0


async def test_two_events_over_the_limit_in_one_window_are_both_parked(node, outbox):
    db, table = outbox
    vhost = node.create_vhost()
    url = node.url(vhost)
    service = f"park-two-{uuid.uuid4().hex[:6]}"
    events = [created(f"t{i}", padding=2 * LIMIT if i in (3, 17) else 0) for i in range(25)]
    await write(db, table, events)
    relay = OutboxRelay(db, table, service=service, amqp_url=url, settings=SETTINGS)
    await relay.start()
    try:
        await eventually(lambda: relay.status()["published_total"] == 23 and relay.status()["parked"] == 2,
                         "23 events published and 2 parked", timeout=60)
    finally:
        await stop_within(relay)
    stored = await rows(db, table)
    assert [e.event_id for e in events if stored[e.event_id]["parked_at"] is not None] == [
        events[3].event_id, events[17].event_id]
    others = [e.event_id for i, e in enumerate(events) if i not in (3, 17)]
    assert list(dict.fromkeys(m for m, _ in await asyncio.to_thread(queued, url))) == others
    assert parked_total(service) == 2
