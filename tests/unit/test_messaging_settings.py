"""Messaging settings, topology names and the AMQP envelope of an outbox row."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from tessera_runtime.config import ConfigError
from tessera_runtime.messaging import MessagingSettings
from tessera_runtime.messaging.envelope import event_class, forwarded_properties, outgoing_event
from tessera_runtime.messaging.topology import QueueTopology


def test_defaults_suit_make_run():
    s = MessagingSettings.from_env({})
    assert (s.events_exchange, s.outbox_relay, s.outbox_batch_size) == ("tessera.events", True, 500)
    assert (s.consumer_max_attempts, s.consumer_retry_delays) == (5, (1.0, 5.0, 30.0, 120.0))


def test_values_are_read_from_the_environment():
    s = MessagingSettings.from_env({"TESSERA_EVENTS_EXCHANGE": "shop.events", "TESSERA_OUTBOX_RELAY": "off",
                                    "TESSERA_OUTBOX_BATCH_SIZE": "50", "TESSERA_CONSUMER_RETRY_DELAYS": "0.5, 2",
                                    "TESSERA_CONSUMER_MAX_ATTEMPTS": "4", "TESSERA_CONSUMER_PREFETCH": "8",
                                    "TESSERA_CONSUMER_CONCURRENCY": "8"})
    assert (s.events_exchange, s.outbox_relay, s.outbox_batch_size) == ("shop.events", False, 50)
    assert (s.consumer_retry_delays, s.consumer_max_attempts, s.consumer_prefetch) == ((0.5, 2.0), 4, 8)
    # The delay after attempt n; the last one repeats.
    assert [s.retry_delay(n) for n in (1, 2, 3)] == [0.5, 2.0, 2.0]
    longest = MessagingSettings.from_env({"TESSERA_CONSUMER_RETRY_DELAYS": "1,315360000"})
    assert longest.consumer_retry_delays == (1.0, 315360000.0)  # ten years: the longest a retry waits


@pytest.mark.parametrize(("env", "variable"), [
    ({"TESSERA_OUTBOX_RELAY": "maybe"}, "TESSERA_OUTBOX_RELAY"),
    ({"TESSERA_OUTBOX_BATCH_SIZE": "0"}, "TESSERA_OUTBOX_BATCH_SIZE"),
    ({"TESSERA_OUTBOX_POLL_SECONDS": "soon"}, "TESSERA_OUTBOX_POLL_SECONDS"),
    ({"TESSERA_CONSUMER_RETRY_DELAYS": "1,x"}, "TESSERA_CONSUMER_RETRY_DELAYS"),
    ({"TESSERA_CONSUMER_RETRY_DELAYS": "1,-2"}, "TESSERA_CONSUMER_RETRY_DELAYS"),
    ({"TESSERA_CONSUMER_MAX_ATTEMPTS": "0"}, "TESSERA_CONSUMER_MAX_ATTEMPTS"),
    ({"TESSERA_CONSUMER_CONCURRENCY": "64", "TESSERA_CONSUMER_PREFETCH": "8"}, "TESSERA_CONSUMER_CONCURRENCY"),
    ({"TESSERA_EVENTS_EXCHANGE": "has space"}, "TESSERA_EVENTS_EXCHANGE"),
    # Names RabbitMQ refuses to declare (403 for its reserved prefix; a name over 255 bytes does not fit the frame):
    # the relay and the consumers would reconnect for ever and publish nothing.
    ({"TESSERA_EVENTS_EXCHANGE": "amq.tessera"}, "TESSERA_EVENTS_EXCHANGE"),
    ({"TESSERA_EVENTS_EXCHANGE": "é" * 150}, "TESSERA_EVENTS_EXCHANGE"),
    # Not a number of seconds: a retry queue's TTL cannot be made of them.
    ({"TESSERA_CONSUMER_RETRY_DELAYS": "1,nan"}, "TESSERA_CONSUMER_RETRY_DELAYS"),
    ({"TESSERA_CONSUMER_RETRY_DELAYS": "inf"}, "TESSERA_CONSUMER_RETRY_DELAYS"),
    # Longer than the per-message TTL RabbitMQ takes (315360000000 ms; it closes the channel of a publish asking for
    # more): every retry would close the consumer's channel and the message come back at once, for ever.
    ({"TESSERA_CONSUMER_RETRY_DELAYS": "1,5,1e11"}, "TESSERA_CONSUMER_RETRY_DELAYS"),
    ({"TESSERA_CONSUMER_RETRY_DELAYS": "315360000.001"}, "TESSERA_CONSUMER_RETRY_DELAYS"),
    ({"TESSERA_OUTBOX_POLL_SECONDS": "nan"}, "TESSERA_OUTBOX_POLL_SECONDS"),
    ({"TESSERA_OUTBOX_CONFIRM_TIMEOUT_SECONDS": "inf"}, "TESSERA_OUTBOX_CONFIRM_TIMEOUT_SECONDS"),
    # Only the two queue types Tessera declares: a third would declare queues no other service agrees on.
    ({"TESSERA_QUEUE_TYPE": "stream"}, "TESSERA_QUEUE_TYPE"),
    ({"TESSERA_QUEUE_TYPE": "Quorum"}, "TESSERA_QUEUE_TYPE"),
])
def test_a_bad_value_stops_the_service_naming_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        MessagingSettings.from_env(env)


def test_a_consumer_queue_comes_with_retry_queues_a_dead_letter_queue_and_its_bindings():
    topology = QueueTopology("tessera.events", "notification.email", ("a.B", "c.D"), (1.0, 5.0, 1.0))
    declared = [(d.kind, d.name, d.exchange, d.routing_key) for d in topology.declarations()]
    assert declared == [
        ("exchange", "tessera.events", "", ""),
        ("exchange", "tessera.events.dead-letter", "", ""),
        ("queue", "notification.email", "", ""),
        ("queue", "notification.email.dlq", "", ""),
        ("bind", "notification.email.dlq", "tessera.events.dead-letter", "notification.email"),
        ("queue", "notification.email.retry.1000ms", "", ""),
        ("queue", "notification.email.retry.5000ms", "", ""),
        ("bind", "notification.email", "tessera.events", "a.B"),
        ("bind", "notification.email", "tessera.events", "c.D"),
    ]
    retry = next(d for d in topology.declarations() if d.name.endswith("1000ms"))
    assert retry.arguments == {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": "notification.email"}


def test_by_default_the_queues_are_classic_queues_declared_as_before():
    assert MessagingSettings.from_env({}).queue_type == "classic"
    assert MessagingSettings.from_env({"TESSERA_QUEUE_TYPE": "classic"}).queue_type == "classic"
    topology = QueueTopology("tessera.events", "notification.email", ("a.B",), (1.0,))
    # No x-queue-type, no at-least-once arguments: a broker holding the queues of earlier versions takes these.
    assert {d.name: d.arguments for d in topology.declarations() if d.kind == "queue"} == {
        "notification.email": {"x-dead-letter-exchange": "tessera.events.dead-letter",
                               "x-dead-letter-routing-key": "notification.email"},
        "notification.email.dlq": None,
        "notification.email.retry.1000ms": {"x-dead-letter-exchange": "",
                                            "x-dead-letter-routing-key": "notification.email"},
    }
    settings_topology = QueueTopology("tessera.events", "notification.email", ("a.B",), (1.0,),
                                      MessagingSettings.from_env({}).queue_type)
    assert settings_topology.declarations() == topology.declarations()


def test_with_tessera_queue_type_quorum_every_queue_is_a_quorum_queue_that_dead_letters_at_least_once():
    queue_type = MessagingSettings.from_env({"TESSERA_QUEUE_TYPE": "quorum"}).queue_type
    assert queue_type == "quorum"
    topology = QueueTopology("tessera.events", "notification.email", ("a.B", "c.D"), (1.0, 5.0), queue_type)
    queues = {d.name: d.arguments for d in topology.declarations() if d.kind == "queue"}
    # Those that dead-letter do it at least once (which needs reject-publish).
    assert queues["notification.email.retry.1000ms"] == {
        "x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": "notification.email",
        "x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}
    assert queues["notification.email"] == {
        "x-queue-type": "quorum", "x-dead-letter-exchange": "tessera.events.dead-letter",
        "x-dead-letter-routing-key": "notification.email", "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish"}
    assert queues["notification.email.dlq"] == {"x-queue-type": "quorum"}


def test_an_outbox_row_becomes_a_persistent_protobuf_message_with_its_context():
    created = dt.datetime(2026, 12, 4, 10, 0, 0, 123456, tzinfo=dt.UTC)
    traceparent = "00-" + "a" * 32 + "-" + "b" * 16 + "-01"
    row = {"seq": 7, "event_id": "ev-7", "aggregate_type": "order", "aggregate_id": "o-1",
           "event_type": "tessera.order.v1.OrderConfirmed", "payload": b"\x0a\x03o-1", "created_at": created,
           "headers": json.dumps({"traceparent": traceparent, "tracestate": "k=v",
                                  "x-request-id": "r-1", "x-correlation-id": "c-1", "ignored": "x"})}
    event = outgoing_event(row, "order")
    p = event.properties
    assert (event.seq, event.routing_key, event.body) == (7, "tessera.order.v1.OrderConfirmed", b"\x0a\x03o-1")
    assert (p.content_type, p.type, p.message_id, p.delivery_mode) == (
        "application/x-protobuf", "tessera.order.v1.OrderConfirmed", "ev-7", 2)
    assert (p.timestamp, p.correlation_id, p.app_id) == (int(created.timestamp()), "c-1", "order")
    assert p.headers == {"x-aggregate-type": "order", "x-aggregate-id": "o-1", "x-producer": "order",
                         "x-created-at": "2026-12-04T10:00:00.123456+00:00", "traceparent": traceparent,
                         "tracestate": "k=v", "x-request-id": "r-1", "x-correlation-id": "c-1"}

    retry = forwarded_properties(p, {"x-tessera-attempt": 2}, expiration_ms=1500)
    assert (retry.message_id, retry.type, retry.expiration) == ("ev-7", p.type, "1500")
    assert retry.headers["x-tessera-attempt"] == 2 and retry.headers["x-aggregate-id"] == "o-1"
    assert "x-tessera-attempt" not in p.headers  # the original is left alone


def test_event_classes_are_found_by_full_name():
    refunded = event_class("tessera.payment.v1.PaymentRefunded")
    assert refunded is not None and refunded.DESCRIPTOR.full_name == "tessera.payment.v1.PaymentRefunded"
    assert event_class("tessera.nothing.v1.Nope") is None


def test_the_published_log_is_each_event_unless_set_to_batch():
    assert MessagingSettings.from_env({}).outbox_published_log == "each"
    assert MessagingSettings.from_env({"TESSERA_OUTBOX_PUBLISHED_LOG": "batch"}).outbox_published_log == "batch"
    with pytest.raises(ConfigError, match="TESSERA_OUTBOX_PUBLISHED_LOG"):
        MessagingSettings.from_env({"TESSERA_OUTBOX_PUBLISHED_LOG": "none"})
