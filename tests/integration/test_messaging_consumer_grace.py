"""A service's event consumer stops within the service's grace period (TESSERA_GRACE_SECONDS), shorter or longer
than ten seconds, on a real server and broker."""

from __future__ import annotations

import asyncio
import time
import types
import uuid

import pika
import pytest
from tessera.user.v1 import user_events_pb2

from tessera_runtime.messaging import MessagingSettings, Subscription, attach_consumer
from tessera_runtime.server import ServiceModule, TesseraServer
from tests.support import rabbitmq
from tests.support.waiting import eventually

SETTINGS = MessagingSettings(consumer_retry_delays=(30.0,), consumer_max_attempts=3, reconnect_max_seconds=0.5,
                             consumer_concurrency=1)


@pytest.fixture(scope="module")
def url():
    vhost = rabbitmq.create_vhost()
    yield rabbitmq.amqp_url(vhost)
    rabbitmq.delete_vhost(vhost)


def publish(url: str, event) -> None:
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        name = event.DESCRIPTOR.full_name
        channel.basic_publish("tessera.events", name, event.SerializeToString(), pika.BasicProperties(
            content_type="application/x-protobuf", type=name, message_id=str(uuid.uuid4()), delivery_mode=2))


async def serve_a_slow_handler(url: str, grace: float, handling: float):
    """A server whose consumer takes `handling` seconds per event; returns it, its queue and what was handled."""
    handled: list[str] = []
    started = asyncio.Event()

    async def slow(event, meta):
        started.set()
        await asyncio.sleep(handling)
        handled.append(event.user_id)

    module = ServiceModule(service_names=(), register=lambda server: None, domain="test.tessera.dev")
    settings = types.SimpleNamespace(amqp_url=url, grace_seconds=grace, messaging=SETTINGS)
    consumer = attach_consumer(module, settings, Subscription("grace", uuid.uuid4().hex[:8],
                                                              {user_events_pb2.UserActivated: slow}))
    server = TesseraServer(module, grace_seconds=grace)
    await server.start()
    await rabbitmq.wait_for_consumer(url, consumer.queue)
    await asyncio.to_thread(publish, url, user_events_pb2.UserActivated(user_id="slow"))
    await asyncio.wait_for(started.wait(), 30)
    return server, consumer, handled


async def test_a_grace_period_shorter_than_ten_seconds_bounds_the_consumers_stop(url):
    server, consumer, handled = await serve_a_slow_handler(url, grace=1.0, handling=60)
    began = time.monotonic()
    await server.stop()
    assert time.monotonic() - began < 5
    assert handled == []
    # The message it was handling is not lost: unacknowledged, it waits in the queue for the next consumer.
    await eventually(lambda: rabbitmq.queue_depth(url, consumer.queue) == 1, "the message back in its queue")


async def test_a_grace_period_longer_than_ten_seconds_lets_a_handler_finish(url):
    server, consumer, handled = await serve_a_slow_handler(url, grace=16.0, handling=11.5)
    began = time.monotonic()
    await server.stop()
    assert 10 < time.monotonic() - began < 16
    assert handled == ["slow"]
    assert rabbitmq.queue_depth(url, consumer.queue) == 0  # handled and acknowledged before the consumer closed
