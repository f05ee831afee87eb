"""A mail server that keeps refusing one recipient: that notification is retried, then dead-lettered (recorded
DEAD_LETTERED, NotificationFailed published) while the others go out; `tessera dlq replay` sends it."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from tessera.notification.v1 import notification_events_pb2, notification_pb2
from tessera.notification.v1 import notification_service_pb2 as npb
from tessera.notification.v1 import notification_service_pb2_grpc as npb_grpc
from tessera.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

from tessera_runtime.cli import main as tessera
from tests.support import rabbitmq
from tests.support.messaging_stack import environment, running
from tests.support.smtp import SmtpSink

QUEUE = "notification.email"


@pytest.fixture(scope="module")
def amqp_url():
    vhost = rabbitmq.create_vhost()
    yield rabbitmq.amqp_url(vhost)
    rabbitmq.delete_vhost(vhost)


async def test_refused_recipient_is_retried_dead_lettered_then_replayed_and_nothing_is_lost(
        tmp_path, amqp_url, capsys):
    smtp = await SmtpSink().start()
    smtp.refuse["poison@example.com"] = (451, "4.3.0 mailbox temporarily unavailable")
    tap = rabbitmq.Tap(amqp_url, "tessera.events", ["tessera.notification.v1.NotificationFailed"])
    n_env = environment("notification", database_url=f"sqlite+aiosqlite:///{tmp_path / 'n.db'}", amqp_url=amqp_url,
                        smtp_port=smtp.port)
    u_env = environment("user", database_url=f"sqlite+aiosqlite:///{tmp_path / 'u.db'}", amqp_url=amqp_url)
    try:
        async with running("notification", n_env) as (_, n_channel), running("user", u_env) as (_, u_channel):
            await rabbitmq.wait_for_consumer(amqp_url, QUEUE)
            users = user_service_pb2_grpc.UserServiceStub(u_channel)
            notifications = npb_grpc.NotificationServiceStub(n_channel)
            created = {}
            for name in ("first", "poison", "second", "third"):
                reply = await users.CreateUser(user_service_pb2.CreateUserRequest(
                    user=user_pb2.User(email=f"{name}@example.com", display_name=name.title()),
                    request_id=uuid.uuid4().hex))
                created[name] = reply.user
            await smtp.wait_for(1, address="third@example.com")  # the ones after the poison are not held up

            [(_, _, body)] = await tap.wait_for(1)  # NotificationFailed once the last attempt failed
            failed = notification_events_pb2.NotificationFailed.FromString(body)
            assert failed.status == notification_pb2.NOTIFICATION_STATUS_DEAD_LETTERED
            assert failed.attempts == 3 and "451" in failed.last_error
            [n] = (await notifications.ListNotifications(
                npb.ListNotificationsRequest(user_id=created["poison"].id))).notifications
            assert (n.status, n.attempts) == (notification_pb2.NOTIFICATION_STATUS_DEAD_LETTERED, 3)
            assert "4.3.0 mailbox temporarily unavailable" in n.last_error and not n.HasField("next_attempt_time")
            deadline = time.monotonic() + 30
            while rabbitmq.queue_depth(amqp_url, f"{QUEUE}.dlq") != 1:
                assert time.monotonic() < deadline, "the poison message did not reach the dead-letter queue"
                await asyncio.sleep(0.05)
            assert smtp.to("poison@example.com") == []

            assert tessera(["dlq", "--amqp-url", amqp_url, "list"]) == 0
            assert f"{QUEUE}.dlq" in capsys.readouterr().out
            assert tessera(["dlq", "--amqp-url", amqp_url, "show", QUEUE, n.event_id]) == 0
            shown = capsys.readouterr().out
            assert "poison@example.com" in shown and "451" in shown

            del smtp.refuse["poison@example.com"]  # the mailbox is back
            assert tessera(["dlq", "--amqp-url", amqp_url, "replay", QUEUE, n.event_id]) == 0
            [mail] = await smtp.wait_for(1, address="poison@example.com")
            assert mail["Subject"] == "Welcome to Tessera, Poison"
            [n] = (await notifications.ListNotifications(
                npb.ListNotificationsRequest(user_id=created["poison"].id))).notifications
            deadline = time.monotonic() + 30
            while n.status != notification_pb2.NOTIFICATION_STATUS_SENT:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
                n = (await notifications.GetNotification(npb.GetNotificationRequest(id=n.id))).notification
            assert (n.attempts, n.last_error, n.message_id) == (4, "", mail["Message-ID"])
            # Four users, four welcome e-mails: one each.
            assert sorted(m["To"].addresses[0].addr_spec for m in smtp.messages) == sorted(
                f"{name}@example.com" for name in created)
            assert rabbitmq.queue_depth(amqp_url, f"{QUEUE}.dlq") == 0
    finally:
        await smtp.stop()
