"""Trace context through the outbox and a real RabbitMQ: the publish continues the request, the consumer links."""

from __future__ import annotations

import json
import logging
import uuid

import pika
import pytest
from opentelemetry import trace
from tessera.user.v1 import user_events_pb2

from tessera_runtime import telemetry
from tessera_runtime.logs import JsonFormatter, correlation_id_var, request_id_var
from tessera_runtime.outbox import PendingEvent
from tests.support.otlp_receiver import in_process_tracing

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
EVENT_TYPE = user_events_pb2.UserCreated.DESCRIPTOR.full_name


@pytest.fixture(scope="session")
def tracing():
    harness = in_process_tracing()
    yield harness
    harness.drain()


@pytest.fixture
def queue():
    """A private, auto-deleted queue on the machine's broker (the default exchange routes to it by name)."""
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    name = f"tessera-test-observability-{uuid.uuid4().hex[:8]}"
    channel.queue_declare(name, exclusive=True, auto_delete=True)
    channel.confirm_delivery()
    yield channel, name
    connection.close()


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(JsonFormatter("notification-service"))
        self.lines: list[dict] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(json.loads(self.format(record)))


def hex_ids(span: trace.Span) -> tuple[str, str]:
    ctx = span.get_span_context()
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


async def test_publish_is_a_child_of_the_writer_and_the_consumer_links_to_it(tracing, queue):
    channel, name = queue
    rid, cid = request_id_var.set("req-obs-1"), correlation_id_var.set("corr-obs-1")
    try:
        with trace.get_tracer("tests").start_as_current_span("CreateUser handler") as writer:
            row = PendingEvent("user", "u-1", user_events_pb2.UserCreated()).row()
    finally:
        request_id_var.reset(rid)
        correlation_id_var.reset(cid)
    request_trace, writer_span = hex_ids(writer)

    # The relay, later and outside the request: headers from the stored row, the publish span around the confirm.
    headers = json.loads(row["headers"])
    assert headers["traceparent"].startswith(f"00-{request_trace}-{writer_span}-")
    with telemetry.publish_span(EVENT_TYPE, headers, exchange="", event_id=row["event_id"]) as publish:
        channel.basic_publish("", name, row["payload"], pika.BasicProperties(headers=headers, type=EVENT_TYPE))
    _, publish_span_id = hex_ids(publish)
    assert headers["traceparent"].startswith(f"00-{request_trace}-{publish_span_id}-")

    # The consumer: the headers as the broker delivered them.
    method, properties, _body = channel.basic_get(name, auto_ack=True)
    assert method is not None
    capture = _Capture()
    logger = logging.getLogger("tessera.test.consumer")
    logger.addHandler(capture)
    try:
        with telemetry.consume_span(properties.type, properties.headers, consumer="notification-email",
                                    queue=name, event_id=row["event_id"]) as consumer:
            logger.warning("sending the welcome e-mail")
    finally:
        logger.removeHandler(capture)
    consumer_trace, consumer_span_id = hex_ids(consumer)
    assert consumer_trace != request_trace

    await tracing.wait(lambda r: len(r.trace(request_trace)) >= 2 and len(r.trace(consumer_trace)) >= 1)
    publish_received = next(s for s in tracing.receiver.trace(request_trace) if s.kind == "PRODUCER")
    assert publish_received.parent_span_id == writer_span
    assert publish_received.name == f"publish {EVENT_TYPE}"
    assert publish_received.attributes["messaging.message.id"] == row["event_id"]
    consumer_received = next(s for s in tracing.receiver.trace(consumer_trace) if s.kind == "CONSUMER")
    assert consumer_received.parent_span_id is None
    assert consumer_received.links == ((request_trace, publish_span_id),)
    assert consumer_received.attributes["tessera.correlation_id"] == "corr-obs-1"

    [line] = capture.lines
    assert (line["trace_id"], line["span_id"]) == (consumer_trace, consumer_span_id)
    assert (line["request_id"], line["correlation_id"]) == ("req-obs-1", "corr-obs-1")
    assert request_id_var.get() is None and correlation_id_var.get() is None  # restored after the message


async def test_a_failed_publish_is_marked_on_its_span(tracing):
    headers: dict = {}
    span = telemetry.start_publish_span(EVENT_TYPE, headers, exchange="tessera.events")
    telemetry.finish_publish_span(span, error="nacked by the broker")
    trace_id, _ = hex_ids(span)
    await tracing.wait(lambda r: bool(r.trace(trace_id)))
    [received] = tracing.receiver.trace(trace_id)
    assert received.is_error and received.parent_span_id is None


async def test_a_message_without_trace_context_still_gets_a_consumer_span(tracing):
    with telemetry.consume_span(EVENT_TYPE, {"x-request-id": b"req-bytes"}, consumer="c") as span:
        assert request_id_var.get() == "req-bytes" and correlation_id_var.get() == "req-bytes"
    trace_id, _ = hex_ids(span)
    await tracing.wait(lambda r: bool(r.trace(trace_id)))
    [received] = tracing.receiver.trace(trace_id)
    assert received.links == () and received.kind == "CONSUMER"
