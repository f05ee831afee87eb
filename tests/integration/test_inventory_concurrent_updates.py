"""Two UpdateProduct calls at once on each backend: each changes only the fields its mask names, and neither undoes
the other. Each call, about to write, waits (up to a second) until the other has got as far: unless a call holds
the product from its read to its commit, both read the same row and the later write puts back the field the
earlier one changed."""

from __future__ import annotations

import asyncio
import uuid

import pytest

from tessera_inventory import bootstrap
from tessera_inventory.adapters import repository
from tessera_inventory.domain.model import Money
from tessera_inventory.service_layer import commands, handlers
from tessera_inventory.service_layer.unit_of_work import InventoryUnitOfWork
from tessera_runtime.db import Database
from tessera_runtime.migrations import upgrade_async


@pytest.fixture
async def db(db_url):
    await upgrade_async(bootstrap.MIGRATIONS, db_url)
    database = Database(db_url)
    yield database
    await database.dispose()


async def test_a_name_and_a_price_changed_at_once_both_stick(db, monkeypatch):
    product = await handlers.create_product(commands.CreateProduct(
        sku="LAMP-1", name="Desk lamp", description="A lamp", price=Money("EUR", 3999), stock_on_hand=5,
        request_id=uuid.uuid4().hex), InventoryUnitOfWork(db))
    arrived = [asyncio.Event(), asyncio.Event()]
    turn = iter(range(2))
    real = repository.SqlAlchemyProductRepository.update_details

    async def update_details(self, *args, **kwargs):
        mine = next(turn, None)
        if mine is not None:
            arrived[mine].set()
            try:
                await asyncio.wait_for(asyncio.gather(*(e.wait() for e in arrived)), timeout=1.0)
            except TimeoutError:
                pass
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(repository.SqlAlchemyProductRepository, "update_details", update_details)
    await asyncio.gather(
        handlers.update_product(commands.UpdateProduct(product.id, ("name",), name="Reading lamp"),
                                InventoryUnitOfWork(db)),
        handlers.update_product(commands.UpdateProduct(product.id, ("price.amount_minor",),
                                                       price=Money("", 4499)), InventoryUnitOfWork(db)))
    async with InventoryUnitOfWork(db) as uow:
        now = await uow.products.get(product.id)
    assert (now.name, now.description, now.price) == ("Reading lamp", "A lamp", Money("EUR", 4499))
