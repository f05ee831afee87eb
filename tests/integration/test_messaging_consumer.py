"""The consumer framework against the real broker: topology, ack after commit, one effect per event id, retries
with delay, the dead-letter queue, and `tessera dlq list|show|replay`."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import time
import uuid

import pika
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Column, MetaData, String, Table, insert, select
from tessera.user.v1 import user_events_pb2

from tessera_runtime import context as callctx
from tessera_runtime import telemetry
from tessera_runtime.cli import main as tessera
from tessera_runtime.db import Database, utcnow
from tessera_runtime.messaging import (
    Consumer,
    EventMeta,
    MessagingSettings,
    PermanentFailure,
    Subscription,
    applied_once,
    deadletter,
    processed_events_table,
)
from tessera_runtime.messaging.consumer import ACK, ConsumerLink
from tessera_runtime.outbox import outbox_table
from tessera_runtime.unit_of_work import SqlAlchemyUnitOfWork
from tests.support import rabbitmq
from tests.support.waiting import eventually

EXCHANGE = "tessera.events"
SETTINGS = MessagingSettings(consumer_retry_delays=(0.2, 0.4), consumer_max_attempts=3,
                             reconnect_max_seconds=0.5, consumer_concurrency=1)
ACTIVATED = user_events_pb2.UserActivated
DEACTIVATED = user_events_pb2.UserDeactivated


CONSUMER_LOGGER = "tessera.consumer"

@pytest.fixture(scope="module")
def vhost():
    name = rabbitmq.create_vhost()
    yield name
    rabbitmq.delete_vhost(name)


class Effects:
    """A consuming service in miniature: an `effects` table written by the handler in the event's transaction."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.metadata = MetaData()
        self.effects = Table("effects", self.metadata, Column("event_id", String(64), primary_key=True),
                             Column("user_id", String(64), nullable=False))
        self.processed = processed_events_table(self.metadata)
        self.outbox = outbox_table(self.metadata)
        self.calls: list[tuple[str, EventMeta]] = []
        self.failing: set[str] = set()
        self.permanent: set[str] = set()
        self.seen_ids: list[tuple[str | None, str | None]] = []

    async def create(self) -> None:
        async with self.db.engine.begin() as conn:
            await conn.run_sync(self.metadata.create_all)

    async def apply(self, event, meta: EventMeta, uow) -> None:
        self.calls.append((event.user_id, meta))
        self.seen_ids.append((callctx.current_request_id(), callctx.current_correlation_id()))
        if event.user_id in self.permanent:
            raise PermanentFailure(f"{event.user_id} can never be applied")
        if event.user_id in self.failing:
            raise RuntimeError(f"cannot apply {event.user_id} now")
        await uow.session.execute(insert(self.effects).values(event_id=meta.event_id, user_id=event.user_id))

    def handler(self):
        return applied_once(lambda: SqlAlchemyUnitOfWork(self.db, self.outbox), self.processed, self.apply)

    async def rows(self) -> list[str]:
        async with self.db.engine.connect() as conn:
            return [r.user_id for r in (await conn.execute(select(self.effects.c.user_id))).all()]

    async def wait_for(self, user_id: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while user_id not in await self.rows():
            if time.monotonic() > deadline:
                raise AssertionError(f"{user_id} was never applied")
            await asyncio.sleep(0.05)


@pytest.fixture
async def effects(db_url):
    db = Database(db_url)  # SQLite and PostgreSQL: the claim of an event id is dialect-specific SQL
    fx = Effects(db)
    await fx.create()
    yield fx
    await db.dispose()


@pytest.fixture
async def consumer(vhost, effects):
    purpose = f"things-{uuid.uuid4().hex[:6]}"
    subscription = Subscription("svc", purpose, {ACTIVATED: effects.handler(), DEACTIVATED: effects.handler()})
    url = rabbitmq.amqp_url(vhost)
    c = Consumer(subscription, amqp_url=url, settings=SETTINGS)
    await c.start()
    try:  # stopped even when it never got to consume: a consumer left running outlives the module's vhost
        await rabbitmq.wait_for_consumer(url, c.queue)
        yield c
    finally:
        await c.stop()


def publish(url: str, message: object, *, message_id: str | None = None, exchange: str = EXCHANGE,
            routing_key: str | None = None, body: bytes | None = None, content_type: str = "application/x-protobuf",
            headers: dict | None = None, timestamp: int | None = None) -> str:
    message_id = message_id if message_id is not None else str(uuid.uuid4())
    name = message.DESCRIPTOR.full_name
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, routing_key or name, body if body is not None else message.SerializeToString(),
                              pika.BasicProperties(content_type=content_type, type=name, message_id=message_id or None,
                                                   delivery_mode=2, headers=headers or {}, timestamp=timestamp))
    return message_id


async def send(url: str, message: object, **options) -> str:
    return await asyncio.to_thread(publish, url, message, **options)


def consumed(name: str, queue: str, event_type: str = ACTIVATED.DESCRIPTOR.full_name) -> float:
    """A consumer counter's value for this queue and event type (each test's consumer has a queue of its own)."""
    labels = {"consumer": queue, "event_type": event_type}
    return REGISTRY.get_sample_value(f"tessera_consumer_{name}_total", labels) or 0


async def dead_letters(url: str, queue: str, count: int, what: str) -> None:
    """Waits until the consumer queue's dead-letter queue holds `count` messages."""
    await eventually(lambda: rabbitmq.queue_depth(url, f"{queue}.dlq") == count, what)


async def test_topology_is_declared_idempotently_and_binds_only_the_handled_events(vhost, effects, consumer):
    url = rabbitmq.amqp_url(vhost)
    await consumer.stop()
    again = Consumer(consumer.subscription, amqp_url=url, settings=SETTINGS)  # same declarations: accepted
    await again.start()
    try:
        await rabbitmq.wait_for_consumer(url, again.queue)
        for queue in (again.queue, f"{again.queue}.dlq", f"{again.queue}.retry.200ms", f"{again.queue}.retry.400ms"):
            assert rabbitmq.queue_depth(url, queue) == 0
        await send(url, user_events_pb2.UserCreated())  # not handled, so not bound: never delivered
        await send(url, ACTIVATED(user_id="a"))
        await send(url, DEACTIVATED(user_id="d"))
        await effects.wait_for("d")
    finally:
        await again.stop()
    assert sorted(await effects.rows()) == ["a", "d"] and again.counts["ignored"] == 0


async def test_an_event_has_one_effect_however_often_it_is_delivered(vhost, effects, consumer, caplog):
    caplog.set_level(logging.INFO, logger=CONSUMER_LOGGER)
    url = rabbitmq.amqp_url(vhost)
    headers = {"x-aggregate-type": "user", "x-aggregate-id": "u-1", "x-correlation-id": "corr-c1",
               "x-request-id": "req-c1", "x-producer": "user"}
    event_id = str(uuid.uuid4())
    before = {name: consumed(name, consumer.queue) for name in ("processed", "duplicates")}
    for _ in range(3):
        await send(url, ACTIVATED(user_id="once"), message_id=event_id, headers=headers)
    await send(url, ACTIVATED(user_id="sentinel"))
    await effects.wait_for("sentinel")
    deadline = time.monotonic() + 30
    while consumer.counts["processed"] < 2:  # counted just after the sentinel's commit
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert sorted(await effects.rows()) == ["once", "sentinel"]
    assert consumer.counts["duplicates"] == 2 and consumer.counts["processed"] == 2
    assert consumed("duplicates", consumer.queue) == before["duplicates"] + 2
    assert consumed("processed", consumer.queue) == before["processed"] + 2
    assert consumed("duplicates", consumer.queue, DEACTIVATED.DESCRIPTOR.full_name) == 0
    meta = effects.calls[0][1]
    assert (meta.event_id, meta.event_type, meta.consumer, meta.attempt) == (
        event_id, "tessera.user.v1.UserActivated", consumer.queue, 1)
    assert (meta.aggregate_type, meta.aggregate_id, meta.producer) == ("user", "u-1", "user")
    assert (meta.correlation_id, meta.request_id, meta.retry_delay) == ("corr-c1", "req-c1", 0.2)
    # The producer's ids are current while the handler runs, and only then.
    assert effects.seen_ids[0] == ("req-c1", "corr-c1")
    assert callctx.current_correlation_id() is None
    # One access line per event applied, none for the duplicates.
    lines = [r for r in caplog.records if r.getMessage() == "event processed" and r.event_id == event_id]
    assert [(r.queue, r.event_type, r.attempt, r.correlation_id) for r in lines] == [
        (consumer.queue, "tessera.user.v1.UserActivated", 1, "corr-c1")]
    assert lines[0].duration_ms >= 0


async def test_a_failing_message_is_retried_then_dead_lettered_while_later_ones_are_processed_then_replayed(
        vhost, effects, consumer, capsys):
    url = rabbitmq.amqp_url(vhost)
    effects.failing.add("poison")
    before = {name: consumed(name, consumer.queue) for name in ("retried", "dead_lettered", "processed")}
    poison_id = await send(url, ACTIVATED(user_id="poison"), headers={"x-correlation-id": "corr-poison"})
    for name in ("after-1", "after-2"):
        await send(url, ACTIVATED(user_id=name))
    await effects.wait_for("after-2")
    await dead_letters(url, consumer.queue, 1, "the poison message never reached the dead-letter queue")
    attempts = [(m.attempt, m.retry_delay) for user, m in effects.calls if user == "poison"]
    assert attempts == [(1, 0.2), (2, 0.4), (3, None)]
    assert (consumer.counts["retried"], consumer.counts["dead_lettered"]) == (2, 1)
    # Two delayed retries, then one dead letter, each counted once with the queue and event type as labels.
    assert consumed("retried", consumer.queue) == before["retried"] + 2
    assert consumed("dead_lettered", consumer.queue) == before["dead_lettered"] + 1
    await eventually(lambda: consumed("processed", consumer.queue) == before["processed"] + 2,
                     "the two later messages to be counted as processed")
    assert sorted(await effects.rows()) == ["after-1", "after-2"]

    [letter] = deadletter.browse(url, consumer.queue)
    assert (letter.message_id, letter.attempts, letter.replays) == (poison_id, 3, 0)
    assert letter.error == "RuntimeError: cannot apply poison now" and letter.dead_lettered_at

    assert tessera(["dlq", "--amqp-url", url, "list", consumer.queue, "--json"]) == 0
    assert [m["message_id"] for m in json.loads(capsys.readouterr().out)] == [poison_id]
    assert tessera(["dlq", "--amqp-url", url, "list"]) == 0
    assert "notification.email.dlq" in capsys.readouterr().out  # the known consumer queues, declared or not
    assert tessera(["dlq", "--amqp-url", url, "show", f"{consumer.queue}.dlq", poison_id]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["payload"] == {"user_id": "poison"} and shown["attempts"] == 3
    assert shown["properties"]["headers"]["x-correlation-id"] == "corr-poison"
    assert rabbitmq.queue_depth(url, f"{consumer.queue}.dlq") == 1  # browsing left it in place

    effects.failing.clear()
    assert tessera(["dlq", "--amqp-url", url, "replay", consumer.queue, poison_id]) == 0
    assert f"replayed {poison_id}" in capsys.readouterr().out
    await effects.wait_for("poison")
    assert rabbitmq.queue_depth(url, f"{consumer.queue}.dlq") == 0
    assert consumed("dead_lettered", consumer.queue) == before["dead_lettered"] + 1  # the replay succeeded
    replayed = [m for user, m in effects.calls if user == "poison"][-1]
    assert replayed.attempt == 1 and replayed.correlation_id == "corr-poison"
    assert tessera(["dlq", "--amqp-url", url, "replay", consumer.queue, poison_id]) == 1  # nothing left to replay
    assert "no message" in capsys.readouterr().err


async def test_messages_that_can_never_succeed_are_dead_lettered_at_once(vhost, effects, consumer):
    url = rabbitmq.amqp_url(vhost)
    effects.permanent.add("never")
    before = {name: consumed(name, consumer.queue) for name in ("retried", "dead_lettered")}
    unknown = consumed("dead_lettered", consumer.queue, "unknown")
    await send(url, ACTIVATED(user_id="never"))
    await send(url, ACTIVATED(), body=b"\xff\xff\xff")
    await send(url, ACTIVATED(user_id="no-id"), message_id="")
    await send(url, ACTIVATED(user_id="json"), content_type="application/json")
    await send(url, ACTIVATED(user_id="long"), message_id="x" * 65)
    await send(url, ACTIVATED(user_id="fine"))
    await effects.wait_for("fine")
    await dead_letters(url, consumer.queue, 5, "expected five dead letters")
    letters = deadletter.browse(url, consumer.queue)
    assert all(letter.attempts == 1 for letter in letters)  # no retries for what cannot succeed
    errors = [letter.error for letter in letters]
    assert errors[0] == "PermanentFailure: never can never be applied"
    assert "is not a valid tessera.user.v1.UserActivated" in errors[1]
    assert "no message_id" in errors[2] and "'application/json'" in errors[3] and "longer than 64" in errors[4]
    assert [user for user, _ in effects.calls] == ["never", "fine"]  # the handler never saw the others
    assert consumed("retried", consumer.queue) == before["retried"]
    assert consumed("dead_lettered", consumer.queue) == before["dead_lettered"] + 5
    assert consumed("dead_lettered", consumer.queue, "unknown") == unknown
    assert tessera(["dlq", "--amqp-url", url, "replay", consumer.queue, "--all"]) == 0
    # Replayed, they fail again (once each) and come back, counted as replayed once.
    await dead_letters(url, consumer.queue, 5, "replayed dead letters should fail and return")
    assert {letter.replays for letter in deadletter.browse(url, consumer.queue)} == {1}


async def test_a_message_timestamped_in_milliseconds_is_handled_without_a_publish_time(vhost, effects, consumer):
    """Another publisher's AMQP timestamp in milliseconds is tens of thousands of years away: the event is handled
    once all the same, its publish time unknown."""
    url = rabbitmq.amqp_url(vhost)
    await send(url, ACTIVATED(user_id="millis"), timestamp=int(time.time() * 1000))
    await send(url, ACTIVATED(user_id="seconds"), timestamp=int(time.time()))
    await effects.wait_for("millis")
    await effects.wait_for("seconds")
    published = {user: meta.published_at for user, meta in effects.calls}
    assert published["millis"] is None and published["seconds"] is not None
    assert [user for user, _ in effects.calls] == ["millis", "seconds"]
    assert consumer.counts["dead_lettered"] == 0 and rabbitmq.queue_depth(url, f"{consumer.queue}.dlq") == 0


@pytest.mark.parametrize("where", ["reading its properties", "starting its span", "dead-lettering it"])
async def test_a_message_the_consumer_itself_fails_on_is_dead_lettered_once_not_requeued_forever(
        vhost, effects, consumer, monkeypatch, where):
    """A failure of the consumer's own code for one message, before its handler or around it, would be the same on
    every delivery: the message goes to the dead-letter queue once, and the messages behind it are handled."""
    url = rabbitmq.amqp_url(vhost)
    poison, tries = str(uuid.uuid4()), []

    def failing(real):
        def wrapper(*args, **kwargs):
            headers_or_delivery = args[0] if args else None
            message_id = getattr(getattr(headers_or_delivery, "properties", None), "message_id", None)
            if message_id == poison or kwargs.get("event_id") == poison:
                tries.append(message_id or kwargs.get("event_id"))
                raise RuntimeError("cannot read this message")
            return real(*args, **kwargs)
        return wrapper

    error = "RuntimeError: cannot read this message"
    if where == "starting its span":
        monkeypatch.setattr(telemetry, "consume_span", failing(telemetry.consume_span))
    else:
        monkeypatch.setattr(consumer, "meta", failing(consumer.meta))
    if where == "dead-lettering it":  # even the dead-letter bookkeeping fails: the message is still settled
        def unreadable(delivery, exc):
            raise RuntimeError("the bookkeeping failed too")
        monkeypatch.setattr(consumer, "_unreadable", unreadable)
        error = "RuntimeError: the bookkeeping failed too"
    await send(url, ACTIVATED(user_id="poison"), message_id=poison)
    await send(url, ACTIVATED(user_id="behind"))
    await effects.wait_for("behind")
    await dead_letters(url, consumer.queue, 1, "expected the message in the dead-letter queue")
    [letter] = deadletter.browse(url, consumer.queue)
    assert (letter.message_id, letter.error, letter.attempts) == (poison, error, 1)
    assert tries == [poison]  # once: not requeued
    assert "poison" not in [user for user, _ in effects.calls]
    assert consumer.counts["dead_lettered"] == (0 if where == "dead-lettering it" else 1)


async def test_an_event_type_without_a_handler_is_acknowledged_and_ignored(vhost, effects, consumer):
    url = rabbitmq.amqp_url(vhost)
    await send(url, user_events_pb2.UserCreated(), exchange="", routing_key=consumer.queue)  # straight to the queue
    await send(url, ACTIVATED(user_id="next"))
    await effects.wait_for("next")
    assert consumer.counts["ignored"] == 1 and rabbitmq.queue_depth(url, consumer.queue) == 0


async def test_old_processed_event_ids_are_pruned(vhost, effects):
    url = rabbitmq.amqp_url(vhost)
    async with effects.db.engine.begin() as conn:
        for event_id, age in (("old", dt.timedelta(days=3)), ("new", dt.timedelta(hours=1))):
            await conn.execute(insert(effects.processed).values(consumer="svc.x", event_id=event_id, event_type="t",
                                                                processed_at=utcnow() - age))
    settings = dataclasses.replace(SETTINGS, processed_events_retention_hours=48)
    pruning = Consumer(Subscription("svc", "x", {}), amqp_url=url, settings=settings,
                       processed=(effects.db, effects.processed))
    assert await pruning.prune_processed() == 1
    async with effects.db.engine.connect() as conn:
        assert [r.event_id for r in (await conn.execute(select(effects.processed.c.event_id))).all()] == ["new"]
    without = Consumer(Subscription("svc", "x", {}), amqp_url=url, settings=settings)
    assert await without.prune_processed() == 0


async def test_the_link_survives_a_callback_that_raises_and_gets_the_message_again(vhost):
    url = rabbitmq.amqp_url(vhost)
    topology = Subscription("svc", f"raw-{uuid.uuid4().hex[:6]}", {ACTIVATED: None}).topology(SETTINGS)
    calls: list[bool] = []

    def on_delivery(delivery, settle) -> None:
        calls.append(delivery.redelivered)
        if len(calls) == 1:
            raise RuntimeError("a bug in a delivery callback")
        settle(ACK)

    link = ConsumerLink(url, "raising", topology, 4, on_delivery, max_backoff=0.5)
    link.start()
    try:
        await rabbitmq.wait_for_consumer(url, topology.queue)
        await send(url, ACTIVATED(user_id="x"))
        deadline = time.monotonic() + 30
        while len(calls) < 2 or link.unsettled:
            assert time.monotonic() < deadline, f"calls so far: {calls}"
            await asyncio.sleep(0.05)
    finally:
        await asyncio.to_thread(link.stop)
    assert calls == [False, True] and rabbitmq.queue_depth(url, topology.queue) == 0


async def test_dlq_command_errors(vhost, capsys):
    url = rabbitmq.amqp_url(vhost)
    assert tessera(["dlq", "--amqp-url", url, "list", "missing.queue"]) == 1
    assert "missing.queue.dlq does not exist" in capsys.readouterr().err
    assert tessera(["dlq", "--amqp-url", url, "show", "missing.queue", "x"]) == 1
    assert tessera(["dlq", "--amqp-url", url, "replay", "missing.queue"]) == 2  # no ids, no --all: usage
    assert "--all" in capsys.readouterr().err
    unreachable = rabbitmq.amqp_url(vhost, port=1)
    assert tessera(["dlq", "--amqp-url", unreachable, "list"]) == 2
    assert "cannot reach the broker" in capsys.readouterr().err
    assert tessera(["dlq", "list", "--amqp-url", unreachable]) == 2  # the option after the subcommand too
    assert tessera(["dlq", "--amqp-url", url, "list", "--amqp-url", unreachable]) == 2


async def test_a_dead_letters_error_keeps_no_password_or_address_the_failure_named(vhost, effects, consumer, capsys):
    """The last error travels with the message in its x-tessera-last-error header, where `tessera dlq` shows it to
    whoever reads the queue: it is masked as the log line of the same failure is."""
    url = rabbitmq.amqp_url(vhost)
    secret = "amqp://app:hunter2@mq.internal:5672/ for ann.smith@example.com"
    effects.permanent.add(secret)
    message_id = await send(url, ACTIVATED(user_id=secret))
    await dead_letters(url, consumer.queue, 1, "the failing message never reached the dead-letter queue")

    [letter] = deadletter.browse(url, consumer.queue)
    assert letter.message_id == message_id
    assert letter.error == ("PermanentFailure: amqp://app:***@mq.internal:5672/ for a***@example.com "
                            "can never be applied")
    assert tessera(["dlq", "--amqp-url", url, "show", consumer.queue, message_id]) == 0
    shown = json.loads(capsys.readouterr().out)  # its payload is the event's own, shown as it is
    assert shown["error"] == shown["properties"]["headers"]["x-tessera-last-error"] == letter.error


async def test_ids_a_message_carries_are_kept_only_as_a_call_would_keep_them(vhost, effects, consumer, caplog):
    """A message's x-request-id and x-correlation-id become the ids of its handling (its log lines, the events its
    handler writes) only when a gRPC call could have sent them: 1 to 128 printable characters. A foreign or broken
    producer's id of any length is not copied into every line and event."""
    caplog.set_level(logging.INFO, logger=CONSUMER_LOGGER)
    url = rabbitmq.amqp_url(vhost)
    await send(url, ACTIVATED(user_id="long-ids"), headers={"x-request-id": "r" * 5000,
                                                             "x-correlation-id": "line\nbreak"})
    await send(url, ACTIVATED(user_id="good-request-id"), headers={"x-request-id": "req-ok",
                                                                    "x-correlation-id": "c" * 129})
    await effects.wait_for("good-request-id")
    await eventually(lambda: consumer.counts["processed"] >= 2, "both events to be counted")
    seen = {user: ids for (user, _), ids in zip(effects.calls, effects.seen_ids, strict=True)}
    assert seen["long-ids"] == (None, None)
    assert seen["good-request-id"] == ("req-ok", "req-ok")  # the request id stands in, as for a call
    metas = {user: meta for user, meta in effects.calls}
    assert (metas["long-ids"].request_id, metas["long-ids"].correlation_id) == (None, None)
    assert metas["good-request-id"].correlation_id is None
    lines = {r.event_id: r for r in caplog.records if r.getMessage() == "event processed"}
    assert lines[metas["long-ids"].event_id].correlation_id is None


async def test_a_dead_letter_queue_deleted_under_a_running_consumer_is_declared_again(vhost, effects, consumer):
    """An operator deletes the dead-letter queue to empty it. The next message given up on must not come back at
    once, again and again (its copy returned, the original requeued): the consumer declares its queues again and
    the message reaches the new dead-letter queue."""
    url = rabbitmq.amqp_url(vhost)
    with rabbitmq.blocking_connection(url) as connection:
        connection.channel().queue_delete(f"{consumer.queue}.dlq")
    effects.permanent.add("given-up")
    await send(url, ACTIVATED(user_id="given-up"))
    await eventually(lambda: rabbitmq.consumers(url, f"{consumer.queue}.dlq") is not None,
                     "the dead-letter queue to be declared again", timeout=20)
    await dead_letters(url, consumer.queue, 1, "the message never reached the dead-letter queue")
    attempts = [user for user, _ in effects.calls if user == "given-up"]
    assert len(attempts) <= 3, f"handled {len(attempts)} times"


async def test_a_consumer_queue_deleted_under_its_consumer_is_declared_again_and_consumed(vhost, effects, consumer):
    """The broker cancels a consumer whose queue is deleted. The consumer must not stay connected and idle for
    good (healthy in its checks, while the events published for it find no queue): it declares its queue and
    bindings again and goes on consuming."""
    url = rabbitmq.amqp_url(vhost)
    with rabbitmq.blocking_connection(url) as connection:
        connection.channel().queue_delete(consumer.queue)
    await eventually(lambda: rabbitmq.consumers(url, consumer.queue), "the queue to be consumed again", timeout=20)
    await send(url, ACTIVATED(user_id="after-the-delete"))
    await effects.wait_for("after-the-delete", timeout=20)
