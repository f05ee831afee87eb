"""The relay's publisher on its link's thread, driven by hand with a fake channel: what a pass's stream lets out
after a nack or a reconnect, and how a batch's frames reach the transport."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace

import pika
import pytest
from pika.spec import Basic

from tessera_runtime.messaging.envelope import OutgoingEvent
from tessera_runtime.messaging.relay import _WRITE_CHUNK, ACK, NACK, RETURNED, ConfirmingPublisher, _Batch


class FakeConnection:
    """Stands in for pika's connection: `_adapter_emit_data` is where pika hands over each marshalled frame."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def _adapter_emit_data(self, data: bytes) -> None:
        self.writes.append(data)


class FakeChannel:
    """Records each publish and, like pika, emits a publish as three frames (method, header, body)."""

    def __init__(self) -> None:
        self.connection = FakeConnection()
        self.published: list[str] = []

    def basic_publish(self, exchange, routing_key, body, properties, mandatory=False) -> None:
        self.published.append(properties.message_id)
        for part in (b"method:", b"header:", body):
            self.connection._adapter_emit_data(part + b"|")


def events(*ids: str, size: int = 0) -> list[OutgoingEvent]:
    return [OutgoingEvent(seq=i, event_id=event_id, routing_key="tessera.user.v1.UserActivated",
                          body=event_id.encode().ljust(size, b"."),
                          properties=pika.BasicProperties(message_id=event_id))
            for i, event_id in enumerate(ids)]


@pytest.fixture
def connected() -> Iterator[tuple[ConfirmingPublisher, FakeChannel]]:
    """A publisher whose link never runs (nothing connects), with a ready fake channel of generation 1."""
    publisher = ConfirmingPublisher("amqp://guest:guest@127.0.0.1:1/", "test", "tessera.events")
    channel = FakeChannel()
    publisher._channel, publisher._ready, publisher.generation = channel, True, 1
    yield publisher, channel
    publisher._ioloop.close()


def confirm(publisher: ConfirmingPublisher, method) -> None:
    publisher._on_confirm(publisher._channel, SimpleNamespace(method=method))


def test_after_a_nack_no_later_batch_of_the_stream_goes_out_and_a_new_pass_publishes_again(connected):
    publisher, channel = connected
    stream = publisher.stream()
    first, second = _Batch(events("a", "b", "c"), stream), _Batch(events("d", "e"), stream)
    publisher._publish(first)
    confirm(publisher, Basic.Nack(delivery_tag=2, multiple=False))  # "b" refused by the broker
    publisher._publish(second)  # handed over before the nack was known, published after it: held back
    confirm(publisher, Basic.Ack(delivery_tag=3, multiple=True))

    assert channel.published == ["a", "b", "c"]
    assert first.future.result() == [ACK, NACK, ACK]
    assert second.future.result() == [None, None]  # never published: its rows stay in the outbox
    assert stream.broken and publisher.in_flight == 0

    again = _Batch(events("b", "c", "d", "e"), publisher.stream())  # the next pass, from the gap on
    publisher._publish(again)
    assert channel.published[3:] == ["b", "c", "d", "e"]


def test_a_stream_never_publishes_on_a_channel_opened_after_it_started(connected):
    publisher, channel = connected
    stream = publisher.stream()
    publisher._publish(_Batch(events("a"), stream))
    publisher.on_channel_lost("connection reset")  # "a" unconfirmed; the link reconnects ...
    publisher.generation = 2  # ... and a new channel is ready
    late = _Batch(events("b"), stream)
    publisher._publish(late)  # must not overtake "a", which the next pass publishes first

    assert channel.published == ["a"]
    assert late.future.result() == [None]
    assert stream.broken


def test_a_batch_reaches_the_transport_as_one_write_with_its_frames_in_order(connected):
    publisher, channel = connected
    publisher._publish(_Batch(events("a", "b", "c"), publisher.stream()))
    assert channel.connection.writes == [b"method:|header:|a|method:|header:|b|method:|header:|c|"]
    assert "_adapter_emit_data" not in vars(channel.connection)  # the connection's own method again
    channel.connection._adapter_emit_data(b"heartbeat")
    assert channel.connection.writes[-1] == b"heartbeat"


def test_a_large_batch_reaches_the_transport_in_moderate_pieces_in_order(connected):
    publisher, channel = connected
    ids = [str(i) for i in range(40)]
    publisher._publish(_Batch(events(*ids, size=_WRITE_CHUNK // 10), publisher.stream()))
    writes = channel.connection.writes
    assert 3 <= len(writes) <= 5 and all(len(w) < _WRITE_CHUNK + _WRITE_CHUNK // 10 + 100 for w in writes)
    assert b"".join(writes) == b"".join(b"method:|header:|" + i.encode().ljust(_WRITE_CHUNK // 10, b".") + b"|"
                                        for i in ids)


def returned(publisher: ConfirmingPublisher, event_id: str) -> None:
    publisher._on_return(publisher._channel, Basic.Return(reply_code=312, reply_text="NO_ROUTE"),
                         pika.BasicProperties(message_id=event_id), b"")


def test_a_multiple_ack_spanning_batches_settles_each_message_up_to_its_tag_and_none_after(connected):
    publisher, _ = connected
    stream = publisher.stream()
    batches = [_Batch(events(*ids), stream) for ids in (("a", "b", "c"), ("d", "e", "f"), ("g", "h"))]
    for batch in batches:
        publisher._publish(batch)
    confirm(publisher, Basic.Ack(delivery_tag=5, multiple=True))  # a-e: the first batch and most of the second

    assert batches[0].future.result() == [ACK, ACK, ACK]
    assert not batches[1].future.done() and batches[1].statuses == [ACK, ACK, None]
    assert not batches[2].future.done() and publisher.in_flight == 3
    confirm(publisher, Basic.Nack(delivery_tag=8, multiple=True))  # f-h refused
    assert batches[1].future.result() == [ACK, ACK, NACK] and batches[2].future.result() == [NACK, NACK]
    assert stream.broken and publisher.in_flight == 0
    confirm(publisher, Basic.Ack(delivery_tag=8, multiple=True))  # a repeated confirm changes nothing
    assert batches[2].future.result() == [NACK, NACK]


def test_a_return_counts_for_the_ack_that_follows_it_and_a_return_after_its_ack_changes_nothing(connected):
    publisher, _ = connected
    batch = _Batch(events("a", "b", "c"), publisher.stream())
    publisher._publish(batch)
    returned(publisher, "a")  # as RabbitMQ does it: the return first, then the ack
    confirm(publisher, Basic.Ack(delivery_tag=2, multiple=True))
    returned(publisher, "b")  # after b's ack: b was confirmed as routed, and stays so
    returned(publisher, "c")
    confirm(publisher, Basic.Ack(delivery_tag=3, multiple=False))
    assert batch.future.result() == [RETURNED, ACK, RETURNED]


def test_confirms_and_returns_of_another_channel_settle_nothing(connected):
    """Delivery tags restart at 1 on every channel: a confirm of a channel the link gave up (one that is still
    closing) is not about the current channel's publish of the same tag."""
    publisher, _ = connected
    batch = _Batch(events("a", "b"), publisher.stream())
    publisher._publish(batch)
    old = FakeChannel()
    publisher._on_return(old, Basic.Return(reply_code=312, reply_text="NO_ROUTE"),
                         pika.BasicProperties(message_id="a"), b"")
    publisher._on_confirm(old, SimpleNamespace(method=Basic.Ack(delivery_tag=2, multiple=True)))
    assert not batch.future.done() and publisher.in_flight == 2
    confirm(publisher, Basic.Ack(delivery_tag=2, multiple=True))
    assert batch.future.result() == [ACK, ACK]
