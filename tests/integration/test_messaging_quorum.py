"""TESSERA_QUEUE_TYPE on the real broker: classic queues by default, quorum queues when set to quorum (what consumers
and publishers declare), `tessera queues migrate` converting classic queues to quorum queues with every message
they hold (and back), and a service that finds its queues of the other type at start exiting with one clear error
line."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import uuid

import pika
import pytest
from tessera.user.v1 import user_events_pb2

from tessera_runtime.cli import main as tessera
from tessera_runtime.messaging import Consumer, MessagingSettings, Subscription, queues, topology
from tessera_runtime.messaging.amqp import running_links
from tessera_runtime.messaging.consumer import ACK
from tessera_runtime.messaging.topology import QueueNotMigrated, QueueTopology, declare_blocking
from tests.support import rabbitmq
from tests.support.processes import ROOT, ServiceProcess
from tests.support.tcp_proxy import TcpProxy
from tests.support.waiting import eventually, wait_for

EXCHANGE = "tessera.events"
QUEUE = "notification.email"  # the consumer queue the installed services declare
ROUTES = topology.installed_consumer_routes()[QUEUE]
# The other installed consumer's queue: missing on these brokers, so migrate (of every queue) declares it anew.
OTHER = "analytics.metrics"
OTHER_QUEUES = (f"{OTHER}.retry.200ms", f"{OTHER}.retry.400ms", OTHER, f"{OTHER}.dlq")
DELAYS = (0.2, 0.4)
SETTINGS = MessagingSettings(consumer_retry_delays=DELAYS, consumer_max_attempts=3, reconnect_max_seconds=0.5,
                             queue_type="quorum")
CLASSIC_SETTINGS = dataclasses.replace(SETTINGS, queue_type="classic")  # the default
AT_LEAST_ONCE = {"x-dead-letter-strategy": "at-least-once", "x-overflow": "reject-publish"}


@pytest.fixture
def vhost():
    name = rabbitmq.create_vhost()
    yield name
    rabbitmq.delete_vhost(name)


def broker_queues(vhost: str) -> dict[str, dict]:
    """Every queue of the vhost as the broker has it: name -> {type, arguments, messages}."""
    out = subprocess.run(["rabbitmqctl", "-q", "list_queues", "-p", vhost, "name", "type", "arguments",
                          "--formatter", "json"], check=True, capture_output=True, text=True, timeout=60).stdout
    url = rabbitmq.amqp_url(vhost)
    # rabbitmqctl gives the arguments as [name, AMQP type, value] triples, and a quorum queue's message count as
    # of its last statistics; the queue itself tells the count now.
    return {q["name"]: {"type": q["type"], "arguments": {name: value for name, _, value in q["arguments"] or ()},
                        "messages": rabbitmq.queue_depth(url, q["name"])} for q in json.loads(out)}


def subscription(purpose: str = "email") -> Subscription:
    async def ignore(_event, _meta):
        return ACK

    return Subscription("notification", purpose, {user_events_pb2.UserCreated: ignore})


async def test_a_consumer_declares_quorum_queues_that_dead_letter_at_least_once(vhost):
    url = rabbitmq.amqp_url(vhost)
    consumer = Consumer(subscription(), amqp_url=url, settings=SETTINGS)
    await consumer.start()
    try:
        await rabbitmq.wait_for_consumer(url, QUEUE)
    finally:
        await consumer.stop()

    declared = broker_queues(vhost)
    assert set(declared) == {QUEUE, f"{QUEUE}.dlq", f"{QUEUE}.retry.200ms", f"{QUEUE}.retry.400ms"}
    assert {q["type"] for q in declared.values()} == {"quorum"}
    assert declared[QUEUE]["arguments"] == {
        "x-queue-type": "quorum", "x-dead-letter-exchange": f"{EXCHANGE}.dead-letter",
        "x-dead-letter-routing-key": QUEUE, **AT_LEAST_ONCE}
    for delay in ("200ms", "400ms"):
        assert declared[f"{QUEUE}.retry.{delay}"]["arguments"] == {
            "x-queue-type": "quorum", "x-dead-letter-exchange": "", "x-dead-letter-routing-key": QUEUE,
            **AT_LEAST_ONCE}
    assert declared[f"{QUEUE}.dlq"]["arguments"] == {"x-queue-type": "quorum"}


async def test_a_publisher_and_a_consumer_may_declare_the_quorum_queue_in_either_order(vhost):
    url = rabbitmq.amqp_url(vhost)
    with rabbitmq.blocking_connection(url) as connection:  # the publisher first, as a relay declares
        declare_blocking(connection.channel(), topology.publisher_declarations(EXCHANGE, {QUEUE: ROUTES}, "quorum"))
    consumer = Consumer(subscription(), amqp_url=url, settings=SETTINGS)
    await consumer.start()
    try:
        await rabbitmq.wait_for_consumer(url, QUEUE)
        with rabbitmq.blocking_connection(url) as connection:  # and a publisher again, after the consumer
            declare_blocking(connection.channel(), topology.publisher_declarations(EXCHANGE, {QUEUE: ROUTES}, "quorum"))
    finally:
        await consumer.stop()
    assert broker_queues(vhost)[QUEUE]["type"] == "quorum"


# -- the classic queues of an earlier version, and their migration ----------------------------------------------

def declare_classic(url: str) -> None:
    """The topology as the earlier version declared it: the same names and bindings, classic queues."""
    back = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": QUEUE}
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        channel.exchange_declare(EXCHANGE, exchange_type="topic", durable=True)
        channel.exchange_declare(f"{EXCHANGE}.dead-letter", exchange_type="direct", durable=True)
        channel.queue_declare(QUEUE, durable=True, arguments={"x-dead-letter-exchange": f"{EXCHANGE}.dead-letter",
                                                              "x-dead-letter-routing-key": QUEUE})
        channel.queue_declare(f"{QUEUE}.dlq", durable=True)
        channel.queue_bind(f"{QUEUE}.dlq", f"{EXCHANGE}.dead-letter", routing_key=QUEUE)
        for delay in ("200ms", "400ms"):
            channel.queue_declare(f"{QUEUE}.retry.{delay}", durable=True, arguments=back)
        for key in ROUTES:
            channel.queue_bind(QUEUE, EXCHANGE, routing_key=key)


def fill(url: str, where: dict[str, int], expiration: str | None = None) -> dict[str, set[str]]:
    """Publishes messages straight into the queues (`where`: queue -> how many; retry queues get `expiration`);
    returns each queue's message ids."""
    ids: dict[str, set[str]] = {}
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for queue, count in where.items():
            ids[queue] = set()
            for i in range(count):
                message_id = f"{queue}-{i}-{uuid.uuid4().hex[:6]}"
                retry = ".retry." in queue
                channel.basic_publish("", queue, message_id.encode(), pika.BasicProperties(
                    message_id=message_id, type=ROUTES[0], delivery_mode=2, headers={"x-tessera-attempt": 2},
                    expiration=expiration if retry else None), mandatory=True)
                ids[queue].add(message_id)
    return ids


def take_all(url: str, queue: str) -> list[tuple[str, str | None, dict]]:
    """The messages of a queue (id, expiration, headers), taken off it."""
    got = []
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        while True:
            method, props, _body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.append((props.message_id, props.expiration, props.headers or {}))


def migrate_cli(url: str, monkeypatch, capsys, *queue_names: str, queue_type: str | None = "quorum",
                ) -> tuple[int, str, str]:
    """`tessera queues migrate` with TESSERA_QUEUE_TYPE=queue_type (None: unset, the default)."""
    monkeypatch.setenv("TESSERA_CONSUMER_RETRY_DELAYS", ",".join(str(d) for d in DELAYS))
    if queue_type is None:
        monkeypatch.delenv("TESSERA_QUEUE_TYPE", raising=False)
    else:
        monkeypatch.setenv("TESSERA_QUEUE_TYPE", queue_type)
    monkeypatch.delenv("TESSERA_EVENTS_EXCHANGE", raising=False)
    code = tessera(["queues", "migrate", "--amqp-url", url, *queue_names])
    out, err = capsys.readouterr()
    return code, out, err


def test_migrate_converts_classic_queues_to_quorum_with_every_message_and_is_idempotent(vhost, monkeypatch, capsys):
    url = rabbitmq.amqp_url(vhost)
    declare_classic(url)
    # Retries that wait for an hour: they must still be waiting, with their TTL, in the quorum retry queues.
    ids = fill(url, {QUEUE: 120, f"{QUEUE}.retry.200ms": 30, f"{QUEUE}.retry.400ms": 20, f"{QUEUE}.dlq": 40},
               expiration="3600000")

    code, out, err = migrate_cli(url, monkeypatch, capsys)

    assert (code, err) == (0, "")
    assert out.splitlines() == [*(f"{name}: quorum queue already" for name in OTHER_QUEUES),
        f"{QUEUE}.retry.200ms: converted to a quorum queue, 30 message(s) moved out and 30 back",
        f"{QUEUE}.retry.400ms: converted to a quorum queue, 20 message(s) moved out and 20 back",
        f"{QUEUE}: converted to a quorum queue, 120 message(s) moved out and 120 back",
        f"{QUEUE}.dlq: converted to a quorum queue, 40 message(s) moved out and 40 back"]
    after = broker_queues(vhost)
    assert set(after) == set(ids) | set(OTHER_QUEUES)  # no temporary queue left
    assert {after[name]["type"] for name in OTHER_QUEUES} == {"quorum"}
    expected = QueueTopology(EXCHANGE, QUEUE, ROUTES, DELAYS, "quorum").declarations()
    for declaration in (d for d in expected if d.kind == "queue"):
        assert after[declaration.name]["type"] == "quorum"
        assert after[declaration.name]["arguments"] == declaration.arguments
        assert after[declaration.name]["messages"] == len(ids[declaration.name])

    # Again: nothing to do, nothing moved.
    code, out, err = migrate_cli(url, monkeypatch, capsys)
    assert (code, err) == (0, "")
    assert out.splitlines() == [f"{name}: quorum queue already" for name in (
        *OTHER_QUEUES, f"{QUEUE}.retry.200ms", f"{QUEUE}.retry.400ms", QUEUE, f"{QUEUE}.dlq")]

    # The bindings came along: an event published now reaches the quorum queue.
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(EXCHANGE, ROUTES[0], b"new", pika.BasicProperties(message_id="new", delivery_mode=2),
                              mandatory=True)
    for queue, wanted in ids.items():
        taken = take_all(url, queue)
        assert sorted(m for m, _, _ in taken) == sorted(wanted | ({"new"} if queue == QUEUE else set()))
        assert all(h.get("x-tessera-attempt") == 2 for m, _, h in taken if m != "new")
        assert all(queues.EXPIRATION_HEADER not in h for _, _, h in taken)
        if ".retry." in queue:  # each retry keeps its TTL (and dead-letters back to the consumer queue)
            assert {e for _, e, _ in taken} == {"3600000"}


def test_migrate_with_the_default_type_converts_quorum_queues_back_to_classic_with_every_message(
        vhost, monkeypatch, capsys):
    url = rabbitmq.amqp_url(vhost)
    declare_quorum(url)
    ids = fill(url, {QUEUE: 60, f"{QUEUE}.retry.200ms": 10, f"{QUEUE}.retry.400ms": 10, f"{QUEUE}.dlq": 20},
               expiration="3600000")
    with rabbitmq.blocking_connection(url) as connection:  # a message the quorum queue delivered once already
        channel = connection.channel()
        channel.basic_get(f"{QUEUE}.dlq", auto_ack=False)
    code, out, err = migrate_cli(url, monkeypatch, capsys, queue_type=None)

    assert (code, err) == (0, "")
    assert out.splitlines() == [*(f"{name}: classic queue already" for name in OTHER_QUEUES),
        f"{QUEUE}.retry.200ms: converted to a classic queue, 10 message(s) moved out and 10 back",
        f"{QUEUE}.retry.400ms: converted to a classic queue, 10 message(s) moved out and 10 back",
        f"{QUEUE}: converted to a classic queue, 60 message(s) moved out and 60 back",
        f"{QUEUE}.dlq: converted to a classic queue, 20 message(s) moved out and 20 back"]
    after = broker_queues(vhost)
    assert set(after) == set(ids) | set(OTHER_QUEUES)
    for declaration in (d for d in QueueTopology(EXCHANGE, QUEUE, ROUTES, DELAYS).declarations() if d.kind == "queue"):
        assert after[declaration.name]["type"] == "classic"
        assert after[declaration.name]["arguments"] == (declaration.arguments or {})
    code, out, _ = migrate_cli(url, monkeypatch, capsys, queue_type="classic")
    assert code == 0 and out.splitlines()[-1] == f"{QUEUE}.dlq: classic queue already"

    for queue, wanted in ids.items():
        taken = take_all(url, queue)
        assert sorted(m for m, _, _ in taken) == sorted(wanted)
        assert all("x-delivery-count" not in h and queues.EXPIRATION_HEADER not in h for _, _, h in taken)
        if ".retry." in queue:
            assert {e for _, e, _ in taken} == {"3600000"}


def test_retries_moved_by_the_migration_still_come_back_to_the_consumer_queue(vhost, monkeypatch, capsys):
    url = rabbitmq.amqp_url(vhost)
    declare_classic(url)
    ids = fill(url, {QUEUE: 5, f"{QUEUE}.retry.400ms": 25}, expiration="1500")

    assert migrate_cli(url, monkeypatch, capsys)[0] == 0

    # Whether they expired before, during or after their move, every retry reaches the consumer queue once.
    every = ids[QUEUE] | ids[f"{QUEUE}.retry.400ms"]
    wait_for(lambda: broker_queues(vhost)[QUEUE]["messages"] == len(every), what="the retries back in the queue")
    assert sorted(m for m, _, _ in take_all(url, QUEUE)) == sorted(every)
    assert broker_queues(vhost)[f"{QUEUE}.retry.400ms"]["messages"] == 0


def test_an_interrupted_migration_finishes_when_run_again_and_loses_nothing(vhost, monkeypatch, capsys):
    url = rabbitmq.amqp_url(vhost)
    declare_classic(url)
    ids = fill(url, {QUEUE: 50})
    restored = 0
    real = queues._restore_expiration

    def failing(properties):
        nonlocal restored
        restored += 1
        if restored == 20:  # the connection breaks while messages move back into the new quorum queue
            raise ConnectionError("broker connection lost")
        return real(properties)

    monkeypatch.setattr(queues, "_restore_expiration", failing)
    with pytest.raises(ConnectionError):
        migrate_cli(url, monkeypatch, capsys, QUEUE)
    halfway = broker_queues(vhost)
    assert halfway[QUEUE]["type"] == "quorum" and halfway[f"{QUEUE}.migrating"]["messages"] > 0
    assert halfway[QUEUE]["messages"] + halfway[f"{QUEUE}.migrating"]["messages"] == 50

    monkeypatch.setattr(queues, "_restore_expiration", real)
    code, out, _ = migrate_cli(url, monkeypatch, capsys, QUEUE)
    assert code == 0 and f"{QUEUE}: quorum queue; " in out and "of an interrupted run moved back" in out
    assert f"{QUEUE}.migrating" not in broker_queues(vhost)
    assert sorted(m for m, _, _ in take_all(url, QUEUE)) == sorted(ids[QUEUE])


def test_migrate_refuses_while_a_consumer_of_the_earlier_version_is_attached(vhost, monkeypatch, capsys):
    url = rabbitmq.amqp_url(vhost)
    declare_classic(url)
    fill(url, {QUEUE: 3})
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=1)
        channel.basic_consume(QUEUE, lambda *_: None)
        connection.process_data_events(0.2)
        code, out, err = migrate_cli(url, monkeypatch, capsys, QUEUE)
    assert code == 1 and out == ""
    assert err.startswith(f"tessera queues migrate: {QUEUE} has 1 consumer(s)") and "Traceback" not in err
    after = broker_queues(vhost)
    assert after[QUEUE]["type"] == "classic" and after[QUEUE]["messages"] == 3
    assert f"{QUEUE}.migrating" not in after


def test_migrate_names_an_unknown_queue(vhost, monkeypatch, capsys):
    code, out, err = migrate_cli(rabbitmq.amqp_url(vhost), monkeypatch, capsys, "nobody.listens")
    assert code == 2 and out == "" and "unknown consumer queue(s) nobody.listens" in err


# -- a consumer that finds its queues of the other type ----------------------------------------------------------

def declare_quorum(url: str) -> None:
    """The topology as services with TESSERA_QUEUE_TYPE=quorum declare it."""
    with rabbitmq.blocking_connection(url) as connection:
        declare_blocking(connection.channel(), QueueTopology(EXCHANGE, QUEUE, ROUTES, DELAYS, "quorum").declarations())


async def test_a_consumer_that_finds_a_classic_queue_fails_its_start_and_stops_reconnecting(vhost):
    url = rabbitmq.amqp_url(vhost)
    declare_classic(url)
    consumer = Consumer(subscription(), amqp_url=url, settings=SETTINGS)
    with pytest.raises(QueueNotMigrated) as failed:
        await consumer.start()
    assert (failed.value.queue, failed.value.found, failed.value.configured) == (QUEUE, "classic", "quorum")
    assert "tessera queues migrate" in str(failed.value)
    await eventually(lambda: consumer.link not in running_links(), "the consumer's link to stop")
    assert consumer.link.stopped and not consumer.link.ready
    assert broker_queues(vhost)[QUEUE]["type"] == "classic"


async def test_a_classic_consumer_that_finds_quorum_queues_fails_its_start_the_same(vhost):
    url = rabbitmq.amqp_url(vhost)
    declare_quorum(url)
    consumer = Consumer(subscription(), amqp_url=url, settings=CLASSIC_SETTINGS)
    with pytest.raises(QueueNotMigrated) as failed:
        await consumer.start()
    assert (failed.value.found, failed.value.configured) == ("quorum", "classic")
    assert failed.value.queue.startswith(QUEUE)  # the first queue it declares: a retry queue or the queue itself
    await eventually(lambda: consumer.link not in running_links(), "the consumer's link to stop")
    assert {q["type"] for q in broker_queues(vhost).values()} == {"quorum"}


async def test_by_default_a_consumer_declares_classic_queues_as_earlier_versions_did(vhost):
    url = rabbitmq.amqp_url(vhost)
    declare_classic(url)  # the queues of an earlier version: taken as they are
    consumer = Consumer(subscription(), amqp_url=url, settings=MessagingSettings.from_env({
        "TESSERA_CONSUMER_RETRY_DELAYS": "0.2,0.4"}))
    await consumer.start()
    try:
        await rabbitmq.wait_for_consumer(url, QUEUE)
    finally:
        await consumer.stop()
    declared = broker_queues(vhost)
    assert {q["type"] for q in declared.values()} == {"classic"}
    assert declared[QUEUE]["arguments"] == {"x-dead-letter-exchange": f"{EXCHANGE}.dead-letter",
                                            "x-dead-letter-routing-key": QUEUE}
    assert declared[f"{QUEUE}.dlq"]["arguments"] == {}


def serve_notification(url: str, tmp_path, queue_type: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TESSERA_QUEUE_TYPE"}
    if queue_type is not None:
        env["TESSERA_QUEUE_TYPE"] = queue_type
    return subprocess.run(
        [sys.executable, "-m", "tessera_runtime.cli", "serve", "notification"], cwd=ROOT, timeout=60,
        capture_output=True, text=True,
        env={**env, "TESSERA_GRPC_PORT": "0", "TESSERA_AMQP_URL": url, "TESSERA_ENV": "test",
             "TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'notification.db'}",
             "TESSERA_MAIL_DIR": str(tmp_path / "mail"), "TESSERA_AMQP_RECONNECT_MAX_SECONDS": "0.5",
             "TESSERA_CONSUMER_RETRY_DELAYS": ",".join(str(d) for d in DELAYS)})


@pytest.mark.parametrize(("queue_type", "found", "configured"), [
    ("quorum", "classic", "quorum"),  # classic queues of an earlier deployment, and quorum configured
    (None, "quorum", "classic"),  # quorum queues, and the default (classic) configured
])
def test_a_service_that_finds_its_queues_of_the_other_type_exits_with_one_error_line_naming_them(
        vhost, tmp_path, queue_type, found, configured):
    url = rabbitmq.amqp_url(vhost)
    (declare_classic if found == "classic" else declare_quorum)(url)
    result = serve_notification(url, tmp_path, queue_type)

    assert result.returncode == 4
    assert "listening on" not in result.stdout
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON: no traceback
    [error] = [line for line in lines if line["level"] == "ERROR"]
    assert error["queue"].startswith(QUEUE) and error["command"] == "tessera queues migrate"
    assert (error["found_queue_type"], error["queue_type"], error["exit_code"]) == (found, configured, 4)
    assert f"{error['queue']} is a {found} queue but TESSERA_QUEUE_TYPE is {configured}" in error["message"]
    assert f"`tessera queues migrate` with TESSERA_QUEUE_TYPE={configured}" in error["message"]
    found_queues = broker_queues(vhost)
    assert {q["type"] for name, q in found_queues.items() if name.startswith(QUEUE)} == {found}  # nothing changed
    # The other consumer's queue did not exist: the service's relay may have declared it (as configured) before the
    # service exited.
    assert found_queues.get(OTHER, {"type": configured})["type"] == configured


def test_a_service_that_reaches_the_broker_only_after_its_start_and_finds_a_classic_queue_exits_the_same(
        vhost, tmp_path):
    declare_classic(rabbitmq.amqp_url(vhost))
    proxy = TcpProxy(rabbitmq.HOST, rabbitmq.PORT).start()
    proxy.cut()  # the broker is out of reach as the service starts: it starts all the same
    service = ServiceProcess("notification", {
        "TESSERA_AMQP_URL": rabbitmq.amqp_url(vhost, port=proxy.port), "TESSERA_ENV": "test",
        "TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'notification.db'}",
        "TESSERA_MAIL_DIR": str(tmp_path / "mail"), "TESSERA_AMQP_RECONNECT_MAX_SECONDS": "0.5",
        "TESSERA_QUEUE_TYPE": "quorum"},
        tmp_path / "notification.log")
    try:
        service.start()
        proxy.restore()
        assert service.proc is not None
        returncode = service.proc.wait(timeout=60)
    finally:
        service.stop()
        proxy.close()

    assert returncode == 4
    lines = [json.loads(line) for line in service.log_text().splitlines()]  # every line is JSON: no traceback
    # (pika's own lines say the broker could not be reached at first)
    errors = [line for line in lines if line["level"] == "ERROR" and line["logger"].startswith("tessera")]
    assert [(e["queue"], e["command"], e["exit_code"]) for e in errors] == [(QUEUE, "tessera queues migrate", 4)]
