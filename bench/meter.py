"""Per-process CPU seconds and peak RSS over a measured interval, read with psutil."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Union

import psutil

MB = 1024 * 1024

Processes = Mapping[str, Union[psutil.Process, Sequence[psutil.Process]]]  # noqa: UP007 - a runtime alias


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


def rss_mb(proc: psutil.Process) -> float:
    return proc.memory_info().rss / MB


class Meter:
    """CPU seconds used by each labelled process (or group of processes: summed) between enter and exit, and its
    peak RSS sampled meanwhile (for a group, of its largest process: PostgreSQL backends share their buffers).

    `processes` may be a callable: it is asked again every `refresh` seconds, so that processes that start during
    the interval (a pool opening connections: new database backends) are counted from their start, and those that
    end are counted up to their last sample."""

    def __init__(self, processes: Processes | Callable[[], Processes], interval: float = 0.05,
                 refresh: float = 0.5) -> None:
        self.provider = processes if callable(processes) else (lambda: processes)
        self.interval = interval
        self.refresh = refresh
        self.cpu_s: dict[str, float] = {}
        self.rss_peak_mb: dict[str, float] = {}
        self.wall_s = 0.0  # from enter to exit: the time the CPU seconds were counted over
        self._tracked: dict[tuple[str, int], psutil.Process] = {}
        self._start: dict[tuple[str, int], float] = {}
        self._last: dict[tuple[str, int], float] = {}
        self._began = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _discover(self, at_start: bool) -> None:
        for label, procs in self.provider().items():
            for proc in [procs] if isinstance(procs, psutil.Process) else procs:
                key = (label, proc.pid)
                if key in self._tracked:
                    continue
                try:
                    now = cpu_seconds(proc)
                    born_during = not at_start and proc.create_time() >= self._began
                except psutil.Error:
                    continue
                self._tracked[key] = proc
                self._start[key] = 0.0 if born_during else now
                self._last[key] = now

    def _read(self) -> None:
        for key, proc in self._tracked.items():
            try:
                self._last[key] = cpu_seconds(proc)
                value = rss_mb(proc)
            except psutil.Error:
                continue
            if value > self.rss_peak_mb.get(key[0], 0.0):
                self.rss_peak_mb[key[0]] = value

    def _sample(self) -> None:
        next_refresh = time.monotonic() + self.refresh
        while not self._stop.wait(self.interval):
            if time.monotonic() >= next_refresh:
                self._discover(at_start=False)
                next_refresh = time.monotonic() + self.refresh
            self._read()

    def __enter__(self) -> Meter:
        self._began = time.time()
        self._entered = time.monotonic()
        self._discover(at_start=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        self.wall_s = time.monotonic() - self._entered
        for key, start in self._start.items():
            self.cpu_s[key[0]] = self.cpu_s.get(key[0], 0.0) + self._last[key] - start
