"""N worker processes of one service on one port (SO_REUSEPORT), started and supervised by a parent process.

A Python process serves gRPC on little more than one core, so `TESSERA_WORKERS=N` runs N copies of the service,
each a complete single-process server (its own event loop, pool, readiness, graceful shutdown), bound to the
same port with SO_REUSEPORT so that the kernel spreads new connections across them. The parent serves nothing:

- it reserves the port first (a bound, non-listening SO_REUSEPORT socket), so port 0 gives all workers one port;
- it starts worker 1 alone and waits for it to serve, so migrations run once, then starts the others;
- it prints the usual `listening on` line once every worker serves;
- it forwards SIGTERM and SIGINT to every worker, each of which drains and stops as a single process does, and
  exits 0 when all of them exited 0;
- when a worker dies on its own, it stops the others and exits with that worker's code, so that the orchestrator
  (Kubernetes, `make run`) restarts the whole service rather than leaving it serving on fewer workers unseen.

With a metrics port set, worker i (from 0) serves its metrics on that port + i.

On Linux each worker also dies with the parent: should the parent be killed outright (SIGKILL, the OOM killer), the
kernel sends every worker SIGTERM (PR_SET_PDEATHSIG), and each stops as on any SIGTERM, releasing the port, instead of
serving on unsupervised.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from types import FrameType

from tessera_runtime.config import ServiceSettings

log = logging.getLogger("tessera.workers")

_LISTENING = re.compile(rb"listening on \S+:(\d+)")
_POLL_SECONDS = 0.1
# Set by the parent in each worker's environment: the pid of the parent the worker must not outlive.
SUPERVISOR_PID = "TESSERA_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1


def _failure_code(returncode: int) -> int:
    """The exit code for a worker that ended unasked: its own, 128 + signal if killed, never 0."""
    if returncode < 0:
        return 128 - returncode
    return returncode or 1


def die_with_supervisor(environ: dict[str, str] | os._Environ[str] = os.environ) -> None:
    """In a worker (SUPERVISOR_PID set; Linux only): asks the kernel for SIGTERM when the parent dies, then checks
    that the parent is still the one that started this worker, since it may have died before the request was made;
    if it did, the worker stops right away."""
    supervisor = environ.get(SUPERVISOR_PID)
    if not supervisor or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
        log.warning("cannot ask to be stopped with the supervising process",
                    extra={"errno": ctypes.get_errno()})
        return
    if os.getppid() != int(supervisor):
        log.error("the supervising process is gone; stopping", extra={"supervisor_pid": int(supervisor)})
        raise SystemExit(128 + signal.SIGTERM)


def reserve_port(host: str, port: int) -> socket.socket:
    """Binds host:port with SO_REUSEPORT without listening: it holds the port for the workers and takes no
    connections itself (the kernel only spreads connections over listening sockets)."""
    family, kind, proto, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


class Supervisor:
    """Starts the workers of one service, forwards stop signals to them and waits for them."""

    def __init__(self, service: str, settings: ServiceSettings) -> None:
        self.service = service
        self.settings = settings
        self.workers: list[subprocess.Popen[bytes]] = []
        self.stopping = False

    def _spawn(self, index: int, port: int) -> subprocess.Popen[bytes]:
        env = {**os.environ, "TESSERA_WORKERS": "1", "TESSERA_GRPC_PORT": str(port), SUPERVISOR_PID: str(os.getpid())}
        if self.settings.metrics_port:
            env["TESSERA_METRICS_PORT"] = str(self.settings.metrics_port + index)
        # A fresh interpreter per worker (not fork): gRPC's core must not be shared across a fork.
        worker = subprocess.Popen([sys.executable, "-m", "tessera_runtime.cli", "serve", self.service],
                                  env=env, stdout=subprocess.PIPE)
        self.workers.append(worker)
        if self.stopping:  # a stop signal came while this worker was being started
            worker.send_signal(signal.SIGTERM)
        return worker

    def _wait_until_serving(self, workers: list[subprocess.Popen[bytes]]) -> int | None:
        """Waits for each worker's `listening on` line; returns the exit code of one that died first."""
        selector = selectors.DefaultSelector()
        buffers: dict[int, bytes] = {}
        for worker in workers:
            assert worker.stdout is not None
            selector.register(worker.stdout, selectors.EVENT_READ, worker)
            buffers[worker.pid] = b""
        waiting = set(buffers)
        while waiting:
            if self.stopping:
                return 0
            for worker in workers:
                if worker.pid in waiting and worker.poll() is not None:
                    return _failure_code(worker.returncode)
            for key, _ in selector.select(timeout=_POLL_SECONDS):
                worker = key.data
                chunk = os.read(key.fd, 4096)
                buffers[worker.pid] += chunk
                if _LISTENING.search(buffers[worker.pid]):
                    waiting.discard(worker.pid)
                    selector.unregister(key.fileobj)
        selector.close()
        return None

    def _forward(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signum)

    def _stop_all(self) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)

    def run(self) -> int:
        count = self.settings.workers
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._forward)
        holder = reserve_port(self.settings.grpc_host, self.settings.grpc_port)
        port = holder.getsockname()[1]
        try:
            failed = self._wait_until_serving([self._spawn(0, port)])
            if failed is None:
                failed = self._wait_until_serving([self._spawn(i, port) for i in range(1, count)])
            if failed is not None and not self.stopping:
                log.error("a worker exited while starting", extra={"exit_code": failed})
                self._stop_all()
                self._wait_all()
                return failed
            if not self.stopping:
                log.info("workers serving", extra={"workers": count, "pids": [w.pid for w in self.workers]})
                print(f"tessera-{self.service} listening on {self.settings.grpc_host}:{port}", flush=True)
            return self._supervise()
        finally:
            holder.close()

    def _supervise(self) -> int:
        while not self.stopping:
            for worker in self.workers:
                if worker.poll() is not None:
                    log.error("a worker exited on its own; stopping the others",
                              extra={"pid": worker.pid, "exit_code": worker.returncode})
                    self._stop_all()
                    self._wait_all()
                    return _failure_code(worker.returncode)
            time.sleep(_POLL_SECONDS)
        codes = self._wait_all()
        log.info("workers stopped", extra={"exit_codes": codes})
        # A worker still starting when the stop came ends as a single process would: killed by the signal.
        return next((128 - code if code < 0 else code for code in codes if code != 0), 0)

    def _wait_all(self) -> list[int]:
        # Each worker bounds its own shutdown by its drain and grace periods; this only waits for them.
        return [worker.wait() for worker in self.workers]


def supervise(service: str, settings: ServiceSettings) -> int:
    return Supervisor(service, settings).run()
