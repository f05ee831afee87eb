"""Starts Tessera service processes for tests and stops exactly those processes, by PID."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(rb"listening on [^:]+:(\d+)")


class ServiceProcess:
    """One `tessera serve <service>` process on an ephemeral port."""

    def __init__(self, service: str, env: dict[str, str], log_path: Path, argv: list[str] | None = None) -> None:
        self.service = service
        self.argv = argv or [sys.executable, "-m", "tessera_runtime.cli", "serve", service]
        self.log_path = log_path
        # Tests never publish to the machine's default vhost: a test that wants events passes its own
        # TESSERA_AMQP_URL (a private vhost) or turns the relay on explicitly.
        quiet = {} if {"TESSERA_AMQP_URL", "TESSERA_OUTBOX_RELAY"} & env.keys() else {"TESSERA_OUTBOX_RELAY": "false"}
        self.env = {**os.environ, "TESSERA_GRPC_PORT": "0", "TESSERA_DRAIN_SECONDS": "0.2",
                    "TESSERA_READINESS_INTERVAL_SECONDS": "0.2", **quiet, **env}
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServiceProcess:
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv,
            env=self.env, stdout=subprocess.PIPE, stderr=self._log, cwd=ROOT,
        )
        assert self.proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        buffer = b""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.service} exited with {self.proc.returncode}; log: {self.log_text()[-3000:]}")
            if sel.select(timeout=0.2):
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                buffer += chunk
                match = _LISTENING.search(buffer)
                if match:
                    self.port = int(match.group(1))
                    return self
        self.kill()
        raise RuntimeError(f"{self.service} did not start in {timeout}s; log: {self.log_text()[-3000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.terminate(timeout=15)
        except subprocess.TimeoutExpired:
            self.kill()
