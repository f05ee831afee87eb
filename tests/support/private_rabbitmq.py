"""A RabbitMQ node of a test's own, for faults that would hurt everyone on the shared broker: killed outright
(SIGKILL, as a crash or a power cut) and started again on the same data.

The node has its own name, ports, data directory and Erlang cookie (HOME), and registers with the machine's
epmd. Only this node's process group, started here, is ever signalled. Its dead-letter worker sends unconfirmed
at-least-once dead letters again after `dead_letter_confirm_timeout_ms` (RabbitMQ's default is three minutes).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pika
import pika.exceptions

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateBroker:
    def __init__(self, directory: Path, *, dead_letter_confirm_timeout_ms: int = 1000) -> None:
        self.directory = directory
        self.node = f"tessera-test-{uuid.uuid4().hex[:8]}@localhost"
        self.port = _free_port()
        self.dist_port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "rabbitmq.conf").write_text("loopback_users = none\n")
        (directory / "advanced.config").write_text(
            f"[{{rabbit, [{{dead_letter_worker_publisher_confirm_timeout, {dead_letter_confirm_timeout_ms}}}]}}].\n")
        (directory / "enabled_plugins").write_text("[].\n")
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(directory), "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": self.node, "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port), "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(directory / "mnesia"), "RABBITMQ_LOG_BASE": str(directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(directory / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(directory / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(directory / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": "/dev/null", "RABBITMQ_LOGS": "-", "ERL_EPMD_ADDRESS": "127.0.0.1",
        }

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/%2F"

    def start(self, timeout: float = 90.0) -> PrivateBroker:
        log = open(self.directory / "node.log", "ab")
        # A session (and process group) of its own: the node's processes are signalled as one, and only they.
        self.proc = subprocess.Popen([SERVER], env=self.env, cwd=self.directory, stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the private broker exited with {self.proc.returncode}: {self.log()[-2000:]}")
            try:
                pika.BlockingConnection(pika.URLParameters(self.url + "?connection_attempts=1")).close()
                return self
            except pika.exceptions.AMQPConnectionError:
                time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"the private broker did not start in {timeout}s: {self.log()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL to the node's process group: nothing is flushed, as in a crash."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)
        time.sleep(0.5)  # the Erlang VM's helper processes go with it

    def log(self) -> str:
        path = self.directory / "node.log"
        return path.read_text(errors="replace") if path.exists() else ""
