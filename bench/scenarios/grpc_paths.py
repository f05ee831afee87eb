"""Scenarios 1, 2 and 4: the user service's read and write paths against the bare echo server and a peer."""

from __future__ import annotations

from bench.harness import Run, ScenarioResult, Segment
from bench.procs import python_module
from bench.scenarios.common import (
    CREATE_USER,
    ECHO_METHOD,
    GET_USER,
    check_echo,
    check_get_user,
    echo_server,
    get_user_body,
    grpcload_side,
    h2load_side,
    seeded_user_id,
    user_service,
)


def _peak(segments: list[Segment], label: str, role: str = "subject") -> float:
    return max((s.rss_mb.get(label, 0.0) for s in segments if s.role == role), default=0.0)


def get_user_vs_echo(run: Run) -> ScenarioResult:
    result = ScenarioResult("1", "Indexed read: GetUser on PostgreSQL vs the bare echo server",
                            baseline="grpc.aio echo, 1 process", subject="Tessera GetUser on PostgreSQL, 1 process",
                            target_ratio=0.5, target_text="≥ 0.5× echo throughput")
    echo, user = echo_server(run), user_service(run)
    user_id = seeded_user_id(run)
    check_echo(echo.address)
    check_get_user(user.address, user_id)
    body = get_user_body(user_id)
    sides = [h2load_side(run, "baseline", "echo", echo, ECHO_METHOD, body, label="echo"),
             h2load_side(run, "subject", "GetUser", user, GET_USER, body, label="user")]
    run.warm(sides)
    result.segments = run.alternate(sides)
    result.set_rates_from_segments()
    result.notes.append("h2load, the same framed GetUserRequest to both; the echo answers it unchanged. "
                        "One user id, read by primary key.")
    run.note_memory("user", load_mb=_peak(result.segments, "user"), context="GetUser at full load (1)")
    if result.met is False:
        run.profile(result, user.processes()[0], sides[1].load, "user service under GetUser")
    return result


def create_user_vs_echo(run: Run) -> ScenarioResult:
    result = ScenarioResult("2", "Write: CreateUser on PostgreSQL (row + outbox row) vs the bare echo server",
                            baseline="grpc.aio echo, 1 process (h2load)",
                            subject="Tessera CreateUser on PostgreSQL, 1 process (grpcload)",
                            target_ratio=0.3, target_text="≥ 0.3× echo throughput")
    echo, user = echo_server(run), user_service(run)
    check_echo(echo.address)
    body = get_user_body(seeded_user_id(run))
    sides = [h2load_side(run, "baseline", "echo", echo, ECHO_METHOD, body, label="echo"),
             grpcload_side(run, "subject", "CreateUser", user, CREATE_USER,
                           "bench.scenarios.common:create_user", label="user")]
    run.warm(sides)
    result.segments = run.alternate(sides)
    result.set_rates_from_segments()
    result.notes.append(
        "Every CreateUser carries its own e-mail and request_id, which h2load cannot vary, so bench.grpcload "
        f"(Python, sync gRPC futures, {run.config.concurrency} calls in flight) loads it; the echo keeps h2load, "
        "whose numbers are the echo's real ceiling (grpcload is slower than h2load: this ratio errs low).")
    run.note_memory("user", load_mb=_peak(result.segments, "user"), context="CreateUser at full load (2)")
    if result.met is False:
        run.profile(result, user.processes()[0], sides[1].load, "user service under CreateUser")
    return result


def get_user_vs_peer(run: Run) -> ScenarioResult:
    result = ScenarioResult("4", "GetUser vs a peer baseline (sync grpc.server + thread pool + sync SQLAlchemy)",
                            baseline="peer: grpc.server, 10 threads, SQLAlchemy ORM + psycopg2",
                            subject="Tessera GetUser on PostgreSQL, 1 process",
                            target_ratio=1.5, target_text="≥ 1.5× the peer's throughput")
    user = user_service(run)
    user_id = seeded_user_id(run)
    database_url = user.env["TESSERA_DATABASE_URL"].replace("+asyncpg", "+psycopg2")
    peer = run.start("peer-user", python_module("bench.baselines.peer_user_server", "--database-url", database_url),
                     {"PEER_DATABASE_URL": database_url})
    check_get_user(peer.address, user_id)
    check_get_user(user.address, user_id)
    body = get_user_body(user_id)
    sides = [h2load_side(run, "baseline", "peer GetUser", peer, GET_USER, body, label="peer"),
             h2load_side(run, "subject", "GetUser", user, GET_USER, body, label="user")]
    run.warm(sides)
    result.segments = run.alternate(sides)
    result.set_rates_from_segments()
    result.notes.append("Same table, same row, same full User in the answer, same h2load load on both.")
    run.stop(peer)
    if result.met is False:
        run.profile(result, user.processes()[0], sides[1].load, "user service under GetUser")
    return result
