"""The access line of every RPC a real server answers: the same JSON line whether it is written straight to
Tessera's JSON handler (the default configuration) or goes through the logging module because someone else (pytest's
caplog here, an application's logging configuration) listens too; and then that listener gets its record."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import time

import grpc
import pytest
from tessera.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

from tessera_runtime.clients import error_details
from tessera_runtime.errors import NotFound
from tessera_runtime.logs import JsonFormatter
from tessera_runtime.server import ServiceModule, create_server

SERVICE = "tessera.user.v1.UserService"
GET_USER = f"/{SERVICE}/GetUser"
DOMAIN = "user.tessera.dev"
# Differ from call to call by nature: the time, the duration, and the ids of each call's own span.
PER_CALL = ("time", "duration_ms", "trace_id", "span_id")


class _Users(user_service_pb2_grpc.UserServiceServicer):
    async def GetUser(self, request, context):
        if request.id == "missing":
            raise NotFound("no user with this id", reason="USER_NOT_FOUND", domain=DOMAIN, metadata={"id": "missing"})
        return user_service_pb2.GetUserResponse(user=user_pb2.User(id=request.id, display_name="Ada"))


@pytest.fixture
async def stub():
    module = ServiceModule(
        service_names=(SERVICE,), domain=DOMAIN,
        register=lambda server: user_service_pb2_grpc.add_UserServiceServicer_to_server(_Users(), server))
    server, port = await create_server(module)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield user_service_pb2_grpc.UserServiceStub(channel)
    await server.stop()


@pytest.fixture
def rpc_logger(monkeypatch):
    """The access lines' logger with only a JSON handler of setup_logging's kind, and the LogRecords it makes."""
    logger = logging.getLogger("tessera.rpc")
    saved = (logger.handlers[:], logger.propagate, logger.level)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("user-service"))
    logger.handlers[:] = [handler]
    logger.propagate = False  # pytest's own handlers sit on the root logger
    logger.setLevel(logging.INFO)
    made: list[str] = []
    make_record = logger.makeRecord
    monkeypatch.setattr(logger, "makeRecord", lambda *a, **k: made.append(a[4] % a[5]) or make_record(*a, **k))
    yield logger, handler, stream, made
    logger.handlers[:], logger.propagate, logger.level = saved


async def _calls(stub) -> None:
    ok = await stub.GetUser(user_service_pb2.GetUserRequest(id="u-1"), timeout=10,
                            metadata=(("x-request-id", "req-ok"), ("x-correlation-id", "corr-1")))
    assert ok.user.display_name == "Ada"
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetUser(user_service_pb2.GetUserRequest(id="missing"), timeout=10,
                           metadata=(("x-request-id", "req-missing"),))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    info, _ = error_details(err.value)
    assert info is not None and info.reason == "USER_NOT_FOUND" and dict(info.metadata) == {"id": "missing"}


def _lines(stream: io.StringIO) -> list[dict]:
    lines = [json.loads(raw) for raw in stream.getvalue().splitlines()]
    stream.seek(0)
    stream.truncate()
    return lines


async def test_the_access_line_is_the_same_written_directly_or_through_a_listeners_logging(stub, rpc_logger, caplog,
                                                                                           tracing):
    logger, handler, stream, made = rpc_logger
    logger.handlers[:] = [handler]  # pytest attaches its handlers to a logger that does not propagate: off

    await _calls(stub)
    direct = _lines(stream)
    assert made == []  # nobody else listens: no LogRecord was made

    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="tessera.rpc")
    await _calls(stub)
    logged = _lines(stream)
    assert made == [f"rpc {GET_USER} OK", f"rpc {GET_USER} NOT_FOUND"]
    records = [r for r in caplog.records if r.name == "tessera.rpc"]
    assert [(r.levelname, r.getMessage(), r.rpc_method, r.grpc_code) for r in records] == [
        ("INFO", f"rpc {GET_USER} OK", GET_USER, "OK"), ("INFO", f"rpc {GET_USER} NOT_FOUND", GET_USER, "NOT_FOUND")]
    assert all(isinstance(r.duration_ms, float) and r.duration_ms >= 0 for r in records)

    assert len(direct) == len(logged) == 2
    for one, other in zip(direct, logged, strict=True):
        assert list(one) == list(other)  # the same fields in the same order
        assert {k: v for k, v in one.items() if k not in PER_CALL} == {
            k: v for k, v in other.items() if k not in PER_CALL}
    for line in direct + logged:  # each line carries the ids of its call's server span
        await tracing.wait(lambda r, line=line: any(s.kind == "SERVER" for s in r.trace(line["trace_id"])))
        (server,) = [s for s in tracing.receiver.trace(line["trace_id"]) if s.kind == "SERVER"]
        assert server.span_id == line["span_id"] and server.attributes["tessera.request_id"] == line["request_id"]
    ok, missing = direct
    assert ok == {**ok, "level": "INFO", "service": "user-service", "logger": "tessera.rpc",
                  "message": f"rpc {GET_USER} OK", "request_id": "req-ok", "correlation_id": "corr-1",
                  "rpc_method": GET_USER, "grpc_code": "OK"}
    assert missing == {**missing, "message": f"rpc {GET_USER} NOT_FOUND", "request_id": "req-missing",
                       "correlation_id": "req-missing", "grpc_code": "NOT_FOUND"}
    assert ok["trace_id"] != missing["trace_id"]


async def test_a_failed_call_s_line_and_metrics_are_recorded_before_its_status_reaches_the_caller(rpc_logger):
    """A caller holding an error answer can rely on the server's access line and RED metrics being there already
    (a test, a log shipper, an operator comparing the two): the status leaves after them, not before."""
    from prometheus_client import REGISTRY

    logger, _, _, _ = rpc_logger
    written: list[str] = []

    class _SlowListener(logging.Handler):  # the line takes a while to write; the status must wait for it
        def emit(self, record: logging.LogRecord) -> None:
            time.sleep(0.3)
            written.append(record.getMessage())

    logger.addHandler(_SlowListener())
    module = ServiceModule(
        service_names=(SERVICE,), domain=DOMAIN,
        register=lambda server: user_service_pb2_grpc.add_UserServiceServicer_to_server(_Users(), server))
    server, port = await create_server(module)
    labels = {"grpc_service": SERVICE, "grpc_method": "GetUser", "grpc_code": "NOT_FOUND"}

    def handled() -> float:
        return REGISTRY.get_sample_value("grpc_server_handled_total", labels) or 0.0

    before = handled()

    def call() -> tuple[grpc.StatusCode, list[str], float]:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            try:
                user_service_pb2_grpc.UserServiceStub(channel).GetUser(
                    user_service_pb2.GetUserRequest(id="missing"), timeout=10)
            except grpc.RpcError as err:  # what was recorded at the moment the answer arrived
                return err.code(), list(written), handled() - before
        raise AssertionError("GetUser of a missing user succeeded")

    try:
        code, lines, counted = await asyncio.to_thread(call)
    finally:
        await server.stop()
    assert (code, lines, counted) == (grpc.StatusCode.NOT_FOUND, [f"rpc {GET_USER} NOT_FOUND"], 1.0)
