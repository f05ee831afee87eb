"""`tessera dlq` against a real broker: a replay the broker refuses half-way, a dead-letter queue longer than one
read, and limits that are no number of messages."""

from __future__ import annotations

import pika
import pytest

from tessera_runtime.cli import main as tessera
from tessera_runtime.messaging import topology
from tests.support import rabbitmq
from tests.support.waiting import wait_for

QUEUE = "probe.replay"
DLQ = f"{QUEUE}.dlq"


@pytest.fixture
def url():
    vhost = rabbitmq.create_vhost()
    yield rabbitmq.amqp_url(vhost)
    rabbitmq.delete_vhost(vhost)


def declare(url: str, queue_arguments: dict | None = None, dlq_arguments: dict | None = None) -> None:
    """The consumer queue and its dead-letter queue: classic queues, as consumers declare them by default."""
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        channel.queue_declare(QUEUE, durable=True, arguments=queue_arguments)
        channel.queue_declare(DLQ, durable=True, arguments=dlq_arguments)


def dead_letter(url: str, count: int) -> list[str]:
    """Puts `count` messages into the dead-letter queue as a consumer's last attempt would; returns their ids."""
    ids = [f"evt-{i:05d}" for i in range(count)]
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        for message_id in ids:
            channel.basic_publish("", DLQ, message_id.encode(), pika.BasicProperties(
                message_id=message_id, type="tessera.user.v1.UserActivated", delivery_mode=2,
                headers={"x-tessera-attempt": 5, "x-tessera-last-error": "boom"}))
    wait_for(lambda: rabbitmq.queue_depth(url, DLQ) == count, what=f"{count} messages in {DLQ}")
    return ids


def bodies(url: str, queue: str) -> list[str]:
    """The messages of a queue, in order, taken off it."""
    got = []
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        while True:
            method, _, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return got
            got.append(body.decode())


def test_a_replay_to_a_deleted_consumer_queue_says_so_and_keeps_every_message(url, capsys):
    declare(url)
    ids = dead_letter(url, 3)
    with rabbitmq.blocking_connection(url) as connection:
        connection.channel().queue_delete(QUEUE)

    assert tessera(["dlq", "--amqp-url", url, "replay", QUEUE, "--all"]) == 1
    out, err = capsys.readouterr()
    assert "replayed" not in out
    assert "Traceback" not in err and f"could not be routed to {QUEUE}" in err
    assert f"3 message(s) remain in {DLQ}" in err
    assert bodies(url, DLQ) == ids  # all of them, in their order


def test_a_replay_the_broker_refuses_half_way_prints_what_it_moved_and_keeps_the_rest(url, capsys):
    # The consumer queue takes two more messages, then the broker refuses (nacks) the next copy.
    declare(url, {"x-max-length": 2, "x-overflow": "reject-publish"})
    ids = dead_letter(url, 5)

    assert tessera(["dlq", "--amqp-url", url, "replay", QUEUE, "--all"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"replayed {i} to {QUEUE}" for i in ids[:2]]
    assert "Traceback" not in err and f"refused {ids[2]}" in err and f"3 message(s) remain in {DLQ}" in err
    assert bodies(url, QUEUE) == ids[:2]
    assert bodies(url, DLQ) == ids[2:]  # nothing lost, nothing reordered


def test_a_replay_from_a_quorum_dead_letter_queue_refused_half_way_keeps_the_rest_once_each(url, capsys):
    # TESSERA_QUEUE_TYPE=quorum: the dead-letter queue is a quorum queue, which puts the messages a replay read and
    # did not move back in no set order. The consumer queue refuses the third copy (a classic queue refuses exactly
    # at its length limit; a quorum queue only once it is exceeded).
    declare(url, {"x-max-length": 2, "x-overflow": "reject-publish"}, topology.QUORUM)
    ids = dead_letter(url, 5)

    assert tessera(["dlq", "--amqp-url", url, "replay", QUEUE, "--all"]) == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"replayed {i} to {QUEUE}" for i in ids[:2]]
    assert "Traceback" not in err and f"refused {ids[2]}" in err and f"3 message(s) remain in {DLQ}" in err
    assert bodies(url, QUEUE) == ids[:2]
    assert sorted(bodies(url, DLQ)) == ids[2:]  # nothing lost, nothing twice


def test_replay_all_moves_a_dead_letter_queue_longer_than_ten_thousand(url, capsys):
    declare(url)
    ids = dead_letter(url, 10_007)

    assert tessera(["dlq", "--amqp-url", url, "replay", QUEUE, "--all"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 10_007 and err == ""
    assert rabbitmq.queue_depth(url, DLQ) == 0
    assert bodies(url, QUEUE) == ids


def test_replay_of_ids_finds_one_past_the_first_ten_thousand(url, capsys):
    declare(url)
    ids = dead_letter(url, 10_003)

    assert tessera(["dlq", "--amqp-url", url, "replay", QUEUE, ids[-1]]) == 0
    assert capsys.readouterr().out == f"replayed {ids[-1]} to {QUEUE}\n"
    assert bodies(url, QUEUE) == [ids[-1]]
    assert bodies(url, DLQ) == ids[:-1]


@pytest.mark.parametrize("limit", ["0", "-3", "ten"])
def test_list_refuses_a_limit_that_is_no_positive_number(url, capsys, limit):
    declare(url)
    dead_letter(url, 2)

    with pytest.raises(SystemExit) as exit_:
        tessera(["dlq", "--amqp-url", url, "list", QUEUE, "--limit", limit])
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert "--limit" in err and "is empty" not in out + err
    assert rabbitmq.queue_depth(url, DLQ) == 2


@pytest.mark.parametrize(("broker", "said"), [
    ("garbage", "got scheme ''"),
    ("http://127.0.0.1:5672/", "got scheme 'http'"),
    ("amqp://guest:guest@127.0.0.1:99999/%2F", "is not a valid URL"),
])
@pytest.mark.parametrize("command", [["list"], ["list", QUEUE], ["show", QUEUE, "evt-1"], ["replay", QUEUE, "--all"]])
def test_a_broker_url_that_is_no_amqp_url_is_refused_in_one_line(capsys, monkeypatch, broker, said, command):
    monkeypatch.setenv("TESSERA_AMQP_URL", broker)
    assert tessera(["dlq", *command]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("tessera dlq: TESSERA_AMQP_URL ")
    assert said in err and len(err.strip().splitlines()) == 1
    assert tessera(["dlq", "--amqp-url", broker, *command]) == 2
    assert "--amqp-url" in capsys.readouterr().err


def test_a_replay_that_names_nothing_to_replay_is_a_usage_error(url, capsys):
    declare(url)
    dead_letter(url, 1)
    assert tessera(["dlq", "--amqp-url", url, "replay", QUEUE]) == 2  # the module's doc: 2 is a usage error
    assert "name the message ids to replay, or pass --all" in capsys.readouterr().err
    assert rabbitmq.queue_depth(url, DLQ) == 1


def test_a_broker_url_the_client_refuses_is_a_usage_error_without_its_password(url, capsys):
    declare(url)
    dead_letter(url, 1)
    refused = url.replace("guest:guest@", "guest:s3cret@") + "?heartbeat=soon"

    assert tessera(["dlq", "--amqp-url", refused, "list", QUEUE]) == 2
    _, err = capsys.readouterr()
    assert "Traceback" not in err and "heartbeat" in err and "s3cret" not in err
    assert rabbitmq.queue_depth(url, DLQ) == 1
