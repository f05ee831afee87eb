"""Inventory integration helpers: a real inventory server on port 0 over a real channel, and database peeks."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import grpc
from sqlalchemy import Table, func, select
from tessera.common.v1 import money_pb2
from tessera.inventory.v1 import inventory_service_pb2 as svc
from tessera.inventory.v1 import inventory_service_pb2_grpc, product_pb2

from tessera_inventory import bootstrap
from tessera_runtime.db import Database
from tessera_runtime.server import TesseraServer, create_server

# Events are asserted in the outbox; nothing consumes them, so no relay publishes them to the shared broker.
QUIET = {"TESSERA_OUTBOX_RELAY": "false"}


@contextlib.asynccontextmanager
async def inventory_service(db_url: str, channel_options: tuple[tuple[str, int], ...] = (),
                            **env: str) -> AsyncIterator[
        tuple[inventory_service_pb2_grpc.InventoryServiceStub, TesseraServer]]:
    """Starts the inventory service (migrations, sweeper) on port 0 and yields a stub on a real channel (made with
    `channel_options`)."""
    settings = bootstrap.SETTINGS.from_env("inventory", 0, {"TESSERA_DATABASE_URL": db_url,
                                                            "TESSERA_GRPC_PORT": "0", **QUIET, **env})
    module = await bootstrap.build(settings)
    server, port = await create_server(module, readiness_interval=0.2)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=channel_options) as channel:
            yield inventory_service_pb2_grpc.InventoryServiceStub(channel), server
    finally:
        await server.stop()


def new_product(sku: str = "SKU-1", stock: int = 10, amount: int = 1999, request_id: str | None = None,
                **fields) -> svc.CreateProductRequest:
    price = fields.pop("price", money_pb2.Money(currency_code="EUR", amount_minor=amount))
    return svc.CreateProductRequest(
        product=product_pb2.Product(sku=sku, name=fields.pop("name", f"Product {sku}"), price=price,
                                    stock_on_hand=stock, **fields),
        request_id=request_id or uuid.uuid4().hex)


def reserve_request(*items: tuple[str, int], order_id: str | None = None, **kw) -> svc.ReserveStockRequest:
    return svc.ReserveStockRequest(
        order_id=order_id or str(uuid.uuid4()),
        items=[product_pb2.ReservationItem(product_id=pid, quantity=q) for pid, q in items], **kw)


async def count_rows(db_url: str, table: Table) -> int:
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            return (await conn.execute(select(func.count()).select_from(table))).scalar_one()
    finally:
        await db.dispose()


async def event_types(db_url: str, outbox: Table) -> list[str]:
    """The short names of the outbox's events, in the order they were written."""
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            rows = (await conn.execute(select(outbox.c.event_type).order_by(outbox.c.seq))).all()
    finally:
        await db.dispose()
    return [r[0].rsplit(".", 1)[1] for r in rows]
