"""Whose confirm is it: the relay's publisher against the real broker when its channel or connection goes away with
batches in flight. Delivery tags restart at 1 on every channel, so a confirm is only ever the broker's word about
a publish of the channel it arrived on: a late confirm from a channel that is closing never settles a publish of
the next one, and every event is delivered at least once and marked published only once the broker confirmed it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator

import pika
import pytest
from sqlalchemy import select
from tessera.user.v1 import user_events_pb2

from tessera_runtime.db import Database
from tessera_runtime.messaging.envelope import OutgoingEvent
from tessera_runtime.messaging.relay import ACK, ConfirmingPublisher, OutboxRelay
from tessera_runtime.outbox import PendingEvent
from tests.integration.test_messaging_relay import FAST, outbox_on, stop_within, write
from tests.support import rabbitmq
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

EXCHANGE = "tessera.events"
ACTIVATED = "tessera.user.v1.UserActivated"


@pytest.fixture(scope="module")
def vhost():
    name = rabbitmq.create_vhost()
    yield name
    rabbitmq.delete_vhost(name)


def outgoing(*ids: str) -> list[OutgoingEvent]:
    return [OutgoingEvent(seq=i, event_id=event_id, routing_key=ACTIVATED, body=event_id.encode(),
                          properties=pika.BasicProperties(message_id=event_id, delivery_mode=2))
            for i, event_id in enumerate(ids)]


def settled(future: concurrent.futures.Future) -> list[str | None] | None:
    return future.result() if future.done() else None


async def test_a_late_confirm_from_the_closing_channel_never_confirms_a_publish_on_the_new_one(vhost):
    """The link's loop fails with three events unconfirmed: the link gives up that connection (closing it, which
    takes as long as the broker's CloseOk) and publishes on a new one at once. The old channel's confirms for its
    tags 1-3 come late, while the new channel's tags 1-3 wait for theirs: they settle the old publishes (already
    given up) and nothing else."""
    proxy = TcpProxy(rabbitmq.HOST, rabbitmq.PORT).start()
    tap = rabbitmq.Tap(rabbitmq.amqp_url(vhost), EXCHANGE)
    # heartbeat=600: held frames include the broker's heartbeats, and pika must not give the connection up for that.
    url = f"{rabbitmq.amqp_url(vhost, port=proxy.port)}?heartbeat=600"
    publisher = ConfirmingPublisher(url, f"late-{uuid.uuid4().hex[:6]}", EXCHANGE, max_backoff=0.5)
    publisher.start()
    try:
        await eventually(lambda: publisher.ready, "the publisher to connect")
        generation, first_connection = publisher.generation, publisher._connection
        old_replies = proxy.hold()  # from now on the broker's frames to the first connection are held back
        old = publisher.publish(outgoing("a1", "a2", "a3"), publisher.stream())
        await tap.wait_for(3)  # the broker took them and confirmed them, on the first channel

        def fail() -> None:
            raise RuntimeError("a callback failed")

        # A callback raising out of pika's loop: the link abandons the connection and connects anew after 1 s.
        publisher._ioloop.add_callback_threadsafe(fail)
        await eventually(lambda: publisher.ready and publisher.generation == generation + 1,
                         "the publisher to be ready on a new connection")
        assert settled(old) == [None, None, None]  # given up with their connection: published again by the relay
        assert not first_connection.is_closed  # still closing: the broker's CloseOk is held back with the confirms
        new_replies = proxy.hold()
        new = publisher.publish(outgoing("b1", "b2", "b3"), publisher.stream())
        await tap.wait_for(6)  # the broker took them and confirmed them, on the new channel (held back)

        proxy.release(old_replies)  # the first channel's confirms and CloseOk arrive now, late
        await eventually(lambda: first_connection.is_closed, "the first connection to close", timeout=10)
        assert settled(new) is None, "a confirm of the old channel settled a publish of the new one"
        assert publisher.in_flight == 3

        proxy.release(new_replies)
        await eventually(lambda: new.done(), "the new channel's confirms")
        assert new.result() == [ACK, ACK, ACK]
        assert publisher.in_flight == 0
    finally:
        await asyncio.to_thread(publisher.stop)
        proxy.close()
    assert [props.message_id for _, props, _ in tap.messages] == ["a1", "a2", "a3", "b1", "b2", "b3"]



async def test_a_connection_the_link_abandons_is_cut_when_the_broker_never_answers_its_close(vhost):
    proxy = TcpProxy(rabbitmq.HOST, rabbitmq.PORT).start()
    url = f"{rabbitmq.amqp_url(vhost, port=proxy.port)}?heartbeat=600"
    publisher = ConfirmingPublisher(url, f"abandoned-{uuid.uuid4().hex[:6]}", EXCHANGE, max_backoff=0.5,
                                    close_timeout=1.0)
    publisher.start()
    try:
        await eventually(lambda: publisher.ready, "the publisher to connect")
        generation, first_connection = publisher.generation, publisher._connection
        proxy.hold()  # the broker's CloseOk never reaches the first connection

        def fail() -> None:
            raise RuntimeError("a callback failed")

        publisher._ioloop.add_callback_threadsafe(fail)
        await eventually(lambda: publisher.ready and publisher.generation == generation + 1,
                         "the publisher to be ready on a new connection")
        await eventually(lambda: first_connection.is_closed, "the abandoned connection to be cut", timeout=5)
    finally:
        await asyncio.to_thread(publisher.stop)
        proxy.close()

# The private node's queue for UserCreated: the relay declares it, bound, on every connection before it publishes, so
# an event is never unroutable here, whatever the broker went through.
QUEUE = "notification.email"
WINDOW = dataclasses.replace(FAST, outbox_batch_size=100, outbox_confirm_timeout_seconds=5.0)


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    broker = rabbitmq.PrivateNode(tmp_path_factory.mktemp("rabbitmq")).start()
    yield broker
    broker.stop()


@pytest.fixture
async def outbox(tmp_path):
    async with outbox_on(f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}") as made:
        yield made


def created(i: int) -> PendingEvent:
    event = user_events_pb2.UserCreated()
    event.user.id, event.user.email = f"u{i}", f"u{i}@example.com"
    return PendingEvent("user", f"u{i}", event)


async def marked_ids(db: Database, table) -> set[str]:
    async with db.engine.connect() as conn:
        return set((await conn.execute(select(table.c.event_id).where(table.c.published_at.is_not(None))))
                   .scalars())


async def all_ids(db: Database, table) -> set[str]:
    async with db.engine.connect() as conn:
        return set((await conn.execute(select(table.c.event_id))).scalars())


def queued_ids(url: str) -> list[str]:
    """The message ids in the consumer queue, taken out of it."""
    ids = []
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        while True:
            method, props, _ = channel.basic_get(QUEUE, auto_ack=True)
            if method is None:
                return ids
            ids.append(props.message_id)


@dataclasses.dataclass
class Held:
    relay: OutboxRelay
    proxy: TcpProxy
    replies: frozenset
    url: str


@contextlib.asynccontextmanager
async def window_awaiting_confirms(node: rabbitmq.PrivateNode, db: Database, table, name: str) -> AsyncIterator[Held]:
    """A relay on the private node, through a proxy: 300 events published and marked; then what the broker sends
    the relay is held back and 700 more events are written, so that the relay's window (four batches of 100) is on
    the broker, confirmed there, and waits for those confirms. The test then breaks something and releases them."""
    vhost = node.create_vhost()
    proxy = TcpProxy(rabbitmq.HOST, node.port).start()
    # heartbeat=600: the held frames include the broker's heartbeats.
    relay = OutboxRelay(db, table, service=f"{name}-{uuid.uuid4().hex[:6]}",
                        amqp_url=f"{rabbitmq.amqp_url(vhost, port=proxy.port)}?heartbeat=600", settings=WINDOW)
    await relay.start()
    try:
        await write(db, table, [created(i) for i in range(300)])
        await eventually(lambda: relay.status()["published_total"] == 300, "the first 300 events to be marked")
        replies = proxy.hold()
        await write(db, table, [created(i) for i in range(300, 1000)])
        await eventually(lambda: relay.status()["in_flight"] == 400, "four batches waiting for their confirms")
        assert len(await marked_ids(db, table)) == 300
        yield Held(relay, proxy, replies, node.url(vhost))
    finally:
        await stop_within(relay)
        proxy.close()


async def each_event_queued_and_marked(held: Held, db: Database, table) -> list[str]:
    """Waits until the relay marked every row; checks that every event is in the queue (once or more) and returns
    the queued ids."""
    await eventually(lambda: held.relay.status()["published_total"] >= 1000, "every event to be marked",
                     timeout=120)
    everything = await all_ids(db, table)
    assert await marked_ids(db, table) == everything
    queued = await asyncio.to_thread(queued_ids, held.url)
    assert set(queued) == everything, f"{len(everything - set(queued))} events marked published are not queued"
    return queued


async def test_a_connection_the_broker_closes_with_batches_in_flight_loses_no_event(node, outbox):
    db, table = outbox
    async with window_awaiting_confirms(node, db, table, "forced") as held:
        generation = held.relay.publisher.generation
        pids = node.connection_pids(held.relay.publisher.name)
        assert len(pids) == 1
        node.ctl("close_connection", pids[0], "closed by the test")  # CONNECTION_FORCED, behind the held confirms
        held.proxy.release(held.replies)
        await each_event_queued_and_marked(held, db, table)
        assert held.relay.publisher.generation > generation  # a new connection


async def test_a_channel_the_broker_closes_with_an_error_with_batches_in_flight_loses_no_event(node, outbox, caplog):
    db, table = outbox
    caplog.set_level(logging.WARNING, logger="tessera")
    async with window_awaiting_confirms(node, db, table, "deleted") as held:
        generation = held.relay.publisher.generation
        with rabbitmq.blocking_connection(held.url) as connection:
            # The next publish on the relay's channel gets 404 NOT_FOUND: the broker closes the channel.
            connection.channel().exchange_delete(WINDOW.events_exchange)
        held.proxy.release(held.replies)  # the window's confirms arrive; the relay publishes its next batch
        await each_event_queued_and_marked(held, db, table)
        assert held.relay.publisher.generation > generation  # a new channel, with the exchange declared again
    # The failed pass names the broker's reason, not the close of the connection that the link recycled after it.
    failed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("outbox relay pass failed")]
    assert failed and all("NOT_FOUND - no exchange 'tessera.events'" in message for message in failed), failed


async def test_a_broker_that_crashes_with_batches_in_flight_keeps_every_event_it_confirmed(node, outbox):
    db, table = outbox
    async with window_awaiting_confirms(node, db, table, "crash") as held:
        node.kill()  # the held confirms die with it
        before_crash = await marked_ids(db, table)
        assert len(before_crash) == 300
        await asyncio.to_thread(node.start)
        await each_event_queued_and_marked(held, db, table)


async def test_a_broker_restart_while_a_flowing_stream_is_confirmed_loses_no_confirmed_event(node, outbox):
    db, table = outbox
    vhost = node.create_vhost()
    url = node.url(vhost)
    relay = OutboxRelay(db, table, service=f"restart-{uuid.uuid4().hex[:6]}", amqp_url=url, settings=WINDOW)
    await write(db, table, [created(i) for i in range(10_000)])
    await relay.start()
    try:
        await eventually(lambda: relay.status()["published_total"] >= 2000 and relay.status()["in_flight"] > 0,
                         "2000 events to be marked, and more in flight")
        node.kill()
        await asyncio.sleep(0.5)  # whatever confirms reached the relay before the crash are marked now
        confirmed = await marked_ids(db, table)
        await asyncio.to_thread(node.start)
        await eventually(lambda: relay.status()["published_total"] >= 10_000, "every event to be marked",
                         timeout=120)
    finally:
        await stop_within(relay)
    queued = set(await asyncio.to_thread(queued_ids, url))
    assert 2000 <= len(confirmed) < 10_000
    assert confirmed <= queued, f"{len(confirmed - queued)} events marked published were lost by the crash"
    assert queued == await all_ids(db, table) == await marked_ids(db, table)


async def test_a_connection_blocked_by_a_broker_alarm_marks_nothing_until_the_broker_confirms(node, outbox):
    db, table = outbox
    async with window_awaiting_confirms(node, db, table, "blocked") as held:
        node.ctl("set_vm_memory_high_watermark", "0")  # a memory alarm: the broker blocks publishing connections
        try:
            held.proxy.release(held.replies)  # the window's confirms; the relay publishes the rest into the block
            await eventually(lambda: held.relay.status()["published_total"] == 700, "the window to be marked")
            await asyncio.sleep(WINDOW.outbox_confirm_timeout_seconds + 3)  # confirms overdue: given up, again
            assert len(await marked_ids(db, table)) == 700
        finally:
            node.ctl("set_vm_memory_high_watermark", "0.4")
        await each_event_queued_and_marked(held, db, table)
