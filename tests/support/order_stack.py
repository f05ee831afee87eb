"""The order service's neighbours for tests: real user, inventory and payment servers on port 0, with seeding and
inspection helpers, and the order service itself in-process or as a real process."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path
from typing import Any

import grpc
from sqlalchemy import func, select
from tessera.common.v1 import money_pb2
from tessera.inventory.v1 import inventory_service_pb2 as inv
from tessera.inventory.v1 import inventory_service_pb2_grpc, product_pb2
from tessera.order.v1 import order_service_pb2_grpc
from tessera.payment.v1 import payment_pb2, payment_service_pb2_grpc
from tessera.payment.v1 import payment_service_pb2 as pay
from tessera.user.v1 import user_pb2, user_service_pb2, user_service_pb2_grpc

from tessera_runtime.db import Database
from tessera_runtime.server import ServiceModule, TesseraServer, create_server
from tests.support.processes import ServiceProcess

# Fast retries and short leases so that failure paths and crash recovery finish in a test's time.
ORDER_TEST_ENV = {
    "TESSERA_OUTBOX_RELAY": "false",  # events are asserted in the outbox; nothing here consumes them
    "TESSERA_ORDER_RETRY_INITIAL_BACKOFF_SECONDS": "0.02",
    "TESSERA_ORDER_RETRY_MAX_BACKOFF_SECONDS": "0.1",
    "TESSERA_ORDER_STEP_MAX_ATTEMPTS": "3",
    "TESSERA_ORDER_COMPENSATION_MAX_ATTEMPTS": "4",
    "TESSERA_ORDER_SAGA_LEASE_SECONDS": "1.5",
    "TESSERA_ORDER_RECOVERY_INTERVAL_SECONDS": "0.2",
    "TESSERA_ORDER_PAYMENT_DEADLINE_SECONDS": "5",
}
# The sandbox's pm_sandbox_timeout hangs until the processor timeout: keep it short.
PAYMENT_TEST_ENV = {
    "TESSERA_PAYMENT_PROCESSOR_TIMEOUT_SECONDS": "0.5",
    "TESSERA_PAYMENT_PROCESSOR_RETRY_BACKOFF_SECONDS": "0.02",
    "TESSERA_PAYMENT_RECOVERY_SECONDS": "0.2",
    "TESSERA_PAYMENT_LEASE_GRACE_SECONDS": "0.5",
}


async def _start(service: str, env: dict[str, str], interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
                 **build_kw: Any) -> tuple[TesseraServer, int]:
    """Builds and starts a service; `interceptors` are added after its own (a recorder of what arrives, say)."""
    from tessera_runtime import app

    root = app.composition_root(service)
    settings = app.load_settings(root, {"TESSERA_GRPC_PORT": "0", **env})
    module: ServiceModule = await root.build(settings, **build_kw)
    if interceptors:
        module = dataclasses.replace(module, extra_interceptors=(*module.extra_interceptors, *interceptors))
    return await create_server(module, readiness_interval=0.2, grace_seconds=1.0)


class Neighbours:
    """Real user, inventory and payment servers (SQLite files under `folder`) and stubs to seed and inspect them;
    `interceptors` are added to each server's own."""

    def __init__(self, folder: Path, interceptors: tuple[grpc.aio.ServerInterceptor, ...] = ()) -> None:
        self.folder = folder
        self.interceptors = interceptors
        self.servers: dict[str, tuple[TesseraServer, int]] = {}
        self.channels: list[grpc.aio.Channel] = []

    async def start(self) -> Neighbours:
        for service, extra in (("user", {}), ("inventory", {}), ("payment", PAYMENT_TEST_ENV)):
            self.servers[service] = await _start(service, {
                "TESSERA_DATABASE_URL": f"sqlite+aiosqlite:///{self.folder / (service + '.db')}",
                "TESSERA_OUTBOX_RELAY": "false", **extra}, self.interceptors)
        self.users = user_service_pb2_grpc.UserServiceStub(self._channel("user"))
        self.inventory = inventory_service_pb2_grpc.InventoryServiceStub(self._channel("inventory"))
        self.payments = payment_service_pb2_grpc.PaymentServiceStub(self._channel("payment"))
        return self

    def address(self, service: str) -> str:
        return f"127.0.0.1:{self.servers[service][1]}"

    def _channel(self, service: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(self.address(service))
        self.channels.append(channel)
        return channel

    def order_env(self, database_url: str, **overrides: str) -> dict[str, str]:
        return {
            "TESSERA_DATABASE_URL": database_url,
            "TESSERA_USER_SERVICE_ADDR": self.address("user"),
            "TESSERA_INVENTORY_SERVICE_ADDR": self.address("inventory"),
            "TESSERA_PAYMENT_SERVICE_ADDR": self.address("payment"),
            **ORDER_TEST_ENV, **overrides,
        }

    async def stop(self) -> None:
        for channel in self.channels:
            await channel.close()
        for server, _ in self.servers.values():
            await server.stop()

    # Seeding.

    async def customer(self, *, active: bool = True) -> str:
        user = (await self.users.CreateUser(user_service_pb2.CreateUserRequest(
            user=user_pb2.User(email=f"c-{uuid.uuid4().hex[:10]}@example.com", display_name="Customer"),
            request_id=uuid.uuid4().hex))).user
        if not active:
            await self.users.DeactivateUser(user_service_pb2.DeactivateUserRequest(id=user.id, reason="test"))
        return user.id

    async def product(self, stock: int, *, price: int = 1250, currency: str = "EUR") -> str:
        sku = f"SKU-{uuid.uuid4().hex[:12]}"
        reply = await self.inventory.CreateProduct(inv.CreateProductRequest(
            product=product_pb2.Product(sku=sku, name=f"Product {sku}", stock_on_hand=stock,
                                        price=money_pb2.Money(currency_code=currency, amount_minor=price)),
            request_id=uuid.uuid4().hex))
        return reply.product.id

    # Inspection.

    async def stock(self, product_id: str) -> product_pb2.Product:
        return (await self.inventory.GetProduct(inv.GetProductRequest(id=product_id))).product

    async def reservation(self, reservation_id: str) -> product_pb2.Reservation:
        return (await self.inventory.GetReservation(inv.GetReservationRequest(id=reservation_id))).reservation

    async def order_payments(self, order_id: str) -> list[payment_pb2.Payment]:
        return list((await self.payments.ListPayments(pay.ListPaymentsRequest(order_id=order_id))).payments)

    async def customer_payments(self, customer_id: str) -> list[payment_pb2.Payment]:
        return list((await self.payments.ListPayments(pay.ListPaymentsRequest(customer_id=customer_id))).payments)

    async def release(self, reservation_id: str) -> None:
        await self.inventory.ReleaseReservation(inv.ReleaseReservationRequest(id=reservation_id, reason="test"))


class InProcessOrder:
    """The order service in this process, on a real server and channel."""

    def __init__(self, server: TesseraServer, port: int) -> None:
        self.server = server
        self.port = port
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = order_service_pb2_grpc.OrderServiceStub(self.channel)

    @classmethod
    async def start(cls, env: dict[str, str], interceptors: tuple[grpc.aio.ServerInterceptor, ...] = (),
                    **build_kw: Any) -> InProcessOrder:
        server, port = await _start("order", env, interceptors, **build_kw)
        return cls(server, port)

    async def stop(self) -> None:
        await self.channel.close()
        await self.server.stop()


class OrderProcess:
    """The order service as a real process (tessera serve order), restartable on the same database."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.log_path = log_path
        self.process: ServiceProcess | None = None
        self.channel: grpc.aio.Channel | None = None
        self.stub: order_service_pb2_grpc.OrderServiceStub

    async def start(self, **extra_env: str) -> OrderProcess:
        await self.close_channel()
        self.process = ServiceProcess("order", {**self.env, **extra_env}, self.log_path).start(timeout=60)
        self.channel = grpc.aio.insecure_channel(self.process.address)
        self.stub = order_service_pb2_grpc.OrderServiceStub(self.channel)
        return self

    async def close_channel(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    def exit_code(self, timeout: float = 30.0) -> int:
        assert self.process is not None and self.process.proc is not None
        return self.process.proc.wait(timeout=timeout)

    async def stop(self) -> None:
        await self.close_channel()
        if self.process is not None:
            self.process.stop()


async def count_rows(database_url: str, table: Any, *where: Any) -> int:
    db = Database(database_url)
    try:
        async with db.engine.connect() as conn:
            return (await conn.execute(select(func.count()).select_from(table).where(*where))).scalar_one()
    finally:
        await db.dispose()
