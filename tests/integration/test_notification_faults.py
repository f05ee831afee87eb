"""Faults on the event path, with real service processes, a real broker and a real SMTP server: the broker cut
off, the relay killed between publishing and marking, the consumer killed after its effect but before its ack.
Each test produces N events and asserts exactly N distinct effects (one e-mail per new user), and that the
duplicates the faults cause were really delivered and skipped."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
import uuid
from collections import Counter
from pathlib import Path

import asyncpg
import grpc
import pytest
from tessera.notification.v1 import notification_pb2
from tessera.notification.v1 import notification_service_pb2 as npb
from tessera.notification.v1 import notification_service_pb2_grpc as npb_grpc
from tessera.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

from tessera_runtime.messaging.relay import advisory_lock_key
from tessera_user.adapters.orm import outbox as user_outbox
from tests.support import postgres, rabbitmq
from tests.support.messaging_stack import FAST
from tests.support.processes import ServiceProcess
from tests.support.smtp import SmtpSink
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually

QUEUE = "notification.email"
USER_CREATED = "tessera.user.v1.UserCreated"


@pytest.fixture(scope="module")
def vhost():
    name = rabbitmq.create_vhost()
    yield name
    rabbitmq.delete_vhost(name)


@pytest.fixture
def broker_proxy():
    proxy = TcpProxy(rabbitmq.HOST, rabbitmq.PORT).start()
    yield proxy
    proxy.close()


@pytest.fixture
def processes():
    started: list[ServiceProcess] = []

    async def start(service: str, env: dict[str, str], log: Path) -> ServiceProcess:
        proc = ServiceProcess(service, {**FAST, "TESSERA_ENV": "test", **env}, log)
        started.append(proc)
        return await asyncio.to_thread(proc.start)

    yield start
    for proc in started:
        proc.stop()


def notification_env(tmp_path: Path, amqp_url: str, smtp: SmtpSink) -> dict[str, str]:
    # One handler at a time: deliveries are handled in queue order, so when a later e-mail arrives every earlier
    # message (duplicates included) has been handled.
    return {"TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'notification.db'}",
            "TESSERA_AMQP_URL": amqp_url, "TESSERA_SMTP_HOST": "127.0.0.1", "TESSERA_SMTP_PORT": str(smtp.port),
            "TESSERA_SMTP_STARTTLS": "false", "TESSERA_CONSUMER_CONCURRENCY": "1"}


async def create_users(address: str, count: int, tag: str) -> list[user_pb2.User]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = user_service_pb2_grpc.UserServiceStub(channel)
        users = []
        for i in range(count):
            reply = await stub.CreateUser(user_service_pb2.CreateUserRequest(
                user=user_pb2.User(email=f"{tag}-{i}@example.com", display_name=f"{tag} {i}"),
                request_id=uuid.uuid4().hex), timeout=10)
            users.append(reply.user)
        return users


def exactly_one_each(smtp: SmtpSink, users: list[user_pb2.User]) -> None:
    received = Counter(m["To"].addresses[0].addr_spec for m in smtp.messages)
    assert {u.email: received[u.email] for u in users} == {u.email: 1 for u in users}


def unpublished(sqlite_file: Path) -> int:
    with contextlib.closing(sqlite3.connect(sqlite_file)) as conn:
        return conn.execute("SELECT count(*) FROM outbox WHERE published_at IS NULL").fetchone()[0]


async def test_broker_outage_services_keep_serving_and_every_event_is_delivered_once(
        tmp_path, vhost, smtp, broker_proxy, processes):
    proxied = rabbitmq.amqp_url(vhost, port=broker_proxy.port)
    notification = await processes("notification", notification_env(tmp_path, proxied, smtp),
                                   tmp_path / "notification.log")
    await rabbitmq.wait_for_consumer(rabbitmq.amqp_url(vhost), QUEUE)
    user_db = tmp_path / "user.db"
    user = await processes("user", {"TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{user_db}",
                                    "TESSERA_AMQP_URL": proxied}, tmp_path / "user.log")
    before = await create_users(user.address, 3, "before")
    await smtp.wait_for(3)

    broker_proxy.cut()
    during = await create_users(user.address, 8, "during")  # the user service keeps serving
    async with grpc.aio.insecure_channel(notification.address) as channel:
        listed = await npb_grpc.NotificationServiceStub(channel).ListNotifications(
            npb.ListNotificationsRequest(user_id=before[0].id), timeout=10)  # and so does the notification service
    assert len(listed.notifications) == 1
    await eventually(lambda: "events are kept in the outbox" in user.log_text(), "the relay's outage log line")
    await eventually(lambda: unpublished(user_db) == 8, "the eight events to wait in the outbox")
    assert len(smtp.messages) == 3

    broker_proxy.restore()
    after = await create_users(user.address, 1, "after")
    await smtp.wait_for(12)
    exactly_one_each(smtp, before + during + after)
    await eventually(lambda: unpublished(user_db) == 0, "the outbox to drain")


async def test_relay_killed_between_publish_and_mark_publishes_again_and_the_email_is_sent_once(
        tmp_path, vhost, smtp, processes):
    amqp_url = rabbitmq.amqp_url(vhost)
    tap = rabbitmq.Tap(amqp_url, "tessera.events", [USER_CREATED])
    await processes("notification", notification_env(tmp_path, amqp_url, smtp), tmp_path / "notification.log")
    await rabbitmq.wait_for_consumer(amqp_url, QUEUE)
    name, url = await postgres.create_database()
    dsn = url.replace("postgresql+asyncpg://", "postgresql://")
    env = {"TESSERA_DATABASE_URL": url, "TESSERA_AMQP_URL": amqp_url}
    key = advisory_lock_key(user_outbox)
    holder = rows = None
    try:
        first = await processes("user", env, tmp_path / "user-1.log")
        # Keep the relay away (it takes this lock per pass) while the events are written ...
        holder = await asyncpg.connect(dsn)
        await holder.execute("SELECT pg_advisory_lock($1)", key)
        users = await create_users(first.address, 5, "relay")
        # ... then lock the rows, so that the relay publishes them, has them confirmed, and blocks marking them.
        rows = await asyncpg.connect(dsn)
        locked = rows.transaction()
        await locked.start()
        assert len(await rows.fetch("SELECT seq FROM outbox WHERE published_at IS NULL FOR UPDATE")) == 5
        await holder.execute("SELECT pg_advisory_unlock($1)", key)
        await tap.wait_for(5)
        await smtp.wait_for(5)
        first.kill()  # between the broker's confirm and the mark
        await locked.rollback()
        assert await rows.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 5

        second = await processes("user", env, tmp_path / "user-2.log")
        delivered = await tap.wait_for(10)
        by_id = Counter(props.message_id for _, props, _ in delivered)
        assert len(by_id) == 5 and set(by_id.values()) == {2}  # every event published twice
        sentinel = await create_users(second.address, 1, "sentinel")
        await smtp.wait_for(1, address=sentinel[0].email)
        exactly_one_each(smtp, users + sentinel)  # applied once
        await tap.wait_for(11)  # the sentinel's UserCreated: nothing was published a third time before it
        assert Counter(props.message_id for _, props, _ in tap.messages).most_common(1)[0][1] == 2
        assert await rows.fetchval("SELECT count(*) FROM outbox WHERE published_at IS NULL") == 0
    finally:
        for conn in (holder, rows):
            if conn is not None:
                await conn.close()
        await postgres.drop_database(name)


async def test_consumer_killed_after_sending_but_before_its_ack_is_redelivered_and_sends_nothing_more(
        tmp_path, vhost, smtp, broker_proxy, processes):
    amqp_url = rabbitmq.amqp_url(vhost)
    proxied = rabbitmq.amqp_url(vhost, port=broker_proxy.port)
    env = notification_env(tmp_path, proxied, smtp)
    first = await processes("notification", env, tmp_path / "notification-1.log")
    await rabbitmq.wait_for_consumer(amqp_url, QUEUE)
    user = await processes("user", {"TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'user.db'}",
                                    "TESSERA_AMQP_URL": amqp_url}, tmp_path / "user.log")
    smtp.hold = asyncio.Event()
    [victim] = await create_users(user.address, 1, "victim")
    await asyncio.wait_for(smtp.held.wait(), 30)
    broker_proxy.cut()  # the consumer's ack can no longer reach the broker, which takes the message back
    smtp.hold.set()  # the mail server accepts: the e-mail is sent, the handler commits

    async with grpc.aio.insecure_channel(first.address) as channel:
        stub = npb_grpc.NotificationServiceStub(channel)
        deadline = time.monotonic() + 30
        while True:
            [n] = (await stub.ListNotifications(npb.ListNotificationsRequest(user_id=victim.id),
                                                timeout=10)).notifications
            if n.status == notification_pb2.NOTIFICATION_STATUS_SENT:
                break
            assert time.monotonic() < deadline, "the handler did not commit"
            await asyncio.sleep(0.05)
    first.kill()  # after the effect, before any ack
    broker_proxy.restore()

    second = await processes("notification", env, tmp_path / "notification-2.log")
    sentinel = await create_users(user.address, 1, "sentinel")
    await smtp.wait_for(1, address=sentinel[0].email)
    exactly_one_each(smtp, [victim, *sentinel])
    assert f'"event_id": "{n.event_id}"' in second.log_text()
    assert "duplicate event skipped" in second.log_text()
    assert rabbitmq.queue_depth(amqp_url, QUEUE) == 0
    async with grpc.aio.insecure_channel(second.address) as channel:
        [again] = (await npb_grpc.NotificationServiceStub(channel).ListNotifications(
            npb.ListNotificationsRequest(user_id=victim.id), timeout=10)).notifications
    assert (again.status, again.attempts) == (notification_pb2.NOTIFICATION_STATUS_SENT, 1)
