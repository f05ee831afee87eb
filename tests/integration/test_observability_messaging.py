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
from tessera_runtime.messaging import (
    DUPLICATE,
    Consumer,
    EventMeta,
    HandlerResult,
    MessagingSettings,
    Subscription,
)
from tessera_runtime.outbox import PendingEvent
from tests.support import rabbitmq
from tests.support.waiting import eventually

AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
EVENT_TYPE = user_events_pb2.UserCreated.DESCRIPTOR.full_name


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


async def test_a_consumers_event_lines_carry_the_ids_of_the_work_they_describe(tracing):
    """The consumer's "event processed" and "duplicate event skipped" lines name the consumer span's trace and the
    request and correlation ids the message came with, as every line written while the handler ran does."""
    vhost = rabbitmq.create_vhost()
    url = rabbitmq.amqp_url(vhost)
    handled: list[tuple[str | None, str | None]] = []

    async def handle(_event, _meta: EventMeta) -> HandlerResult:
        span = trace.get_current_span()
        handled.append(hex_ids(span))
        return DUPLICATE if len(handled) > 1 else None

    consumer = Consumer(Subscription("obs", "lines", {user_events_pb2.UserCreated: handle}), amqp_url=url,
                        settings=MessagingSettings(reconnect_max_seconds=0.5))
    capture = _Capture()
    logger = logging.getLogger("tessera.consumer")
    level = logger.level
    logger.addHandler(capture)
    logger.setLevel(logging.INFO)
    try:
        await consumer.start()
        try:
            await rabbitmq.wait_for_consumer(url, consumer.queue)
            producer_trace = uuid.uuid4().hex
            headers = {"x-request-id": "req-obs-2", "x-correlation-id": "corr-obs-2",
                       "traceparent": f"00-{producer_trace}-{uuid.uuid4().hex[:16]}-01"}
            event_id = str(uuid.uuid4())
            body = user_events_pb2.UserCreated().SerializeToString()
            with rabbitmq.blocking_connection(url) as connection:
                channel = connection.channel()
                for _ in range(2):  # the second delivery of the same event is a duplicate
                    channel.basic_publish("tessera.events", EVENT_TYPE, body,
                                          pika.BasicProperties(type=EVENT_TYPE, message_id=event_id, headers=headers))
            await eventually(lambda: consumer.counts["processed"] + consumer.counts["duplicates"] == 2,
                             "both deliveries to be handled")
        finally:
            await consumer.stop()
    finally:
        logger.removeHandler(capture)
        logger.setLevel(level)
        rabbitmq.delete_vhost(vhost)
    lines = [line for line in capture.lines if line["message"] in ("event processed", "duplicate event skipped")]
    assert [line["message"] for line in lines] == ["event processed", "duplicate event skipped"]
    for line, (trace_id, span_id) in zip(lines, handled, strict=True):
        assert (line["trace_id"], line["span_id"]) == (trace_id, span_id)  # the consumer span the handler ran in
        assert line["trace_id"] != producer_trace
        assert (line["request_id"], line["correlation_id"], line["event_id"]) == ("req-obs-2", "corr-obs-2", event_id)
