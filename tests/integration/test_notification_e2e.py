"""End to end over the real broker and a real SMTP server: a user is created, a welcome e-mail arrives; an order
event comes out of a real outbox through the relay, a receipt arrives."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import sqlite3
import time
import uuid

import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import MetaData
from tessera.common.v1 import money_pb2
from tessera.notification.v1 import notification_events_pb2, notification_pb2
from tessera.notification.v1 import notification_service_pb2 as npb
from tessera.notification.v1 import notification_service_pb2_grpc as npb_grpc
from tessera.order.v1 import order_events_pb2, order_pb2
from tessera.payment.v1 import payment_events_pb2
from tessera.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

from tessera_runtime.db import Database
from tessera_runtime.messaging import MessagingSettings
from tessera_runtime.messaging.relay import OutboxRelay
from tessera_runtime.outbox import PendingEvent, outbox_table, write_events
from tests.support import rabbitmq
from tests.support.messaging_stack import environment, running

QUEUE = "notification.email"


@pytest.fixture(scope="module")
def amqp_url():
    vhost = rabbitmq.create_vhost()
    yield rabbitmq.amqp_url(vhost)
    rabbitmq.delete_vhost(vhost)


@pytest.fixture
async def notification(tmp_path, amqp_url, smtp):
    env = environment("notification", database_url=f"sqlite+aiosqlite:///{tmp_path / 'notification.db'}",
                      amqp_url=amqp_url, smtp_port=smtp.port)
    async with running("notification", env) as (_, channel):
        await rabbitmq.wait_for_consumer(amqp_url, QUEUE)
        yield npb_grpc.NotificationServiceStub(channel)


async def create_user(stub, email: str, name: str, **fields) -> user_pb2.User:
    reply = await stub.CreateUser(user_service_pb2.CreateUserRequest(
        user=user_pb2.User(email=email, display_name=name, **fields), request_id=uuid.uuid4().hex),
        metadata=(("x-correlation-id", f"corr-{email}"),))
    return reply.user


async def test_create_user_sends_a_welcome_email_and_records_it(tmp_path, amqp_url, smtp, notification):
    tap = rabbitmq.Tap(amqp_url, "tessera.events", ["tessera.notification.v1.*"])
    env = environment("user", database_url=f"sqlite+aiosqlite:///{tmp_path / 'user.db'}", amqp_url=amqp_url)
    async with running("user", env) as (_, channel):
        user = await create_user(user_service_pb2_grpc.UserServiceStub(channel), "ada@example.com", "Ada Lovelace")

        [mail] = await smtp.wait_for(1, address="ada@example.com")
    assert mail["Subject"] == "Welcome to Tessera, Ada Lovelace"
    assert mail["To"].addresses[0].display_name == "Ada Lovelace"
    assert "Hello Ada Lovelace" in mail.get_content()
    assert "We will e-mail you a receipt for every order" in mail.get_content()

    [n] = await settled(notification, npb.ListNotificationsRequest(user_id=user.id))
    assert (n.kind, n.status, n.attempts) == (notification_pb2.NOTIFICATION_KIND_WELCOME,
                                              notification_pb2.NOTIFICATION_STATUS_SENT, 1)
    assert n.recipient == "ada@example.com" and n.event_type == "tessera.user.v1.UserCreated"
    assert n.message_id == mail["Message-ID"] and n.event_id == mail["X-Tessera-Event-Id"]
    assert n.HasField("sent_time") and not n.last_error
    got = await notification.GetNotification(npb.GetNotificationRequest(id=n.id))
    assert got.notification == n

    # NotificationSent leaves through the notification service's own outbox, in the request's correlation.
    [(_, props, body)] = await tap.wait_for(1)
    assert props.type == "tessera.notification.v1.NotificationSent"
    assert props.correlation_id == "corr-ada@example.com"
    event = notification_events_pb2.NotificationSent.FromString(body)
    assert (event.notification_id, event.user_id, event.message_id, event.attempts) == (n.id, user.id,
                                                                                        n.message_id, 1)


async def settled(stub, request: npb.ListNotificationsRequest, timeout: float = 30.0) -> list:
    """The listed notifications once none is PENDING (the e-mail reaches the server just before its outcome is
    recorded)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = list((await stub.ListNotifications(request)).notifications)
        if rows and all(n.status != notification_pb2.NOTIFICATION_STATUS_PENDING for n in rows):
            return rows
        assert time.monotonic() < deadline, f"notifications still pending: {rows}"
        await asyncio.sleep(0.05)


async def applied(notification_db, event_id: str, timeout: float = 30.0) -> None:
    """Waits until the notification service recorded the event as applied (sent or deliberately not)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.closing(sqlite3.connect(notification_db)) as conn:
            if conn.execute("SELECT 1 FROM processed_events WHERE event_id = ?", (event_id,)).fetchone():
                return
        assert time.monotonic() < deadline, f"event {event_id} was never applied"
        await asyncio.sleep(0.05)


def _ts(value: dt.datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(value)
    return ts


def _eur(minor: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="EUR", amount_minor=minor)


async def test_order_and_payment_events_from_a_real_outbox_send_receipts_failures_cancellations_refunds(
        tmp_path, amqp_url, smtp, notification):
    env = environment("user", database_url=f"sqlite+aiosqlite:///{tmp_path / 'user.db'}", amqp_url=amqp_url)
    async with running("user", env) as (_, channel):
        users = user_service_pb2_grpc.UserServiceStub(channel)
        grace = await create_user(users, "grace@example.com", "Grace Hopper",
                                  profile=user_pb2.Profile(locale="de-DE"))
        quiet = await create_user(users, "quiet@example.com", "Quiet Customer",
                                  preferences=user_pb2.Preferences(order_update_emails=False))
        await smtp.wait_for(1, address="grace@example.com")
        await smtp.wait_for(1, address="quiet@example.com")

    # An order service's outbox, published by the relay exactly as a service publishes it.
    metadata = MetaData()
    table = outbox_table(metadata)
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'orders.db'}")
    async with db.engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    created = dt.datetime(2026, 11, 30, 9, 30, tzinfo=dt.UTC)
    order_id = str(uuid.uuid4())
    items = [order_pb2.OrderItem(product_id=str(uuid.uuid4()), product_name="Walnut desk", sku="DESK-01", quantity=1,
                                 unit_price=_eur(129900), line_total=_eur(129900)),
             order_pb2.OrderItem(product_id=str(uuid.uuid4()), product_name="Desk lamp", sku="LAMP-7", quantity=2,
                                 unit_price=_eur(2450), line_total=_eur(4900))]
    events = [
        order_events_pb2.OrderConfirmed(order_id=order_id, customer_id=grace.id, items=items, total=_eur(134800),
                                        payment_id="pay-1", create_time=_ts(created)),
        order_events_pb2.OrderFailed(order_id=str(uuid.uuid4()), customer_id=grace.id, items=items[:1],
                                     total=_eur(129900), create_time=_ts(created), failure=order_pb2.OrderFailure(
                                         reason="INSUFFICIENT_STOCK", message="Walnut desk is out of stock.")),
        order_events_pb2.OrderCancelled(order_id=order_id, customer_id=grace.id, items=items,
                                        refunded_amount=_eur(134800), payment_id="pay-1", reason="changed my mind",
                                        create_time=_ts(created)),
        payment_events_pb2.PaymentRefunded(payment_id="pay-1", order_id=order_id, customer_id=grace.id,
                                           amount=_eur(134800), reason="order cancelled"),
        # The quiet customer does not want order e-mails: recorded as applied, nothing sent.
        order_events_pb2.OrderConfirmed(order_id=str(uuid.uuid4()), customer_id=quiet.id, items=items[1:],
                                        total=_eur(4900), create_time=_ts(created)),
    ]
    pending = [PendingEvent("order", order_id, e) for e in events]
    async with db.sessionmaker() as session, session.begin():
        await write_events(session, table, pending)
    relay = OutboxRelay(db, table, service="order", amqp_url=amqp_url,
                        settings=MessagingSettings(outbox_poll_seconds=0.2))
    await relay.start()
    try:
        mails = await smtp.wait_for(5, address="grace@example.com")  # welcome + 4
        await applied(tmp_path / "notification.db", pending[-1].event_id)  # the quiet customer's receipt event
    finally:
        await relay.stop()
        await db.dispose()
    by_subject = {m["Subject"]: m.get_content() for m in mails}
    ref = order_id[:8].upper()
    receipt = by_subject[f"Your Tessera order {ref} is confirmed"]
    # German locale: decimal comma, dot groups, currency after the amount.
    assert "1 × Walnut desk (DESK-01) at 1.299,00\u00a0€ = 1.299,00\u00a0€" in receipt
    assert "2 × Desk lamp (LAMP-7) at 24,50\u00a0€ = 49,00\u00a0€" in receipt
    assert "Total       1.348,00\u00a0€" in receipt
    assert "Ordered on  2026-11-30" in receipt and order_id in receipt
    failed = next(body for subject, body in by_subject.items() if "could not be placed" in subject)
    assert "Walnut desk is out of stock." in failed and "You have not been charged." in failed
    cancelled = by_subject[f"Your Tessera order {ref} is cancelled"]
    assert "(changed my mind)" in cancelled and "Refunded    1.348,00\u00a0€" in cancelled
    refunded = by_subject[f"Your refund of 1.348,00\u00a0€ for order {ref}"]
    assert "we refunded 1.348,00\u00a0€ for your order" in refunded

    listed = await notification.ListNotifications(npb.ListNotificationsRequest(user_id=grace.id))
    kinds = [n.kind for n in listed.notifications]
    assert sorted(kinds) == sorted([notification_pb2.NOTIFICATION_KIND_WELCOME,
                                    notification_pb2.NOTIFICATION_KIND_ORDER_RECEIPT,
                                    notification_pb2.NOTIFICATION_KIND_ORDER_FAILED,
                                    notification_pb2.NOTIFICATION_KIND_ORDER_CANCELLED,
                                    notification_pb2.NOTIFICATION_KIND_PAYMENT_REFUNDED])
    about_order = await notification.ListNotifications(npb.ListNotificationsRequest(order_id=order_id))
    assert len(about_order.notifications) == 3
    assert len(smtp.to("quiet@example.com")) == 1  # the welcome only
    quiet_list = await notification.ListNotifications(npb.ListNotificationsRequest(user_id=quiet.id))
    assert [n.kind for n in quiet_list.notifications] == [notification_pb2.NOTIFICATION_KIND_WELCOME]


async def test_create_order_sends_a_receipt_with_its_items_and_total(tmp_path, amqp_url, smtp, notification):
    from tessera.order.v1 import order_service_pb2 as osvc

    from tests.support.order_stack import InProcessOrder, Neighbours

    # Inventory and payment from the order tests' stack; the customer comes from a user service with its relay.
    neighbours = await Neighbours(tmp_path / "neighbours").start()
    user_env = environment("user", database_url=f"sqlite+aiosqlite:///{tmp_path / 'user.db'}", amqp_url=amqp_url)
    try:
        async with running("user", user_env) as (user_server, channel):
            customer = await create_user(user_service_pb2_grpc.UserServiceStub(channel), "lin@example.com",
                                         "Lin Customer")
            await smtp.wait_for(1, address="lin@example.com")  # the welcome: the customer is known
            pen = await neighbours.product(10, price=1250)
            ink = await neighbours.product(5, price=399)
            order_service = await InProcessOrder.start(neighbours.order_env(
                f"sqlite+aiosqlite:///{tmp_path / 'order.db'}", TESSERA_OUTBOX_RELAY="true",
                TESSERA_AMQP_URL=amqp_url, TESSERA_OUTBOX_POLL_SECONDS="0.2",
                TESSERA_USER_SERVICE_ADDR=f"127.0.0.1:{user_server.port}"))
            try:
                order = (await order_service.stub.CreateOrder(osvc.CreateOrderRequest(
                    customer_id=customer.id, payment_method="pm_sandbox_ok", currency_code="EUR",
                    request_id=uuid.uuid4().hex, items=[osvc.CreateOrderRequest.Item(product_id=pen, quantity=2),
                                                        osvc.CreateOrderRequest.Item(product_id=ink, quantity=3)]),
                    timeout=20)).order
                assert order.status == order_pb2.ORDER_STATUS_CONFIRMED
                mails = await smtp.wait_for(2, address="lin@example.com")
            finally:
                await order_service.stop()
    finally:
        await neighbours.stop()
    receipt = next(m for m in mails if m["Subject"] == f"Your Tessera order {order.id[:8].upper()} is confirmed")
    body = receipt.get_content()
    names = {i.product_id: i.product_name for i in order.items}
    assert f"2 × {names[pen]}" in body and "at €12.50 = €25.00" in body
    assert f"3 × {names[ink]}" in body and "at €3.99 = €11.97" in body
    assert "Total       €36.97" in body and order.payment_id in body
    [n] = await settled(notification, npb.ListNotificationsRequest(order_id=order.id))
    assert (n.kind, n.status, n.user_id) == (notification_pb2.NOTIFICATION_KIND_ORDER_RECEIPT,
                                             notification_pb2.NOTIFICATION_STATUS_SENT, customer.id)
