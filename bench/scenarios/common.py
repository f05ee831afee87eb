"""What several scenarios share: the echo server, the user service on PostgreSQL with seeded users, sides."""

from __future__ import annotations

import uuid

import grpc
import psutil
from tessera.user.v1 import user_pb2, user_service_pb2_grpc
from tessera.user.v1 import user_service_pb2 as user_svc

from bench import infra
from bench.harness import RpcCounter, Run, Side, processes_of
from bench.load import Budget, LoadResult, grpc_frame, grpcload, h2load
from bench.procs import ManagedProcess, python_module

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
ECHO_METHOD = "/tessera.bench.Echo/Echo"
GET_USER = "/tessera.user.v1.UserService/GetUser"
CREATE_USER = "/tessera.user.v1.UserService/CreateUser"
SEEDED_USERS = 200


def echo_server(run: Run) -> ManagedProcess:
    if "echo" not in run.shared:
        run.shared["echo"] = run.start("echo", python_module("bench.baselines.echo_server"))
    return run.shared["echo"]  # type: ignore[return-value]


def user_database(run: Run) -> str:
    if "user_db" not in run.shared:
        run.shared["user_db"] = run.dbs.create("user")
    return run.shared["user_db"]  # type: ignore[return-value]


def user_service(run: Run) -> ManagedProcess:
    """The user service (one process) on its PostgreSQL database, with SEEDED_USERS users in it."""
    if "user" not in run.shared:
        service = run.tessera("user", user_database(run))
        run.shared["user"] = service
        run.shared["user_ids"] = seed_users(service.address, SEEDED_USERS)
    return run.shared["user"]  # type: ignore[return-value]


def seeded_user_id(run: Run) -> str:
    user_service(run)
    return run.shared["user_ids"][SEEDED_USERS // 2]  # type: ignore[index]


def seed_users(address: str, count: int) -> list[str]:
    """Creates users through the service itself (so every row is what CreateUser writes)."""
    with grpc.insecure_channel(address) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        futures = [stub.CreateUser.future(create_user_request("seed", i), timeout=30) for i in range(count)]
        return [f.result().user.id for f in futures]


def create_user_request(seed: str, index: int) -> user_svc.CreateUserRequest:
    tag = f"{seed}-{index}".replace(" ", "-")
    return user_svc.CreateUserRequest(
        user=user_pb2.User(email=f"{tag}@bench.example.com", display_name=f"Bench {index}"),
        request_id=f"{tag}-{uuid.uuid4().hex[:8]}"[:64])


def create_user(seed: str, index: int) -> bytes:
    """bench.grpcload factory: a CreateUser request with its own e-mail address and request_id."""
    return create_user_request(seed, index).SerializeToString()


def echo_payload(seed: str, index: int) -> bytes:
    """bench.grpcload factory for the echo server: as many bytes as a GetUserRequest."""
    return user_svc.GetUserRequest(id=str(uuid.UUID(int=index))).SerializeToString()


def get_user_body(user_id: str) -> bytes:
    return grpc_frame(user_svc.GetUserRequest(id=user_id).SerializeToString())


def check_get_user(address: str, user_id: str) -> None:
    """One real call before the load: h2load counts HTTP 200s, so the answer itself is checked here."""
    with grpc.insecure_channel(address) as channel:
        reply = user_service_pb2_grpc.UserServiceStub(channel).GetUser(user_svc.GetUserRequest(id=user_id),
                                                                       timeout=10)
    if reply.user.id != user_id:
        raise RuntimeError(f"GetUser on {address} answered {reply.user.id!r}, not {user_id!r}")


def check_echo(address: str) -> None:
    with grpc.insecure_channel(address) as channel:
        if channel.unary_unary(ECHO_METHOD)(b"ping", timeout=10) != b"ping":
            raise RuntimeError("the echo server did not echo")


def h2load_side(run: Run, role: str, name: str, process: ManagedProcess, method: str, body: bytes, *,
                label: str, clients: int | None = None, streams: int | None = None,
                count_rpcs: bool = True) -> Side:
    cfg = run.config
    url = f"http://{process.address}{method}"

    def load(budget: Budget, _seed: str) -> LoadResult:
        return h2load(url, budget=budget, clients=clients or cfg.clients, streams=streams or cfg.streams,
                      body=body, headers=GRPC_HEADERS)

    rpc = RpcCounter(process.metrics_urls, method) if count_rpcs and process.metrics_urls else None
    return Side(role, name, load, lambda: {**processes_of(label, process), **postgres_of(process)}, rpc)


def grpcload_side(run: Run, role: str, name: str, process: ManagedProcess, method: str, factory: str, *,
                  label: str, concurrency: int | None = None) -> Side:
    def load(budget: Budget, seed: str) -> LoadResult:
        return grpcload(process.address, method, factory, budget=budget, seed=seed,
                        concurrency=concurrency or run.config.concurrency)

    rpc = RpcCounter(process.metrics_urls, method) if process.metrics_urls else None
    return Side(role, name, load, lambda: {**processes_of(label, process), **postgres_of(process)}, rpc)


def postgres_of(process: ManagedProcess) -> dict[str, list[psutil.Process]]:
    """The PostgreSQL backends connected to this process's database, metered together as one group."""
    url = process.env.get("TESSERA_DATABASE_URL") or process.env.get("PEER_DATABASE_URL")
    if not url or not url.startswith("postgresql"):
        return {}
    found = []
    for pid in infra.backend_pids(url):
        try:
            found.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            continue
    return {"postgres": found} if found else {}
