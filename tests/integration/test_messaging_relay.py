"""The outbox relay against the real broker: order, AMQP properties, pipelined confirms, several replicas on
PostgreSQL, a broker outage, a broker that stops answering, stopping at any moment, unroutable events, and how a
service attaches it."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import time
import uuid

import asyncpg
import asyncpg.transaction
import grpc
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import MetaData, insert, select, update
from sqlalchemy import event as sqlalchemy_event
from tessera.user.v1 import user_events_pb2, user_pb2, user_service_pb2, user_service_pb2_grpc

from tessera_runtime.config import ServiceSettings
from tessera_runtime.db import Database, utcnow
from tessera_runtime.logs import JsonFormatter, correlation_id_var, request_id_var
from tessera_runtime.messaging import MessagingSettings, attach_outbox_relay
from tessera_runtime.messaging.relay import ACK, NACK, OutboxRelay, PublishIncomplete, PublishStream
from tessera_runtime.outbox import PendingEvent, notify_committed, outbox_table, write_events
from tessera_runtime.server import HealthCheck, ServiceModule, create_server
from tessera_user import bootstrap
from tests.integration.conftest import settings_for
from tests.support import rabbitmq
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

EXCHANGE = "tessera.events"
FAST = MessagingSettings(outbox_poll_seconds=0.2, reconnect_max_seconds=0.5, outbox_batch_size=100)


@pytest.fixture(scope="module")
def vhost():
    name = rabbitmq.create_vhost()
    yield name
    rabbitmq.delete_vhost(name)


@contextlib.asynccontextmanager
async def outbox_on(url: str):
    """An outbox table on the database at `url`, as (Database, Table)."""
    metadata = MetaData()
    table = outbox_table(metadata)
    db = Database(url)
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    try:
        yield db, table
    finally:
        await db.dispose()


@pytest.fixture
async def outbox(tmp_path):
    async with outbox_on(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}") as made:
        yield made


@pytest.fixture
async def pg_outbox(pg_database):
    """An outbox table on a throwaway PostgreSQL database (advisory locks, concurrent transactions)."""
    async with outbox_on(pg_database[1]) as made:
        yield made


@pytest.fixture
async def either_outbox(db_url):
    """An outbox table on each backend: on PostgreSQL a pass's last batch is marked in its lock's transaction, on
    SQLite every batch in a transaction of its own."""
    async with outbox_on(db_url) as made:
        yield made


def activated(user_id: str) -> user_events_pb2.UserActivated:
    return user_events_pb2.UserActivated(user_id=user_id)


async def write(db: Database, table, events: list[PendingEvent]) -> None:
    async with db.sessionmaker() as session, session.begin():
        await write_events(session, table, events)


async def unpublished(db: Database, table) -> int:
    async with db.engine.connect() as conn:
        return len((await conn.execute(select(table.c.seq).where(table.c.published_at.is_(None)))).all())


async def all_rows(db: Database, table) -> list:
    async with db.engine.connect() as conn:
        return (await conn.execute(select(table.c.seq))).all()


async def until_all_marked(db: Database, table, what: str, timeout: float = 30.0) -> None:
    """Waits until every outbox row is marked published; fails with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while await unpublished(db, table):
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.05)


def sample(name: str, service: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"service": service})


ACTIVATED_TYPE = user_events_pb2.UserActivated.DESCRIPTOR.full_name


def published(service: str, event_type: str = ACTIVATED_TYPE) -> float:
    return REGISTRY.get_sample_value("tessera_outbox_published_total",
                                     {"service": service, "event_type": event_type}) or 0


def publish_failures(service: str) -> float:
    return sample("tessera_outbox_publish_failures_total", service) or 0


async def test_publishes_every_row_in_order_with_its_properties_and_marks_it_after_the_confirm(vhost, outbox):
    db, table = outbox
    url = rabbitmq.amqp_url(vhost)
    tap = rabbitmq.Tap(url, EXCHANGE)
    trace_id = uuid.uuid4().hex
    tokens = request_id_var.set("req-relay-1"), correlation_id_var.set("corr-relay-1")
    try:
        events = [PendingEvent("user", f"user-{i % 4}", activated(str(i))) for i in range(1000)]
    finally:
        request_id_var.reset(tokens[0])
        correlation_id_var.reset(tokens[1])
    for e in events:
        e.headers.update(traceparent=f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01", tracestate="tessera=t")
    await write(db, table, events)
    service = f"relay-{uuid.uuid4().hex[:6]}"
    relay = OutboxRelay(db, table, service=service, amqp_url=url, settings=FAST)
    await relay.start()
    try:
        delivered = await tap.wait_for(1000)
        await eventually(lambda: sample("tessera_outbox_backlog", service) == 0, "the backlog gauge to drop to 0")
    finally:
        await relay.stop()

    assert [user_events_pb2.UserActivated.FromString(body).user_id for _, _, body in delivered] == [
        str(i) for i in range(1000)]
    method, props, _ = delivered[7]
    event = events[7]
    assert method.routing_key == "tessera.user.v1.UserActivated"
    assert (props.content_type, props.type, props.message_id, props.delivery_mode) == (
        "application/x-protobuf", "tessera.user.v1.UserActivated", event.event_id, 2)
    assert props.timestamp == int(event.created_at.timestamp())
    assert props.correlation_id == "corr-relay-1" and props.app_id == service
    headers = props.headers
    assert (headers["x-aggregate-type"], headers["x-aggregate-id"]) == ("user", "user-3")
    assert (headers["x-request-id"], headers["x-correlation-id"]) == ("req-relay-1", "corr-relay-1")
    assert headers["traceparent"].split("-")[1] == trace_id and "tessera=t" in headers["tracestate"]
    async with db.engine.connect() as conn:
        rows = (await conn.execute(select(table.c.published_at, table.c.attempts))).all()
    assert len(rows) == 1000 and all(r.published_at is not None and r.attempts == 1 for r in rows)
    assert sample("tessera_outbox_oldest_unpublished_seconds", service) == 0
    assert relay.status()["published_total"] == 1000
    # Counted by service and event type once the broker confirmed them; nothing failed.
    assert published(service) == 1000
    assert published(service, "tessera.user.v1.UserCreated") == 0
    assert publish_failures(service) == 0


async def test_two_replicas_on_postgresql_publish_each_event_once_in_order(vhost, pg_outbox):
    db, table = pg_outbox
    amqp = rabbitmq.amqp_url(vhost)
    tap = rabbitmq.Tap(amqp, EXCHANGE)
    replicas = [OutboxRelay(db, table, service="replicas", amqp_url=amqp, settings=FAST) for _ in range(2)]
    for relay in replicas:
        await relay.start()
    try:
        for chunk in range(5):  # written while both relays run
            await write(db, table, [PendingEvent("user", f"u{i % 3}", activated(str(chunk * 100 + i)))
                                    for i in range(100)])
        await write(db, table, [PendingEvent("user", "sentinel", activated("sentinel"))])
        delivered = await tap.wait_for(501)
        await until_all_marked(db, table, "rows left unmarked")
    finally:
        for relay in replicas:
            await relay.stop()
    ids = [user_events_pb2.UserActivated.FromString(body).user_id for _, _, body in delivered]
    # The sentinel comes last and nothing before it came twice: one replica at a time, in seq order.
    assert ids == [str(i) for i in range(500)] + ["sentinel"]
    assert sum(relay.status()["published_total"] for relay in replicas) == 501


async def test_broker_outage_keeps_events_in_the_outbox_and_drains_them_when_it_returns(vhost, outbox, caplog):
    db, table = outbox
    proxy = TcpProxy(rabbitmq.HOST, rabbitmq.PORT).start()
    tap = rabbitmq.Tap(rabbitmq.amqp_url(vhost), EXCHANGE)
    service = f"outage-{uuid.uuid4().hex[:6]}"
    relay = OutboxRelay(db, table, service=service, amqp_url=rabbitmq.amqp_url(vhost, port=proxy.port),
                        settings=FAST)
    caplog.set_level(logging.INFO, logger="tessera.outbox")
    await relay.start()
    try:
        await write(db, table, [PendingEvent("user", "a", activated("first"))])
        await tap.wait_for(1)
        proxy.cut()
        await write(db, table, [PendingEvent("user", "a", activated(str(i))) for i in range(50)])
        await eventually(lambda: sample("tessera_outbox_backlog", service) == 50, "the backlog gauge to show 50")
        await eventually(lambda: any("events are kept in the outbox" in r.getMessage() for r in caplog.records),
                         "the outage log line")
        assert not relay.status()["connected"] and relay.status()["backlog"] == 50
        assert sample("tessera_outbox_oldest_unpublished_seconds", service) > 0
        proxy.restore()
        await write(db, table, [PendingEvent("user", "a", activated("last"))])
        delivered = await tap.wait_for(52)
    finally:
        await relay.stop()
        proxy.close()
    ids = [user_events_pb2.UserActivated.FromString(body).user_id for _, _, body in delivered]
    assert ids == ["first", *map(str, range(50)), "last"]
    outage = next(r for r in caplog.records if "events are kept in the outbox" in r.getMessage())
    assert outage.levelname == "WARNING" and outage.backlog in (0, 50)
    assert any(r.getMessage().startswith("broker reachable again") for r in caplog.records)


def silent_broker_url(vhost: str, proxy: TcpProxy) -> str:
    # Through the proxy, so that the test can freeze the connection. heartbeat=600 keeps pika's heartbeat checker,
    # which would notice a silent broker after a minute or more, out of it: only the relay's own bounds act.
    return f"{rabbitmq.amqp_url(vhost, port=proxy.port)}?heartbeat=600"


async def stop_within(relay: OutboxRelay, seconds: float = 60.0) -> None:
    stopping = asyncio.ensure_future(relay.stop())
    done, _ = await asyncio.wait({stopping}, timeout=seconds)
    assert done, "relay.stop() did not return"
    stopping.result()


@contextlib.asynccontextmanager
async def relay_on_a_broker_that_freezes(vhost: str, db: Database, table, name: str, **options):
    """A started relay whose broker connection freezes once it is up: it looks connected and never answers again
    (no confirm, no CloseOk). The relay must be stopped within a bound whatever it was doing."""
    proxy = TcpProxy(rabbitmq.HOST, rabbitmq.PORT).start()
    relay = OutboxRelay(db, table, service=f"{name}-{uuid.uuid4().hex[:6]}", amqp_url=silent_broker_url(vhost, proxy),
                        **options)
    await relay.start()
    try:
        await eventually(lambda: relay.status()["connected"], "the relay to connect")
        proxy.freeze()
        yield relay
    finally:
        await stop_within(relay)
        proxy.close()


async def test_confirms_that_never_arrive_make_the_relay_reconnect_and_publish_the_batch_again(vhost, outbox, caplog):
    db, table = outbox
    tap = rabbitmq.Tap(rabbitmq.amqp_url(vhost), EXCHANGE)
    caplog.set_level(logging.WARNING, logger="tessera.outbox")
    async with relay_on_a_broker_that_freezes(vhost, db, table, "silent",
                                              settings=dataclasses.replace(FAST, outbox_confirm_timeout_seconds=3.0)
                                              ) as relay:
        await write(db, table, [PendingEvent("user", "a", activated(str(i))) for i in range(20)])
        delivered = await tap.wait_for(20)
        await eventually(lambda: relay.status()["published_total"] == 20, "every row to be marked")
    # The batch whose confirms never came is one failed publish; the events count as published once, when confirmed.
    assert publish_failures(relay.service) == 1
    assert published(relay.service) == 20
    # Nothing sent on the frozen connection reached the broker; the new connection published each event once.
    ids = [user_events_pb2.UserActivated.FromString(body).user_id for _, _, body in delivered]
    assert ids == [str(i) for i in range(20)]
    assert any("confirms overdue" in r.getMessage() for r in caplog.records)
    async with db.engine.connect() as conn:
        rows = (await conn.execute(select(table.c.published_at, table.c.attempts))).all()
    assert all(r.published_at is not None and r.attempts >= 2 for r in rows)  # unconfirmed once, then published


async def test_several_batches_are_in_flight_at_once_within_the_window_and_none_is_marked_before_its_confirm(
        vhost, outbox):
    db, table = outbox
    async with relay_on_a_broker_that_freezes(  # nothing is ever confirmed
            vhost, db, table, "window", settings=dataclasses.replace(FAST, outbox_confirm_timeout_seconds=600.0),
            window_batches=3) as relay:
        await write(db, table, [PendingEvent("user", f"u{i % 7}", activated(str(i))) for i in range(1000)])
        # Three batches of 100 published back to back without a single confirm, and not a fourth.
        await eventually(lambda: relay.status()["in_flight"] == 300, "three batches in flight")
        await asyncio.sleep(0.5)
        assert relay.status()["in_flight"] == 300
        assert await unpublished(db, table) == 1000
    assert await unpublished(db, table) == 1000  # published, never confirmed: every row stays in the outbox


async def test_overdue_confirms_with_several_batches_in_flight_republish_them_all_in_order_once(vhost, outbox, caplog):
    db, table = outbox
    tap = rabbitmq.Tap(rabbitmq.amqp_url(vhost), EXCHANGE)
    caplog.set_level(logging.WARNING, logger="tessera.outbox")
    async with relay_on_a_broker_that_freezes(
            vhost, db, table, "overdue", settings=dataclasses.replace(FAST, outbox_confirm_timeout_seconds=3.0),
            window_batches=3) as relay:
        await write(db, table, [PendingEvent("user", f"u{i % 7}", activated(str(i))) for i in range(350)])
        delivered = await tap.wait_for(350)
        await eventually(lambda: relay.status()["published_total"] == 350, "every row to be marked")
    # The three batches lost on the frozen connection went out again on the new one, before the fourth, once each.
    ids = [user_events_pb2.UserActivated.FromString(body).user_id for _, _, body in delivered]
    assert ids == [str(i) for i in range(350)]
    assert any("confirms overdue" in r.getMessage() for r in caplog.records)
    async with db.engine.connect() as conn:
        rows = (await conn.execute(select(table.c.published_at, table.c.attempts).order_by(table.c.seq))).all()
    assert all(r.published_at is not None for r in rows)
    # The window held three batches: those were published twice, the fourth only on the new connection.
    assert [r.attempts for r in rows] == [2] * 300 + [1] * 50


async def test_on_postgresql_a_quiet_pass_runs_on_the_relays_connection_and_does_not_count_the_backlog_again(
        vhost, pg_outbox, monkeypatch):
    """A quiet service publishes each commit's events on a pass of their own. On PostgreSQL such a pass is BEGIN, the
    lock, the read, the mark and COMMIT on the relay's own connection, straight on asyncpg: nothing goes through
    the engine (SQLAlchemy's per-statement cost was most of a small pass's CPU), and a pass that caught up sets the
    backlog gauges to 0 without counting the outbox again."""
    db, table = pg_outbox
    writer = Database(db.url)  # the test's own writes and reads stay off the relay's engine
    through_engine: list[str] = []
    sqlalchemy_event.listen(db.engine.sync_engine, "before_cursor_execute",
                            lambda _c, _cur, statement, *_a: through_engine.append(statement))
    direct: list[str] = []
    open_direct = db.relay_connection

    @contextlib.asynccontextmanager
    async def logged():
        async with open_direct() as conn:
            def record(query) -> None:
                verb = query.query.split()[0].upper().rstrip(";")
                direct.append(f"{verb} LOCK" if "advisory" in query.query else verb)
            conn.add_query_logger(record)
            try:
                yield conn
            finally:
                conn.remove_query_logger(record)

    monkeypatch.setattr(db, "relay_connection", logged)
    service = f"quiet-{uuid.uuid4().hex[:6]}"
    relay = OutboxRelay(db, table, service=service, amqp_url=rabbitmq.amqp_url(vhost),
                        settings=dataclasses.replace(FAST, outbox_poll_seconds=30.0))
    tap = rabbitmq.Tap(rabbitmq.amqp_url(vhost), EXCHANGE)
    await relay.start()
    try:
        await eventually(lambda: relay.publisher.ready, "the relay to connect")
        await asyncio.sleep(0.3)  # its first pass, which found nothing, is over
        for i in range(3):
            direct.clear()
            through_engine.clear()
            await write(writer, table, [PendingEvent("user", "quiet", activated(str(i)))])
            notify_committed(table)
            await tap.wait_for(i + 1)
            await until_all_marked(writer, table, "the event was never marked")
            await eventually(lambda: "COMMIT" in direct and not relay.publisher.in_flight, "the pass to commit")
            await asyncio.sleep(0.1)  # what the relay does after a pass, it has done by now
            if i:  # the first pass on the connection also looked up types for asyncpg's statement cache
                assert direct == ["BEGIN", "SELECT LOCK", "SELECT", "UPDATE", "COMMIT"]
            assert through_engine == []
            assert sample("tessera_outbox_backlog", service) == 0
            assert sample("tessera_outbox_oldest_unpublished_seconds", service) == 0
    finally:
        await relay.stop()
        await writer.dispose()
    assert relay.status()["published_total"] == 3


async def test_a_row_committed_after_later_rows_were_published_is_published_too(vhost, pg_outbox):
    db, table = pg_outbox
    tap = rabbitmq.Tap(rabbitmq.amqp_url(vhost), EXCHANGE)
    relay = OutboxRelay(db, table, service=f"late-{uuid.uuid4().hex[:6]}", amqp_url=rabbitmq.amqp_url(vhost),
                        settings=FAST, window_batches=2)
    await relay.start()
    try:
        async with db.engine.connect() as slow:
            # A transaction takes the lowest seq and commits only after 250 later rows were committed and published.
            await slow.execute(insert(table), [PendingEvent("user", "late", activated("late")).row()])
            await write(db, table, [PendingEvent("user", f"u{i % 3}", activated(str(i))) for i in range(250)])
            await tap.wait_for(250)
            await slow.commit()
        notify_committed(table)
        delivered = await tap.wait_for(251)
        await until_all_marked(db, table, "the late row was never marked")
    finally:
        await relay.stop()
    ids = [user_events_pb2.UserActivated.FromString(body).user_id for _, _, body in delivered]
    assert ids == [str(i) for i in range(250)] + ["late"]


async def test_on_postgresql_published_total_counts_only_marks_that_are_committed(vhost, pg_outbox, monkeypatch):
    """A pass's last batch is marked in its lock's transaction: the relay's count (status()["published_total"]) must
    not count those rows before that transaction commits, or a caller that stops the relay once the count is reached
    cancels the commit and finds the rows still unpublished (seen in CI)."""
    db, table = pg_outbox
    seen: list[tuple[int, int]] = []  # (the relay's count, rows marked in the database) as each pass commits
    real_exit = asyncpg.transaction.Transaction.__aexit__

    async def exit_after_checking(self, exc_type, exc, tb):
        if exc_type is None:
            marked = len(await all_rows(db, table)) - await unpublished(db, table)
            seen.append((relay.status()["published_total"], marked))
        return await real_exit(self, exc_type, exc, tb)

    monkeypatch.setattr(asyncpg.transaction.Transaction, "__aexit__", exit_after_checking)
    relay = OutboxRelay(db, table, service=f"count-{uuid.uuid4().hex[:6]}", amqp_url=rabbitmq.amqp_url(vhost),
                        settings=dataclasses.replace(FAST, outbox_batch_size=10))
    await write(db, table, [PendingEvent("user", f"u{i}", activated(str(i))) for i in range(25)])
    await relay.start()
    try:
        await until_all_marked(db, table, "every row to be marked")
        await eventually(lambda: relay.status()["published_total"] == 25, "the relay to count all 25")
    finally:
        await relay.stop()
    assert seen and all(counted <= marked for counted, marked in seen), seen


class ScriptedPublisher:
    """Stands in for the relay's publisher: each batch waits until the test confirms the oldest one, with the status
    `verdict` gives each event; a nack breaks the pass's stream, as the real publisher's confirm callback does."""

    def __init__(self, verdict) -> None:
        self.verdict = verdict
        self.generation, self.ready, self.stopped, self.last_error = 1, True, False, None
        self.sent: list[list[str]] = []  # event ids of each batch that went out, in order
        self.waiting: collections.deque = collections.deque()
        self.most_unconfirmed = 0

    @property
    def in_flight(self) -> int:
        return sum(len(events) for events, _, _ in self.waiting)

    def stream(self) -> PublishStream:
        return PublishStream(self.generation)

    def publish(self, events, stream=None) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        if stream is not None and stream.broken:
            future.set_result([None] * len(events))
            return future
        self.sent.append([e.event_id for e in events])
        self.waiting.append((events, future, stream))
        self.most_unconfirmed = max(self.most_unconfirmed, len(self.waiting))
        return future

    def confirm_oldest(self) -> None:
        events, future, stream = self.waiting.popleft()
        statuses = [self.verdict(e) for e in events]
        if NACK in statuses and stream is not None:
            stream.broken = True
        if not future.cancelled():  # the relay stops waiting for batches behind a gap
            future.set_result(statuses)

    def reset(self) -> None:
        raise AssertionError("no confirm is overdue here")


async def published_ids(db: Database, table) -> set[str]:
    async with db.engine.connect() as conn:
        return {r.event_id for r in (await conn.execute(
            select(table.c.event_id).where(table.c.published_at.is_not(None)))).all()}


async def run_pass(relay: OutboxRelay, publisher: ScriptedPublisher, db: Database, table) -> int:
    """Runs one pass, confirming the oldest batch once the window is full or the relay publishes nothing more;
    before each confirm, checks that no row of a batch still waiting for its confirm is marked."""
    task = asyncio.ensure_future(relay.relay_once())
    sent, idle_since = 0, time.monotonic()
    while not task.done():
        await asyncio.sleep(0.01)
        if len(publisher.sent) != sent:
            sent, idle_since = len(publisher.sent), time.monotonic()
        if publisher.waiting and (len(publisher.waiting) >= relay.window_batches
                                  or time.monotonic() - idle_since > 0.2):
            waiting = {e.event_id for events, _, _ in publisher.waiting for e in events}
            assert not waiting & await published_ids(db, table), "a row was marked before its confirm"
            publisher.confirm_oldest()
    return task.result()


async def test_a_nack_in_the_window_marks_only_what_precedes_it_and_the_next_pass_resumes_there_in_order(
        either_outbox):
    db, table = either_outbox
    events = [PendingEvent("user", f"u{i % 7}", activated(str(i))) for i in range(400)]
    await write(db, table, events)
    refused = events[105].event_id
    publisher = ScriptedPublisher(lambda e: NACK if e.event_id == refused else ACK)
    relay = OutboxRelay(db, table, service="nack", amqp_url="amqp://unused", settings=FAST, window_batches=3)
    relay.publisher = publisher

    with pytest.raises(PublishIncomplete, match="nack"):
        await run_pass(relay, publisher, db, table)
    assert publisher.most_unconfirmed <= 3
    first_pass = [event_id for batch in publisher.sent for event_id in batch]
    assert first_pass == [e.event_id for e in events[:len(first_pass)]] and len(first_pass) >= 200
    # Batches behind the nacked event were confirmed too, yet nothing behind the gap is marked.
    assert await published_ids(db, table) == {e.event_id for e in events[:105]}

    publisher.verdict = lambda e: ACK
    publisher.sent.clear()
    publisher.waiting.clear()  # the first pass's batches behind the gap, which it gave up
    assert await run_pass(relay, publisher, db, table) == 295
    assert [event_id for batch in publisher.sent for event_id in batch] == [e.event_id for e in events[105:]]
    async with db.engine.connect() as conn:
        rows = (await conn.execute(select(table.c.published_at, table.c.attempts).order_by(table.c.seq))).all()
    assert all(r.published_at is not None for r in rows)
    assert [r.attempts for r in rows] == [1] * 105 + [2] * 295
    assert relay.status()["published_total"] == 400


async def test_a_nack_in_a_passs_only_batch_keeps_the_confirmed_rows_before_it_marked(either_outbox):
    """A quiet service publishes each commit on a pass of one batch, marked in the pass's own transaction (on
    PostgreSQL, the lock's): when the broker refuses an event, the rows confirmed before it stay marked and only the
    refused one and those after it are published again."""
    db, table = either_outbox
    events = [PendingEvent("user", f"u{i}", activated(str(i))) for i in range(10)]
    await write(db, table, events)
    refused = events[5].event_id
    publisher = ScriptedPublisher(lambda e: NACK if e.event_id == refused else ACK)
    service = f"nack-quiet-{uuid.uuid4().hex[:6]}"
    relay = OutboxRelay(db, table, service=service, amqp_url="amqp://unused", settings=FAST)
    relay.publisher = publisher

    with pytest.raises(PublishIncomplete, match="nack"):
        await run_pass(relay, publisher, db, table)
    assert len(publisher.sent) == 1  # one batch
    assert await published_ids(db, table) == {e.event_id for e in events[:5]}
    assert (publish_failures(service), published(service)) == (1, 5)  # the refused batch failed; its prefix counts

    publisher.verdict = lambda e: ACK
    publisher.sent.clear()
    assert await run_pass(relay, publisher, db, table) == 5
    assert publisher.sent == [[e.event_id for e in events[5:]]]
    assert (publish_failures(service), published(service)) == (1, 10)
    async with db.engine.connect() as conn:
        attempts = (await conn.execute(select(table.c.attempts).order_by(table.c.seq))).scalars().all()
    assert attempts == [1] * 5 + [2] * 5


async def test_stop_returns_and_ends_the_connection_while_a_batch_waits_for_confirms(vhost, outbox):
    db, table = outbox
    proxy = TcpProxy(rabbitmq.HOST, rabbitmq.PORT).start()
    relay = OutboxRelay(db, table, service=f"inflight-{uuid.uuid4().hex[:6]}",
                        amqp_url=silent_broker_url(vhost, proxy),
                        settings=dataclasses.replace(FAST, outbox_confirm_timeout_seconds=600.0))
    await relay.start()
    try:
        await eventually(lambda: relay.status()["connected"], "the relay to connect")
        proxy.freeze()
        await write(db, table, [PendingEvent("user", "a", activated(str(i))) for i in range(5)])
        await eventually(lambda: relay.status()["in_flight"] == 5, "the batch to wait for its confirms")
        await stop_within(relay)  # neither the confirms nor the broker's CloseOk ever come
        # The connection's thread ended while the broker still said nothing (not once the proxy closed below):
        # nothing goes on reconnecting after the relay stopped.
        assert not relay.publisher.running
    finally:
        await stop_within(relay)  # a no-op after a stop; stops the relay should the test fail before
        proxy.close()
    assert await unpublished(db, table) == 5  # the batch stays in the outbox for the next start


async def test_a_relay_stopped_while_draining_marks_what_the_broker_took_so_a_restart_publishes_nothing_twice(
        vhost, either_outbox):
    """A rolling deploy stops a relay in the middle of a drain: the batches in flight are confirmed within moments,
    and the stop lets the pass mark them before it ends it; the next relay publishes only the rest."""
    db, table = either_outbox
    url = rabbitmq.amqp_url(vhost)
    tap = rabbitmq.Tap(url, EXCHANGE)
    events = [PendingEvent("user", f"u{i % 7}", activated(str(i))) for i in range(3000)]
    await write(db, table, events)
    settings = dataclasses.replace(FAST, outbox_batch_size=50)
    relay = OutboxRelay(db, table, service=f"deploy-{uuid.uuid4().hex[:6]}", amqp_url=url, settings=settings)
    await relay.start()
    try:
        await eventually(lambda: relay.status()["published_total"] >= 200 and relay.status()["in_flight"] > 0,
                         "the drain to be under way with batches in flight", timeout=60)
    finally:
        await stop_within(relay)
    marked = len(events) - await unpublished(db, table)
    # stop() closed the relay's connection: the broker routed every message it took on it before the close, so the
    # tap's queue holds them all now.
    await tap.wait_for(marked)
    await asyncio.to_thread(tap._drain)
    taken = len(tap.messages)
    assert 0 < marked < len(events)
    assert taken == marked, "the broker took events the stopped relay left unmarked: a restart publishes them again"
    successor = OutboxRelay(db, table, service=relay.service, amqp_url=url, settings=settings)
    await successor.start()
    try:
        await until_all_marked(db, table, "the next relay to publish the rest", timeout=120)
    finally:
        await stop_within(successor)
    delivered = await tap.wait_for(len(events))
    ids = [user_events_pb2.UserActivated.FromString(body).user_id for _, _, body in delivered]
    assert ids == [str(i) for i in range(len(events))]  # each once, in order, across the two relays


async def test_stop_returns_when_a_commit_wakes_the_relay_as_it_is_stopped(vhost, outbox):
    db, table = outbox
    await write(db, table, [PendingEvent("user", "a", activated("before"))])
    relay = OutboxRelay(db, table, service=f"racing-{uuid.uuid4().hex[:6]}", amqp_url=rabbitmq.amqp_url(vhost),
                        settings=dataclasses.replace(FAST, outbox_poll_seconds=60.0))
    await relay.start()
    try:
        # Published, then the backlog counted again: the relay now waits for a commit or its next poll.
        await eventually(lambda: relay.status()["published_total"] == 1 and relay.status()["backlog"] == 0,
                         "the relay to publish the event and go idle")
    finally:
        # A service commits events and is told to stop in the same moment: the relay's wake-up races its
        # cancellation, which Python 3.11's asyncio.wait_for then swallowed, and stop() waited forever.
        notify_committed(table)
        await stop_within(relay)
    assert not relay.publisher.running


async def test_commits_arriving_while_the_relay_gathers_share_one_pass(vhost, outbox):
    db, table = outbox
    relay = OutboxRelay(db, table, service=f"gather-{uuid.uuid4().hex[:6]}", amqp_url=rabbitmq.amqp_url(vhost),
                        settings=dataclasses.replace(FAST, outbox_poll_seconds=60.0, outbox_gather_seconds=0.3))
    passes: list[int] = []
    relay_once = relay.relay_once

    async def counted() -> int:
        published = await relay_once()
        passes.append(published)
        return published

    relay.relay_once = counted  # type: ignore[method-assign]
    await write(db, table, [PendingEvent("user", "a", activated("first"))])
    await relay.start()
    try:
        await eventually(lambda: relay.status()["published_total"] == 1 and relay.status()["backlog"] == 0,
                         "the relay to publish the first event and go idle")
        idle = len(passes)
        # Two commits 0.1 s apart: the first wakes the relay, which gathers for 0.3 s, so the second joins its pass.
        await write(db, table, [PendingEvent("user", "b", activated("second"))])
        notify_committed(table)
        await asyncio.sleep(0.1)
        await write(db, table, [PendingEvent("user", "c", activated("third"))])
        notify_committed(table)
        await eventually(lambda: relay.status()["published_total"] == 3, "both commits to be published")
    finally:
        await stop_within(relay)
    assert passes[idle:] == [2]


@pytest.fixture
def empty_broker():
    """The URL of a new vhost: a broker on which no consumer has ever declared anything."""
    vhost = rabbitmq.create_vhost()
    yield rabbitmq.amqp_url(vhost)
    rabbitmq.delete_vhost(vhost)


async def publish_one(db: Database, table, url: str, event: PendingEvent, name: str,
                      settings: MessagingSettings = FAST) -> OutboxRelay:
    """Writes one event and runs a relay until it has published it; returns the stopped relay."""
    await write(db, table, [event])
    relay = OutboxRelay(db, table, service=f"{name}-{uuid.uuid4().hex[:6]}", amqp_url=url, settings=settings)
    await relay.start()
    try:
        await eventually(lambda: relay.status()["published_total"] == 1, "the event to be published")
    finally:
        await relay.stop()
    return relay


async def test_an_event_published_before_its_consumer_ever_started_waits_in_its_queue(outbox, empty_broker):
    # A first deploy starts every service at once: the user service may publish UserCreated before the
    # notification service has declared its queue. The relay declares the installed consumers' queues first.
    db, table = outbox
    created = user_events_pb2.UserCreated()
    created.user.id, created.user.email = "u-first", "first@example.com"
    relay = await publish_one(db, table, empty_broker, PendingEvent("user", "u-first", created), "first")
    assert relay.status()["unrouted_total"] == 0
    assert rabbitmq.queue_depth(empty_broker, "notification.email") == 1
    connection = rabbitmq.blocking_connection(empty_broker)
    try:
        method, _props, body = connection.channel().basic_get("notification.email", auto_ack=True)
    finally:
        connection.close()
    assert method.routing_key == "tessera.user.v1.UserCreated"
    assert user_events_pb2.UserCreated.FromString(body).user.id == "u-first"


async def test_a_consumer_queue_declared_differently_does_not_stop_publishing(outbox, empty_broker, caplog):
    db, table = outbox
    caplog.set_level(logging.WARNING, logger="tessera.outbox")
    connection = rabbitmq.blocking_connection(empty_broker)
    try:  # the same queue name with other arguments: the relay's declaration of it is refused (406)
        connection.channel().queue_declare("notification.email", durable=True)
    finally:
        connection.close()
    await publish_one(db, table, empty_broker, PendingEvent("user", "a", activated("despite")), "clash")
    [warning] = [r for r in caplog.records if "could not declare the consumer queues" in r.getMessage()]
    # A classic queue of an earlier version, say: the warning names it and the command that converts it.
    assert (warning.queue, warning.command) == ("notification.email", "tessera queues migrate")
    assert "tessera queues migrate" in warning.getMessage()


async def test_a_quorum_relay_that_finds_a_classic_consumer_queue_warns_and_still_routes_events_to_it(
        outbox, empty_broker, caplog):
    db, table = outbox
    caplog.set_level(logging.WARNING, logger="tessera.outbox")
    connection = rabbitmq.blocking_connection(empty_broker)
    try:  # as classic queues are declared, bound as before: events reach it until it is migrated
        channel = connection.channel()
        channel.exchange_declare("tessera.events", exchange_type="topic", durable=True)
        channel.queue_declare("notification.email", durable=True, arguments={
            "x-dead-letter-exchange": "tessera.events.dead-letter", "x-dead-letter-routing-key": "notification.email"})
        channel.queue_bind("notification.email", "tessera.events", routing_key=ACTIVATED_TYPE)
    finally:
        connection.close()
    await publish_one(db, table, empty_broker, PendingEvent("user", "a", activated("kept")), "classic",
                      dataclasses.replace(FAST, queue_type="quorum"))
    assert rabbitmq.queue_depth(empty_broker, "notification.email") == 1
    [warning] = [r for r in caplog.records if "could not declare the consumer queues" in r.getMessage()]
    assert (warning.queue, warning.command) == ("notification.email", "tessera queues migrate")
    assert "notification.email is a classic queue but TESSERA_QUEUE_TYPE is quorum" in warning.getMessage()


async def test_an_event_nobody_consumes_is_marked_published_counted_and_logged(vhost, outbox, caplog):
    db, table = outbox
    caplog.set_level(logging.INFO, logger="tessera.outbox")
    url = rabbitmq.amqp_url(vhost)
    await asyncio.to_thread(_declare_exchange, url, "nobody.events")  # no queue is bound to it
    await write(db, table, [PendingEvent("user", "a", activated("nobody")) for _ in range(3)])
    relay = OutboxRelay(db, table, service="unrouted", amqp_url=url,
                        settings=dataclasses.replace(FAST, events_exchange="nobody.events"))
    await relay.start()
    try:
        await until_all_marked(db, table, "the unroutable events were never marked published")
    finally:
        await relay.stop()
    assert relay.status()["unrouted_total"] == 3
    # One line per event, none of them "event published": the first of its type a warning, the others at INFO.
    unrouted = [r for r in caplog.records if "no queue is bound" in r.getMessage()]
    assert [(r.levelname, r.event_type, r.exchange) for r in unrouted] == [
        ("WARNING", ACTIVATED_TYPE, "nobody.events"), ("INFO", ACTIVATED_TYPE, "nobody.events"),
        ("INFO", ACTIVATED_TYPE, "nobody.events")]
    assert len({r.event_id for r in unrouted}) == 3
    assert not [r for r in caplog.records if r.getMessage() == "event published"]


async def test_published_rows_are_pruned_after_the_retention_and_unpublished_ones_never(outbox):
    db, table = outbox
    events = [PendingEvent("user", "a", activated(str(i))) for i in range(4)]
    await write(db, table, events)
    old, recent = utcnow() - dt.timedelta(hours=3), utcnow() - dt.timedelta(minutes=30)
    async with db.engine.begin() as conn:
        for event, published in zip(events, (old, old, recent, None), strict=True):
            await conn.execute(update(table).where(table.c.event_id == event.event_id)
                               .values(published_at=published))
    relay = OutboxRelay(db, table, service="prune", amqp_url="amqp://unused",
                        settings=dataclasses.replace(FAST, outbox_retention_hours=2))
    assert await relay.prune_published() == 2
    async with db.engine.connect() as conn:
        left = {r.event_id for r in (await conn.execute(select(table.c.event_id))).all()}
    assert left == {events[2].event_id, events[3].event_id}
    kept = OutboxRelay(db, table, service="prune", amqp_url="amqp://unused",
                       settings=dataclasses.replace(FAST, outbox_retention_hours=0))
    assert await kept.prune_published() == 0


def _declare_exchange(url: str, name: str) -> None:
    with rabbitmq.blocking_connection(url) as connection:
        connection.channel().exchange_declare(name, exchange_type="topic", durable=True)


def _module() -> ServiceModule:
    async def ping() -> bool:
        return True

    return ServiceModule(service_names=("x",), register=lambda server: None, domain="x",
                         readiness_checks=(ping,), on_start=(ping,), on_stop=(ping,))


async def test_attach_adds_start_and_stop_hooks_and_a_non_critical_broker_check(outbox):
    db, table = outbox
    settings = ServiceSettings.from_env("svc", 0, {})
    module = _module()
    relay = attach_outbox_relay(module, db, table, settings, messaging=MessagingSettings())
    assert relay is not None
    assert module.on_start[-1] == relay.start  # after the service's own start hooks (its migrations)
    assert module.on_stop[-1] == relay.stop  # stop hooks run in reverse: before the database is disposed
    check = module.readiness_checks[-1]
    assert isinstance(check, HealthCheck) and check.name == "broker" and not check.critical

    off = _module()
    assert attach_outbox_relay(off, db, table, settings, messaging=MessagingSettings(outbox_relay=False)) is None
    assert (len(off.on_start), len(off.on_stop), len(off.readiness_checks)) == (1, 1, 1)


async def test_messaging_settings_come_from_the_service_settings_or_the_environment(monkeypatch):
    from tessera_runtime.messaging.settings import MessagingServiceSettings, messaging_settings

    settings = MessagingServiceSettings.from_env("svc", 0, {"TESSERA_EVENTS_EXCHANGE": "other.events",
                                                            "TESSERA_OUTBOX_RELAY": "off"})
    assert messaging_settings(settings) == MessagingSettings(events_exchange="other.events", outbox_relay=False)
    monkeypatch.setenv("TESSERA_OUTBOX_BATCH_SIZE", "42")
    assert messaging_settings(ServiceSettings.from_env("svc", 0, {})).outbox_batch_size == 42
    assert json.dumps(messaging_settings(settings).consumer_retry_delays) == "[1.0, 5.0, 30.0, 120.0]"


async def test_a_broker_that_stops_answering_never_holds_up_the_services_calls(vhost, db_url):
    """The relay runs beside the gRPC server on its event loop: with the broker connection frozen (connected, silent)
    and events piling up, every call still answers well within its deadline, and the events go out once a new
    connection confirms them."""
    proxy = TcpProxy(rabbitmq.HOST, rabbitmq.PORT).start()
    tap = rabbitmq.Tap(rabbitmq.amqp_url(vhost), EXCHANGE)
    settings = settings_for("user", db_url, TESSERA_OUTBOX_RELAY="true",
                            TESSERA_AMQP_URL=silent_broker_url(vhost, proxy),
                            TESSERA_OUTBOX_CONFIRM_TIMEOUT_SECONDS="3", TESSERA_OUTBOX_POLL_SECONDS="0.2")
    server, port = await create_server(await bootstrap.build(settings), readiness_interval=0.2)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            users = user_service_pb2_grpc.UserServiceStub(channel)

            async def create(i: int) -> str:
                reply = await users.CreateUser(user_service_pb2.CreateUserRequest(
                    user=user_pb2.User(email=f"frozen-{i}@example.com", display_name="F"), request_id=f"f-{i}"),
                    timeout=2)
                return reply.user.id

            first = await create(0)
            await tap.wait_for(1)  # the relay is connected and has published
            proxy.freeze()
            ids = [first]
            for i in range(1, 31):
                ids.append(await create(i))
                assert (await users.GetUser(user_service_pb2.GetUserRequest(id=ids[-1]), timeout=2)).user.id == ids[-1]
            delivered = await tap.wait_for(31)
    finally:
        await server.stop()
        proxy.close()
    created = {user_events_pb2.UserCreated.FromString(body).user.id for _, _, body in delivered}
    assert created == set(ids)


class JsonLines(logging.Handler):
    """The relay's log lines as the service writes them (tessera_runtime.logs' JSON), parsed."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter("user-service"))
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))

    def published(self) -> list[dict]:
        return [line for line in self.lines if line["message"] == "event published"]


@contextlib.contextmanager
def relay_log_lines():
    logger = logging.getLogger("tessera.outbox")
    handler, level = JsonLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # a service's default level
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


async def test_each_confirmed_event_has_one_published_line_with_its_ids(vhost, outbox):
    db, table = outbox
    tap = rabbitmq.Tap(rabbitmq.amqp_url(vhost), EXCHANGE)
    trace_id, writer_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    tokens = request_id_var.set("req-line-1"), correlation_id_var.set("corr-line-1")
    try:
        traced = [PendingEvent("user", f"user-{i}", activated(str(i))) for i in range(3)]
    finally:
        request_id_var.reset(tokens[0])
        correlation_id_var.reset(tokens[1])
    for e in traced:
        e.headers["traceparent"] = f"00-{trace_id}-{writer_span}-01"
    bare = PendingEvent("order", "order-9", activated("bare"))  # written outside any request
    await write(db, table, [*traced, bare])
    async with db.engine.connect() as conn:
        seqs = dict((await conn.execute(select(table.c.event_id, table.c.seq))).all())
    relay = OutboxRelay(db, table, service=f"lines-{uuid.uuid4().hex[:6]}", amqp_url=rabbitmq.amqp_url(vhost),
                        settings=FAST)
    with relay_log_lines() as logged:
        await relay.start()
        try:
            await tap.wait_for(4)
            await eventually(lambda: relay.status()["published_total"] == 4, "every row to be marked")
        finally:
            await relay.stop()
    lines = logged.published()
    assert [line["event_id"] for line in lines] == [e.event_id for e in [*traced, bare]]  # in seq order, once each
    first = lines[0]
    assert (first["level"], first["logger"]) == ("INFO", "tessera.outbox")
    assert {k: first[k] for k in ("event_type", "exchange", "routing_key", "aggregate_type", "aggregate_id",
                                  "outbox_seq", "correlation_id", "request_id")} == {
        "event_type": ACTIVATED_TYPE, "exchange": EXCHANGE, "routing_key": ACTIVATED_TYPE,
        "aggregate_type": "user", "aggregate_id": "user-0", "outbox_seq": seqs[traced[0].event_id],
        "correlation_id": "corr-line-1", "request_id": "req-line-1"}
    assert first["lag_ms"] >= 0
    # The publish span's ids: the trace of the request that wrote the event, and the span whose traceparent the
    # message carries to the consumer.
    delivered = {props.message_id: props for _, props, _ in tap.messages}
    for line in lines[:3]:
        assert line["trace_id"] == trace_id
        assert delivered[line["event_id"]].headers["traceparent"] == f"00-{trace_id}-{line['span_id']}-01"
    last = lines[3]
    assert (last["aggregate_type"], last["aggregate_id"], last["correlation_id"], last["request_id"]) == (
        "order", "order-9", None, None)


async def test_an_event_published_on_a_connection_that_never_confirms_has_no_line_until_a_confirm(vhost, outbox):
    db, table = outbox
    tap = rabbitmq.Tap(rabbitmq.amqp_url(vhost), EXCHANGE)
    events = [PendingEvent("user", "a", activated(str(i))) for i in range(5)]
    with relay_log_lines() as logged:
        async with relay_on_a_broker_that_freezes(vhost, db, table, "unconfirmed",
                                                  settings=dataclasses.replace(FAST, outbox_confirm_timeout_seconds=3.0)
                                                  ) as relay:
            await write(db, table, events)
            await eventually(lambda: relay.status()["in_flight"] == 5, "the batch to wait for its confirms")
            assert logged.published() == []  # sent, but the broker confirmed nothing
            await tap.wait_for(5)
            await eventually(lambda: relay.status()["published_total"] == 5, "every row to be marked")
    # Published twice, confirmed once (on the new connection): one line each.
    assert [line["event_id"] for line in logged.published()] == [e.event_id for e in events]
    [failed] = [line for line in logged.lines if line["message"].startswith("outbox relay pass failed")]
    assert failed["level"] == "WARNING" and failed["event_id"] == events[0].event_id
    assert f"lost before it confirmed event {events[0].event_id}" in failed["message"]
    assert failed["outbox_seq"] == 1


async def test_an_event_the_broker_refuses_has_no_published_line_and_the_failure_names_it(outbox, empty_broker):
    """A queue that is full and rejects publishes makes the real broker nack: the events it confirmed before the
    refused one have their line, the refused one and those after it none."""
    db, table = outbox
    with rabbitmq.blocking_connection(empty_broker) as connection:
        channel = connection.channel()
        channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        channel.queue_declare("full", durable=True, arguments={"x-max-length": 3, "x-overflow": "reject-publish"})
        channel.queue_bind("full", EXCHANGE, routing_key="#")
    events = [PendingEvent("user", "a", activated(str(i))) for i in range(6)]
    await write(db, table, events)
    relay = OutboxRelay(db, table, service=f"refused-{uuid.uuid4().hex[:6]}", amqp_url=empty_broker, settings=FAST)
    with relay_log_lines() as logged:
        await relay.start()
        try:
            await eventually(lambda: any(line["message"].startswith("outbox relay pass failed")
                                         for line in logged.lines), "the refused publish")
        finally:
            await relay.stop()
    assert [line["event_id"] for line in logged.published()] == [e.event_id for e in events[:3]]
    assert await published_ids(db, table) == {e.event_id for e in events[:3]}
    failed = next(line for line in logged.lines if line["message"].startswith("outbox relay pass failed"))
    assert f"the broker refused (nack) event {events[3].event_id}" in failed["message"]
    assert (failed["event_id"], failed["outbox_seq"]) == (events[3].event_id, 4)


async def test_a_correlation_id_too_long_for_the_amqp_property_does_not_block_the_outbox(vhost, outbox):
    """A consumer restores the correlation id an incoming message carries, whatever its length, and the events its
    handler writes carry it on. AMQP's correlation_id property holds at most 255 bytes: the event goes out with the
    id in its x-correlation-id header only, and the events behind it go out too."""
    db, table = outbox
    tap = rabbitmq.Tap(rabbitmq.amqp_url(vhost), EXCHANGE)
    long_id = "é" * 200  # 400 bytes in UTF-8
    token = correlation_id_var.set(long_id)
    try:
        carried = PendingEvent("notification", "n-1", activated("long"))
    finally:
        correlation_id_var.reset(token)
    behind = PendingEvent("notification", "n-2", activated("behind"))
    await write(db, table, [carried, behind])
    relay = OutboxRelay(db, table, service=f"long-id-{uuid.uuid4().hex[:6]}", amqp_url=rabbitmq.amqp_url(vhost),
                        settings=FAST)
    await relay.start()
    try:
        delivered = await tap.wait_for(2, timeout=15)
        await until_all_marked(db, table, "rows left unmarked", timeout=15)
    finally:
        await relay.stop()
    (_, first, _), (_, second, _) = delivered
    assert (first.message_id, second.message_id) == (carried.event_id, behind.event_id)
    assert first.headers["x-correlation-id"] == long_id and first.correlation_id is None


async def test_with_batch_lines_each_confirmed_batch_has_one_line_listing_its_event_ids(vhost, outbox):
    db, table = outbox
    tap = rabbitmq.Tap(rabbitmq.amqp_url(vhost), EXCHANGE)
    events = [PendingEvent("user", f"u{i % 3}", activated(str(i))) for i in range(250)]
    await write(db, table, events)
    relay = OutboxRelay(db, table, service=f"batch-lines-{uuid.uuid4().hex[:6]}", amqp_url=rabbitmq.amqp_url(vhost),
                        settings=dataclasses.replace(FAST, outbox_published_log="batch"))  # batches of 100
    with relay_log_lines() as logged:
        await relay.start()
        try:
            await tap.wait_for(250)
            await eventually(lambda: relay.status()["published_total"] == 250, "every row to be marked")
        finally:
            await relay.stop()
    assert logged.published() == []
    lines = [line for line in logged.lines if line["message"] == "events published"]
    assert [(line["count"], line["first_outbox_seq"], line["last_outbox_seq"]) for line in lines] == [
        (100, 1, 100), (100, 101, 200), (50, 201, 250)]
    assert [event_id for line in lines for event_id in line["event_ids"]] == [e.event_id for e in events]
    assert {(line["level"], line["exchange"]) for line in lines} == {("INFO", EXCHANGE)}
