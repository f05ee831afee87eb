"""This machine's RabbitMQ for tests: a private vhost per test module, and a tap that records what is published.

A vhost is created with rabbitmqctl (and deleted with everything in it afterwards), so exchanges, queues and
messages of one test never meet another's, nor `make run`'s.
"""

from __future__ import annotations

import asyncio
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from typing import Any

import pika
import pika.exceptions

HOST = "127.0.0.1"
PORT = 5672
USER = "guest"
PASSWORD = "guest"


def _ctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def create_vhost(prefix: str = "tessera-test") -> str:
    name = f"{prefix}-{uuid.uuid4().hex[:10]}"
    _ctl("add_vhost", name)
    _ctl("set_permissions", "-p", name, USER, ".*", ".*", ".*")
    return name


def delete_vhost(name: str) -> None:
    _ctl("delete_vhost", name)


def amqp_url(vhost: str, host: str = HOST, port: int = PORT) -> str:
    return f"amqp://{USER}:{PASSWORD}@{host}:{port}/{urllib.parse.quote(vhost, safe='')}"


def blocking_connection(url: str) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(url))


class Tap:
    """A queue bound to an exchange by routing keys, drained on demand: what a test sees being published."""

    def __init__(self, url: str, exchange: str, routing_keys: Iterable[str] = ("#",)) -> None:
        self.url = url
        self.queue = f"tap-{uuid.uuid4().hex[:8]}"
        self.messages: list[tuple[Any, Any, bytes]] = []  # (method, properties, body)
        with blocking_connection(url) as connection:
            channel = connection.channel()
            channel.exchange_declare(exchange, exchange_type="topic", durable=True)
            channel.queue_declare(self.queue, durable=False, auto_delete=False)
            for key in routing_keys:
                channel.queue_bind(self.queue, exchange, routing_key=key)

    def _drain(self) -> int:
        got = 0
        with blocking_connection(self.url) as connection:
            channel = connection.channel()
            while True:
                method, props, body = channel.basic_get(self.queue, auto_ack=True)
                if method is None:
                    return got
                self.messages.append((method, props, body))
                got += 1

    async def wait_for(self, count: int, timeout: float = 30.0) -> list[tuple[Any, Any, bytes]]:
        """Waits until at least `count` messages were seen; returns all seen so far."""
        deadline = time.monotonic() + timeout
        while len(self.messages) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"tap saw {len(self.messages)} messages, expected {count}")
            if not await asyncio.to_thread(self._drain):
                await asyncio.sleep(0.05)
        return self.messages


def queue_depth(url: str, queue: str) -> int:
    with blocking_connection(url) as connection:
        return connection.channel().queue_declare(queue, passive=True).method.message_count


def consumers(url: str, queue: str) -> int | None:
    """Consumers attached to a queue, or None when it does not exist."""
    with blocking_connection(url) as connection:
        try:
            return connection.channel().queue_declare(queue, passive=True).method.consumer_count
        except pika.exceptions.ChannelClosedByBroker:
            return None


async def wait_for_consumer(url: str, queue: str, timeout: float = 30.0) -> None:
    """Waits until a consumer listens on the queue: its topology is declared and it takes deliveries."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(consumers, url, queue):
        if time.monotonic() > deadline:
            raise AssertionError(f"no consumer on {queue} after {timeout}s")
        await asyncio.sleep(0.1)
