"""JSON log lines: the fields every line has, the ids of the work that wrote it, and what is masked."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
import time
import uuid

import pytest
from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from tessera_runtime.logs import JsonFormatter, RpcAccessLog, correlation_id_var, mask, request_id_var

TRACE_ID = 0x4BF92F3577B34DA6A3CE929D0E0E4736
SPAN_ID = 0x00F067AA0BA902B7
JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1LTEiLCJzY29wZSI6Im9yZGVyOndyaXRlIn0.c2lnbmF0dXJl"


def render(message: str, *args, exc_info=None, **extra) -> dict:
    record = logging.LogRecord("tessera.test", logging.INFO, __file__, 1, message, args, exc_info)
    record.__dict__.update(extra)
    line = JsonFormatter("order-service").format(record)
    assert "\n" not in line  # one line per record, whatever the message holds
    return json.loads(line)


def test_every_line_has_the_documented_fields_even_outside_any_work():
    line = render("started")
    assert {"time", "level", "service", "message", "trace_id", "span_id", "request_id",
            "correlation_id"} <= line.keys()
    assert (line["level"], line["service"], line["message"]) == ("INFO", "order-service", "started")
    assert line["trace_id"] is line["span_id"] is line["request_id"] is line["correlation_id"] is None
    assert line["time"].endswith("+00:00")


def test_the_time_is_the_records_own_in_utc_to_the_millisecond():
    """The part up to the second is formatted once per second: lines of one second, the next second, an earlier
    one again (records of other threads may come late) each carry their own time."""
    for created in (1_764_930_373.021, 1_764_930_373.9999, 1_764_930_373.9999996, 1_764_930_374.0, 1_764_930_373.5,
                    0.001, 1_893_456_000.25):
        record = logging.LogRecord("tessera.test", logging.INFO, __file__, 1, "at", (), None)
        record.created = created
        line = json.loads(JsonFormatter("order-service").format(record))
        assert line["time"] == dt.datetime.fromtimestamp(created, dt.UTC).isoformat(timespec="milliseconds")


def test_a_line_written_inside_a_span_and_a_request_carries_their_ids():
    span = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1)))
    rid, cid = request_id_var.set("req-1"), correlation_id_var.set("corr-1")
    try:
        with trace.use_span(span):
            line = render("reserving stock")
    finally:
        request_id_var.reset(rid)
        correlation_id_var.reset(cid)
    assert line["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert line["span_id"] == "00f067aa0ba902b7"
    assert (line["request_id"], line["correlation_id"]) == ("req-1", "corr-1")


def test_emails_tokens_and_passwords_never_reach_a_line_whole():
    line = render("customer %s signed in with Bearer %s; raw %s; broker %s",
                  "ada.lovelace@example.com", JWT, JWT, "amqp://tessera:s3cr3t@rabbit:5672/%2F",
                  customer_email="grace@example.com",
                  recipients=["a.b@example.org", {"cc": "c.d@example.net"}],
                  database_url="postgresql+asyncpg://app:hunter2@db/orders",
                  authorization="Basic dXNlcjpwYXNz", api_key="k-123", password="pw", page_token=None)
    text = json.dumps(line)
    for secret in ("ada.lovelace", "grace@", "a.b@", "c.d@", JWT, "eyJzdWIi", "s3cr3t", "hunter2",
                   "dXNlcjpwYXNz", "k-123", '"pw"'):
        assert secret not in text, secret
    assert "a***@example.com" in line["message"] and "Bearer [redacted]" in line["message"]
    assert line["customer_email"] == "g***@example.com"
    assert line["recipients"] == ["a***@example.org", {"cc": "c***@example.net"}]
    assert line["database_url"] == "postgresql+asyncpg://app:***@db/orders"
    assert line["authorization"] == line["api_key"] == line["password"] == "[redacted]"
    assert line["page_token"] is None


def test_tracebacks_are_masked_too():
    try:
        raise ValueError("no user bob@example.com")
    except ValueError:
        import sys

        line = render("failed", exc_info=sys.exc_info())
    assert "bob@example.com" not in line["traceback"] and "b***@example.com" in line["traceback"]


def test_mask_leaves_ordinary_text_and_urls_without_credentials_alone():
    text = "order 42 confirmed; see http://127.0.0.1:9101/metrics and amqp://rabbit:5672/%2F"
    assert mask(text) == text


def test_each_kind_of_secret_is_masked_on_its_own():
    # mask() skips texts that cannot hold a secret: each kind must be recognised alone, in any letter case.
    assert mask(f"raw {JWT}") == "raw [redacted-jwt]"
    assert mask("header BEARER abc.def-123") == "header BEARER [redacted]"
    assert mask("header bearer abc") == "header bearer [redacted]"
    assert mask("dsn amqp://u:pw@host/vh") == "dsn amqp://u:***@host/vh"
    assert mask("to ada@example.com") == "to a***@example.com"
    plain = "rpc /tessera.user.v1.UserService/GetUser OK"
    assert mask(plain) is plain


# The access line of each RPC (RpcAccessLog): written straight to Tessera's JSON handlers when only they would see
# it, through the logging module otherwise; the same line either way.

class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _json_handler_alone(logger: logging.Logger) -> None:
    """Takes off the handlers pytest attaches to a logger that does not propagate when each test phase starts."""
    logger.handlers[:] = [h for h in logger.handlers if type(h.formatter) is JsonFormatter]


@pytest.fixture
def access(monkeypatch):
    """A logger with a JSON handler of setup_logging's kind alone (once _json_handler_alone ran), its stream, and
    the RpcAccessLog on it; a fixed clock; and a count of the LogRecords the logger makes."""
    logger = logging.getLogger(f"tessera.test.rpc.{uuid.uuid4().hex}")
    logger.propagate = False  # pytest's own handlers sit on the root logger
    logger.setLevel(logging.INFO)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter("user-service"))
    logger.addHandler(handler)
    made = []
    make_record = logger.makeRecord
    monkeypatch.setattr(logger, "makeRecord", lambda *a, **k: made.append(a) or make_record(*a, **k))
    monkeypatch.setattr(time, "time", lambda: 1_764_930_373.0215)
    span = NonRecordingSpan(SpanContext(TRACE_ID, SPAN_ID, is_remote=False, trace_flags=TraceFlags(1)))
    rid, cid = request_id_var.set('req-"1"\\é'), correlation_id_var.set("corr-1")
    try:
        with trace.use_span(span):
            yield logger, stream, RpcAccessLog(logger), made
    finally:
        request_id_var.reset(rid)
        correlation_id_var.reset(cid)
        logger.handlers.clear()


def _logged(logger: logging.Logger, method: str, code: str, duration_ms: float) -> None:
    """The access line as an ordinary logging call writes it."""
    logger.info("rpc %s %s", method, code,
                extra={"rpc_method": method, "grpc_code": code, "duration_ms": duration_ms})


@pytest.mark.parametrize(("method", "code", "duration_ms"), [
    ("/tessera.user.v1.UserService/GetUser", "OK", 0.412),
    ("/tessera.user.v1.UserService/GetUser", "NOT_FOUND", 12.0),
    ("/tessera.order.v1.OrderService/CreateOrder", "INVALID_ARGUMENT", 1234.5),
    # Nothing in a method name or a code should be a secret; if one ever were, it is masked as the formatter masks.
    ("/tessera.test.v1.Mail/ada.lovelace@example.com", "OK", 0.001),
    (f"/tessera.test.v1.Auth/Bearer {JWT}", "UNAUTHENTICATED", 3.25),
], ids=["success", "error", "slow error", "e-mail", "token"])
def test_the_access_line_written_directly_is_the_line_the_logging_module_writes(access, method, code, duration_ms):
    logger, stream, access_log, made = access
    _json_handler_alone(logger)
    access_log.info(method, code, duration_ms)
    assert made == []  # written without a LogRecord
    _logged(logger, method, code, duration_ms)
    direct, logged = stream.getvalue().splitlines()
    assert direct == logged
    line = json.loads(direct)
    assert (line["level"], line["logger"], line["grpc_code"], line["duration_ms"]) == ("INFO", logger.name, code,
                                                                                        duration_ms)
    assert (line["trace_id"], line["request_id"]) == ("4bf92f3577b34da6a3ce929d0e0e4736", 'req-"1"\\é')
    assert "ada.lovelace" not in direct and JWT not in direct


def test_the_access_line_outside_any_request_or_span_has_null_ids(access):
    logger, stream, access_log, made = access
    _json_handler_alone(logger)
    with trace.use_span(trace.INVALID_SPAN):
        rid, cid = request_id_var.set(None), correlation_id_var.set(None)
        try:
            access_log.info("/grpc.health.v1.Health/Check", "OK", 0.1)
            _logged(logger, "/grpc.health.v1.Health/Check", "OK", 0.1)
        finally:
            request_id_var.reset(rid)
            correlation_id_var.reset(cid)
    direct, logged = stream.getvalue().splitlines()
    assert direct == logged and len(made) == 1  # the one of the logging call
    assert json.loads(direct)["trace_id"] is json.loads(direct)["request_id"] is None


def test_a_handler_or_filter_of_anyone_else_gets_the_access_line_as_a_record(access):
    logger, stream, access_log, made = access
    _json_handler_alone(logger)
    json_handler = logger.handlers[0]
    for attach, detach in (
        (lambda h: logger.addHandler(h), lambda h: logger.removeHandler(h)),
        (lambda h: logging.getLogger().addHandler(h), lambda h: logging.getLogger().removeHandler(h)),
    ):
        seen = _Records()
        attach(seen)
        logger.propagate = True
        try:
            access_log.info("/tessera.user.v1.UserService/GetUser", "OK", 0.5)
        finally:
            detach(seen)
            logger.propagate = False
        (record,) = seen.records
        assert (record.getMessage(), record.rpc_method, record.grpc_code, record.duration_ms) == (
            "rpc /tessera.user.v1.UserService/GetUser OK", "/tessera.user.v1.UserService/GetUser", "OK", 0.5)
    filtered: list[str] = []
    json_handler.addFilter(lambda record: filtered.append(record.getMessage()) or True)
    access_log.info("/tessera.user.v1.UserService/GetUser", "OK", 0.5)
    assert filtered == ["rpc /tessera.user.v1.UserService/GetUser OK"]
    assert len(made) == 3
    # Every JSON line, through the logging module or not, is the same line.
    assert len(set(stream.getvalue().splitlines())) == 1 and len(stream.getvalue().splitlines()) == 3


def test_the_access_line_respects_the_level(access):
    logger, stream, access_log, made = access
    _json_handler_alone(logger)
    logger.setLevel(logging.WARNING)
    access_log.info("/tessera.user.v1.UserService/GetUser", "OK", 0.5)
    assert stream.getvalue() == "" and made == []
