"""Service discovery with real `tessera serve` processes in a directory registry: what an operator sees when an
instance is killed without a graceful stop and started again on its port, as `tessera registry list` prints it and
as a caller's discovery balances it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tessera_runtime.discovery import FileRegistry
from tests.support.processes import ROOT, ServiceProcess

pytestmark = pytest.mark.integration


def _registered(registry: Path, pid: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not any(i.metadata.get("pid") == str(pid) for i in FileRegistry(registry).instances_now("inventory")):
        assert time.monotonic() < deadline, f"process {pid} did not register"
        time.sleep(0.05)


def test_an_instance_restarted_on_its_port_after_a_crash_replaces_the_crashed_ones_registration(tmp_path):
    registry = tmp_path / "registry"
    env = {"TESSERA_DATA_DIR": str(tmp_path), "TESSERA_REGISTRY_DIR": str(registry), "TESSERA_INSTANCE_WEIGHT": "1"}
    crashed = ServiceProcess("inventory", env, tmp_path / "crashed.log").start()
    restarted = None
    try:
        assert crashed.proc is not None
        _registered(registry, crashed.proc.pid)
        crashed.kill()  # SIGKILL: no graceful stop, its registration stays behind
        restarted = ServiceProcess("inventory", {**env, "TESSERA_GRPC_PORT": str(crashed.port),
                                                 "TESSERA_INSTANCE_WEIGHT": "3"}, tmp_path / "restarted.log").start()
        assert restarted.proc is not None
        _registered(registry, restarted.proc.pid)

        instances = FileRegistry(registry).instances_now("inventory")
        assert [(i.address, i.weight, i.metadata["pid"]) for i in instances] == [
            (restarted.address, 3, str(restarted.proc.pid))]
        listed = subprocess.run([sys.executable, "-m", "tessera_runtime.cli", "registry", "list", "--dir",
                                 str(registry)], capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert listed.returncode == 0, listed.stderr
        rows = [line.split() for line in listed.stdout.splitlines()[1:]]
        assert [row[:4] for row in rows] == [["inventory", restarted.address, "3", "SERVING"]], listed.stdout
    finally:
        crashed.kill()
        if restarted is not None:
            restarted.stop()
