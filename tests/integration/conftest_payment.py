"""Payment integration helpers: a real payment server on port 0 over a real channel, and database peeks."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from sqlalchemy import func, select
from tessera.common.v1 import money_pb2
from tessera.payment.v1 import payment_service_pb2 as svc
from tessera.payment.v1 import payment_service_pb2_grpc

from tessera_payment import bootstrap
from tessera_payment.adapters.orm import outbox, sandbox_charges
from tessera_runtime.db import Database
from tessera_runtime.server import TesseraServer, create_server

T = TypeVar("T")

# Events are asserted in the outbox; nothing consumes them, so no relay publishes them to the shared broker.
QUIET = {"TESSERA_OUTBOX_RELAY": "false"}


@contextlib.asynccontextmanager
async def payment_service(db_url: str, **env: str) -> AsyncIterator[
        tuple[payment_service_pb2_grpc.PaymentServiceStub, TesseraServer, int]]:
    """Starts the payment service (migrations, sandbox processor, recovery) on port 0; yields a stub on a real
    channel, the server and its port."""
    settings = bootstrap.SETTINGS.from_env("payment", 0, {"TESSERA_DATABASE_URL": db_url,
                                                          "TESSERA_GRPC_PORT": "0", **QUIET, **env})
    module = await bootstrap.build(settings)
    server, port = await create_server(module, readiness_interval=0.2)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield payment_service_pb2_grpc.PaymentServiceStub(channel), server, port
    finally:
        await server.stop()


def payment_request(method: str = "pm_sandbox_ok", amount: int = 4200, currency: str = "EUR",
                    key: str | None = None, order_id: str | None = None,
                    customer_id: str | None = None) -> svc.ProcessPaymentRequest:
    return svc.ProcessPaymentRequest(
        order_id=order_id or str(uuid.uuid4()), customer_id=customer_id or str(uuid.uuid4()),
        amount=money_pb2.Money(currency_code=currency, amount_minor=amount), payment_method=method,
        idempotency_key=key or uuid.uuid4().hex)


async def query(db_url: str, statement: Any) -> list[Any]:
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            return list((await conn.execute(statement)).all())
    finally:
        await db.dispose()


async def sandbox_charges_of(db_url: str, payment_id: str) -> list[Any]:
    """The sandbox processor's ledger rows for a payment: more than one would be a double charge."""
    return await query(db_url, select(sandbox_charges).where(sandbox_charges.c.charge_key == payment_id))


async def event_types(db_url: str) -> list[str]:
    rows = await query(db_url, select(outbox.c.event_type).order_by(outbox.c.seq))
    return [r[0].rsplit(".", 1)[1] for r in rows]


async def outbox_count(db_url: str) -> int:
    return (await query(db_url, select(func.count()).select_from(outbox)))[0][0]


async def eventually(probe: Callable[[], Awaitable[T | None]], timeout: float = 20.0) -> T:
    """Polls probe until it returns something other than None (no timed assertion: a generous limit)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = await probe()
        if result is not None:
            return result
        if loop.time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


class ReplyHoldingProxy:
    """A TCP proxy on the test's event loop in front of a server. After hold_replies(), requests still reach the
    server but nothing the server sends comes back: the situation of a caller whose reply was lost."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._passing = asyncio.Event()
        self._passing.set()
        self._server: asyncio.base_events.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> ReplyHoldingProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def hold_replies(self) -> None:
        self._passing.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [writer, up_writer]
        for task in (self._pipe(reader, up_writer, replies=False), self._pipe(up_reader, writer, replies=True)):
            self._tasks.add(asyncio.get_running_loop().create_task(task))

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, *, replies: bool) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await src.read(65536):
                if replies:
                    await self._passing.wait()
                dst.write(data)
                await dst.drain()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
