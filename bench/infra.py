"""What the benchmark stands on: throwaway PostgreSQL databases, tool installation, machine and versions."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import sys
import urllib.parse
import uuid

import asyncpg
import psutil

PG_ADMIN_DSN = os.environ.get("TESSERA_BENCH_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
AMQP_SERVER = os.environ.get("TESSERA_BENCH_AMQP_SERVER", "amqp://guest:guest@127.0.0.1:5672")


def _server_part() -> str:
    return PG_ADMIN_DSN.rsplit("/", 1)[0].replace("postgresql://", "")


class Databases:
    """Throwaway PostgreSQL databases for one benchmark run, all dropped by `drop_all`."""

    def __init__(self, prefix: str = "tessera_bench") -> None:
        self.prefix = prefix
        self.names: list[str] = []
        self.created: list[str] = []  # every database this run made, dropped or not

    def create(self, purpose: str) -> str:
        """Creates an empty database; returns its SQLAlchemy asyncpg URL."""
        name = f"{self.prefix}_{purpose}_{uuid.uuid4().hex[:8]}"
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
        self.names.append(name)
        self.created.append(name)
        return f"postgresql+asyncpg://{_server_part()}/{name}"

    def drop_all(self) -> None:
        for name in self.names:
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        self.names.clear()


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _fetch(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


class Vhost:
    """A private RabbitMQ vhost for one benchmark run (created with rabbitmqctl, deleted with all in it), so the
    events the services publish meet nobody else's queues."""

    def __init__(self, prefix: str = "tessera-bench") -> None:
        self.name = f"{prefix}-{uuid.uuid4().hex[:8]}"
        _rabbitmqctl("add_vhost", self.name)
        _rabbitmqctl("set_permissions", "-p", self.name, "guest", ".*", ".*", ".*")
        self.url = f"{AMQP_SERVER}/{urllib.parse.quote(self.name, safe='')}"

    def delete(self) -> None:
        _rabbitmqctl("delete_vhost", self.name)


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def plain_dsn(sqlalchemy_url: str) -> str:
    return sqlalchemy_url.replace("postgresql+asyncpg://", "postgresql://")


# The backends connected to a database ($1), not counting the asking one.
BACKENDS = "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()"


def backend_pids(sqlalchemy_url: str) -> list[int]:
    """PIDs of the PostgreSQL backends connected to this URL's database (not counting the asking one)."""
    rows = asyncio.run(_fetch(PG_ADMIN_DSN, BACKENDS, sqlalchemy_url.rsplit("/", 1)[1]))
    return [r["pid"] for r in rows]


def ensure_tools() -> list[str]:
    """Installs h2load (Debian nghttp2-client) and wrk when missing; returns what is still missing."""
    from bench.load import tools_missing

    missing = tools_missing()
    if missing and shutil.which("apt-get"):
        print(f"bench: installing {', '.join(missing)} (nghttp2-client, wrk)", flush=True)
        subprocess.run(["apt-get", "update", "-qq"], check=False, stdout=subprocess.DEVNULL)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nghttp2-client", "wrk"], check=False,
                       stdout=subprocess.DEVNULL)
        missing = tools_missing()
    return missing


def _first_line(argv: list[str]) -> str:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    text = (result.stdout or result.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def _package(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, str]:
    """The machine and the versions the numbers were measured with."""
    pg = asyncio.run(_fetch(PG_ADMIN_DSN, "SHOW server_version"))[0][0]
    rabbit = _first_line(["rabbitmqctl", "version"])
    envoy_path = shutil.which("envoy") or os.path.join(os.path.dirname(sys.executable), "envoy")
    envoy = _first_line([envoy_path, "--version"])
    envoy_match = re.search(r"/(\d+\.\d+\.\d+)/", envoy)
    wrk_version = _first_line(["wrk", "-v"])
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{_cpu_model()}, {psutil.cpu_count()} logical cores, "
                   f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM",
        "kernel": platform.release(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "grpcio": _package("grpcio"),
        "protobuf": _package("protobuf"),
        "SQLAlchemy": _package("SQLAlchemy"),
        "asyncpg": _package("asyncpg"),
        "psycopg2-binary": _package("psycopg2-binary"),
        "pika": _package("pika"),
        "PostgreSQL": pg,
        "RabbitMQ": rabbit,
        "Envoy": envoy_match.group(1) if envoy_match else envoy,
        "h2load": _first_line(["h2load", "--version"]),
        "wrk": wrk_version.split(" Copyright")[0],
    }
