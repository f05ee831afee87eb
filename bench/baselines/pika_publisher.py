"""Raw pika publisher with batched confirms: the baseline of the outbox relay's publish rate on the same broker.

It publishes `count` persistent messages to a topic exchange with a window of `window` unconfirmed messages
(the broker acknowledges many at once, `multiple=True`), on pika's SelectConnection, and prints one JSON line:
messages confirmed, seconds from the first publish to the last confirm, and the rate.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid

import pika
from pika.spec import Basic


class BatchedConfirmPublisher:
    def __init__(self, url: str, exchange: str, routing_key: str, body: bytes, count: int, window: int) -> None:
        self.url = url
        self.exchange = exchange
        self.routing_key = routing_key
        self.body = body
        self.count = count
        self.window = window
        self.published = 0
        self.outstanding: dict[int, None] = {}  # delivery tags not yet confirmed, in publish order
        self.confirmed = 0
        self.nacked = 0
        self.started = 0.0
        self.finished = 0.0
        self.channel = None
        self.connection = pika.SelectConnection(pika.URLParameters(url), on_open_callback=self._on_open,
                                                on_open_error_callback=self._on_error,
                                                on_close_callback=lambda *_: self.connection.ioloop.stop())

    def _on_error(self, _connection, error) -> None:
        raise SystemExit(f"cannot connect: {error}")

    def _on_open(self, connection) -> None:
        connection.channel(on_open_callback=self._on_channel)

    def _on_channel(self, channel) -> None:
        self.channel = channel
        channel.exchange_declare(self.exchange, exchange_type="topic", durable=True,
                                 callback=lambda _frame: channel.confirm_delivery(self._on_confirm,
                                                                                  callback=self._on_confirm_mode))

    def _on_confirm_mode(self, _frame) -> None:
        self.started = time.perf_counter()
        self._publish_window()

    def _publish_window(self) -> None:
        while self.published < self.count and len(self.outstanding) < self.window:
            self.published += 1
            self.outstanding[self.published] = None
            properties = pika.BasicProperties(content_type="application/x-protobuf", delivery_mode=2,
                                              type=self.routing_key, message_id=str(uuid.uuid4()),
                                              timestamp=int(time.time()), app_id="bench",
                                              headers={"x-aggregate-type": "user", "x-aggregate-id":
                                                       str(uuid.uuid4()), "x-producer": "bench"})
            self.channel.basic_publish(self.exchange, self.routing_key, self.body, properties, mandatory=True)

    def _on_confirm(self, frame) -> None:
        method = frame.method
        if method.multiple:  # the broker settles every outstanding tag up to this one
            tags = [tag for tag in self.outstanding if tag <= method.delivery_tag]
        else:
            tags = [method.delivery_tag] if method.delivery_tag in self.outstanding else []
        for tag in tags:
            del self.outstanding[tag]
        settled = len(tags)
        if isinstance(method, Basic.Ack):
            self.confirmed += settled
        else:
            self.nacked += settled
        if self.confirmed + self.nacked >= self.count:
            self.finished = time.perf_counter()
            self.connection.close()
            return
        self._publish_window()

    def run(self) -> dict:
        self.connection.ioloop.start()
        seconds = self.finished - self.started
        return {"messages": self.confirmed, "nacked": self.nacked, "seconds": seconds,
                "rate": self.confirmed / seconds if seconds > 0 else 0.0}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--exchange", required=True)
    parser.add_argument("--routing-key", required=True)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--window", type=int, default=500, help="unconfirmed messages in flight")
    parser.add_argument("--body-size", type=int, default=200)
    args = parser.parse_args(argv)
    publisher = BatchedConfirmPublisher(args.url, args.exchange, args.routing_key, b"\x0a" * args.body_size,
                                        args.count, args.window)
    json.dump(publisher.run(), sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
