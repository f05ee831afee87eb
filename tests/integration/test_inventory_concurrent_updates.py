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
from tests.support.concurrency import meet_before
from tests.support.databases import migrated


@pytest.fixture
async def db(db_url):
    async with migrated(bootstrap.MIGRATIONS, db_url) as database:
        yield database


async def test_a_name_and_a_price_changed_at_once_both_stick(db, monkeypatch):
    product = await handlers.create_product(commands.CreateProduct(
        sku="LAMP-1", name="Desk lamp", description="A lamp", price=Money("EUR", 3999), stock_on_hand=5,
        request_id=uuid.uuid4().hex), InventoryUnitOfWork(db))
    meet_before(monkeypatch, repository.SqlAlchemyProductRepository, "update_details")
    await asyncio.gather(
        handlers.update_product(commands.UpdateProduct(product.id, ("name",), name="Reading lamp"),
                                InventoryUnitOfWork(db)),
        handlers.update_product(commands.UpdateProduct(product.id, ("price.amount_minor",),
                                                       price=Money("", 4499)), InventoryUnitOfWork(db)))
    async with InventoryUnitOfWork(db) as uow:
        now = await uow.products.get(product.id)
    assert (now.name, now.description, now.price) == ("Reading lamp", "A lamp", Money("EUR", 4499))
