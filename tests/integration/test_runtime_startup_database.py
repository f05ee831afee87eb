"""A service started while its database cannot be used: one JSON error line naming the database (never its
password), exit status 3, nothing else on stderr, and nothing announced."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid

import pytest

from tessera_runtime.app import EXIT_DATABASE_UNAVAILABLE
from tests.support.processes import ROOT

PASSWORD = "pa55-" + uuid.uuid4().hex[:8]


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(database_url: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tessera_runtime.cli", "serve", "user"], cwd=ROOT, timeout=120,
                          capture_output=True, text=True,
                          env={**os.environ, "TESSERA_GRPC_PORT": "0", "TESSERA_OUTBOX_RELAY": "false",
                               "TESSERA_DATABASE_URL": database_url, **env})


@pytest.mark.parametrize("where", ["nothing listens", "no such database"])
def test_an_unusable_database_at_start_is_one_json_error_naming_it_and_exit_3(where):
    if where == "nothing listens":
        location = f"127.0.0.1:{closed_port()}/tessera_user"
    else:
        location = f"127.0.0.1:5432/tessera_missing_{uuid.uuid4().hex[:8]}"
    result = serve(f"postgresql+asyncpg://postgres:{PASSWORD}@{location}")

    assert result.returncode == EXIT_DATABASE_UNAVAILABLE == 3
    assert "listening on" not in result.stdout
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON: no traceback
    [error] = [line for line in lines if line["level"] == "ERROR"]
    assert error["database"] == location and error["exit_code"] == 3
    assert "database" in error["message"]
    assert PASSWORD not in result.stderr + result.stdout


def test_with_workers_the_service_exits_with_the_same_status():
    result = serve(f"postgresql+asyncpg://postgres:{PASSWORD}@127.0.0.1:{closed_port()}/tessera_user",
                   TESSERA_WORKERS="2")

    assert result.returncode == 3
    assert "listening on" not in result.stdout and "Traceback" not in result.stderr
    assert PASSWORD not in result.stderr
