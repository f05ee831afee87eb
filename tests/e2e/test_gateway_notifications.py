"""The notification service through the gateway: its REST and native gRPC routes, the notification:read scope and
the service's own rule that a customer reads only their own notifications.

Notifications are made only by consuming events, so this module runs the user and notification services on a
private vhost of the machine's broker, behind an Envoy of their own: a user created over REST is welcomed by
e-mail (written to files in the work folder), and that welcome is what the customer then reads back.
"""

from __future__ import annotations

import uuid

import pytest

from tests.support import rabbitmq
from tests.support.gateway import SERVICES, Gateway, ServiceStack, unique, wait_for

LIST = "tessera.notification.v1.NotificationService/ListNotifications"
GET = "tessera.notification.v1.NotificationService/GetNotification"
# grpcurl exits with 64 + the gRPC status code.
OK, PERMISSION_DENIED = 0, 64 + 7


@pytest.fixture(scope="module")
def notifying(tmp_path_factory, dead_port):
    """A gateway in front of user and notification services that publish and consume through a private vhost."""
    workdir = tmp_path_factory.mktemp("gateway-notifications")
    vhost = rabbitmq.create_vhost("tessera-gateway-notifications")
    stack = ServiceStack(workdir, amqp_url=rabbitmq.amqp_url(vhost))
    gw = None
    try:
        stack.start(["user", "notification"])
        addresses = {name: f"127.0.0.1:{dead_port}" for name in SERVICES}
        addresses.update(stack.addresses())
        gw = Gateway(workdir, "notifications", addresses).start(["user", "notification"])
        yield gw
    finally:
        if gw is not None:
            gw.stop()
        stack.stop()
        rabbitmq.delete_vhost(vhost)


@pytest.fixture(scope="module")
def welcomed(notifying):
    """Two customers, each with the welcome notification the service recorded for them: {name: (user id,
    notification)}."""
    gw = notifying
    admin = gw.mint(unique("ops"), "admin")
    customers = {}
    for name in ("alice", "bob"):
        created = gw.call("POST", f"/v1/users?requestId={unique(name)}", token=admin,
                          body={"email": f"{unique(name)}@example.com", "displayName": name.title()})
        assert created.status == 200, created.body
        customers[name] = created.json()["user"]["id"]

    def welcome(user_id: str) -> dict | None:
        listed = gw.call("GET", f"/v1/notifications?userId={user_id}", token=admin)
        assert listed.status == 200, listed.body
        found = [n for n in listed.json()["notifications"] if n["kind"] == "NOTIFICATION_KIND_WELCOME"]
        return found[0] if found else None

    return {name: (user_id, wait_for(lambda u=user_id: welcome(u), timeout=60, what=f"{name}'s welcome"))
            for name, user_id in customers.items()}


def test_a_customer_lists_and_reads_their_own_notifications_over_rest(notifying, welcomed):
    gw = notifying
    alice, welcome = welcomed["alice"]
    token = gw.mint(alice, "notification:read")

    listed = gw.call("GET", "/v1/notifications", token=token)  # no filter: the caller's own
    assert listed.status == 200, listed.body
    notifications = listed.json()["notifications"]
    assert [n["id"] for n in notifications] == [welcome["id"]]
    assert {n["userId"] for n in notifications} == {alice}
    filtered = gw.call("GET", f"/v1/notifications?userId={alice}&kind=NOTIFICATION_KIND_WELCOME", token=token)
    assert filtered.status == 200 and [n["id"] for n in filtered.json()["notifications"]] == [welcome["id"]]

    read = gw.call("GET", f"/v1/notifications/{welcome['id']}", token=token)
    assert read.status == 200, read.body
    notification = read.json()["notification"]
    assert (notification["id"], notification["userId"], notification["kind"], notification["channel"]) == (
        welcome["id"], alice, "NOTIFICATION_KIND_WELCOME", "NOTIFICATION_CHANNEL_EMAIL")
    assert notification["eventType"] == "tessera.user.v1.UserCreated"
    assert read.header("content-type").startswith("application/json")


def test_another_customers_notifications_are_refused(notifying, welcomed):
    gw = notifying
    alice, _ = welcomed["alice"]
    bob, bobs = welcomed["bob"]
    token = gw.mint(alice, "notification:read")

    read = gw.call("GET", f"/v1/notifications/{bobs['id']}", token=token)
    assert read.status == 403, read.body
    [info] = [d for d in read.json()["details"] if d.get("@type", "").endswith("ErrorInfo")]
    assert (info["reason"], info["domain"]) == ("PERMISSION_DENIED", "notification.tessera.dev")
    listed = gw.call("GET", f"/v1/notifications?userId={bob}", token=token)
    assert listed.status == 403, listed.body
    assert listed.json()["details"][0]["domain"] == "notification.tessera.dev"
    # Bob's welcome is in no list of Alice's, and an id that does not exist is simply not found.
    own = gw.call("GET", "/v1/notifications?pageSize=200", token=token).json()["notifications"]
    assert bobs["id"] not in {n["id"] for n in own}
    assert gw.call("GET", f"/v1/notifications/{uuid.uuid4()}", token=token).status == 404
    # Bob reads his own; an operator reads anybody's.
    assert gw.call("GET", f"/v1/notifications/{bobs['id']}", token=gw.mint(bob, "notification:read")).status == 200
    assert gw.call("GET", f"/v1/notifications/{bobs['id']}", token=gw.mint(unique("ops"), "admin")).status == 200


@pytest.mark.parametrize("scopes", ["user:read order:read", "notification:readonly", "notification", ""])
def test_a_token_without_notification_read_is_refused(notifying, welcomed, scopes):
    gw = notifying
    alice, welcome = welcomed["alice"]
    token = gw.mint(alice, scopes)
    for path in ("/v1/notifications", f"/v1/notifications/{welcome['id']}"):
        refused = gw.call("GET", path, token=token)
        assert refused.status == 403, (path, refused.body)
        assert refused.json()["details"][0]["reason"] == "MISSING_SCOPE"
        assert refused.json()["details"][0]["domain"] == "gateway.tessera.dev"
    assert gw.call("GET", "/v1/notifications").status == 401  # and no token at all is unauthenticated


def test_native_grpc_routes_follow_the_same_rules(notifying, welcomed):
    gw = notifying
    alice, welcome = welcomed["alice"]
    _, bobs = welcomed["bob"]
    token = gw.mint(alice, "notification:read")

    listed = gw.grpcurl(LIST, {}, token=token)
    assert listed.returncode == OK, listed.stderr
    assert welcome["id"] in listed.stdout and bobs["id"] not in listed.stdout
    read = gw.grpcurl(GET, {"id": welcome["id"]}, token=token)
    assert read.returncode == OK, read.stderr
    assert alice in read.stdout

    assert gw.grpcurl(GET, {"id": bobs["id"]}, token=token).returncode == PERMISSION_DENIED
    no_scope = gw.mint(alice, "user:read")
    assert gw.grpcurl(LIST, {}, token=no_scope).returncode == PERMISSION_DENIED
    assert gw.grpcurl(GET, {"id": welcome["id"]}, token=no_scope).returncode == PERMISSION_DENIED
