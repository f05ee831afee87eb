"""What publishers declare: the events exchange and every installed consumer queue with its bindings."""

from __future__ import annotations

import pytest

from tessera_notification import subscriptions
from tessera_notification.entrypoints import event_consumer
from tessera_runtime.messaging import topology


def test_the_installed_consumer_routes_are_the_notification_services_subscription():
    routes = topology.installed_consumer_routes()
    assert routes == {"notification.email": subscriptions.ROUTES["notification.email"]}
    subscription = event_consumer.subscription(lambda: None, lambda *_: None)  # handlers are only built here
    assert subscription.queue == "notification.email"
    assert set(subscription.routing_keys) == set(routes["notification.email"])


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


def test_a_handler_map_that_drifts_from_the_declared_events_is_refused(monkeypatch):
    monkeypatch.setattr(event_consumer, "EVENTS", subscriptions.EVENTS[:-1])
    with pytest.raises(RuntimeError, match=r"notification\.email handles"):
        event_consumer.subscription(lambda: None, lambda *_: None)
