"""At-least-once dead-lettering between the queues consumers declare, on a RabbitMQ node of the tests' own: a node
killed outright while retries move back to the consumer queue, and a dead letter whose target queue is missing for
a while. Classic queues (the default) lose messages in both cases (at-most-once dead-lettering); the quorum queues
of TESSERA_QUEUE_TYPE=quorum lose none."""

from __future__ import annotations

import time

import pika
import pytest

from tessera_runtime.messaging.topology import QueueTopology, declare_blocking
from tests.support import rabbitmq
from tests.support.waiting import wait_for

# As services declare them with TESSERA_QUEUE_TYPE=quorum.
TOPOLOGY = QueueTopology("tessera.events", "svc.things", ("tessera.user.v1.UserCreated",), (0.2,), "quorum")
QUEUE = TOPOLOGY.queue
RETRY = TOPOLOGY.retry_queue(0.2)
DLQ = TOPOLOGY.dead_letter_queue


class Broker:
    """The private node, and the URL of its default vhost."""

    def __init__(self, node: rabbitmq.PrivateNode) -> None:
        self.node = node
        self.url = node.url()
        self.running = False

    def start(self) -> None:
        self.node.start()
        self.running = True

    def kill(self) -> None:
        self.running = False
        self.node.kill()


@pytest.fixture(scope="module")
def node(tmp_path_factory):
    # Its dead-letter worker sends an unconfirmed dead letter again after 1 s (RabbitMQ's default: three minutes).
    broker = Broker(rabbitmq.PrivateNode(tmp_path_factory.mktemp("rabbitmq"),
                                         rabbit_settings={"dead_letter_worker_publisher_confirm_timeout": 1000}))
    broker.start()
    yield broker
    broker.node.stop()


@pytest.fixture
def broker(node):
    if not node.running:
        node.start()
    with pika.BlockingConnection(pika.URLParameters(node.url)) as connection:
        channel = connection.channel()
        for name in (QUEUE, RETRY, DLQ):
            channel.queue_delete(name)
        declare_blocking(channel, TOPOLOGY.declarations())
    return node


def depth(url: str, queue: str) -> int:
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        return connection.channel().queue_declare(queue, passive=True).method.message_count


def take_ids(url: str, queue: str) -> list[str]:
    ids = []
    with pika.BlockingConnection(pika.URLParameters(url)) as connection:
        channel = connection.channel()
        while True:
            method, props, _ = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return ids
            ids.append(props.message_id)


def test_a_broker_killed_while_retries_move_back_to_the_consumer_queue_loses_none(broker):
    count = 4000
    connection = pika.BlockingConnection(pika.URLParameters(broker.url))  # dies with the broker: never closed
    channel = connection.channel()
    channel.confirm_delivery()
    started = time.monotonic()
    for i in range(count):  # failed messages waiting for their retry, all due at about the same time
        channel.basic_publish("", RETRY, b"x" * 200, pika.BasicProperties(
            message_id=f"m-{i}", delivery_mode=2, expiration="15000"), mandatory=True)
    assert time.monotonic() - started < 15, "publishing took longer than the retry delay"
    probe = connection.channel()
    # The broker dies while it moves the expired retries back to the consumer queue.
    while probe.queue_declare(QUEUE, passive=True).method.message_count < count // 10:
        pass
    moved_when_killed = probe.queue_declare(QUEUE, passive=True).method.message_count
    broker.kill()
    assert moved_when_killed < count, "every retry had moved before the broker was killed"

    broker.start()
    wait_for(lambda: depth(broker.url, RETRY) == 0, timeout=60, what="the retries to move back after the restart")
    ids = take_ids(broker.url, QUEUE)
    # At least once: none lost (a message the broker copied just before it died may be there twice).
    assert set(ids) == {f"m-{i}" for i in range(count)}


def test_a_dead_letter_whose_target_queue_is_missing_waits_for_it(broker):
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_delete(DLQ)  # emptied by an operator, say: the dead-letter exchange routes nowhere
        channel.basic_publish("", QUEUE, b"x", pika.BasicProperties(message_id="rejected", delivery_mode=2))
        method, _, _ = channel.basic_get(QUEUE, auto_ack=False)
        channel.basic_reject(method.delivery_tag, requeue=False)  # the broker dead-letters it
        time.sleep(1.5)  # its first try found no queue
        declare_blocking(channel, TOPOLOGY.declarations())  # a consumer declares the queues again
    wait_for(lambda: depth(broker.url, DLQ) == 1, timeout=30, what="the dead letter to reach the new queue")
    assert take_ids(broker.url, DLQ) == ["rejected"]


def test_a_retry_whose_consumer_queue_is_missing_waits_for_it(broker):
    with pika.BlockingConnection(pika.URLParameters(broker.url)) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.queue_delete(QUEUE)
        channel.basic_publish("", RETRY, b"y", pika.BasicProperties(message_id="retried", delivery_mode=2,
                                                                     expiration="50"))
        time.sleep(1.5)  # it expired, and found no queue to go back to
        declare_blocking(channel, TOPOLOGY.declarations())
    wait_for(lambda: depth(broker.url, QUEUE) == 1, timeout=30, what="the retry to reach the new queue")
    assert take_ids(broker.url, QUEUE) == ["retried"]
