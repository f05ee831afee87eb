"""This machine's RabbitMQ for tests: a private vhost per test module, and a tap that records what is published;
and a private node of a test's own, for fault tests that stop, kill or block the broker.

A vhost is created with rabbitmqctl (and deleted with everything in it afterwards), so exchanges, queues and
messages of one test never meet another's, nor `make run`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.parse
import uuid
from collections.abc import Iterable
from pathlib import Path
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


_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
_CTL = "/usr/lib/rabbitmq/bin/rabbitmqctl"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class PrivateNode:
    """A RabbitMQ node of the test's own, on a free port, with its data in `directory`: a fault test may stop it,
    kill it or raise an alarm on it, never touching the machine's broker on 5672. Every rabbitmqctl call names
    this node. `start()` again after `stop()` or `kill()` brings the same node back with its durable queues."""

    def __init__(self, directory: Path, *, rabbit_settings: dict[str, int] | None = None) -> None:
        """`rabbit_settings`: values of the node's `rabbit` application (advanced.config), e.g.
        {"dead_letter_worker_publisher_confirm_timeout": 1000}."""
        self.directory = directory
        self.name = f"tessera-{uuid.uuid4().hex[:8]}@localhost"
        self.port = _free_port()
        self._dist_port = _free_port()
        self._process: subprocess.Popen[bytes] | None = None
        (directory / "home").mkdir(parents=True, exist_ok=True)
        (directory / "enabled_plugins").write_text("[].\n")
        (directory / "rabbitmq.conf").write_text(f"listeners.tcp.local = {HOST}:{self.port}\n")
        self._env = {
            **os.environ, "HOME": str(directory / "home"),  # its own Erlang cookie, for its own rabbitmqctl
            "RABBITMQ_NODENAME": self.name, "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self._dist_port), "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(directory / "log"), "RABBITMQ_PID_FILE": str(directory / "pid"),
            "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
        }
        if rabbit_settings:
            self.set_rabbit_settings(rabbit_settings)

    def set_rabbit_settings(self, rabbit_settings: dict[str, int]) -> None:
        """Writes the node's `rabbit` application values (advanced.config); they apply from its next start."""
        terms = ", ".join(f"{{{key}, {value}}}" for key, value in rabbit_settings.items())
        (self.directory / "advanced.config").write_text(f"[{{rabbit, [{terms}]}}].\n")
        self._env["RABBITMQ_ADVANCED_CONFIG_FILE"] = str(self.directory / "advanced.config")

    def ctl(self, *args: str) -> str:
        done = subprocess.run([_CTL, "-q", "-n", self.name, *args], check=True, capture_output=True, timeout=60,
                              env=self._env)
        return done.stdout.decode()

    def url(self, vhost: str = "/") -> str:
        return amqp_url(vhost, port=self.port)

    def start(self, timeout: float = 90.0) -> PrivateNode:
        with open(self.directory / "server.log", "ab") as log:
            self._process = subprocess.Popen([_SERVER], env=self._env, stdout=log, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.ctl("await_startup")
                return self
            except subprocess.CalledProcessError:
                if self._process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(
                        f"the private RabbitMQ node did not start; see {self.directory / 'server.log'}") from None
                time.sleep(0.5)

    def create_vhost(self) -> str:
        name = f"tessera-test-{uuid.uuid4().hex[:10]}"
        self.ctl("add_vhost", name)
        self.ctl("set_permissions", "-p", name, USER, ".*", ".*", ".*")
        return name

    def stop(self) -> None:
        """Stops the node gracefully (a broker restart)."""
        if self._process is None:
            return
        if self._process.poll() is None:
            with contextlib.suppress(subprocess.CalledProcessError, subprocess.TimeoutExpired):
                self.ctl("stop")
        self._wait_or_kill()

    def kill(self) -> None:
        """Kills the node's Erlang VM outright (a broker crash): what it had not written to disk is gone."""
        if self._process is None:
            return
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int((self.directory / "pid").read_text().strip()), signal.SIGKILL)
        self._wait_or_kill()

    def _wait_or_kill(self) -> None:
        assert self._process is not None
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait(timeout=10)
        self._process = None
        # The Erlang VM may outlive its start script for a moment: the node is down once its pid is gone.
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int((self.directory / "pid").read_text().strip())
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)
            (self.directory / "pid").unlink()

    def connection_pids(self, name: str) -> list[str]:
        """The broker's ids of the connections whose client named itself `name` (pika's connection_name)."""
        out = self.ctl("list_connections", "pid", "client_properties")
        return [line.split("\t", 1)[0] for line in out.splitlines() if f'"connection_name","{name}"' in line
                or f"<<\"connection_name\">>,longstr,<<\"{name}\">>" in line]
