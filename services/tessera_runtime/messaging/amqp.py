"""One AMQP connection on its own thread (pika SelectConnection), re-established with backoff until stopped.

Why a thread: pika's frame encoding and socket work then never runs on a service's asyncio loop, so a slow or
unreachable broker cannot delay a gRPC call, and the loop never waits on pika. The thread owns one IOLoop for its
whole life; connections come and go on it, so `call_soon` works whatever the connection's state and callbacks
queued across a reconnect still run (and see that the channel is gone).

Every close is bounded: a broker that stopped answering (or a network path that silently drops packets) never
answers Connection.Close either, so after `close_timeout` seconds the socket is cut the way pika's own heartbeat
checker cuts a dead connection. `stop()` therefore always ends the thread, and a link never lingers reconnecting
after its owner stopped.
"""

from __future__ import annotations

import logging
import random
import threading
import urllib.parse
import weakref
from collections.abc import Callable

import pika
from pika.adapters.select_connection import IOLoop
from pika.channel import Channel

log = logging.getLogger("tessera.messaging")

# Links whose thread is running; weak, so that the registry never keeps a forgotten link alive.
_running: weakref.WeakSet[AmqpLink] = weakref.WeakSet()
_running_lock = threading.Lock()


def running_links() -> list[AmqpLink]:
    """The links of this process whose thread is still running (started and not yet stopped)."""
    with _running_lock:
        return [link for link in _running if link.running]


def connection_parameters(url: str, connection_name: str) -> pika.URLParameters:
    """Parameters from an amqp:// URL; heartbeat and timeouts get service-friendly defaults unless the URL sets
    them in its query string."""
    params = pika.URLParameters(url)
    given = set(urllib.parse.parse_qs(urllib.parse.urlparse(url).query))
    if "heartbeat" not in given:
        params.heartbeat = 30
    if "socket_timeout" not in given:
        params.socket_timeout = 5
    if "blocked_connection_timeout" not in given:
        # A broker in a memory or disk alarm blocks publishers; give up the connection rather than hang.
        params.blocked_connection_timeout = 60
    params.connection_attempts = 1
    params.client_properties = {"connection_name": connection_name}
    return params


class AmqpLink:
    """A connection and one channel, kept open until `stop()`. Subclasses set the channel up in `setup_channel`
    and drop what they track in `on_channel_lost`; both run on the link's thread."""

    def __init__(self, url: str, name: str, *, max_backoff: float = 30.0, close_timeout: float = 5.0) -> None:
        self.name = name
        self.parameters = connection_parameters(url, name)
        self.max_backoff = max_backoff
        # How long a graceful close (Channel.Close / Connection.Close and their -Ok) may take before the socket is
        # cut: a broker that stopped answering never sends the CloseOk.
        self.close_timeout = close_timeout
        # Incremented for every channel that becomes ready, so that work meant for an older channel (a batch of a
        # publish stream bound to it) can be recognised and refused.
        self.generation = 0
        self.last_error: str | None = None
        self.on_ready: Callable[[], None] = lambda: None
        # An error no reconnection can cure (see `fatal_error`): once set the link has stopped for good, and
        # on_fatal was called with it.
        self.fatal: Exception | None = None
        self.on_fatal: Callable[[Exception], None] = lambda _error: None
        # Set once the first connection attempt has an outcome: ready, failed, or fatal.
        self.attempted = threading.Event()
        self._ioloop = IOLoop()
        self._thread = threading.Thread(target=self._run, name=f"amqp-{name}", daemon=True)
        self._lock = threading.Lock()
        self._alive = False
        self._stop_requested = False
        self._stopping = False
        self._connection: pika.SelectConnection | None = None
        self._channel: Channel | None = None
        self._ready = False
        self._failures = 0
        self._reconnect_timer: object | None = None
        # Why the link closes the current connection itself after its channel was closed (by the broker, say).
        self._recycled_for: str | None = None

    # -- any thread ------------------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        """True while the channel is open and set up."""
        return self._ready

    @property
    def running(self) -> bool:
        """True from `start()` until the link's thread has ended."""
        return self._thread.is_alive()

    @property
    def stopped(self) -> bool:
        """True once `stop()` was called: the link never connects again."""
        return self._stop_requested

    def start(self) -> None:
        with self._lock:
            self._alive = True
        with _running_lock:
            _running.add(self)
        self._thread.start()

    def call_soon(self, fn: Callable[[], None]) -> bool:
        """Runs fn on the link's thread; False when the link is no longer running."""
        def guarded() -> None:
            try:
                fn()
            except Exception:  # one failed request must not end the link's thread
                log.exception("AMQP link request failed", extra={"link": self.name})

        with self._lock:
            if not self._alive:
                return False
            self._ioloop.add_callback_threadsafe(guarded)
            return True

    def stop(self) -> None:
        """Closes the connection (gracefully, or by cutting the socket after `close_timeout`) and ends the thread.
        Blocking, for about `close_timeout` seconds at most: call it from a worker thread in async code."""
        self._stop_requested = True
        if self.call_soon(self._shutdown):
            # The thread ends by itself within close_timeout; the margin covers a loaded machine.
            self._thread.join(self.close_timeout + 5.0)
            if self._thread.is_alive():
                log.error("AMQP link thread did not end", extra={"link": self.name})

    # -- the link's thread -----------------------------------------------------------------------------------

    def setup_channel(self, channel: Channel, done: Callable[[], None]) -> None:
        """Declares what the link needs and calls done() when the channel is ready for use."""
        done()

    def on_channel_lost(self, error: BaseException | str) -> None:
        """Called once when a ready or opening channel is gone."""

    def fatal_error(self, reason: BaseException) -> Exception | None:
        """The error to stop for good on, when the broker closed the channel for a reason that reconnecting would
        only meet again; None (the default) reconnects."""
        return None

    @property
    def channel(self) -> Channel | None:
        return self._channel if self._ready else None

    def _run(self) -> None:
        self._ioloop.add_callback_threadsafe(self._connect)
        try:
            while True:
                try:
                    self._ioloop.start()
                    return  # stopped on purpose
                except Exception:
                    if self._stopping:
                        # pika can raise while a connection that is still opening is closed; the link ends anyway.
                        log.debug("AMQP link failed while stopping", exc_info=True, extra={"link": self.name})
                        return
                    # A callback raised out of pika's loop: start over on a fresh connection rather than let the
                    # thread die with the service still running.
                    log.exception("AMQP link failed; reconnecting", extra={"link": self.name})
                    self._abandon_connection()
        finally:
            with self._lock:
                self._alive = False
            self._ioloop.close()

    def _abandon_connection(self) -> None:
        connection = self._connection
        self._connection = None
        self._lose_channel("link failed")
        if connection is not None:
            try:
                # Bounded like any close: the link connects anew meanwhile, and a broker that does not answer
                # must not keep the old connection open for as long as its heartbeat allows.
                self._close_within_timeout(connection, 200, "the link failed")
            except Exception:
                log.debug("closing the failed connection failed", exc_info=True)
                self._cut(connection, "the link failed")
        if self._stopping:
            self._ioloop.stop()
        else:
            self._reconnect_timer = self._ioloop.call_later(1.0, self._connect)

    def _shutdown(self) -> None:
        self._stopping = True
        if self._reconnect_timer is not None:
            self._ioloop.remove_timeout(self._reconnect_timer)
            self._reconnect_timer = None
        connection = self._connection
        if connection is not None and not connection.is_closed:
            if not connection.is_closing:
                connection.close()  # its close callback stops the loop
            # Whatever the broker does, the loop stops: a close that is not answered in time is cut short.
            self._ioloop.call_later(self.close_timeout, self._force_stop)
        else:
            self._ioloop.stop()

    def _force_stop(self) -> None:
        connection = self._connection
        if connection is None or connection.is_closed:
            self._ioloop.stop()
            return
        log.warning("the broker did not answer the close in time; cutting the connection",
                    extra={"link": self.name, "close_timeout": self.close_timeout})
        self._cut(connection, "the link stopped")  # its close callback stops the loop
        self._ioloop.call_later(1.0, self._ioloop.stop)  # and should pika not call it, this does

    def close_connection(self, reply_code: int, reply_text: str) -> None:
        """Closes the current connection (on the link's thread) so that the link reconnects; if the broker does not
        answer the close within `close_timeout`, the socket is cut."""
        if self._connection is not None:
            self._close_within_timeout(self._connection, reply_code, reply_text)

    def _close_within_timeout(self, connection: pika.SelectConnection, reply_code: int, reply_text: str) -> None:
        if connection.is_closed:
            return
        if not connection.is_closing:
            connection.close(reply_code, reply_text)

        def cut_if_still_open() -> None:
            if not connection.is_closed:
                log.warning("the broker did not answer the close in time; cutting the connection",
                            extra={"link": self.name, "close_timeout": self.close_timeout})
                self._cut(connection, reply_text)

        self._ioloop.call_later(self.close_timeout, cut_if_still_open)

    def _cut(self, connection: pika.SelectConnection, reason: str) -> None:
        # pika has no public abort: this is the call its heartbeat checker makes for a connection whose peer
        # stopped answering. The connection's close callback (`_on_lost`) then runs as for any lost connection.
        try:
            connection._terminate_stream(pika.exceptions.AMQPConnectionError(reason))
        except Exception:
            log.debug("cutting the connection failed", exc_info=True, extra={"link": self.name})

    def _connect(self) -> None:
        self._reconnect_timer = None
        self._recycled_for = None
        if self._stopping:
            self._ioloop.stop()
            return
        self._connection = pika.SelectConnection(
            self.parameters, on_open_callback=self._on_open, on_open_error_callback=self._on_lost,
            on_close_callback=self._on_lost, custom_ioloop=self._ioloop,
        )

    def _on_open(self, connection: pika.SelectConnection) -> None:
        connection.channel(on_open_callback=self._on_channel_open)

    def _on_channel_open(self, channel: Channel) -> None:
        self._channel = channel
        channel.add_on_close_callback(self._on_channel_closed)
        self.setup_channel(channel, lambda: self._on_channel_ready(channel))

    def _on_channel_ready(self, channel: Channel) -> None:
        if channel is not self._channel or not channel.is_open:
            return
        self.generation += 1
        self._ready = True
        self.attempted.set()
        if self._failures:
            log.info("connected to the broker again", extra={"link": self.name})
        else:
            log.info("connected to the broker", extra={"link": self.name})
        self._failures = 0
        self.last_error = None
        self.on_ready()

    def _lose_channel(self, error: BaseException | str) -> None:
        if self._channel is None:
            return
        self._channel = None
        self._ready = False
        self.last_error = str(error) or type(error).__name__
        self.on_channel_lost(error)

    def _on_channel_closed(self, channel: Channel, reason: BaseException) -> None:
        if channel is not self._channel:
            return
        fatal = self.fatal_error(reason) if not self._stopping else None
        if fatal is not None:
            self._lose_channel(reason)
            self.last_error = str(fatal)
            self.fatal = fatal
            self._stop_requested = True
            self._shutdown()  # no reconnection: it would meet the same refusal, for ever
            self.attempted.set()
            self.on_fatal(fatal)
            return
        self._lose_channel(reason)
        if isinstance(reason, pika.exceptions.ChannelClosedByBroker):
            # A declaration mismatch or an unknown exchange: recycle the whole connection, so that the next
            # attempt starts clean and is rate limited by the backoff.
            log.error("AMQP channel closed by the broker: %s", reason, extra={"link": self.name})
        connection = self._connection
        if connection is not None and not (connection.is_closing or connection.is_closed):
            # The channel's reason stays the link's last_error once this connection is gone (see _on_lost).
            self._recycled_for = self.last_error
            connection.close()

    def _on_lost(self, connection: pika.SelectConnection, error: BaseException | str) -> None:
        if connection is not self._connection:
            return
        self._connection = None
        self._lose_channel(error)
        if self.fatal is None:
            self.last_error = self._recycled_for or str(error) or type(error).__name__
        self._recycled_for = None
        if self._stopping:
            self._ioloop.stop()
            return
        self.attempted.set()
        self._failures += 1
        delay = min(self.max_backoff, 0.25 * 2 ** min(self._failures, 16)) * random.uniform(0.8, 1.2)
        level = logging.WARNING if self._failures == 1 else logging.DEBUG
        log.log(level, "broker unreachable, retrying in %.1fs: %s", delay, self.last_error,
                extra={"link": self.name, "failures": self._failures})
        self._reconnect_timer = self._ioloop.call_later(delay, self._connect)
