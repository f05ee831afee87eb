"""Debian's Prometheus and promtool for tests (unpacked by `make prometheus` into .venv/prometheus), and a real
Prometheus server on 127.0.0.1 with its own data folder, stopped by its PID."""

from __future__ import annotations

import abc
import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.processes import ROOT

BIN_DIR = ROOT / ".venv" / "prometheus" / "root" / "usr" / "bin"
RULES_TESTS = ROOT / "tests" / "integration" / "prometheus"


def binary(name: str) -> Path:
    """The path of `prometheus` or `promtool`; a test that needs one fails (never skips) without it."""
    path = BIN_DIR / name
    if not path.is_file():
        pytest.fail(f"{path} is missing: run `make prometheus` (make test does it first)")
    return path


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary("promtool")), *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess(abc.ABC):
    """A server binary on 127.0.0.1 (a free port) with its log in `folder`, ready once GET /-/ready answers 200,
    stopped by its PID. Subclasses give its `name` and its command line."""

    name = "server"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The command line, once `port` is chosen."""

    def start(self, timeout: float = 30.0):
        self.port = _free_port()
        argv = self.command()
        self._log = open(self.folder / f"{self.name}.log", "ab")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=self._log, cwd=self.folder)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} was not ready in {timeout}s: {self.log_text()[-3000:]}")

    def log_text(self) -> str:
        path = self.folder / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
        self.proc = None


class PrometheusServer(ServerProcess):
    """`prometheus` scraping the given jobs (name → metrics addresses) every `interval` and evaluating `rule_files`
    as often; a job scrapes /metrics unless `metrics_paths` names another path; listens on 127.0.0.1 on a free port;
    its data, config and log live in `folder`."""

    def __init__(self, folder: Path, jobs: dict[str, list[str]], rule_files: list[Path],
                 interval: str = "1s", metrics_paths: dict[str, str] | None = None) -> None:
        super().__init__(folder)
        paths = metrics_paths or {}
        self.config = {
            "global": {"scrape_interval": interval, "scrape_timeout": interval, "evaluation_interval": interval},
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [{"job_name": job, "metrics_path": paths.get(job, "/metrics"),
                                "static_configs": [{"targets": targets}]}
                               for job, targets in jobs.items()],
        }

    name = "prometheus"

    def command(self) -> list[str]:
        config = self.folder / "prometheus.yml"
        config.write_text(yaml.safe_dump(self.config, sort_keys=False))
        checked = promtool("check", "config", config)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        return [str(binary("prometheus")), f"--config.file={config}", f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"]

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}{query}", timeout=10) as reply:
            body = json.loads(reply.read())
        assert body["status"] == "success", body
        return body["data"]
