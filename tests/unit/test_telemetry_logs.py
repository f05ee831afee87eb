"""JSON log lines: the fields every line has, the ids of the work that wrote it, and what is masked."""

from __future__ import annotations

import datetime as dt
import json
import logging

from opentelemetry import trace
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from tessera_runtime.logs import JsonFormatter, correlation_id_var, mask, request_id_var

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
