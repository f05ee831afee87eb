"""NotificationService over gRPC on SQLite and PostgreSQL: get, keyset pages newest first, filters, bad input,
not found, and who may read what."""

from __future__ import annotations

import datetime as dt
import uuid

import grpc
import pytest
from tessera.notification.v1 import notification_pb2 as pb
from tessera.notification.v1 import notification_service_pb2 as npb
from tessera.notification.v1 import notification_service_pb2_grpc as npb_grpc

from tessera_notification.domain.model import Notification, NotificationKind, NotificationStatus
from tessera_notification.service_layer.unit_of_work import NotificationUnitOfWork
from tessera_runtime.clients import error_details
from tessera_runtime.db import Database
from tests.support import rabbitmq
from tests.support.messaging_stack import environment, running

ALICE, BOB = str(uuid.uuid4()), str(uuid.uuid4())
ORDER = str(uuid.uuid4())
T0 = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def amqp_url():
    vhost = rabbitmq.create_vhost()
    yield rabbitmq.amqp_url(vhost)
    rabbitmq.delete_vhost(vhost)


def notification(user_id: str, minute: int, kind: NotificationKind = NotificationKind.ORDER_RECEIPT,
                 status: NotificationStatus = NotificationStatus.SENT, order_id: str = "") -> Notification:
    n = Notification.create(kind=kind, user_id=user_id, recipient=f"{user_id[:4]}@example.com",
                            subject=f"minute {minute}", event_id=str(uuid.uuid4()),
                            event_type="tessera.order.v1.OrderConfirmed", order_id=order_id,
                            now=T0 + dt.timedelta(minutes=minute))
    n.status = status
    return n


async def seed(url: str, items: list[Notification]) -> None:
    db = Database(url)
    try:
        async with NotificationUnitOfWork(db) as uow:
            for n in items:
                await uow.notifications.add(n)
            await uow.commit()
    finally:
        await db.dispose()


@pytest.fixture
async def api(db_url, amqp_url):
    async with running("notification", environment("notification", database_url=db_url,
                                                   amqp_url=amqp_url)) as (_, channel):
        yield npb_grpc.NotificationServiceStub(channel), db_url


def as_user(user_id: str, *scopes: str) -> tuple[tuple[str, str], ...]:
    return (("x-user-id", user_id), ("x-user-scopes", " ".join(scopes)))


async def test_lists_newest_first_in_stable_keyset_pages_with_filters(api):
    stub, url = api
    alice = [notification(ALICE, m) for m in range(7)]
    alice[2].kind = NotificationKind.WELCOME
    alice[4].status = NotificationStatus.DEAD_LETTERED
    alice[5].order_id = alice[6].order_id = ORDER
    await seed(url, [*alice, notification(BOB, 3), notification(BOB, 9)])

    first = await stub.ListNotifications(npb.ListNotificationsRequest(user_id=ALICE, page_size=3))
    assert [n.subject for n in first.notifications] == ["minute 6", "minute 5", "minute 4"]
    await seed(url, [notification(ALICE, 100)])  # created while paging: never on a later page
    second = await stub.ListNotifications(npb.ListNotificationsRequest(user_id=ALICE, page_size=3,
                                                                       page_token=first.next_page_token))
    third = await stub.ListNotifications(npb.ListNotificationsRequest(user_id=ALICE, page_size=3,
                                                                      page_token=second.next_page_token))
    assert [n.subject for n in second.notifications] == ["minute 3", "minute 2", "minute 1"]
    assert [n.subject for n in third.notifications] == ["minute 0"] and third.next_page_token == ""

    everyone = await stub.ListNotifications(npb.ListNotificationsRequest())
    assert len(everyone.notifications) == 10 and everyone.next_page_token == ""
    welcome = await stub.ListNotifications(npb.ListNotificationsRequest(kind=pb.NOTIFICATION_KIND_WELCOME))
    assert [n.subject for n in welcome.notifications] == ["minute 2"]
    dead = await stub.ListNotifications(npb.ListNotificationsRequest(
        user_id=ALICE, status=pb.NOTIFICATION_STATUS_DEAD_LETTERED))
    assert [n.subject for n in dead.notifications] == ["minute 4"]
    about = await stub.ListNotifications(npb.ListNotificationsRequest(order_id=ORDER))
    assert [n.subject for n in about.notifications] == ["minute 6", "minute 5"]

    got = (await stub.GetNotification(npb.GetNotificationRequest(id=alice[3].id))).notification
    assert (got.id, got.user_id, got.kind, got.status, got.channel) == (
        alice[3].id, ALICE, pb.NOTIFICATION_KIND_ORDER_RECEIPT, pb.NOTIFICATION_STATUS_SENT,
        pb.NOTIFICATION_CHANNEL_EMAIL)
    assert got.create_time.ToDatetime(tzinfo=dt.UTC) == T0 + dt.timedelta(minutes=3)


async def _refused(call, code: grpc.StatusCode) -> tuple:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    err = caught.value
    assert err.code() == code
    info, bad = error_details(err)
    assert info is not None and info.domain == "notification.tessera.dev"
    return info, bad


@pytest.mark.parametrize(("request_", "field"), [
    (npb.ListNotificationsRequest(user_id="not-a-uuid"), "user_id"),
    (npb.ListNotificationsRequest(order_id="123"), "order_id"),
    (npb.ListNotificationsRequest(kind=99), "kind"),
    (npb.ListNotificationsRequest(status=42), "status"),
    (npb.ListNotificationsRequest(page_size=-1), "page_size"),
    (npb.ListNotificationsRequest(page_token="garbage"), "page_token"),
])
async def test_bad_list_requests_name_the_field(api, request_, field):
    stub, _ = api
    info, bad = await _refused(stub.ListNotifications(request_), grpc.StatusCode.INVALID_ARGUMENT)
    assert info.reason == "INVALID_ARGUMENT" and [v.field for v in bad.field_violations] == [field]


async def test_bad_get_requests_not_found_and_foreign_page_tokens(api):
    stub, url = api
    for bad_id, why in (("", "is required"), ("nope", "must be a UUID")):
        info, bad = await _refused(stub.GetNotification(npb.GetNotificationRequest(id=bad_id)),
                                   grpc.StatusCode.INVALID_ARGUMENT)
        assert bad.field_violations[0].field == "id" and why in bad.field_violations[0].description
    missing = str(uuid.uuid4())
    info, _ = await _refused(stub.GetNotification(npb.GetNotificationRequest(id=missing)),
                             grpc.StatusCode.NOT_FOUND)
    assert info.reason == "NOTIFICATION_NOT_FOUND" and info.metadata["notification_id"] == missing

    await seed(url, [notification(ALICE, m) for m in range(3)])
    page = await stub.ListNotifications(npb.ListNotificationsRequest(user_id=ALICE, page_size=1))
    _, bad = await _refused(stub.ListNotifications(npb.ListNotificationsRequest(
        user_id=BOB, page_size=1, page_token=page.next_page_token)), grpc.StatusCode.INVALID_ARGUMENT)
    assert bad.field_violations[0].field == "page_token"


async def test_customers_read_only_their_own_notifications_and_admins_read_all(api):
    stub, url = api
    mine, theirs = notification(ALICE, 1), notification(BOB, 2)
    await seed(url, [mine, theirs])
    alice = as_user(ALICE, "notification:read")

    got = await stub.GetNotification(npb.GetNotificationRequest(id=mine.id), metadata=alice)
    assert got.notification.id == mine.id
    info, _ = await _refused(stub.GetNotification(npb.GetNotificationRequest(id=theirs.id), metadata=alice),
                             grpc.StatusCode.PERMISSION_DENIED)
    assert info.reason == "PERMISSION_DENIED"
    await _refused(stub.ListNotifications(npb.ListNotificationsRequest(user_id=BOB), metadata=alice),
                   grpc.StatusCode.PERMISSION_DENIED)
    own = await stub.ListNotifications(npb.ListNotificationsRequest(), metadata=alice)
    assert [n.id for n in own.notifications] == [mine.id]  # no user_id: the caller's own

    admin = as_user(str(uuid.uuid4()), "admin")
    assert (await stub.GetNotification(npb.GetNotificationRequest(id=theirs.id), metadata=admin)).notification.id
    listed = await stub.ListNotifications(npb.ListNotificationsRequest(), metadata=admin)
    assert {n.id for n in listed.notifications} == {mine.id, theirs.id}
