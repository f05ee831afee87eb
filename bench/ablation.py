"""`python -m bench.ablation`: where GetUser's CPU goes, from variants of the user service run side by side.

Four servers answer the same GetUser, each a process of its own, loaded in turn by the same h2load load (the
benchmark's scenario 1), alternating over the rounds:

- memory, bare: the user service's servicer, handler and mapping, its user kept in memory, on a plain grpc.aio
  server;
- memory, per-RPC stack: the same behind the interceptors every Tessera server has (OpenTelemetry's server span,
  ids, identity, deadline, the log line, RED metrics);
- postgresql, bare: the servicer reading its user from PostgreSQL through its unit of work, on a plain server;
- postgresql, per-RPC stack: the user service as it runs, TesseraServer with the PostgreSQL read.

It prints each variant's requests/s and CPU ms per request (the server process alone; its PostgreSQL backends are
printed apart). The differences between rows are the cost of the per-RPC stack and of the read. bench/FINDINGS.md
quotes them. Everything runs on 127.0.0.1 and stops by itself (about 20 s per round)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import tempfile
from pathlib import Path

import grpc

from bench.infra import Databases
from bench.load import Budget, h2load
from bench.meter import Meter
from bench.procs import ManagedProcess, python_module
from bench.scenarios.common import GET_USER, GRPC_HEADERS, get_user_body, postgres_of

VARIANTS = {
    "memory-bare": "memory, bare",
    "memory-stack": "memory, per-RPC stack",
    "postgresql-bare": "postgresql, bare",
    "postgresql-stack": "postgresql, per-RPC stack",
}


async def _serve(variant: str, user_id: str) -> None:
    from tessera.user.v1 import user_service_pb2, user_service_pb2_grpc

    from tessera_runtime import logs, telemetry
    from tessera_runtime.db import Database, utcnow
    from tessera_runtime.server import ServiceModule, TesseraServer
    from tessera_user import DOMAIN
    from tessera_user.domain.model import Preferences, Profile, User, UserStatus
    from tessera_user.entrypoints.grpc_servicer import UserServicer
    from tessera_user.service_layer.unit_of_work import FakeUserUnitOfWork, UserUnitOfWork

    logs.setup_logging("user", "INFO")  # as the service does: the log line is one of the per-RPC features
    telemetry.setup_telemetry("user")
    db: Database | None = None
    if variant.startswith("memory"):
        fake = FakeUserUnitOfWork()
        now = utcnow()
        fake.users.users[user_id] = User(id=user_id, email="ablation@example.com", display_name="Ablation",
                                         status=UserStatus.ACTIVE, profile=Profile(), preferences=Preferences(),
                                         create_time=now, update_time=now)
        servicer = UserServicer(fake.factory)
    else:
        db = Database(os.environ["TESSERA_DATABASE_URL"])
        servicer = UserServicer(lambda: UserUnitOfWork(db))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if variant.endswith("stack"):
        name = user_service_pb2.DESCRIPTOR.services_by_name["UserService"].full_name
        module = ServiceModule(service_names=(name,), domain=DOMAIN,
                               register=lambda s: user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, s))
        server = TesseraServer(module, readiness_interval=3600)
        port = await server.start()
        print(f"{variant} listening on 127.0.0.1:{port}", flush=True)
        await stop.wait()
        await server.stop()
    else:
        bare = grpc.aio.server(options=(("grpc.so_reuseport", 1),))
        user_service_pb2_grpc.add_UserServiceServicer_to_server(servicer, bare)
        port = bare.add_insecure_port("127.0.0.1:0")
        await bare.start()
        print(f"{variant} listening on 127.0.0.1:{port}", flush=True)
        await stop.wait()
        await bare.stop(1)
    if db is not None:
        await db.dispose()


def _seed(database_url: str) -> str:
    """The user service's schema and one user, created by its own handler; returns the user's id."""
    from tessera_runtime.db import Database
    from tessera_runtime.migrations import upgrade_async
    from tessera_user import bootstrap
    from tessera_user.domain.model import Preferences, Profile
    from tessera_user.service_layer import commands, handlers
    from tessera_user.service_layer.unit_of_work import UserUnitOfWork

    async def seed() -> str:
        await upgrade_async(bootstrap.MIGRATIONS, database_url)
        db = Database(database_url)
        try:
            user = await handlers.create_user(commands.CreateUser(
                email="ablation@example.com", display_name="Ablation", profile=Profile(), preferences=Preferences(),
                request_id="ablation"), UserUnitOfWork(db))
        finally:
            await db.dispose()
        return user.id

    return asyncio.run(seed())


def measure(rounds: int, seconds: float, clients: int, streams: int,
            requests: int = 0) -> list[tuple[str, float, float, float]]:
    """Runs every variant for `rounds` rounds; returns (variant, requests/s, CPU ms per request of the server,
    CPU ms per request of its PostgreSQL backends), each summed over the rounds."""
    dbs = Databases("tessera_ablation")
    servers: dict[str, ManagedProcess] = {}
    # requests and seconds measured; server and backend CPU seconds, and the requests they served (warm-up too)
    totals: dict[str, list[float]] = {v: [0, 0.0, 0.0, 0.0, 0] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="tessera-ablation-") as logs:
        try:
            url = dbs.create("user")
            user_id = _seed(url)
            for variant in VARIANTS:
                # The PostgreSQL variants' address goes where the services take theirs, so that postgres_of meters
                # their backends as the benchmark does.
                env = {"TESSERA_DATABASE_URL": url} if variant.startswith("postgresql") else {}
                servers[variant] = ManagedProcess(
                    variant, python_module("bench.ablation", "--serve", variant, "--user-id", user_id), env,
                    Path(logs) / f"{variant}.log").start()
            body = get_user_body(user_id)
            budget = Budget(seconds=seconds, warmup=1.0, requests=requests)
            warm = Budget(seconds=1.0, warmup=0.5, requests=requests)
            for server in servers.values():  # warm every variant once, unmeasured
                h2load(f"http://{server.address}{GET_USER}", budget=warm, clients=clients, streams=streams,
                       body=body, headers=GRPC_HEADERS)
            for _ in range(rounds):
                for variant, server in servers.items():
                    with Meter(lambda s=server: {"server": s.processes(), **postgres_of(s)}) as meter:
                        result = h2load(f"http://{server.address}{GET_USER}", budget=budget, clients=clients,
                                        streams=streams, body=body, headers=GRPC_HEADERS)
                    if result.errors:
                        raise RuntimeError(f"{variant}: {result.errors} requests failed: {server.log_tail()}")
                    if variant.startswith("postgresql") and "postgres" not in meter.cpu_s:
                        raise RuntimeError(f"{variant} has no PostgreSQL connection: it did not read the database")
                    total = totals[variant]
                    total[0] += result.requests
                    total[1] += result.seconds
                    # The CPU counts the warm-up too, so it is divided by every request completed, warm-up included.
                    total[2] += meter.cpu_s.get("server", 0.0)
                    total[3] += meter.cpu_s.get("postgres", 0.0)
                    total[4] += result.completed
        finally:
            for server in servers.values():
                server.stop()
            dbs.drop_all()
    return [(VARIANTS[v], t[0] / t[1], t[2] / t[4] * 1000, t[3] / t[4] * 1000) for v, t in totals.items()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--requests", type=int, default=0,
                        help="send this many requests per segment instead of running for --seconds (smoke runs)")
    parser.add_argument("--serve", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--user-id", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        asyncio.run(_serve(args.serve, args.user_id))
        return 0
    rows = measure(args.rounds, args.seconds, args.clients, args.streams, args.requests)
    print("| variant | requests/s | CPU ms per request (server) | CPU ms per request (PostgreSQL) |")
    print("|---|---|---|---|")
    for name, rps, cpu, db_cpu in rows:
        database = f"{db_cpu:.3f}" if name.startswith("postgresql") else "—"  # (CPU time counts in 10 ms ticks)
        print(f"| {name} | {rps:,.0f} | {cpu:.3f} | {database} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
