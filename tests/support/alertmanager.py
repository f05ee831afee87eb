"""Debian's Alertmanager and amtool for tests (unpacked by `make prometheus` into .venv/prometheus), a real
Alertmanager on 127.0.0.1 with its own storage folder and no cluster listener, stopped by its PID, and a webhook
receiver that records what Alertmanager delivers."""

from __future__ import annotations

import copy
import json
import subprocess
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import yaml

from tessera_deploy import alertmanager
from tests.support.processes import ROOT
from tests.support.prometheus import ServerProcess, binary

# Debian names the server prometheus-alertmanager; amtool keeps its name.
SERVER = "prometheus-alertmanager"
# Debian's Alertmanager reads its default notification templates from /usr/share/prometheus/alertmanager, a path
# compiled into it, and exits without them. The package is unpacked into the venv, not installed, so the server
# runs in a private mount namespace (unshare, as root) in which the unpacked package's usr/share is overlaid on the
# system's: it finds its templates there, and nothing is written outside the venv. The shell execs the server, so
# the PID Popen holds is the server's.
_OVERLAY_SHARE = 'mount -t overlay tessera-alertmanager -o "lowerdir=$1:/usr/share" /usr/share && shift && exec "$@"'


def amtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(binary("amtool")), *map(str, args)], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)


def config_for_tests(webhook_url: str, group_wait: str = "1s", group_interval: str = "1s") -> dict[str, Any]:
    """The shipped k8s/monitoring/alertmanager.yml with two test-only changes, and nothing else: each receiver gets a
    webhook to `webhook_url`/<receiver> (the shipped receivers have no integration), and the root route's
    group_wait and group_interval (inherited by every route) are shortened from 30s and 5m, so that a test sees a
    group's first notification, and the next one after an alert joins it, in seconds. Routes, receivers' names,
    group_by, repeat intervals and inhibit rules are as shipped."""
    config = copy.deepcopy(alertmanager.load())
    config["route"].update(group_wait=group_wait, group_interval=group_interval)
    for receiver in config["receivers"]:
        receiver["webhook_configs"] = [{"url": f"{webhook_url}/{receiver['name']}", "send_resolved": True}]
    return config


class WebhookSink:
    """An HTTP server on 127.0.0.1 (port 0) that records each webhook notification: (path, JSON body)."""

    def __init__(self) -> None:
        received: list[tuple[str, dict[str, Any]]] = []
        lock = threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                with lock:
                    received.append((self.path, body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self._received = received
        self._lock = lock
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def start(self) -> WebhookSink:
        self._thread.start()
        return self

    def received(self) -> list[tuple[str, dict[str, Any]]]:
        with self._lock:
            return list(self._received)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(timeout=10)


class AlertmanagerServer(ServerProcess):
    """`prometheus-alertmanager` with `config`, its API on 127.0.0.1 on a free port, clustering off (an empty
    --cluster.listen-address), its storage, config and log in `folder`."""

    name = "alertmanager"

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        super().__init__(folder)
        self.config = config

    def command(self) -> list[str]:
        path = self.folder / "alertmanager.yml"
        path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        checked = amtool("check-config", path)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        server = binary(SERVER)
        share = server.parent.parent / "share"
        return ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", _OVERLAY_SHARE, "sh", str(share),
                str(server), f"--config.file={path}", f"--storage.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address=", "--log.level=warn"]

    def post_alerts(self, alerts: list[dict[str, Any]]) -> None:
        """POST /api/v2/alerts, as Prometheus sends firing alerts."""
        request = urllib.request.Request(f"{self.url}/api/v2/alerts", data=json.dumps(alerts).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=10) as reply:
            assert reply.status == 200, reply.status

    def alerts(self) -> list[dict[str, Any]]:
        """GET /api/v2/alerts: every alert Alertmanager holds, with its status (state, inhibitedBy)."""
        with urllib.request.urlopen(f"{self.url}/api/v2/alerts", timeout=10) as reply:
            return json.loads(reply.read())
