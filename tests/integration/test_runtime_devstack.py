"""`make run` (tessera_runtime.devstack) supervising real processes: a component that dies stops the stack with a
non-zero exit naming it, and Ctrl-C during the startup wait stops everything at once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from tests.support.processes import ROOT
from tests.support.waiting import wait_for

# `make run`'s main with plain processes in place of the services: "steady" sleeps, "flaky"
# exits with code 3 a moment after it is ready, "slow" never becomes ready.
SCRIPT = textwrap.dedent("""
    import sys
    from tessera_runtime import devstack

    kind = sys.argv[1]

    def component(name, code, ready):
        return devstack.Component(name=name, argv=[sys.executable, "-c", code], env={}, ready=ready,
                                  describe=[name])

    def add_services(stack):
        sleeper = "import time; time.sleep(600)"
        stack.components.append(component("steady", sleeper, lambda: True))
        if kind == "crash":
            code = "import sys, time; time.sleep(1.5); sys.exit(3)"
            stack.components.append(component("flaky", code, lambda: True))
        else:
            stack.components.append(component("slow", sleeper, lambda: False))

    devstack.DevStack.add_services = add_services
    devstack.DevStack.add_extensions = lambda stack: None
    sys.exit(devstack.main())
""")


def start(kind: str, data: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", SCRIPT, kind], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "TESSERA_DATA_DIR": str(data)})


def children(proc: subprocess.Popen[str], count: int) -> list[int]:
    return wait_for(lambda: len(kids := psutil.Process(proc.pid).children()) == count and [k.pid for k in kids],
                    timeout=30, what=f"{count} components started")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def end(proc: subprocess.Popen[str], pids: list[int]) -> None:
    """Ends what this test started and is still running, by PID."""
    for pid in [proc.pid, *pids]:
        with contextlib.suppress(psutil.NoSuchProcess):
            if not gone(pid):
                psutil.Process(pid).kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=10)


def test_a_component_that_dies_stops_the_stack_with_a_non_zero_exit_naming_it(tmp_path):
    proc = start("crash", tmp_path)
    pids: list[int] = []
    try:
        pids = children(proc, 2)
        out, err = proc.communicate(timeout=60)
        assert "Ctrl-C stops everything" in out  # it had started
        assert proc.returncode == 1
        assert "flaky" in err and "exited with code 3" in err
        assert all(gone(pid) for pid in pids)
    finally:
        end(proc, pids)


def test_ctrl_c_during_the_startup_wait_stops_everything_promptly(tmp_path):
    proc = start("slow", tmp_path)
    pids: list[int] = []
    try:
        pids = children(proc, 2)
        time.sleep(1)  # well inside the 60 s startup wait
        asked = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert time.monotonic() - asked < 10
        assert "Tessera is running" not in out
        wait_for(lambda: all(gone(pid) for pid in pids), timeout=5, what="every component ended")
    finally:
        end(proc, pids)
