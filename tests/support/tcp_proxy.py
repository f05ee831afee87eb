"""A TCP proxy the test owns, to cut and restore a service's connection to a dependency on demand."""

from __future__ import annotations

import asyncio
import threading


class TcpProxy:
    """Forwards 127.0.0.1:<port> to a target. `cut()` drops every connection and refuses new ones until
    `restore()`; `freeze()` silences the connections open now without closing them; `hold()` keeps back what the
    target sends on the connections open now until `release()`. Runs on its own thread and event loop, so it works
    with any test and any process."""

    def __init__(self, target_host: str, target_port: int, delay: float = 0.0) -> None:
        self.target = (target_host, target_port)
        self.delay = delay  # added to every chunk forwarded, to make calls slow on purpose
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._frozen: set[asyncio.StreamWriter] = set()
        self._clients: set[asyncio.StreamWriter] = set()
        self._held: dict[asyncio.StreamWriter, list[bytes]] = {}

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}
        self._clients.add(writer)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    if dst in self._frozen:
                        continue  # swallowed: the peer stays connected and never hears a thing
                    if dst in self._held:
                        self._held[dst].append(data)  # forwarded, in order, on release()
                        continue
                    if self.delay:
                        await asyncio.sleep(self.delay)
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}
        self._frozen -= {writer, up_writer}
        self._clients.discard(writer)
        self._held.pop(writer, None)

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for w in list(self._writers):
            w.transport.abort()
        self._writers.clear()

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._listen())

    async def _freeze(self) -> None:
        self._frozen |= self._writers

    def freeze(self) -> None:
        """The connections open now stop forwarding, both ways and for good, yet stay open: each side sees a peer
        that is connected and never answers (a frozen server, a path that drops packets). New connections are
        forwarded as usual."""
        self._call(self._freeze())

    async def _hold(self) -> frozenset[asyncio.StreamWriter]:
        held = frozenset(self._clients - self._held.keys())
        for writer in held:
            self._held[writer] = []
        return held

    def hold(self) -> frozenset[asyncio.StreamWriter]:
        """What the target sends on the connections open now (and not held already) is kept back, in order, until
        `release()` of what this returns: the client hears nothing more from the target (no reply, no confirm)
        while what it sends still reaches the target. New connections are forwarded as usual."""
        return self._call(self._hold())

    async def _release(self, held: frozenset[asyncio.StreamWriter]) -> None:
        for writer in held:
            kept = self._held.pop(writer, None)
            if kept and not writer.is_closing():
                writer.write(b"".join(kept))

    def release(self, held: frozenset[asyncio.StreamWriter]) -> None:
        """Forwards what was kept back on the connections of a `hold()`, and all they receive from then on."""
        self._call(self._release(held))

    async def _shutdown(self) -> None:
        await self._cut()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def close(self) -> None:
        self._call(self._shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
