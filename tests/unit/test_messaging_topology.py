"""What publishers declare: the events exchange and every installed consumer queue with its bindings."""

from __future__ import annotations

import pika.exceptions
import pytest

from tessera_analytics import subscriptions as analytics_subscriptions
from tessera_analytics.entrypoints import event_consumer as analytics_consumer
from tessera_notification import subscriptions
from tessera_notification.entrypoints import event_consumer
from tessera_runtime.messaging import topology


def test_the_installed_consumer_routes_are_the_notification_and_analytics_subscriptions():
    routes = topology.installed_consumer_routes()
    assert routes == {"notification.email": subscriptions.ROUTES["notification.email"],
                      "analytics.metrics": analytics_subscriptions.ROUTES["analytics.metrics"]}
    subscription = event_consumer.subscription(lambda: None, lambda *_: None)  # handlers are only built here
    assert subscription.queue == "notification.email"
    assert set(subscription.routing_keys) == set(routes["notification.email"])
    counting = analytics_consumer.subscription(lambda: None)
    assert counting.queue == "analytics.metrics"
    assert set(counting.routing_keys) == set(routes["analytics.metrics"]) == {
        "tessera.user.v1.UserCreated", "tessera.order.v1.OrderConfirmed", "tessera.order.v1.OrderFailed",
        "tessera.order.v1.OrderCancelled", "tessera.payment.v1.PaymentRefunded"}


def test_a_publisher_declares_the_queue_exactly_as_its_consumer_does():
    routes = {"notification.email": ("tessera.user.v1.UserCreated", "tessera.order.v1.OrderConfirmed")}
    declared = topology.publisher_declarations("shop.events", routes)
    consumer = topology.QueueTopology("shop.events", "notification.email", routes["notification.email"],
                                      (1.0, 5.0)).declarations()
    assert declared[0] == topology.Declaration("exchange", "shop.events", exchange_type="topic")
    # Same queue arguments and bindings as the consumer's own declarations: either side may declare first.
    assert all(d in consumer for d in declared)
    assert [(d.kind, d.routing_key) for d in declared if d.kind == "bind"] == [
        ("bind", "tessera.user.v1.UserCreated"), ("bind", "tessera.order.v1.OrderConfirmed")]


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_a_publisher_declares_the_queue_type_its_consumer_declares(queue_type):
    routes = {"notification.email": ("tessera.user.v1.UserCreated",)}
    declared = topology.publisher_declarations("shop.events", routes, queue_type)
    consumer = topology.QueueTopology("shop.events", "notification.email", routes["notification.email"],
                                      (1.0,), queue_type).declarations()
    assert all(d in consumer for d in declared)
    [queue] = [d for d in declared if d.kind == "queue"]
    assert (queue.arguments or {}).get("x-queue-type", "classic") == queue_type


def refusal(arg: str, current: str) -> pika.exceptions.ChannelClosedByBroker:
    """RabbitMQ's refusal of a declaration that differs from the queue it has in arg."""
    return pika.exceptions.ChannelClosedByBroker(406, (
        f"PRECONDITION_FAILED - inequivalent arg '{arg}' for queue 'notification.email' in vhost '/': {current}"))


@pytest.mark.parametrize(("configured", "arg", "current", "found"), [
    # The arguments RabbitMQ 3.10 names when a classic queue is declared as quorum, and the other way round.
    ("quorum", "x-overflow", "received the value 'reject-publish' of type 'longstr' but current is none", "classic"),
    ("quorum", "x-queue-type", "received the value 'quorum' of type 'longstr' but current is none", "classic"),
    ("classic", "x-dead-letter-strategy", "received none but current is the value 'at-least-once' of type "
     "'longstr'", "quorum"),
    ("classic", "x-queue-type", "received none but current is the value 'quorum' of type 'longstr'", "quorum"),
])
def test_a_queue_found_as_the_other_type_is_named_with_both_types_and_what_to_do(configured, arg, current, found):
    error = topology.queue_not_migrated(refusal(arg, current), configured)
    assert error is not None
    assert (error.queue, error.configured, error.found) == ("notification.email", configured, found)
    message = str(error)
    assert f"the queue notification.email is a {found} queue but TESSERA_QUEUE_TYPE is {configured}" in message
    assert f"run `tessera queues migrate` with TESSERA_QUEUE_TYPE={configured}" in message
    assert f"or set TESSERA_QUEUE_TYPE={found}" in message


def test_a_queue_declared_with_other_arguments_of_the_same_type_is_named_without_a_type():
    error = topology.queue_not_migrated(refusal("x-max-length", "received none but current is the value 5"))
    assert error is not None and error.found is None
    assert "notification.email exists with other arguments than a classic queue" in str(error)
    assert topology.queue_not_migrated(pika.exceptions.ChannelClosedByBroker(404, "NOT_FOUND - no queue")) is None


def test_a_handler_map_that_drifts_from_the_declared_events_is_refused(monkeypatch):
    monkeypatch.setattr(event_consumer, "EVENTS", subscriptions.EVENTS[:-1])
    with pytest.raises(RuntimeError, match=r"notification\.email handles"):
        event_consumer.subscription(lambda: None, lambda *_: None)
