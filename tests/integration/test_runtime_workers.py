"""TESSERA_WORKERS: N worker processes on one port, each serving and shutting down like a single process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys

import grpc
import psutil
import pytest
from tessera.user.v1 import user_pb2, user_service_pb2_grpc
from tessera.user.v1 import user_service_pb2 as svc

from tests.support import postgres
from tests.support.processes import ROOT, ServiceProcess
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import wait_for

# Separate channels to one target share a connection unless each has its own subchannel pool.
OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)


def workers_of(service: ServiceProcess) -> list[psutil.Process]:
    return psutil.Process(service.proc.pid).children()


def listening_pids(port: int, pids: list[int]) -> set[int]:
    return {pid for pid in pids for c in psutil.Process(pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def established(pid: int, port: int) -> int:
    return sum(1 for c in psutil.Process(pid).net_connections("tcp")
               if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == port)


def kill_leftovers(service: ServiceProcess, pids: list[int]) -> None:
    service.kill()
    for pid in pids:
        try:
            psutil.Process(pid).kill()
        except psutil.NoSuchProcess:
            pass


def new_user(i: int, tag: str) -> svc.CreateUserRequest:
    return svc.CreateUserRequest(user=user_pb2.User(email=f"{tag}{i}@example.com", display_name=f"W {i}"),
                                 request_id=f"{tag}-{i}")


@pytest.fixture
async def pg_via_proxy():
    name, url = await postgres.create_database()
    proxy = TcpProxy("127.0.0.1", 5432).start()
    yield url.replace("127.0.0.1:5432", f"127.0.0.1:{proxy.port}"), proxy
    proxy.close()
    await postgres.drop_database(name)


async def test_two_workers_share_one_port_and_both_serve(tmp_path):
    service = ServiceProcess("user", {"TESSERA_WORKERS": "2", "TESSERA_DATA_DIR": str(tmp_path)},
                             tmp_path / "user.log").start()
    pids: list[int] = []
    try:
        pids = [p.pid for p in workers_of(service)]
        assert len(pids) == 2
        assert listening_pids(service.port, pids) == set(pids)
        # The supervising parent holds the port but takes no connections.
        assert listening_pids(service.port, [service.proc.pid]) == set()

        channels = [grpc.aio.insecure_channel(service.address, options=OWN_CONNECTION) for _ in range(24)]
        try:
            stubs = [user_service_pb2_grpc.UserServiceStub(c) for c in channels]
            created = await asyncio.gather(*(s.CreateUser(new_user(i, "share"), timeout=20)
                                             for i, s in enumerate(stubs)))
            # The kernel spread the 24 connections over both workers (all on one: probability 2**-23).
            assert all(established(pid, service.port) >= 1 for pid in pids)
            # Both workers use one database: every user is readable through every connection.
            for i, stub in enumerate(stubs):
                got = await stub.GetUser(svc.GetUserRequest(id=created[-1 - i].user.id), timeout=10)
                assert got.user.email == f"share{len(stubs) - 1 - i}@example.com"
        finally:
            for c in channels:
                await c.close()
    finally:
        code = service.terminate()
        kill_leftovers(service, pids)
    assert code == 0


@pytest.mark.parametrize("stop_signal", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_sigterm_or_sigint_lets_every_worker_finish_its_calls_then_exits_zero(pg_via_proxy, tmp_path,
                                                                                   stop_signal):
    """The parent forwards the signal it got (a terminal's Ctrl-C is SIGINT) to every worker, which drains."""
    url, proxy = pg_via_proxy
    service = ServiceProcess("user", {"TESSERA_WORKERS": "2", "TESSERA_DATABASE_URL": url,
                                      "TESSERA_DRAIN_SECONDS": "0.5", "TESSERA_GRACE_SECONDS": "20"},
                             tmp_path / "user.log").start()
    pids = [p.pid for p in workers_of(service)]
    try:
        channels = [grpc.aio.insecure_channel(service.address, options=OWN_CONNECTION) for _ in range(16)]
        try:
            stubs = [user_service_pb2_grpc.UserServiceStub(c) for c in channels]
            await asyncio.gather(*(s.CreateUser(new_user(i, "warm"), timeout=20) for i, s in enumerate(stubs)))
            assert all(established(pid, service.port) >= 1 for pid in pids)
            proxy.delay = 0.25  # every database round trip now takes a while: calls stay in flight on both
            calls = [asyncio.ensure_future(s.CreateUser(new_user(i, "flight"), timeout=30))
                     for i, s in enumerate(stubs)]
            await asyncio.sleep(0.3)
            service.proc.send_signal(stop_signal)
            replies = await asyncio.gather(*calls)
            assert len({r.user.id for r in replies}) == len(stubs)
            proxy.delay = 0
        finally:
            for c in channels:
                await c.close()
        assert await asyncio.to_thread(service.proc.wait, 60) == 0
        assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
                       for pid in pids)
        log = service.log_text()
        assert log.count('"message": "draining"') == 2 and log.count('"message": "stopped"') == 2
        assert "Traceback" not in log  # SIGINT is a stop, not a KeyboardInterrupt
    finally:
        kill_leftovers(service, pids)


def test_sigterm_while_the_workers_start_stops_everything_without_announcing(pg_via_proxy, tmp_path):
    url, proxy = pg_via_proxy
    proxy.delay = 0.5  # migrations crawl: the stop arrives while the first worker is still starting
    env = {**os.environ, "TESSERA_WORKERS": "2", "TESSERA_GRPC_PORT": "0", "TESSERA_DATABASE_URL": url}
    with open(tmp_path / "user.log", "wb") as log:
        parent = subprocess.Popen([sys.executable, "-m", "tessera_runtime.cli", "serve", "user"], cwd=ROOT,
                                  env=env, stdout=subprocess.PIPE, stderr=log)
    pids: list[int] = []
    try:
        wait_for(lambda: len(psutil.Process(parent.pid).children()) == 1)
        pids = [p.pid for p in psutil.Process(parent.pid).children()]
        parent.send_signal(signal.SIGTERM)
        out, _ = parent.communicate(timeout=60)
        # The worker was killed by the stop it was forwarded, as a single process still starting would be.
        assert parent.returncode == 128 + signal.SIGTERM
        assert b"listening on" not in out
        assert all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                   for pid in pids)
    finally:
        proxy.delay = 0
        if parent.poll() is None:
            parent.kill()
        for pid in pids:
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()


def test_a_worker_that_dies_stops_the_service_with_its_code(tmp_path):
    service = ServiceProcess("user", {"TESSERA_WORKERS": "2", "TESSERA_DATA_DIR": str(tmp_path)},
                             tmp_path / "user.log").start()
    pids = [p.pid for p in workers_of(service)]
    try:
        psutil.Process(pids[0]).kill()
        assert service.proc.wait(timeout=60) == 128 + signal.SIGKILL
        survivor = pids[1]
        wait_for(lambda: not psutil.pid_exists(survivor)
                 or psutil.Process(survivor).status() == psutil.STATUS_ZOMBIE)
        assert "a worker exited on its own" in service.log_text()
    finally:
        kill_leftovers(service, pids)


def test_a_worker_that_cannot_start_fails_the_service_without_announcing(tmp_path):
    env = {"TESSERA_WORKERS": "2", "TESSERA_GRPC_PORT": "0",
           "TESSERA_DATABASE_URL": "postgresql+asyncpg://postgres@127.0.0.1:1/unreachable"}
    result = subprocess.run([sys.executable, "-m", "tessera_runtime.cli", "serve", "user"], cwd=ROOT,
                            env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "listening on" not in result.stdout
    assert "a worker exited while starting" in result.stderr


def test_workers_outside_their_range_stop_the_service_naming_the_variable():
    result = subprocess.run([sys.executable, "-m", "tessera_runtime.cli", "serve", "user"], cwd=ROOT,
                            env={"PATH": "/usr/bin:/bin", "TESSERA_WORKERS": "0"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "TESSERA_WORKERS" in result.stderr


def test_workers_of_a_parent_killed_outright_stop_and_free_the_port(tmp_path):
    service = ServiceProcess("user", {"TESSERA_WORKERS": "2", "TESSERA_DATA_DIR": str(tmp_path)},
                             tmp_path / "user.log").start()
    pids = [p.pid for p in workers_of(service)]
    try:
        assert len(pids) == 2
        service.proc.send_signal(signal.SIGKILL)  # the supervisor gets no chance to stop them
        service.proc.wait(timeout=10)
        wait_for(lambda: all(not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
                             for pid in pids), timeout=30, what="both workers ended")
        with socket.socket() as probe:  # nothing serves the port any more
            assert probe.connect_ex(("127.0.0.1", service.port)) != 0
    finally:
        kill_leftovers(service, pids)


def test_a_worker_whose_parent_is_already_gone_stops_at_once(tmp_path):
    """The parent died before the worker asked to die with it: the worker sees it is no longer its parent's."""
    env = {**os.environ, "TESSERA_WORKERS": "1", "TESSERA_GRPC_PORT": "0", "TESSERA_DATA_DIR": str(tmp_path),
           "TESSERA_OUTBOX_RELAY": "false", "TESSERA_SUPERVISOR_PID": "1"}  # not this worker's parent
    result = subprocess.run([sys.executable, "-m", "tessera_runtime.cli", "serve", "user"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 128 + signal.SIGTERM
    assert "listening on" not in result.stdout
    assert "the supervising process is gone" in result.stderr
