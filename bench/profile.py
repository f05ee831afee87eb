"""py-spy profiles of a server under load, summarised as where its Python time goes."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

PY_SPY = str(Path(sys.executable).parent / "py-spy")
TOP = 12


def _frame_name(frame: str) -> str:
    """'handle (tessera_runtime/interceptors.py:97)' -> 'handle (tessera_runtime/interceptors.py)'."""
    if frame.startswith("process ") and "(" not in frame.split(":", 1)[0]:
        return "process root (native code: no Python frame)"
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({where})" if where else name


def _area(frame: str) -> str:
    """Groups a frame by the code it belongs to: a Tessera package, a library, or the standard library."""
    _, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    if path.startswith("tessera_") or path.startswith("tessera/"):
        return path.split("/")[0]
    if "/" not in path:
        return "python stdlib"
    head = path.split("/")[0]
    return head if head else "other"


def summarise(collapsed: str) -> list[str]:
    """Top functions by own time and the share of time per area (Tessera package / library / stdlib)."""
    leaf: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    area: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        n = int(count)
        total += n
        leaf[_frame_name(frames[-1])] += n
        area[_area(frames[-1])] += n
        for name in {_frame_name(f) for f in frames}:
            inclusive[name] += n
    if not total:
        return ["py-spy collected no samples"]
    lines = [f"{total} samples; own time by area: " +
             ", ".join(f"{name} {100 * n / total:.0f}%" for name, n in area.most_common(8))]
    lines.append("own time (the function itself):")
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in leaf.most_common(TOP)]
    # Frames present in most samples are the event loop and the server's entry points: they say nothing.
    lines.append("inclusive time (the function and what it calls), below the event loop:")
    below_loop = [(name, n) for name, n in inclusive.most_common() if not _entry_frame(name)]
    lines += [f"{100 * n / total:5.1f}%  {name}" for name, n in below_loop[:TOP]]
    return lines


# Frames every sample passes through on its way to real work: the interpreter, the event loop, the CLI.
_ENTRY_FILES = ("<frozen runpy>", "asyncio/base_events.py", "asyncio/runners.py", "asyncio/events.py",
                "tessera_runtime/cli.py", "tessera_runtime/app.py", "threading.py")


def _entry_frame(name: str) -> bool:
    return name.startswith("process ") or any(f"({path})" in name for path in _ENTRY_FILES)


def record(pid: int, run_load: Callable[[], object], output: Path, seconds: float) -> list[str]:
    """Samples `pid` (and its subprocesses) with py-spy while `run_load` runs; returns the summary."""
    argv = [PY_SPY, "record", "--pid", str(pid), "--duration", f"{max(1, round(seconds))}", "--rate", "200",
            "--format", "raw", "--output", str(output), "--nonblocking", "--subprocesses"]
    spy = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        run_load()
    finally:
        try:
            _, err = spy.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            spy.kill()
            _, err = spy.communicate()
    if not output.exists():
        return [f"py-spy produced no profile: {err.decode(errors='replace').strip()[-300:]}"]
    return summarise(output.read_text())
