"""The consumer framework: a durable queue per (service, purpose), handlers per event type, ack after commit,
bounded retries with a delay, then the dead-letter queue.

A service declares what it consumes and attaches it to its server:

    subscription = Subscription(service="notification", purpose="email", handlers={
        UserCreated: on_user_created,         # async def on_user_created(event, meta: EventMeta) -> HandlerResult
        OrderConfirmed: on_order_confirmed,
    })
    attach_consumer(module, settings, subscription)

The queue "notification.email" is bound to the exchange by each handled event's full name; its retry queues and
dead-letter queue are declared with it (see topology.py). For each delivery the framework:

1. decodes the protobuf named by the message's `type` (a message it cannot decode goes to the dead-letter queue
   at once; an event type without a handler is acknowledged and ignored);
2. restores the producer's request id, correlation id and trace context (a CONSUMER span linked to the
   producer's) around the handler;
3. awaits the handler on the service's event loop (at most TESSERA_CONSUMER_CONCURRENCY at once, of up to
   TESSERA_CONSUMER_PREFETCH delivered). The handler applies its effect and records the event id in ONE
   transaction (`idempotency.applied_once` does both), so a redelivery has no second effect;
4. acknowledges the delivery after the handler returned, that is after its commit. If the handler raised, the
   message is republished to the retry queue of its delay (TESSERA_CONSUMER_RETRY_DELAYS) with its attempt
   count, and acknowledged once the broker confirmed the copy; after TESSERA_CONSUMER_MAX_ATTEMPTS attempts (or
   at once for PermanentFailure) it goes to the dead-letter queue, where `tessera dlq` lists, shows and replays
   it. A crash anywhere before the ack leaves the message with the broker, which delivers it again.

Handlers must tolerate redelivery and reordering (a retried message comes back after later ones).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf.message import DecodeError, Message
from opentelemetry.trace import Status, StatusCode
from pika.channel import Channel
from pika.spec import Basic
from sqlalchemy import Table

from tessera_runtime import metrics, telemetry
from tessera_runtime.context import clean_id
from tessera_runtime.db import Database
from tessera_runtime.logs import mask
from tessera_runtime.messaging import envelope
from tessera_runtime.messaging.amqp import AmqpLink
from tessera_runtime.messaging.handling import (
    DUPLICATE,
    EventHandler,
    EventMeta,
    PermanentFailure,
    RetryLater,
)
from tessera_runtime.messaging.idempotency import prune_processed_events
from tessera_runtime.messaging.settings import MessagingSettings, messaging_settings
from tessera_runtime.messaging.topology import MIGRATE_COMMAND, QueueTopology, declare_async, queue_not_migrated
from tessera_runtime.outbox import PROTOBUF_CONTENT_TYPE
from tessera_runtime.server import HealthCheck, ServiceModule

log = logging.getLogger("tessera.consumer")

_PRUNE_INTERVAL = 600.0
# How long a consumer's start waits for its first connection attempt to have an outcome: a queue of the wrong
# type then fails the start. A broker that does not answer within it does not hold the service back.
_FIRST_ATTEMPT_SECONDS = 15.0
MAX_EVENT_ID = 64  # the width of processed_events.event_id

@dataclasses.dataclass(frozen=True)
class Subscription:
    """What one consumer queue handles: `<service>.<purpose>`, bound by the full names of the handled events."""

    service: str
    purpose: str
    handlers: Mapping[type[Message], EventHandler]

    @property
    def queue(self) -> str:
        return f"{self.service}.{self.purpose}"

    @property
    def routing_keys(self) -> tuple[str, ...]:
        return tuple(cls.DESCRIPTOR.full_name for cls in self.handlers)

    def topology(self, settings: MessagingSettings) -> QueueTopology:
        return QueueTopology(settings.events_exchange, self.queue, self.routing_keys, settings.consumer_retry_delays,
                             settings.queue_type)


@dataclasses.dataclass(frozen=True)
class Delivery:
    tag: int
    routing_key: str
    redelivered: bool
    properties: Any  # pika.BasicProperties
    body: bytes


@dataclasses.dataclass(frozen=True)
class Outcome:
    action: str  # "ack", "requeue", "retry" or "dead"
    delay: float = 0.0
    error: str = ""
    attempt: int = 1


ACK = Outcome("ack")
REQUEUE = Outcome("requeue")


class ConsumerLink(AmqpLink):
    """The consumer's connection: declares the topology, consumes with a prefetch, settles deliveries on
    request from the event loop, and forwards failed messages to a retry queue or the dead-letter queue with
    publisher confirms before acknowledging the original."""

    def __init__(self, url: str, name: str, topology: QueueTopology, prefetch: int,
                 on_delivery: Callable[[Delivery, Callable[[Outcome], None]], None], *,
                 max_backoff: float = 30.0) -> None:
        super().__init__(url, name, max_backoff=max_backoff)
        self.topology = topology
        self.prefetch = prefetch
        self.on_delivery = on_delivery
        # (generation, delivery tag) of every delivery not yet acknowledged or rejected.
        self.unsettled: set[tuple[int, int]] = set()
        self.on_idle: Callable[[], None] = lambda: None  # called when nothing is left unsettled
        self._consumer_tag: str | None = None
        self._next_tag = 0
        self._forwards: dict[int, tuple[tuple[int, int], str]] = {}
        self._returned: set[str] = set()

    def cancel_consuming(self) -> None:
        """Asks the broker for no more deliveries; those already delivered are still settled."""
        def cancel() -> None:
            channel = self.channel
            if channel is not None and self._consumer_tag is not None:
                channel.basic_cancel(self._consumer_tag)
                self._consumer_tag = None

        self.call_soon(cancel)

    # -- the link's thread -----------------------------------------------------------------------------------

    def setup_channel(self, channel: Channel, done: Callable[[], None]) -> None:
        channel.add_on_return_callback(self._on_return)
        channel.add_on_cancel_callback(self._on_cancelled)

        def consume(_frame: object = None) -> None:
            self._consumer_tag = channel.basic_consume(self.topology.queue, self._on_message, auto_ack=False,
                                                       callback=lambda _f: done())

        def confirm_mode(_frame: object = None) -> None:
            self._next_tag = 0
            channel.confirm_delivery(self._on_confirm, callback=consume)

        declare_async(channel, self.topology.declarations(),
                      lambda: channel.basic_qos(prefetch_count=self.prefetch, callback=confirm_mode))

    def fatal_error(self, reason: BaseException) -> Exception | None:
        # A queue of the topology exists as the other type (or with other arguments): every reconnection would be
        # refused the same way.
        return queue_not_migrated(reason, self.topology.queue_type)

    def _on_cancelled(self, _frame: object) -> None:
        """The broker cancelled the consumer: its queue was deleted. Connected and idle, the consumer would look
        healthy while the events meant for it found no queue; a new connection declares the queues again."""
        if self._stopping:
            return
        log.warning("the broker cancelled the consumer (its queue was deleted); declaring the queues again",
                    extra={"queue": self.topology.queue})
        self._consumer_tag = None
        self.close_connection(320, "consumer cancelled by the broker; declaring the queues again")

    def on_channel_lost(self, error: BaseException | str) -> None:
        # The broker puts every unacknowledged delivery of the lost channel back in the queue.
        self.unsettled.clear()
        self._forwards.clear()
        self._returned.clear()
        self._consumer_tag = None
        self.on_idle()

    def _discard(self, key: tuple[int, int]) -> None:
        self.unsettled.discard(key)
        if not self.unsettled:
            self.on_idle()

    def _on_message(self, _channel: Channel, method: Basic.Deliver, properties: Any, body: bytes) -> None:
        key = (self.generation, method.delivery_tag)
        self.unsettled.add(key)
        delivery = Delivery(method.delivery_tag, method.routing_key, method.redelivered, properties, body)

        def settle(outcome: Outcome) -> None:
            self.call_soon(lambda: self._settle(key, delivery, outcome))

        self.on_delivery(delivery, settle)

    def _settle(self, key: tuple[int, int], delivery: Delivery, outcome: Outcome) -> None:
        channel = self.channel
        if key not in self.unsettled or channel is None or key[0] != self.generation:
            return  # its channel is gone; the broker delivers the message again
        if outcome.action == "ack":
            channel.basic_ack(delivery.tag)
        elif outcome.action == "requeue":
            channel.basic_nack(delivery.tag, requeue=True)
        else:
            self._forward(channel, key, delivery, outcome)
            return
        self._discard(key)

    def _forward(self, channel: Channel, key: tuple[int, int], delivery: Delivery, outcome: Outcome) -> None:
        forward_id = uuid.uuid4().hex
        error = envelope.truncate_error(outcome.error)
        if outcome.action == "retry":
            exchange, routing_key = "", self.topology.retry_queue(outcome.delay)
            properties = envelope.forwarded_properties(
                delivery.properties, {envelope.ATTEMPT: outcome.attempt + 1, envelope.LAST_ERROR: error,
                                      envelope.FORWARD_ID: forward_id},
                expiration_ms=round(outcome.delay * 1000))
        else:
            exchange, routing_key = self.topology.dead_letter_exchange, self.topology.queue
            properties = envelope.forwarded_properties(
                delivery.properties, {envelope.ATTEMPT: outcome.attempt, envelope.LAST_ERROR: error,
                                      envelope.ORIGIN_QUEUE: self.topology.queue,
                                      envelope.DEAD_LETTERED_AT: dt.datetime.now(dt.UTC).isoformat(),
                                      envelope.FORWARD_ID: forward_id})
        channel.basic_publish(exchange, routing_key, delivery.body, properties, mandatory=True)
        self._next_tag += 1
        self._forwards[self._next_tag] = (key, forward_id)

    def _on_return(self, _channel: Channel, method: Basic.Return, properties: Any, _body: bytes) -> None:
        forward_id = envelope.header_str(properties.headers, envelope.FORWARD_ID)
        if forward_id is not None:
            self._returned.add(forward_id)
            log.error("retry or dead-letter queue missing; the message stays in its queue, and the queues are "
                      "declared again", extra={"queue": self.topology.queue, "routing_key": method.routing_key})

    def _on_confirm(self, frame: Any) -> None:
        method = frame.method
        tags = [method.delivery_tag]
        if method.multiple:
            tags = [tag for tag in self._forwards if tag <= method.delivery_tag]
        channel = self.channel
        missing = False
        for tag in tags:
            entry = self._forwards.pop(tag, None)
            if entry is None or channel is None:
                continue
            key, forward_id = entry
            returned = forward_id in self._returned
            self._returned.discard(forward_id)
            if isinstance(method, Basic.Ack) and not returned:
                channel.basic_ack(key[1])
            else:
                # The copy was not taken: keep the original, which comes back for another attempt.
                channel.basic_nack(key[1], requeue=True)
                missing = missing or returned
            self._discard(key)
        if missing:
            # A retry or dead-letter queue was deleted under the consumer (emptied by an operator): the requeued
            # message would come straight back and be returned again, for ever. A new connection declares the
            # queues again (setup_channel) before it takes the message once more.
            self.close_connection(320, "retry or dead-letter queue missing; declaring the queues again")


class Consumer:
    """Consumes one subscription inside a service process. Handlers run on the service's event loop."""

    def __init__(self, subscription: Subscription, *, amqp_url: str, settings: MessagingSettings,
                 processed: tuple[Database, Table] | None = None) -> None:
        self.subscription = subscription
        self.processed = processed
        self.settings = settings
        self.queue = subscription.queue
        self._handlers = {cls.DESCRIPTOR.full_name: (cls, h) for cls, h in subscription.handlers.items()}
        self.link = ConsumerLink(amqp_url, f"{self.queue}-consumer", subscription.topology(settings),
                                 settings.consumer_prefetch, self._on_delivery,
                                 max_backoff=settings.reconnect_max_seconds)
        self.counts = {"processed": 0, "duplicates": 0, "retried": 0, "dead_lettered": 0, "ignored": 0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._semaphore: asyncio.Semaphore | None = None
        self._stopping = False
        self._pruning: asyncio.Task[None] | None = None
        self._started = False
        self._fatal_lock = threading.Lock()
        # Told, from the link's thread, of a failure after start() returned (attach_consumer: the service's).
        self.on_failure: Callable[[Exception], None] = lambda error: log.error(
            "the consumer stopped: %s", error, extra={"queue": getattr(error, "queue", self.queue),
                                                      "command": MIGRATE_COMMAND})

    def _on_fatal(self, error: Exception) -> None:
        """On the link's thread: the consumer stopped for good. Before start() returned, start() raises the error;
        after (the broker was out of reach as the service started), the service is told (on_failure), and
        `tessera serve` stops and exits with it as it would at start."""
        with self._fatal_lock:
            if not self._started:
                return
        self.on_failure(error)

    async def start(self) -> None:
        """Connects and starts consuming. Raises QueueNotMigrated (and the link is stopped) when the broker answers
        that a queue of the subscription exists as another type than the configured one (or with other arguments);
        an unreachable broker is retried in the background."""
        self._loop = asyncio.get_running_loop()
        self._semaphore = asyncio.Semaphore(self.settings.consumer_concurrency)
        self.link.on_fatal = self._on_fatal
        self.link.start()
        await asyncio.to_thread(self.link.attempted.wait, _FIRST_ATTEMPT_SECONDS)
        with self._fatal_lock:
            self._started = True
            if self.link.fatal is not None:
                raise self.link.fatal
        if self.processed is not None and self.settings.processed_events_retention_hours > 0:
            self._pruning = self._loop.create_task(self._prune_periodically(), name=f"{self.queue}-prune")
        log.info("consumer started", extra={"queue": self.queue, "events": list(self._handlers)})

    async def stop(self, grace: float = 10.0) -> None:
        """Stops taking deliveries, lets running handlers finish and settle (for at most `grace` seconds), then
        closes the connection; whatever is still unsettled is delivered again later."""
        self._stopping = True
        if self._pruning is not None:
            self._pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruning
        assert self._loop is not None
        idle = asyncio.Event()
        self.link.on_idle = lambda: self._loop.call_soon_threadsafe(idle.set)
        self.link.cancel_consuming()
        if self.link.unsettled and self.link.ready:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a cancellation of stop() that arrives as
            # the consumer becomes idle.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await idle.wait()
        await asyncio.to_thread(self.link.stop)
        log.info("consumer stopped", extra={"queue": self.queue, **self.counts})

    async def prune_processed(self) -> int:
        """Forgets this service's processed event ids older than TESSERA_PROCESSED_EVENTS_RETENTION_HOURS (done
        every ten minutes while the consumer runs); returns how many."""
        if self.processed is None or self.settings.processed_events_retention_hours <= 0:
            return 0
        db, table = self.processed
        async with db.engine.begin() as conn:
            removed = await prune_processed_events(
                conn, table, dt.timedelta(hours=self.settings.processed_events_retention_hours))
        if removed:
            log.info("processed event ids pruned", extra={"queue": self.queue, "rows": removed})
        return removed

    async def _prune_periodically(self) -> None:
        while True:
            await asyncio.sleep(_PRUNE_INTERVAL)
            try:
                await self.prune_processed()
            except Exception as exc:  # the database away: try again next time
                log.warning("pruning processed event ids failed: %s", exc)

    def status(self) -> dict[str, Any]:
        return {"queue": self.queue, "connected": self.link.ready, "in_flight": len(self.link.unsettled),
                "last_error": self.link.last_error, **self.counts}

    async def broker_reachable(self) -> bool:
        return self.link.ready

    # -- called on the link's thread -------------------------------------------------------------------------

    def _on_delivery(self, delivery: Delivery, settle: Callable[[Outcome], None]) -> None:
        assert self._loop is not None
        try:
            future = asyncio.run_coroutine_threadsafe(self._process(delivery), self._loop)
        except RuntimeError:  # the loop is closed: the service is gone
            return

        def done(f: concurrent.futures.Future[Outcome]) -> None:
            if f.cancelled():  # the service is stopping: the broker delivers the message again
                settle(REQUEUE)
                return
            exc = f.exception()
            if exc is None:
                settle(f.result())
                return
            # A failure outside the handler's own would fail the same way on every delivery: requeued, the message
            # would come straight back, again and again. It goes to the dead-letter queue, where it can be read and
            # replayed.
            try:
                outcome = self._unreadable(delivery, exc)
            except Exception:  # never leave the message unsettled: it would hold its prefetch slot for good
                outcome = Outcome("dead", error=_error_text(exc))
            settle(outcome)

        future.add_done_callback(done)

    # -- on the service's event loop -------------------------------------------------------------------------

    def meta(self, delivery: Delivery) -> EventMeta:
        props = delivery.properties
        headers = props.headers or {}
        attempt = max(1, envelope.header_int(headers, envelope.ATTEMPT, 1))
        final = attempt >= self.settings.consumer_max_attempts
        return EventMeta(
            event_id=props.message_id or "", event_type=envelope.event_type_of(props, delivery.routing_key),
            consumer=self.queue, attempt=attempt, max_attempts=self.settings.consumer_max_attempts,
            retry_delay=None if final else self.settings.retry_delay(attempt),
            aggregate_type=envelope.header_str(headers, envelope.AGGREGATE_TYPE),
            aggregate_id=envelope.header_str(headers, envelope.AGGREGATE_ID),
            correlation_id=(clean_id(envelope.header_str(headers, envelope.CORRELATION_ID))
                            or clean_id(props.correlation_id)),
            request_id=clean_id(envelope.header_str(headers, envelope.REQUEST_ID)),
            producer=envelope.header_str(headers, envelope.PRODUCER) or props.app_id,
            published_at=_published_at(props.timestamp), redelivered=delivery.redelivered,
        )

    async def _process(self, delivery: Delivery) -> Outcome:
        assert self._semaphore is not None
        async with self._semaphore:
            if self._stopping:
                return REQUEUE
            return await self._handle(delivery)

    async def _handle(self, delivery: Delivery) -> Outcome:
        try:
            meta = self.meta(delivery)
        except Exception as exc:  # properties no handler can be given: the same on every delivery
            return self._unreadable(delivery, exc)
        labels = (self.queue, meta.event_type)
        entry = self._handlers.get(meta.event_type)
        if entry is None:
            self.counts["ignored"] += 1
            log.warning("no handler for %s; message acknowledged and ignored", meta.event_type,
                        extra={"queue": self.queue, "event_id": meta.event_id})
            return ACK
        cls, handler = entry
        started = time.perf_counter()
        with telemetry.consume_span(meta.event_type, delivery.properties.headers, consumer=self.queue,
                                    queue=self.queue, event_id=meta.event_id,
                                    delivery_count=meta.attempt) as span:
            try:
                event = self._decode(cls, delivery, meta)
                result = await handler(event, meta)
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                return self._failed(meta, exc, labels)
            # Written inside the span, as the handler's own lines are: with its trace and the message's request id.
            if result == DUPLICATE:
                self.counts["duplicates"] += 1
                metrics.CONSUMER_DUPLICATES.labels(*labels).inc()
                log.info("duplicate event skipped", extra={"queue": self.queue, "event_id": meta.event_id,
                                                           "event_type": meta.event_type})
            else:
                self.counts["processed"] += 1
                metrics.CONSUMER_PROCESSED.labels(*labels).inc()
                # The consumer's access line: one per event applied, as the server writes one per RPC.
                log.info("event processed", extra={
                    "queue": self.queue, "event_id": meta.event_id, "event_type": meta.event_type,
                    "attempt": meta.attempt, "correlation_id": meta.correlation_id,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2)})
        return ACK

    @staticmethod
    def _decode(cls: type[Message], delivery: Delivery, meta: EventMeta) -> Message:
        content_type = delivery.properties.content_type
        if content_type not in (None, PROTOBUF_CONTENT_TYPE):
            raise PermanentFailure(f"content type {content_type!r} is not {PROTOBUF_CONTENT_TYPE}")
        if not meta.event_id:
            raise PermanentFailure("the message has no message_id (event id), so it cannot be deduplicated")
        if len(meta.event_id) > MAX_EVENT_ID:
            raise PermanentFailure(f"the message_id is longer than {MAX_EVENT_ID} characters")
        try:
            return cls.FromString(delivery.body)
        except DecodeError as exc:
            raise PermanentFailure(f"the body is not a valid {cls.DESCRIPTOR.full_name}: {exc}") from None

    def _unreadable(self, delivery: Delivery, exc: BaseException) -> Outcome:
        """A message the consumer itself failed on, before or after its handler: dead-lettered at once."""
        event_type = envelope.event_type_of(delivery.properties, delivery.routing_key)
        # A type no handler takes is counted as "unknown": whatever a bad message names adds no series.
        label = event_type if event_type in self._handlers else "unknown"
        attempt = max(1, envelope.header_int(delivery.properties.headers, envelope.ATTEMPT, 1))
        return self._dead_letter(
            "the consumer could not process a message", exc, (self.queue, label), attempt,
            {"queue": self.queue, "event_id": delivery.properties.message_id, "event_type": event_type,
             "attempt": attempt}, exc_info=exc)

    def _dead_letter(self, why: str, exc: BaseException, labels: tuple[str, str], attempt: int,
                     extra: dict[str, Any], exc_info: BaseException | None = None) -> Outcome:
        error = _error_text(exc)
        self.counts["dead_lettered"] += 1
        metrics.CONSUMER_DEAD_LETTERED.labels(*labels).inc()
        log.error("%s; moved to the dead-letter queue %s", why, self.link.topology.dead_letter_queue,
                  exc_info=exc_info, extra={**extra, "error": error})
        return Outcome("dead", error=error, attempt=attempt)

    def _failed(self, meta: EventMeta, exc: Exception, labels: tuple[str, str]) -> Outcome:
        error = _error_text(exc)
        extra = {"queue": self.queue, "event_id": meta.event_id, "event_type": meta.event_type,
                 "attempt": meta.attempt, "max_attempts": meta.max_attempts}
        if isinstance(exc, PermanentFailure) or meta.retry_delay is None:
            return self._dead_letter("event handling failed for good", exc, labels, meta.attempt, extra)
        extra["error"] = error
        self.counts["retried"] += 1
        metrics.CONSUMER_RETRIED.labels(*labels).inc()
        log.warning("event handling failed; retrying in %.1fs", meta.retry_delay, extra=extra,
                    exc_info=not isinstance(exc, RetryLater))
        return Outcome("retry", delay=meta.retry_delay, error=error, attempt=meta.attempt)


def _error_text(exc: BaseException) -> str:
    """The failure as the message carries it on (x-tessera-last-error, shown by `tessera dlq`): masked as a log line
    is, since whoever reads the dead-letter queue reads it."""
    return mask(f"{type(exc).__name__}: {exc}") if str(exc) else type(exc).__name__


def _published_at(timestamp: Any) -> dt.datetime | None:
    """The AMQP timestamp (seconds since the epoch) as a time; None when absent or not seconds (a publisher's
    milliseconds would be tens of thousands of years away)."""
    if not isinstance(timestamp, int):
        return None
    try:
        return dt.datetime.fromtimestamp(timestamp, dt.UTC)
    except (OverflowError, OSError, ValueError):
        return None


def attach_consumer(module: ServiceModule, settings: Any, subscription: Subscription, *,
                    processed: tuple[Database, Table] | None = None,
                    messaging: MessagingSettings | None = None) -> Consumer:
    """Runs a consumer with the service: started after the service's own start hooks (its migrations), and
    stopped in the service's grace period (TESSERA_GRACE_SECONDS), while in-flight calls finish: it takes no more
    deliveries and its running handlers have what is left of that period, before the service's own stop hooks
    (its database) run. Also a non-critical `broker` health check for it. With `processed` (the database and its
    processed_events table) old processed event ids are pruned periodically."""
    messaging = messaging or messaging_settings(settings)
    consumer = Consumer(subscription, amqp_url=settings.amqp_url, settings=messaging, processed=processed)
    consumer.on_failure = module.failure.report
    module.on_start = (*module.on_start, consumer.start)
    module.on_grace = (*module.on_grace, consumer.stop)
    module.readiness_checks = (*module.readiness_checks,
                               HealthCheck(f"broker:{subscription.queue}", consumer.broker_reachable,
                                           critical=False))
    return consumer
