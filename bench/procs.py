"""Processes the benchmark starts (services, baselines, Envoy): started, watched and stopped by their own PIDs."""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
LISTENING = re.compile(rb"listening on [^\s:]+:(\d+)")


class ManagedProcess:
    """One long-running process started by the benchmark; `port` is read from its `listening on` line."""

    def __init__(self, label: str, argv: Sequence[str], env: dict[str, str], log_path: Path,
                 ready: re.Pattern[bytes] | None = LISTENING) -> None:
        self.label = label
        self.argv = list(argv)
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.ready = ready
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.metrics_urls: list[str] = []
        self._log = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0) -> ManagedProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, env=self.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=self._log)
        if self.ready is None:
            return self
        assert self.proc.stdout is not None
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + timeout
        seen = b""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.label} exited with {self.proc.returncode}: {self.log_tail()}")
            if selector.select(timeout=0.2):
                seen += os.read(self.proc.stdout.fileno(), 4096)
                match = self.ready.search(seen)
                if match:
                    self.port = int(match.group(1)) if match.groups() else 0
                    selector.close()
                    return self
        self.stop()
        raise RuntimeError(f"{self.label} did not start within {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, chars: int = 2000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""

    def processes(self) -> list[psutil.Process]:
        """The process and its children (worker processes of a multi-worker service)."""
        try:
            parent = psutil.Process(self.pid)
            return [parent, *parent.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc is None:
            return None
        children = [p.pid for p in self.processes()[1:]]
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        for pid in children:  # a supervisor forwards SIGTERM; anything left after it is ended here, by PID
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass
        if self._log is not None:
            self._log.close()
            self._log = None
        return code


def python_module(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]
