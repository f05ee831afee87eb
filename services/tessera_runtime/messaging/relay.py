"""The outbox relay: publishes a service's committed outbox rows to the events exchange, in order, confirmed.

Design. Each service process runs one relay next to its gRPC server:

- Database work runs on the service's event loop (asyncpg / aiosqlite): it never blocks the loop. On PostgreSQL a
  pass holds the relay's own connection (Database.relay_connection), on which it takes the lock, reads and marks
  its last batch straight on asyncpg, compiled once: a quiet service publishes each commit's events on a pass of
  their own, and through SQLAlchemy those few statements cost more than twice the CPU. A long pass (a backlog)
  also borrows one connection of the engine's pool to mark its earlier batches. SQLite goes through the engine,
  one connection at a time.
- pika runs on its own thread (`ConfirmingPublisher`, a SelectConnection), so broker I/O and frame encoding never
  run on the loop. The loop hands it a batch and gets a future that the thread resolves when the broker has
  confirmed every message of the batch (or the connection was lost).
- Confirms are pipelined, and so are batches: a pass reads a batch of up to TESSERA_OUTBOX_BATCH_SIZE rows, hands
  it to the publisher and reads the next one while the broker confirms the first, up to a window of a few batches
  in flight. The broker acknowledges many messages at once (`multiple=True`), and reading, publishing, confirming
  and marking overlap instead of taking turns.
- A row is marked published only after the broker confirmed it, batch by batch in `seq` order, and only the
  confirmed prefix of what a pass published is marked: after a gap (a nack, a lost connection, overdue confirms)
  the pass publishes nothing more and marks nothing behind the gap, even rows the broker did confirm, so the gap
  and everything after it is published again, in order, on the next pass. A relay killed between publishing and
  marking publishes those rows again: delivery is at least once and consumers dedupe by event id (message_id).
  A confirm counts only on the channel it arrived on: delivery tags restart at 1 on every channel, and one that
  arrives late on a channel the link gave up (still closing, its connection already replaced) confirms nothing.
- Order: rows go out in `seq` order on one channel, which RabbitMQ keeps per queue. A pass publishes on the
  channel that was open when it started and on no other (`PublishStream`): a batch never goes out on a new
  connection ahead of an earlier one that was lost with the old. On PostgreSQL each pass holds a transaction-scoped
  advisory lock, on the connection it reads with, for as long as it has batches in flight, so that of several
  replicas only one publishes at a time and a later batch never overtakes an earlier one; its marks are committed
  batch by batch on a second connection, the last batch's in the lock's transaction. SQLite is the embedded
  single-host mode: the pass reads and marks in short transactions and never holds SQLite's write lock while it
  waits for the broker; of several processes on one SQLite file (TESSERA_WORKERS) only the one holding an exclusive
  lock on the file "<database>.relay-lock" publishes, and another takes over when it exits.
- A pass reads forward from the last row it read, so rows committed out of `seq` order (a transaction that
  commits after a later one) are picked up by the next pass, which starts again from the oldest unpublished row;
  a pass ends when it has caught up or after _PASS_BATCHES batches.
- Before its first publish on a connection, the relay declares the events exchange and every consumer queue of the
  services installed here with its bindings (topology.publisher_declarations): an event published before its
  consumer ever started waits in that consumer's durable queue.
- Unroutable events (mandatory publish, no queue bound) are returned by the broker; the relay counts and logs them
  and marks them published: nobody consumes that event type, and retrying would block the events behind it.
- An event the broker refuses for good (larger than its max_message_size: it closes the channel with 406
  PRECONDITION_FAILED) is found by publishing the events in flight one at a time, and parked: kept in the outbox with
  the broker's reason, logged once at ERROR, counted (tessera_outbox_events_parked_total), and passed over by later
  passes, so that the events behind it go out (the events of its aggregate too: they pass it). A row that cannot be
  made an AMQP message is parked as it is read. Nothing else parks an event (see _pass). `tessera outbox retry`
  puts a parked event back in line (parked.py).
- Each confirmed row has one log line as it is marked: "event published" (its ids, type, exchange, outbox seq, and
  the correlation, request and trace ids of the request that wrote it), or "event not routed"; with
  TESSERA_OUTBOX_PUBLISHED_LOG=batch the published rows of a batch share one "events published" line listing their
  ids. A row the broker did not confirm has none until it is published again; the failed pass's warning names the
  first of them.
- Every wait is bounded. Confirms that do not arrive within TESSERA_OUTBOX_CONFIRM_TIMEOUT_SECONDS of a batch's
  publish (a broker or a network path that stopped answering) make the relay give up the connection: the
  unconfirmed rows stay in the outbox and are published again on a new one. `stop()` always returns, whatever the
  broker and the database do.
- The broker away never stops the service: the relay keeps the rows, logs that events are kept in the outbox
  with the backlog and the age of the oldest one, reconnects with backoff and drains the backlog when it returns.
  `tessera_outbox_backlog` and `tessera_outbox_oldest_unpublished_seconds` show it; the broker's health is a
  non-critical check (DEGRADED, never NOT_SERVING).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import datetime as dt
import fcntl
import functools
import hashlib
import logging
import struct
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pika.exceptions
from opentelemetry.trace import Span
from pika import frame, spec
from pika.channel import Channel
from pika.spec import Basic
from sqlalchemy import BigInteger, Integer, Table, any_, bindparam, delete, func, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncConnection

from tessera_runtime import metrics, telemetry
from tessera_runtime.db import Database, utcnow
from tessera_runtime.logs import span_ids
from tessera_runtime.messaging.amqp import AmqpLink
from tessera_runtime.messaging.envelope import (
    CORRELATION_ID,
    REQUEST_ID,
    OutgoingEvent,
    outgoing_event,
    truncate_error,
)
from tessera_runtime.messaging.settings import MessagingSettings, messaging_settings
from tessera_runtime.messaging.topology import (
    CLASSIC,
    MIGRATE_COMMAND,
    declare_async,
    exchange_declarations,
    installed_consumer_routes,
    publisher_declarations,
    queue_not_migrated,
)
from tessera_runtime.outbox import add_commit_listener
from tessera_runtime.server import HealthCheck, ServiceModule

log = logging.getLogger("tessera.outbox")

ACK, RETURNED, NACK = "ack", "returned", "nack"
_CONFIRMED = (ACK, RETURNED)
_STATS_INTERVAL = 2.0
_OUTAGE_LOG_INTERVAL = 30.0
_BEHIND_SECONDS = 5.0
_PRUNE_INTERVAL = 600.0
_PRUNE_BATCH = 5000
# Batches a pass keeps in flight: the next ones are read and published while the broker confirms the first.
WINDOW_BATCHES = 4
# A pass reads forward from its last row; after this many batches it lets its window drain and the next pass starts
# again from the oldest unpublished row (one committed late, below the pass's position, waits at most this long).
_PASS_BATCHES = 40
# On stop, the pass in progress stops reading and has this long (at most the confirm timeout) to have the batches it
# has in flight confirmed and marked before it is cancelled: a healthy broker confirms within moments, and rows it
# took but the relay left unmarked would be published again by the next relay (a rolling deploy's duplicates).
_STOP_GRACE_SECONDS = 2.0
# Frames of a batch are handed to pika's transport in pieces of about this many bytes (see _coalesced_writes).
_WRITE_CHUNK = 128 * 1024
# The reply code with which RabbitMQ closes a channel for a message it will never take, whatever the channel: larger
# than its max_message_size, a user_id property that is not the connection's user, an invalid expiration. Refusals
# that are not about the message close the channel with other codes (403 ACCESS_REFUSED, 404 NOT_FOUND), or nack it
# (a full queue), or never come (an alarm blocks the connection; the broker is away).
PRECONDITION_FAILED = 406
# What building and marshalling an AMQP message out of an outbox row raises when the row cannot be one (see
# _encoded): JSON errors, a string that is no UTF-8, a short string over 255 bytes, a value of no AMQP type.
_UNENCODABLE = (ValueError, TypeError, KeyError, AttributeError, OverflowError, struct.error,
                pika.exceptions.ShortStringTooLong, pika.exceptions.UnsupportedAMQPFieldException)


class PublishStream:
    """The batches of one relay pass, published in order on one channel. The stream is bound to the channel that
    was open when it started (its generation) and breaks at the first message the broker refuses or the link
    could not publish: from then on none of its batches goes out, so nothing published after a gap can reach the
    broker on this channel, or on a later one, ahead of the gap's own republish."""

    __slots__ = ("broken", "generation", "refusal")

    def __init__(self, generation: int) -> None:
        self.generation = generation
        self.broken = False
        # (reply code, reply text) when the broker closed the stream's channel with messages of it unconfirmed.
        self.refusal: tuple[int, str] | None = None


class _Batch:
    """One published batch: a status per message (None until confirmed), resolved when all are known."""

    def __init__(self, events: Sequence[OutgoingEvent], stream: PublishStream | None = None) -> None:
        self.events = events
        self.stream = stream
        self.statuses: list[str | None] = [None] * len(events)
        self.returned = [False] * len(events)
        self.outstanding = len(events)
        self.future: concurrent.futures.Future[list[str | None]] = concurrent.futures.Future()

    def settle(self, index: int, status: str) -> None:
        if self.statuses[index] is None:
            self.statuses[index] = status
            self.outstanding -= 1
        if self.outstanding == 0:
            self.finish()

    def abandon(self, first: int) -> None:
        """Messages from `first` on were never published: they stay unconfirmed."""
        if self.stream is not None:
            self.stream.broken = True
        self.outstanding -= len(self.events) - first
        if self.outstanding <= 0:
            self.finish()

    def finish(self) -> None:
        with contextlib.suppress(concurrent.futures.InvalidStateError):
            self.future.set_result(list(self.statuses))


@contextlib.contextmanager
def _coalesced_writes(connection: Any) -> Iterator[None]:
    """Hands the frames pika marshals inside the block to the connection's transport as one buffer.

    pika gives its transport every frame on its own (a publish is three: method, header, body), and the transport
    sends each buffered piece with its own send() on a TCP_NODELAY socket: a batch of 500 events cost 1,500 system
    calls and as many small TCP segments for the broker to read. Collected and joined into pieces of _WRITE_CHUNK
    bytes, a batch goes out in a few large writes. Frames keep their order, and nothing else writes on the link's
    thread while the block runs.
    """
    emit = getattr(type(connection), "_adapter_emit_data", None)
    if emit is None:  # not the pika this was written for: frames go out one by one
        yield
        return
    frames: list[bytes] = []
    size = 0

    def collect(frame: bytes) -> None:
        nonlocal size
        frames.append(frame)
        size += len(frame)
        if size >= _WRITE_CHUNK:  # the transport copies what a send() leaves over: keep its pieces moderate
            flush()

    def flush() -> None:
        nonlocal size
        if frames:
            emit(connection, b"".join(frames))
            frames.clear()
            size = 0

    connection._adapter_emit_data = collect  # shadows the method for this connection only
    try:
        yield
    finally:
        del connection._adapter_emit_data
        flush()


class ConfirmingPublisher(AmqpLink):
    """Publishes batches to the events exchange with mandatory routing and pipelined publisher confirms."""

    def __init__(self, url: str, name: str, exchange: str, *, max_backoff: float = 30.0,
                 close_timeout: float = 5.0, consumer_routes: dict[str, tuple[str, ...]] | None = None,
                 queue_type: str = CLASSIC) -> None:
        super().__init__(url, name, max_backoff=max_backoff, close_timeout=close_timeout)
        self.exchange = exchange
        self.queue_type = queue_type
        self.consumer_declarations = (publisher_declarations(exchange, consumer_routes, queue_type)
                                      if consumer_routes else [])
        self._next_tag = 0
        self._pending: dict[int, tuple[_Batch, int]] = {}
        self._by_message_id: dict[str, tuple[_Batch, int]] = {}

    def stream(self) -> PublishStream:
        """A stream bound to the channel open now; its batches are refused once that channel is gone."""
        return PublishStream(self.generation)

    def publish(self, events: Sequence[OutgoingEvent], stream: PublishStream | None = None,
                ) -> concurrent.futures.Future[list[str | None]]:
        """Publishes events in order; the future gives each one's status: ack, returned (no queue bound, still
        confirmed), nack, or None when the connection was lost before the broker confirmed it. With a stream, the
        batch goes out only on the stream's channel and only while the stream is unbroken (otherwise every status
        is None)."""
        batch = _Batch(events, stream)
        if not events:
            batch.finish()
        elif not self.ready or not self.call_soon(lambda: self._publish(batch)):
            if stream is not None:
                stream.broken = True
            batch.finish()
        return batch.future

    @property
    def in_flight(self) -> int:
        """Messages published and not yet confirmed by the broker."""
        return len(self._pending)

    def reset(self) -> None:
        """Gives up the connection (confirms overdue): unconfirmed messages resolve as None at once, and the link
        reconnects. A broker that stopped confirming may not answer the close either, so the channel is dropped
        here rather than when its CloseOk arrives, and the socket is cut after the close timeout."""
        def drop() -> None:
            self._lose_channel("broker confirms overdue")
            self.close_connection(320, "confirms overdue")

        self.call_soon(drop)

    # -- the link's thread -----------------------------------------------------------------------------------

    def setup_channel(self, channel: Channel, done: Callable[[], None]) -> None:
        channel.add_on_return_callback(self._on_return)

        def confirm_mode() -> None:
            self._next_tag = 0  # delivery tags restart at 1 on every channel
            # Bound to this channel: a confirm is about a delivery tag of the channel it arrived on (see _on_confirm).
            channel.confirm_delivery(functools.partial(self._on_confirm, channel), callback=lambda _frame: done())

        def publishing() -> None:
            declare_async(channel, exchange_declarations(self.exchange), confirm_mode)

        if not self.consumer_declarations:
            publishing()
            return
        # The consumer queues are declared first, on a channel of their own: a queue someone declared differently
        # (406 PRECONDITION_FAILED closes the channel that tried) is logged, and publishing goes on without it.
        finished = False

        def declared(side: Channel | None = None) -> None:
            nonlocal finished
            if finished:
                return
            finished = True
            if side is not None and side.is_open:
                side.close()
            publishing()

        def refused(_side: Channel, reason: Exception) -> None:
            if not finished:
                outdated = queue_not_migrated(reason, self.queue_type)
                if outdated is not None:  # a queue of the other type, say: events still reach it
                    log.warning("could not declare the consumer queues; publishing without them: %s", outdated,
                                extra={"exchange": self.exchange, "queue": outdated.queue,
                                       "command": MIGRATE_COMMAND})
                else:
                    log.warning("could not declare the consumer queues; publishing without them: %s", reason,
                                extra={"exchange": self.exchange})
                declared()

        def side_open(side: Channel) -> None:
            side.add_on_close_callback(refused)
            declare_async(side, self.consumer_declarations, lambda: declared(side))

        channel.connection.channel(on_open_callback=side_open)

    def _publish(self, batch: _Batch) -> None:
        channel = self.channel
        stream = batch.stream
        if channel is None or (stream is not None and (stream.broken or stream.generation != self.generation)):
            if stream is not None:
                stream.broken = True
            batch.finish()
            return
        with _coalesced_writes(channel.connection):
            for index, event in enumerate(batch.events):
                try:
                    channel.basic_publish(self.exchange, event.routing_key, event.body, event.properties,
                                          mandatory=True)
                except Exception as exc:  # the channel closed under us: the rest stays unconfirmed
                    log.warning("publish interrupted: %s", exc)
                    batch.abandon(index)
                    return
                self._next_tag += 1
                self._pending[self._next_tag] = (batch, index)
                self._by_message_id[event.event_id] = (batch, index)

    def _on_return(self, channel: Channel, method: Basic.Return, properties: Any, _body: bytes) -> None:
        if channel is not self._channel:
            return  # a return from a channel given up (see _on_confirm)
        entry = self._by_message_id.get(properties.message_id)
        if entry is not None:
            batch, index = entry
            batch.returned[index] = True

    def _on_confirm(self, channel: Channel, frame: Any) -> None:
        """A Basic.Ack or Basic.Nack of `channel`. Delivery tags restart at 1 on every channel, and what is pending
        is the current channel's: a confirm from a channel the link gave up is dropped. pika still hands such a
        confirm over while that channel closes (its callbacks stay until the broker's CloseOk), and when the link
        abandons a connection it publishes on the next one without waiting for that: the old channel's tag 3 is
        not the broker's word about the new channel's tag 3."""
        if channel is not self._channel:
            return
        method = frame.method
        status_if_ack = isinstance(method, Basic.Ack)
        tags = [method.delivery_tag]
        if method.multiple:
            tags = []
            for tag in self._pending:
                if tag > method.delivery_tag:
                    break
                tags.append(tag)
        for tag in tags:
            entry = self._pending.pop(tag, None)
            if entry is None:
                continue
            batch, index = entry
            self._by_message_id.pop(batch.events[index].event_id, None)
            if not status_if_ack:
                status = NACK
                if batch.stream is not None:
                    batch.stream.broken = True  # the stream's later batches wait for the republish
            else:
                status = RETURNED if batch.returned[index] else ACK
            batch.settle(index, status)

    def on_channel_lost(self, error: BaseException | str) -> None:
        batches = {id(batch): batch for batch, _ in self._pending.values()}
        self._pending.clear()
        self._by_message_id.clear()
        # The broker's own close (not a lost connection, nor the link giving the channel up): the relay tells a
        # refusal of one message from the rest by it (see OutboxRelay._pass).
        refusal = ((error.reply_code, error.reply_text)
                   if isinstance(error, pika.exceptions.ChannelClosedByBroker) else None)
        for batch in batches.values():
            if batch.stream is not None:
                batch.stream.broken = True
                if refusal is not None:
                    batch.stream.refusal = refusal  # set before the batch's future resolves: the relay reads it then
            batch.finish()


def _sqlite_lock_path(db: Database) -> Path | None:
    if db.dialect != "sqlite":
        return None
    database = make_url(db.url).database
    if not database or database == ":memory:":
        return None
    return Path(database + ".relay-lock")


def advisory_lock_key(table: Table) -> int:
    """The PostgreSQL advisory lock that lets one relay at a time publish a database's outbox."""
    digest = hashlib.sha256(f"tessera.outbox.relay:{table.name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _InFlight:
    """A batch handed to the publisher: its rows, their events and publish spans, and the confirms' future."""

    __slots__ = ("events", "future", "rows", "sent_at", "spans")

    def __init__(self, rows: list[Any], events: list[OutgoingEvent], spans: list[Span],
                 future: asyncio.Future[list[str | None]], sent_at: float) -> None:
        self.rows = rows
        self.events = events
        self.spans = spans
        self.future = future
        self.sent_at = sent_at

    def abandon(self) -> None:
        """The pass ends without settling the batch: its rows stay in the outbox, unmarked."""
        self.future.cancel()  # nothing awaits it any more
        for span in self.spans:
            telemetry.finish_publish_span(span, "the relay pass ended before the broker confirmed")


def _fetch_statement(table: Table) -> Any:
    """A batch: up to `size` unpublished rows after seq `after` (0: from the oldest), in seq order; parked rows are
    passed over."""
    c = table.c
    return (select(c.seq, c.event_id, c.aggregate_type, c.aggregate_id, c.event_type, c.payload, c.headers,
                   c.created_at)
            .where(c.published_at.is_(None), c.parked_at.is_(None), c.seq > bindparam("after", type_=BigInteger))
            .order_by(c.seq).limit(bindparam("size", type_=Integer)))


def _stats_statement(table: Table) -> Any:
    """The backlog (unpublished rows waiting for the relay), its oldest row's time, and the parked rows."""
    c = table.c
    waiting = c.parked_at.is_(None)
    return select(func.count().filter(waiting).label("backlog"),
                  func.min(c.created_at).filter(waiting).label("oldest"),
                  func.count().filter(c.parked_at.is_not(None)).label("parked")).where(c.published_at.is_(None))


def _park_statement(table: Table) -> Any:
    """Parks one unpublished row: the relay passes over it until `tessera outbox retry` puts it back in line. A row
    another replica parked first (both passes read it before either parked it) is left as that one parked it."""
    c = table.c
    return (update(table).where(c.seq == bindparam("row_seq", type_=BigInteger), c.published_at.is_(None),
                                c.parked_at.is_(None))
            .values(parked_at=bindparam("now", type_=c.parked_at.type), parked_reason=bindparam("reason")))


def _mark_statements(table: Table, postgres: bool) -> dict[str, Any]:
    """The batch's marks (see _marks): `mark` the confirmed rows published, `count` an attempt on the others."""
    c = table.c
    if postgres:
        # One array parameter, so a batch's UPDATE is one prepared statement whatever its length, rather than an IN
        # list of hundreds of parameters rendered anew for every batch.
        chosen = c.seq == any_(bindparam("seqs", type_=ARRAY(BigInteger)))
    else:
        chosen = c.seq.in_(bindparam("seqs", expanding=True))
    return {"mark": update(table).where(chosen).values(published_at=bindparam("now", type_=c.published_at.type),
                                                       attempts=c.attempts + 1),
            "count": update(table).where(chosen).values(attempts=c.attempts + 1)}


def _marks(rows: list[Any], confirmed: int) -> list[tuple[str, dict[str, Any]]]:
    """The mark statements of a batch whose first `confirmed` rows the broker confirmed, with their parameters: the
    confirmed rows are marked published; the others are counted, not marked, and published again next pass."""
    marks: list[tuple[str, dict[str, Any]]] = []
    if confirmed:
        marks.append(("mark", {"now": utcnow(), "seqs": [r["seq"] for r in rows[:confirmed]]}))
    if confirmed < len(rows):
        marks.append(("count", {"seqs": [r["seq"] for r in rows[confirmed:]]}))
    return marks


class _DirectStatements:
    """The statements of a PostgreSQL pass, compiled once for asyncpg (Database.direct_plan)."""

    def __init__(self, db: Database, table: Table, fetch: Any, marks: dict[str, Any]) -> None:
        self.lock = db.direct_plan(select(func.pg_try_advisory_xact_lock(bindparam("key", type_=BigInteger))),
                                   "SELECT")
        self.fetch = db.direct_plan(fetch, "SELECT")
        self.mark = db.direct_plan(marks["mark"], "UPDATE")
        self.count = db.direct_plan(marks["count"], "UPDATE")
        self.stats = db.direct_plan(_stats_statement(table), "SELECT")


class OutboxRelay:
    """Publishes one outbox table; started and stopped by the service's server hooks."""

    def __init__(self, db: Database, table: Table, *, service: str, amqp_url: str,
                 settings: MessagingSettings, window_batches: int = WINDOW_BATCHES) -> None:
        self.db = db
        self.table = table
        self.service = service
        self.settings = settings
        self.window_batches = max(1, window_batches)
        self.publisher = ConfirmingPublisher(amqp_url, f"{service}-outbox-relay", settings.events_exchange,
                                             max_backoff=settings.reconnect_max_seconds,
                                             close_timeout=min(5.0, settings.outbox_confirm_timeout_seconds),
                                             consumer_routes=installed_consumer_routes(),
                                             queue_type=settings.queue_type)
        self.lock_key = advisory_lock_key(table)
        self.backlog = 0
        self.oldest_age_seconds = 0.0
        self.published_total = 0
        self.unrouted_total = 0
        self.parked = 0  # parked rows, as last counted
        self.parked_total = 0  # rows this relay parked
        # After the broker closed a pass's channel with 406 PRECONDITION_FAILED: the last seq that pass published.
        # Passes then publish one event at a time up to it, to find the event the broker refuses (see _pass).
        self._isolate_until: int | None = None
        self._parking: list[tuple[Any, str]] = []  # rows the current pass found unpublishable, with the reason
        self._park_query = _park_statement(table)
        self._parked_counted = False  # `parked` was counted at least once (see _run)
        self._had_turn = False  # the last pass held the outbox's lock (no other replica's pass was running)
        self._unrouted_types: set[str] = set()
        self._postgres = db.dialect == "postgresql"
        self._fetch_query = _fetch_statement(table)
        self._mark_statements = _mark_statements(table, self._postgres)
        # The same statements compiled for asyncpg, for the lock's transaction on PostgreSQL.
        self._sql = (_DirectStatements(db, table, self._fetch_query, self._mark_statements) if self._postgres
                     else None)
        # The last pass published every row it could see and had them all confirmed (see _pass).
        self.caught_up = False
        self._lock_path = _sqlite_lock_path(db)
        self._lock_file: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._wake: asyncio.Event | None = None
        self._in_pass = False  # relay_once is running
        self._remove_listener: Callable[[], None] | None = None
        self._stats_at = 0.0
        self._outage_logged_at: float | None = None
        self._backlog_logged_at: float | None = None
        self._pruned_at = time.monotonic()

    # -- lifecycle -------------------------------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._stopping = False
        wake = self._wake = asyncio.Event()
        self.publisher.on_ready = lambda: loop.call_soon_threadsafe(wake.set)
        self._remove_listener = add_commit_listener(self.table, wake.set)
        self.publisher.start()
        self._task = loop.create_task(self._run(), name=f"{self.service}-outbox-relay")
        log.info("outbox relay started", extra={"exchange": self.settings.events_exchange,
                                                "batch_size": self.settings.outbox_batch_size})

    async def stop(self) -> None:
        """Stops publishing and closes the broker connection. The pass in progress publishes nothing more; the
        batches it has in flight get a moment (_STOP_GRACE_SECONDS) to be confirmed and marked, so that the next
        relay does not publish them again. Always returns, within the confirm timeout for the relay's loop and the
        close timeout for the connection; a batch still waiting for confirms then is abandoned and its rows stay in
        the outbox."""
        self._stopping = True
        if self._remove_listener is not None:
            self._remove_listener()
            self._remove_listener = None
        if self._wake is not None:
            self._wake.set()  # a loop waiting for its next poll ends now
        if self._task is not None:
            await self._end_loop(self._task)
        await asyncio.to_thread(self.publisher.stop)
        if self._lock_file is not None:
            self._lock_file.close()  # releases the lock
            self._lock_file = None
        log.info("outbox relay stopped", extra={"backlog": self.backlog})

    def status(self) -> dict[str, Any]:
        """What the relay is doing, for logs and tools; never part of readiness."""
        return {"connected": self.publisher.ready, "backlog": self.backlog, "in_flight": self.publisher.in_flight,
                "oldest_unpublished_seconds": round(self.oldest_age_seconds, 3),
                "published_total": self.published_total, "unrouted_total": self.unrouted_total,
                "parked": self.parked, "parked_total": self.parked_total, "last_error": self.publisher.last_error}

    async def broker_reachable(self) -> bool:
        """Health check (non-critical): the relay's broker connection is up."""
        return self.publisher.ready

    async def _end_loop(self, task: asyncio.Task[None]) -> None:
        # Cancelling alone is not enough: on Python 3.11 asyncio.wait_for returns normally when a cancellation races
        # with what it awaits completing (gh-86296; the relay's own sleep used it, a driver may), and a driver may
        # turn a cancellation into an ordinary error, which the loop would retry. So the loop also checks
        # _stopping, the cancel is repeated while the loop runs, and the wait is bounded.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.outbox_confirm_timeout_seconds
        # First the loop may end by itself: a pass sees _stopping, reads no more, and settles and marks what it has
        # in flight.
        if self._in_pass:  # otherwise it waits (a poll, a backoff) and has nothing to settle
            await asyncio.wait({task}, timeout=min(_STOP_GRACE_SECONDS, self.settings.outbox_confirm_timeout_seconds))
        while not task.done():
            remaining = deadline - loop.time()
            if remaining <= 0:
                log.error("the outbox relay loop did not end in time", extra={"task": task.get_name()})
                return
            task.cancel()
            await asyncio.wait({task}, timeout=min(1.0, remaining))
        if not task.cancelled() and task.exception() is not None:
            log.error("the outbox relay loop failed", exc_info=task.exception())

    # -- the loop --------------------------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        drained_some = False
        # A stopped publisher never connects again: nothing is left to do.
        while not (self._stopping or self.publisher.stopped):
            try:
                if not self.publisher.ready:
                    await self._refresh_stats(force=False)
                    if self.publisher.last_error is not None:  # not merely still connecting at start
                        self._log_outage()
                    await self._sleep(self.settings.outbox_poll_seconds)
                    continue
                if self._outage_logged_at is not None:
                    self._outage_logged_at = None
                    await self._refresh_stats(force=True)
                    log.info("broker reachable again; publishing the events kept in the outbox",
                             extra={"backlog": self.backlog})
                published = await self.relay_once()
                failures = 0
                drained_some = drained_some or published > 0
                # Finding a refused event: one at a time, a pass after the other at once, as long as this relay
                # has the outbox (while another replica's pass holds it, it waits for the next poll).
                if ((published >= self.settings.outbox_batch_size and not self.caught_up)
                        or (self._isolate_until is not None and self._had_turn)):
                    await self._refresh_stats(force=False)  # a long drain shows its progress every few seconds
                    continue
                if self.caught_up and not self.parked and self._parked_counted:
                    # Nothing to count: the pass saw the outbox empty after its last batch. A busy service's relay,
                    # which catches up on every pass, thus makes no count query after each one.
                    self._set_stats(0, None, time.monotonic())
                else:
                    await self._refresh_stats(force=drained_some)
                drained_some = False
                await self._prune()
                await self._sleep(self.settings.outbox_poll_seconds)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._stopping:
                    return
                failures += 1
                delay = min(self.settings.reconnect_max_seconds, 0.2 * 2 ** min(failures, 8))
                log.warning("outbox relay pass failed; events stay in the outbox, retrying in %.1fs: %s",
                            delay, exc, extra={"error_type": type(exc).__name__,
                                               **(exc.fields if isinstance(exc, PublishIncomplete) else {})})
                await asyncio.sleep(delay)  # not cut short by new commits: this is a backoff

    async def _sleep(self, seconds: float) -> None:
        assert self._wake is not None
        # asyncio.timeout, not asyncio.wait_for: on Python 3.11 wait_for swallows a cancellation that arrives as
        # the wake-up does (a commit notifying the relay just as the service stops), and stop() then waited forever.
        woken = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._wake.wait()
                woken = True
        if woken and self.settings.outbox_gather_seconds > 0 and not self._stopping:
            # Woken by a commit (or the broker coming back): commits arriving in the next few milliseconds join
            # this pass. A busy service then pays one pass for several commits; a quiet one waits a little longer.
            await asyncio.sleep(self.settings.outbox_gather_seconds)
        self._wake.clear()

    def _log_outage(self) -> None:
        now = time.monotonic()
        if self._outage_logged_at is None:
            self._backlog_logged_at = now
            log.warning("broker unreachable: events are kept in the outbox until it returns",
                        extra={"backlog": self.backlog, "oldest_unpublished_seconds": round(self.oldest_age_seconds, 1),
                               "error": self.publisher.last_error})
            self._outage_logged_at = now
        elif now - self._outage_logged_at >= _OUTAGE_LOG_INTERVAL:
            log.warning("broker still unreachable: events are kept in the outbox",
                        extra={"backlog": self.backlog, "oldest_unpublished_seconds": round(self.oldest_age_seconds, 1),
                               "error": self.publisher.last_error})
            self._outage_logged_at = now

    async def _refresh_stats(self, *, force: bool) -> None:
        now = time.monotonic()
        if not force and now - self._stats_at < _STATS_INTERVAL:
            return
        self._stats_at = now
        if self._sql is not None:
            async with self.db.relay_connection() as conn:
                row = self._sql.stats.row(await conn.fetchrow(self._sql.stats.sql))
        else:
            async with self.db.engine.connect() as conn:
                row = (await conn.execute(_stats_statement(self.table))).one()._mapping
        oldest = row["oldest"]
        if oldest is not None and oldest.tzinfo is None:
            oldest = oldest.replace(tzinfo=dt.UTC)
        self.parked = int(row["parked"])
        self._parked_counted = True
        metrics.OUTBOX_PARKED.labels(self.service).set(self.parked)
        self._set_stats(int(row["backlog"]), oldest, now)

    def _set_stats(self, backlog: int, oldest: dt.datetime | None, now: float) -> None:
        """Sets the backlog gauges, and logs when publishing falls behind or has caught up again. Parked rows are
        not part of the backlog: they have a gauge of their own."""
        self._stats_at = now
        self.backlog = backlog
        self.oldest_age_seconds = max(0.0, (utcnow() - oldest).total_seconds()) if oldest is not None else 0.0
        metrics.OUTBOX_BACKLOG.labels(self.service).set(backlog)
        metrics.OUTBOX_OLDEST_UNPUBLISHED.labels(self.service).set(self.oldest_age_seconds)
        # Logged when publishing falls behind (the oldest event waits for more than a few seconds), at most every
        # half minute; a busy outbox that keeps up says nothing.
        if backlog and self.oldest_age_seconds >= _BEHIND_SECONDS:
            if self._backlog_logged_at is None or now - self._backlog_logged_at >= _OUTAGE_LOG_INTERVAL:
                log.info("outbox backlog", extra={"backlog": backlog,
                                                  "oldest_unpublished_seconds": round(self.oldest_age_seconds, 3)})
                self._backlog_logged_at = now
        elif not backlog and self._backlog_logged_at is not None:
            log.info("outbox drained", extra={"backlog": 0})
            self._backlog_logged_at = None

    # -- one pass --------------------------------------------------------------------------------------------

    async def relay_once(self) -> int:
        """One pass: publishes the oldest unpublished rows, a window of batches in flight, until it has caught up
        (or after _PASS_BATCHES batches); returns how many rows were confirmed and marked. Rows it found that can
        never be published are parked as it ends, once its own marks are committed (see _pass)."""
        self._parking = []
        self._in_pass = True
        try:
            return await self._relay_once()
        finally:
            try:
                parking, self._parking = self._parking, []
                if parking:
                    await self._park(parking)
            finally:
                self._in_pass = False

    async def _relay_once(self) -> int:
        self.caught_up = False
        self._had_turn = False
        if self._postgres:
            # The lock's transaction runs on the relay's own connection, its few statements straight on asyncpg:
            # a pass of one small batch (a quiet service publishes each commit's events on a pass of their own) is
            # BEGIN, the lock, the read, the mark and COMMIT, and through SQLAlchemy those cost more than twice the CPU.
            assert self._sql is not None
            incomplete: PublishIncomplete | None = None
            deferred = 0  # rows the lock's transaction marks: counted once it has committed
            async with self.db.relay_connection() as conn, conn.transaction():
                if not await conn.fetchval(self._sql.lock.sql, *self._sql.lock.arguments({"key": self.lock_key})):
                    return 0  # another replica is publishing this outbox
                self._had_turn = True
                async with contextlib.AsyncExitStack() as stack:
                    marker: AsyncConnection | None = None

                    async def mark(rows: list[Any], confirmed: int, last: bool) -> int:
                        # The lock's transaction reads (each statement sees what was committed before it). Marks are
                        # committed batch by batch on a connection of their own, so that they stand should the pass
                        # fail later and the backlog goes down as the pass goes on; the pass's last batch (often its
                        # only one) is marked in the lock's transaction, which commits as the pass ends.
                        nonlocal marker, deferred
                        if last:
                            await self._mark_direct(conn, rows, confirmed)
                            deferred += confirmed
                            return 0
                        if marker is None:
                            marker = await stack.enter_async_context(self.db.engine.connect())
                        await self._mark_in_transaction(marker, rows, confirmed)
                        return confirmed

                    try:
                        marked = await self._pass(functools.partial(self._fetch_direct, conn), mark)
                    except PublishIncomplete as exc:
                        # The pass stopped at a gap after marking the confirmed rows before it, the last batch's in
                        # this transaction: it must commit, or those rows would be published again.
                        incomplete = exc
            self.published_total += deferred
            if incomplete is not None:
                raise incomplete
            return marked
        if not self._hold_file_lock():
            return 0  # another process on this SQLite file is publishing
        self._had_turn = True
        return await self._pass(self._fetch_apart, self._mark_apart)

    def _hold_file_lock(self) -> bool:
        if self._lock_path is None or self._lock_file is not None:
            return True
        # Held open while this relay runs: the lock lasts as long as the open file.
        handle = open(self._lock_path, "a+b")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            return False
        self._lock_file = handle
        log.info("this process publishes the outbox", extra={"lock": str(self._lock_path)})
        return True

    async def _pass(self, fetch: Callable[[int | None, int], Awaitable[list[Any]]],
                    mark: Callable[[list[Any], int, bool], Awaitable[int]]) -> int:
        """Reads batches forward and keeps up to `window_batches` of them in flight; settles them oldest first:
        marks the confirmed prefix of each, and after the first gap marks nothing more and publishes nothing more
        (`PublishStream`), so that the gap and everything behind it is published again, in order.

        An event the broker refuses for good must not hold up the events behind it, and nothing else may be taken
        for one. When the broker closes the pass's channel with 406 PRECONDITION_FAILED, the event it refused is one
        of those the pass published and had not had confirmed, but which one the broker does not say: the next
        passes publish them one at a time, each waiting for its confirm (`_isolate_until`). The event refused while
        it is the only one on the channel not yet confirmed is that event: it is parked (kept in the outbox, passed
        over by later passes; see _park). A row that cannot even be made an AMQP message is parked as it is read.
        Anything else (a nack, a lost connection, overdue confirms, a channel closed for another reason) parks
        nothing: the pass fails and the gap is published again."""
        isolating = self._isolate_until is not None
        size = 1 if isolating else self.settings.outbox_batch_size
        window_batches = 1 if isolating else self.window_batches
        stream = self.publisher.stream()
        window: collections.deque[_InFlight] = collections.deque()
        after: int | None = None
        caught_up = False
        batches = marked = not_marked = 0
        sent_until = 0  # the last seq the pass published
        alone = False  # isolating: the last event went out with nothing else on the channel awaiting its confirm
        gap: str | None = None  # the status of the first message that was not confirmed
        gap_event: OutgoingEvent | None = None  # and that message
        gap_row: Any = None  # and its row

        def isolated() -> bool:  # every event up to _isolate_until went out on its own
            return isolating and self._isolate_until is not None and after is not None and after >= self._isolate_until

        try:
            while True:
                while (gap is None and not caught_up and not self._stopping and len(window) < window_batches
                       and batches < _PASS_BATCHES and not isolated()):
                    rows = await fetch(after, size)
                    caught_up = len(rows) < size
                    if not rows:
                        break
                    after = rows[-1]["seq"]
                    batches += 1
                    rows, events = self._encoded(rows)
                    if rows:
                        sent_until = rows[-1]["seq"]
                        alone = isolating and self.publisher.in_flight == 0
                        window.append(self._send(rows, events, stream))
                if not window:
                    break
                item = window[0]
                confirmed = 0
                if gap is None:
                    statuses = await self._confirms(item)
                    while confirmed < len(statuses) and statuses[confirmed] in _CONFIRMED:
                        confirmed += 1
                    if confirmed < len(statuses):
                        gap, gap_event = statuses[confirmed] or "lost", item.events[confirmed]
                        gap_row = item.rows[confirmed]
                else:  # behind a gap nothing is marked: its confirms are not worth waiting for
                    done = item.future.done() and not item.future.cancelled()
                    statuses = item.future.result() if done else [None] * len(item.rows)
                    item.future.cancel()
                fetching_ends = (gap is not None or caught_up or batches >= _PASS_BATCHES or self._stopping
                                 or isolated())
                # `mark` says how many of them it committed now: status()'s count never runs ahead of the
                # database (on PostgreSQL the pass's last batch is counted once the lock's transaction commits).
                committed = await mark(item.rows, confirmed, len(window) == 1 and fetching_ends)
                window.popleft()
                self._settle(item, statuses, confirmed)
                marked += confirmed
                self.published_total += committed
                not_marked += len(item.rows) - confirmed
        finally:
            if window:  # the pass failed or was cancelled with these still in flight
                stream.broken = True
                for item in window:
                    item.abandon()
        if gap is None:
            if isolated() or (isolating and caught_up):
                self._isolate_until = None  # each went out alone and was confirmed (or parked)
            # Every unpublished row the pass could see was published and marked: the backlog was empty as of its
            # last read (rows this process committed since then woke the relay for the next pass; other processes'
            # rows wait for the next poll, and the next count shows them).
            self.caught_up = caught_up and not self._stopping
            return marked
        assert gap_event is not None
        refusal = stream.refusal if gap == "lost" else None
        if refusal is not None and refusal[0] == PRECONDITION_FAILED:
            code, text = refusal
            if alone:
                # Published on its own, with every event before it on the channel confirmed: the refusal is its own.
                self._parking.append((gap_row, f"the broker refused it: {code} {text}"))
                return marked
            if not isolating:
                self._isolate_until = sent_until
                log.warning("the broker refused one of the events published and not yet confirmed; publishing them "
                            "one at a time to find it", extra={"first_outbox_seq": gap_event.seq,
                                                               "last_outbox_seq": sent_until,
                                                               "reason": f"{code} {text}"})
        metrics.OUTBOX_PUBLISH_FAILURES.labels(self.service).inc()
        which = f"event {gap_event.event_id} (outbox seq {gap_event.seq})"
        reason = f"the broker refused (nack) {which}" if gap == NACK else (
            f"the broker connection was lost before it confirmed {which}: {self.publisher.last_error}")
        raise PublishIncomplete(f"{reason}; {not_marked} events stay in the outbox",
                                {"event_id": gap_event.event_id, "outbox_seq": gap_event.seq})

    def _encoded(self, rows: list[Any]) -> tuple[list[Any], list[OutgoingEvent]]:
        """The rows that make AMQP messages, and their messages. A row that does not (its stored headers are no
        JSON object, a value pika cannot encode) never will: it is set aside for parking, and the rows behind it
        go out."""
        kept: list[Any] = []
        events: list[OutgoingEvent] = []
        exchange = self.settings.events_exchange
        for row in rows:
            try:
                event = outgoing_event(row, self.service)
                # What basic_publish marshals before it sends anything: the method frame and the content header.
                frame.Method(1, spec.Basic.Publish(exchange=exchange, routing_key=event.routing_key,
                                                   mandatory=True)).marshal()
                frame.Header(1, len(event.body), event.properties).marshal()
            except _UNENCODABLE as exc:
                self._parking.append((row, f"cannot be made an AMQP message: {type(exc).__name__}: {exc}"))
                continue
            kept.append(row)
            events.append(event)
        return kept, events

    def _send(self, rows: list[Any], events: list[OutgoingEvent], stream: PublishStream) -> _InFlight:
        exchange = self.settings.events_exchange
        # Started before the publish: each span writes its traceparent into the headers the message carries.
        spans = [telemetry.start_publish_span(e.routing_key, e.properties.headers, exchange=exchange,
                                              event_id=e.event_id) for e in events]
        future = asyncio.wrap_future(self.publisher.publish(events, stream))
        return _InFlight(rows, events, spans, future, asyncio.get_running_loop().time())

    async def _park(self, parking: list[tuple[Any, str]]) -> None:
        """Parks rows the broker refuses for good: kept in the outbox with the reason and the time, passed over by
        later passes. Each is logged once at ERROR and counted in tessera_outbox_events_parked_total."""
        now = utcnow()
        async with self.db.engine.begin() as conn:
            done = [(row, reason) for row, reason in parking
                    if (await conn.execute(self._park_query, {"row_seq": row["seq"], "now": now,
                                                              "reason": truncate_error(reason)})).rowcount]
        for row, reason in done:
            self.parked += 1
            self.parked_total += 1
            metrics.OUTBOX_EVENTS_PARKED.labels(self.service, row["event_type"]).inc()
            log.error("event parked: it cannot be published, and the events behind it are published past it; "
                      "`tessera outbox list` shows it, `tessera outbox retry` puts it back in line",
                      extra={"event_id": row["event_id"], "event_type": row["event_type"],
                             "aggregate_type": row["aggregate_type"], "aggregate_id": row["aggregate_id"],
                             "outbox_seq": row["seq"], "size_bytes": len(row["payload"]), "reason": reason})
        metrics.OUTBOX_PARKED.labels(self.service).set(self.parked)

    async def _confirms(self, item: _InFlight) -> list[str | None]:
        """The batch's statuses, once the broker confirmed them all or the connection was lost; a batch whose
        confirms are overdue gives up the connection (every batch in flight is then unconfirmed)."""
        future = item.future
        if not future.done():
            timeout = self.settings.outbox_confirm_timeout_seconds
            loop = asyncio.get_running_loop()
            await asyncio.wait({future}, timeout=max(0.0, item.sent_at + timeout - loop.time()))
            if not future.done():
                log.warning("broker confirms overdue; reconnecting and publishing the batch again",
                            extra={"batch": len(item.events), "in_flight": self.publisher.in_flight,
                                   "confirm_timeout_seconds": timeout})
                self.publisher.reset()  # resolves every batch in flight at once with what was confirmed so far
                await asyncio.wait({future}, timeout=timeout)
        return future.result() if future.done() else [None] * len(item.events)

    def _settle(self, item: _InFlight, statuses: list[str | None], confirmed: int) -> None:
        """Ends the batch's publish spans; counts and logs the `confirmed` rows, which were just marked: one line per
        event, "event published" once the broker took it into a queue (or, with TESSERA_OUTBOX_PUBLISHED_LOG=batch,
        one "events published" line listing their ids), "event not routed" when no queue is bound for its type.
        Rows not confirmed get no line of their own: the pass's failure names the first of them, and they have
        theirs when they are published again."""
        for span, status in zip(item.spans, statuses, strict=True):
            telemetry.finish_publish_span(span, None if status in _CONFIRMED else f"not confirmed: {status}")
        if not confirmed:
            return
        now = utcnow()
        lag = metrics.OUTBOX_PUBLISH_LAG.labels(self.service)
        by_type: dict[str, int] = {}
        logged = log.isEnabledFor(logging.INFO)  # asked once per batch: a drain writes a line per event
        each = self.settings.outbox_published_log == "each"
        routed: list[OutgoingEvent] = []
        for event, row, span, status in zip(item.events[:confirmed], item.rows, item.spans, statuses, strict=False):
            by_type[event.routing_key] = by_type.get(event.routing_key, 0) + 1
            created = row["created_at"] if row["created_at"].tzinfo else row["created_at"].replace(tzinfo=dt.UTC)
            lag_seconds = max(0.0, (now - created).total_seconds())
            lag.observe(lag_seconds)
            if status == RETURNED:
                self.unrouted_total += 1
                # The first of a type at WARNING (a missing consumer, or a type nobody needs yet), then at INFO.
                first = event.routing_key not in self._unrouted_types
                self._unrouted_types.add(event.routing_key)
                if first or logged:
                    log.log(logging.WARNING if first else logging.INFO,
                            "event not routed: no queue is bound for %s; marked published, nobody consumes it",
                            event.routing_key, extra=self._publication(event, row, span, lag_seconds))
            elif logged and each:
                # The relay's access line, as the consumer writes "event processed": the event is on the broker.
                log.info("event published", extra=self._publication(event, row, span, lag_seconds))
            elif logged:
                routed.append(event)
        if routed:  # TESSERA_OUTBOX_PUBLISHED_LOG=batch: the ids still lead to each event's publication
            log.info("events published", extra={
                "exchange": self.settings.events_exchange, "count": len(routed),
                "first_outbox_seq": routed[0].seq, "last_outbox_seq": routed[-1].seq,
                "event_ids": [event.event_id for event in routed]})
        for event_type, count in by_type.items():
            metrics.OUTBOX_PUBLISHED.labels(self.service, event_type).inc(count)

    def _publication(self, event: OutgoingEvent, row: Any, span: Span, lag_seconds: float) -> dict[str, Any]:
        """The fields of an event's publication line. trace_id and span_id are its publish span's, a child of the
        request that wrote the event; correlation_id and request_id are that request's, carried in the headers."""
        trace_id, span_id = span_ids(span)
        headers = event.properties.headers
        return {"event_id": event.event_id, "event_type": event.routing_key,
                "exchange": self.settings.events_exchange, "routing_key": event.routing_key,
                "aggregate_type": row["aggregate_type"], "aggregate_id": row["aggregate_id"], "outbox_seq": event.seq,
                "correlation_id": headers.get(CORRELATION_ID), "request_id": headers.get(REQUEST_ID),
                "trace_id": trace_id, "span_id": span_id,
                "lag_ms": round(lag_seconds * 1000, 2)}

    async def _fetch(self, conn: AsyncConnection, after: int | None, size: int) -> list[Any]:
        rows = await conn.execute(self._fetch_query, {"after": after or 0, "size": size})
        return [row._mapping for row in rows.all()]

    async def _fetch_direct(self, conn: asyncpg.Connection, after: int | None, size: int) -> list[Any]:
        sql = self._sql
        assert sql is not None
        return [sql.fetch.row(record) for record in await conn.fetch(
            sql.fetch.sql, *sql.fetch.arguments({"after": after or 0, "size": size}))]

    async def _mark_direct(self, conn: asyncpg.Connection, rows: list[Any], confirmed: int) -> None:
        """_mark's statements on a direct connection."""
        sql = self._sql
        assert sql is not None
        for name, params in _marks(rows, confirmed):
            plan = getattr(sql, name)
            await conn.execute(plan.sql, *plan.arguments(params))

    async def _fetch_apart(self, after: int | None, size: int) -> list[Any]:
        async with self.db.engine.begin() as conn:
            return await self._fetch(conn, after, size)

    async def _mark(self, conn: AsyncConnection, rows: list[Any], confirmed: int) -> None:
        """One UPDATE for the confirmed rows of a batch, and one for the rest (if any)."""
        for name, params in _marks(rows, confirmed):
            await conn.execute(self._mark_statements[name], params)

    async def _mark_in_transaction(self, conn: AsyncConnection, rows: list[Any], confirmed: int) -> None:
        # A transaction, not autocommit: a relay killed while its UPDATE waits (for a row lock, say) never commits
        # it; in autocommit the server would apply the orphaned statement once the wait ends.
        async with conn.begin():
            await self._mark(conn, rows, confirmed)

    async def _mark_apart(self, rows: list[Any], confirmed: int, _last: bool) -> int:
        async with self.db.engine.begin() as conn:
            await self._mark(conn, rows, confirmed)
        return confirmed

    async def _prune(self) -> None:
        if self.settings.outbox_retention_hours <= 0 or time.monotonic() - self._pruned_at < _PRUNE_INTERVAL:
            return
        self._pruned_at = time.monotonic()
        await self.prune_published()

    async def prune_published(self) -> int:
        """Deletes up to a batch of rows published longer ago than TESSERA_OUTBOX_RETENTION_HOURS (the relay does
        it every ten minutes); returns how many."""
        hours = self.settings.outbox_retention_hours
        if hours <= 0:
            return 0
        c = self.table.c
        cutoff = utcnow() - dt.timedelta(hours=hours)
        old = (select(c.seq).where(c.published_at.is_not(None), c.published_at < cutoff)
               .order_by(c.seq).limit(_PRUNE_BATCH))
        async with self.db.engine.begin() as conn:
            result = await conn.execute(delete(self.table).where(c.seq.in_(old)))
        if result.rowcount:
            log.info("published outbox rows pruned", extra={"rows": result.rowcount, "retention_hours": hours})
        return result.rowcount or 0


class PublishIncomplete(Exception):
    """Part of a batch was not confirmed; it stays in the outbox and is published again. `fields` name the first
    event not confirmed, for the log line of the failed pass."""

    def __init__(self, message: str, fields: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.fields = fields or {}


def attach_outbox_relay(module: ServiceModule, db: Database, outbox: Table, settings: Any, *,
                        messaging: MessagingSettings | None = None) -> OutboxRelay | None:
    """Runs an outbox relay with the service: started after the service's own start hooks (its migrations),
    stopped before its own stop hooks (before the database is disposed). Adds a non-critical `broker` health
    check: without the broker the service is DEGRADED but keeps serving. Returns the relay, or None when
    TESSERA_OUTBOX_RELAY is off.

    `settings` is the service's ServiceSettings (its `service` and `amqp_url`; its `messaging` when the class has
    one, as MessagingServiceSettings does; otherwise messaging settings are read from the environment)."""
    messaging = messaging or messaging_settings(settings)
    if not messaging.outbox_relay:
        log.info("outbox relay off (TESSERA_OUTBOX_RELAY); events stay in the outbox")
        return None
    relay = OutboxRelay(db, outbox, service=settings.service, amqp_url=settings.amqp_url, settings=messaging)
    module.on_start = (*module.on_start, relay.start)
    module.on_stop = (*module.on_stop, relay.stop)  # stop hooks run in reverse: the relay stops first
    module.readiness_checks = (*module.readiness_checks,
                               HealthCheck("broker", relay.broker_reachable, critical=False))
    return relay
