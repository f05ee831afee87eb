"""Whose confirm is it: the relay's publisher against the real broker when its channel or connection goes away with
batches in flight. Delivery tags restart at 1 on every channel, so a confirm is only ever the broker's word about
a publish of the channel it arrived on: a late confirm from a channel that is closing never settles a publish of
the next one, and every event is delivered at least once and marked published only once the broker confirmed it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid

import pika
import pytest

from tessera_runtime.messaging.envelope import OutgoingEvent
from tessera_runtime.messaging.relay import ACK, ConfirmingPublisher
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
