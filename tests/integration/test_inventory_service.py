"""The inventory service over a real channel to a real server on port 0, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import grpc
import pytest
from google.protobuf import duration_pb2, field_mask_pb2
from google.rpc import error_details_pb2, status_pb2
from sqlalchemy import event as sqlalchemy_event
from sqlalchemy import select, update
from tessera.common.v1 import money_pb2
from tessera.inventory.v1 import inventory_events_pb2 as events_pb2
from tessera.inventory.v1 import inventory_service_pb2 as svc
from tessera.inventory.v1 import product_pb2

from tessera_inventory.adapters.orm import outbox, products, reservations, stock_adjustments
from tessera_runtime.clients import error_details
from tessera_runtime.db import Database
from tests.integration.conftest_inventory import (
    count_rows,
    event_types,
    inventory_service,
    new_product,
    reserve_request,
)
from tests.support.databases import execute, migrated

ACTIVE = product_pb2.RESERVATION_STATUS_ACTIVE
COMMITTED = product_pb2.RESERVATION_STATUS_COMMITTED
RELEASED = product_pb2.RESERVATION_STATUS_RELEASED
EXPIRED = product_pb2.RESERVATION_STATUS_EXPIRED


@pytest.fixture
async def inventory(db_url):
    async with inventory_service(db_url) as (stub, _):
        yield stub


async def failure(call) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo, grpc.aio.AioRpcError]:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    info, _ = error_details(err.value)
    assert info is not None and info.domain == "inventory.tessera.dev"
    return err.value.code(), info, err.value


def levels(p: product_pb2.Product) -> tuple[int, int, int]:
    return p.stock_on_hand, p.stock_reserved, p.stock_available


async def test_catalogue_round_trip_and_its_events(inventory, db_url):
    request = new_product("LAMP-1", stock=3, description="A lamp")
    created = (await inventory.CreateProduct(request)).product
    assert (created.sku, created.version, levels(created)) == ("LAMP-1", 1, (3, 0, 3))
    assert (await inventory.CreateProduct(request)).product == created
    code, info, _ = await failure(inventory.CreateProduct(new_product("LAMP-1")))
    assert (code, info.reason, dict(info.metadata)) == (grpc.StatusCode.ALREADY_EXISTS, "SKU_ALREADY_EXISTS",
                                                        {"sku": "LAMP-1"})
    code, info, _ = await failure(inventory.CreateProduct(new_product("LAMP-2", request_id=request.request_id)))
    assert (code, info.reason) == (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    other = (await inventory.CreateProduct(new_product("DESK-1", stock=0))).product

    assert (await inventory.GetProduct(svc.GetProductRequest(id=created.id))).product == created
    batch = await inventory.BatchGetProducts(svc.BatchGetProductsRequest(ids=[other.id, created.id, other.id]))
    assert [p.sku for p in batch.products] == ["DESK-1", "LAMP-1", "DESK-1"]

    updated = (await inventory.UpdateProduct(svc.UpdateProductRequest(
        product=product_pb2.Product(id=created.id, name="Desk lamp", description="ignored",
                                    price=money_pb2.Money(currency_code="USD", amount_minor=1)),
        update_mask=field_mask_pb2.FieldMask(paths=["name", "price.currency_code"])))).product
    assert (updated.name, updated.description, updated.price.currency_code, updated.price.amount_minor,
            updated.version) == ("Desk lamp", "A lamp", "USD", 1999, 2)

    adjusted = (await inventory.AdjustStock(svc.AdjustStockRequest(
        product_id=other.id, delta=7, reason="Delivery 2024-117", request_id="adj-1"))).product
    assert levels(adjusted) == (7, 0, 7) and adjusted.version == 2
    again = (await inventory.AdjustStock(svc.AdjustStockRequest(
        product_id=other.id, delta=7, reason="Delivery 2024-117", request_id="adj-1"))).product
    assert again == adjusted
    code, info, _ = await failure(inventory.AdjustStock(svc.AdjustStockRequest(
        product_id=other.id, delta=-8, reason="Count", request_id="adj-2")))
    assert (code, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "STOCK_BELOW_RESERVED")
    assert dict(info.metadata) == {"product_id": other.id, "stock_on_hand": "7", "stock_reserved": "0"}

    first = await inventory.ListProducts(svc.ListProductsRequest(page_size=1))
    second = await inventory.ListProducts(svc.ListProductsRequest(page_size=1, page_token=first.next_page_token))
    assert [p.sku for p in (*first.products, *second.products)] == ["LAMP-1", "DESK-1"]
    assert second.next_page_token == ""
    in_stock = await inventory.ListProducts(svc.ListProductsRequest(in_stock_only=True, sku="DESK-1"))
    assert [p.id for p in in_stock.products] == [other.id]

    await inventory.DeleteProduct(svc.DeleteProductRequest(id=created.id))
    code, info, _ = await failure(inventory.GetProduct(svc.GetProductRequest(id=created.id)))
    assert (code, info.reason, dict(info.metadata)) == (grpc.StatusCode.NOT_FOUND, "PRODUCT_NOT_FOUND",
                                                        {"product_id": created.id})
    reused = (await inventory.CreateProduct(new_product("LAMP-1"))).product
    assert reused.id != created.id
    assert [p.sku for p in (await inventory.ListProducts(svc.ListProductsRequest())).products] == [
        "DESK-1", "LAMP-1"]
    assert await event_types(db_url, outbox) == ["ProductCreated", "ProductCreated", "ProductUpdated",
                                                 "StockAdjusted", "ProductDeleted", "ProductCreated"]
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            payload = (await conn.execute(select(outbox.c.payload).where(
                outbox.c.event_type == "tessera.inventory.v1.StockAdjusted"))).scalar_one()
    finally:
        await db.dispose()
    event = events_pb2.StockAdjusted.FromString(payload)
    assert (event.product_id, event.delta, event.stock_on_hand, event.request_id) == (other.id, 7, 7, "adj-1")


def _invalid_cases(existing: str) -> list[tuple[str, object, str]]:
    unknown = str(uuid.uuid4())
    money = money_pb2.Money
    mask = field_mask_pb2.FieldMask
    return [
        ("CreateProduct", new_product(""), "product.sku"),
        ("CreateProduct", new_product("bad sku!"), "product.sku"),
        ("CreateProduct", new_product("N", name=""), "product.name"),
        ("CreateProduct", new_product("N", description="d" * 5001), "product.description"),
        ("CreateProduct", new_product("N", price=None), "product.price"),
        ("CreateProduct", new_product("N", price=money(currency_code="EURO", amount_minor=1)),
         "product.price.currency_code"),
        ("CreateProduct", new_product("N", amount=0), "product.price.amount_minor"),
        ("CreateProduct", new_product("N", stock=-1), "product.stock_on_hand"),
        ("CreateProduct", new_product("N", id=unknown), "product.id"),
        ("CreateProduct", new_product("N", version=3), "product.version"),
        ("CreateProduct", new_product("N", request_id="r" * 65), "request_id"),
        ("GetProduct", svc.GetProductRequest(id="42"), "id"),
        ("BatchGetProducts", svc.BatchGetProductsRequest(), "ids"),
        ("BatchGetProducts", svc.BatchGetProductsRequest(ids=[existing, "nope"]), "ids[1]"),
        ("ListProducts", svc.ListProductsRequest(page_size=-1), "page_size"),
        ("ListProducts", svc.ListProductsRequest(page_token="garbage"), "page_token"),
        ("ListProducts", svc.ListProductsRequest(sku="s" * 65), "sku"),
        # A line break at the end would pass a pattern's "$"; a SKU never has one.
        ("CreateProduct", new_product("LAMP-2\n", name="Lamp"), "product.sku"),
        ("UpdateProduct", svc.UpdateProductRequest(product=product_pb2.Product(id=existing, name="x"),
                                                   update_mask=mask()), "update_mask"),
        ("UpdateProduct", svc.UpdateProductRequest(product=product_pb2.Product(id=existing, sku="x"),
                                                   update_mask=mask(paths=["sku"])), "update_mask"),
        ("UpdateProduct", svc.UpdateProductRequest(product=product_pb2.Product(id=existing),
                                                   update_mask=mask(paths=["stock_available"])), "update_mask"),
        ("UpdateProduct", svc.UpdateProductRequest(product=product_pb2.Product(id=existing, name=""),
                                                   update_mask=mask(paths=["name"])), "product.name"),
        ("UpdateProduct", svc.UpdateProductRequest(
            product=product_pb2.Product(id=existing, price=money(currency_code="EUR", amount_minor=-1)),
            update_mask=mask(paths=["price"])), "product.price.amount_minor"),
        ("UpdateProduct", svc.UpdateProductRequest(product=product_pb2.Product(id="x", name="y"),
                                                   update_mask=mask(paths=["name"])), "product.id"),
        ("DeleteProduct", svc.DeleteProductRequest(id=""), "id"),
        ("AdjustStock", svc.AdjustStockRequest(product_id=existing, delta=0, reason="r", request_id="a"), "delta"),
        ("AdjustStock", svc.AdjustStockRequest(product_id=existing, delta=1, reason="", request_id="a"), "reason"),
        ("AdjustStock", svc.AdjustStockRequest(product_id=existing, delta=1, reason="r"), "request_id"),
        ("AdjustStock", svc.AdjustStockRequest(product_id="p", delta=1, reason="r", request_id="a"), "product_id"),
        ("ReserveStock", reserve_request((existing, 1), order_id="order-1"), "order_id"),
        ("ReserveStock", reserve_request(), "items"),
        ("ReserveStock", reserve_request((existing, 0)), "items[0].quantity"),
        ("ReserveStock", reserve_request((existing, 1_000_001)), "items[0].quantity"),
        ("ReserveStock", reserve_request((existing, 1), ("x", 1)), "items[1].product_id"),
        ("ReserveStock", reserve_request((existing, 1), (existing, 2)), "items[1].product_id"),
        ("ReserveStock", reserve_request((existing, 1), ttl=duration_pb2.Duration(seconds=30)), "ttl"),
        ("ReserveStock", reserve_request((existing, 1), ttl=duration_pb2.Duration(seconds=86_401)), "ttl"),
        # Too long, either way, for any time span Python has.
        ("ReserveStock", reserve_request((existing, 1), ttl=duration_pb2.Duration(seconds=10**15)), "ttl"),
        ("ReserveStock", reserve_request((existing, 1), ttl=duration_pb2.Duration(seconds=-10**15)), "ttl"),
        # Not zero, so not the default: shorter than a microsecond, and Durations the protobuf rules make invalid
        # (nanos out of range, nanos against the sign of seconds).
        ("ReserveStock", reserve_request((existing, 1), ttl=duration_pb2.Duration(nanos=500)), "ttl"),
        ("ReserveStock", reserve_request((existing, 1), ttl=duration_pb2.Duration(seconds=120, nanos=-5)), "ttl"),
        ("ReserveStock", reserve_request((existing, 1), ttl=duration_pb2.Duration(seconds=120, nanos=10**9)),
         "ttl"),
        ("CreateProduct", svc.CreateProductRequest(product=product_pb2.Product(
            sku="NUL-1", name="n", description="has\x00nul", stock_on_hand=1,
            price=money(currency_code="EUR", amount_minor=100)), request_id="nul-1"), "product.description"),
        ("GetReservation", svc.GetReservationRequest(id="r"), "id"),
        ("ReleaseReservation", svc.ReleaseReservationRequest(id=unknown, reason="x" * 501), "reason"),
        ("CommitReservation", svc.CommitReservationRequest(id="c"), "id"),
    ]


async def test_each_invalid_field_is_named_and_nothing_is_written(inventory, db_url):
    existing = (await inventory.CreateProduct(new_product("KEEP", stock=5))).product
    for rpc, request, field in _invalid_cases(existing.id):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(inventory, rpc)(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, field, err.value.details())
        info, bad = error_details(err.value)
        assert info is not None and (info.reason, info.domain) == ("INVALID_ARGUMENT", "inventory.tessera.dev")
        assert bad is not None and [v.field for v in bad.field_violations] == [field], (rpc, field)
    assert (await inventory.GetProduct(svc.GetProductRequest(id=existing.id))).product == existing
    assert await count_rows(db_url, products) == 1
    assert await count_rows(db_url, reservations) == 0
    assert await count_rows(db_url, stock_adjustments) == 0
    assert await count_rows(db_url, outbox) == 1


async def test_unknown_ids_are_not_found_with_their_reason(inventory):
    missing = str(uuid.uuid4())
    product_calls = [
        inventory.GetProduct(svc.GetProductRequest(id=missing)),
        inventory.BatchGetProducts(svc.BatchGetProductsRequest(ids=[missing])),
        inventory.UpdateProduct(svc.UpdateProductRequest(product=product_pb2.Product(id=missing, name="n"),
                                                         update_mask=field_mask_pb2.FieldMask(paths=["name"]))),
        inventory.DeleteProduct(svc.DeleteProductRequest(id=missing)),
        inventory.AdjustStock(svc.AdjustStockRequest(product_id=missing, delta=1, reason="r", request_id="x")),
        inventory.ReserveStock(reserve_request((missing, 1))),
    ]
    for call in product_calls:
        code, info, _ = await failure(call)
        assert (code, info.reason, dict(info.metadata)) == (grpc.StatusCode.NOT_FOUND, "PRODUCT_NOT_FOUND",
                                                            {"product_id": missing})
    for call in (inventory.GetReservation(svc.GetReservationRequest(id=missing)),
                 inventory.ReleaseReservation(svc.ReleaseReservationRequest(id=missing)),
                 inventory.CommitReservation(svc.CommitReservationRequest(id=missing))):
        code, info, _ = await failure(call)
        assert (code, info.reason, dict(info.metadata)) == (grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND",
                                                            {"reservation_id": missing})


async def test_reservation_lifecycle(inventory, db_url):
    lamp = (await inventory.CreateProduct(new_product("LAMP", stock=5))).product
    desk = (await inventory.CreateProduct(new_product("DESK", stock=2))).product
    order_id = str(uuid.uuid4())
    held = (await inventory.ReserveStock(reserve_request((lamp.id, 3), (desk.id, 2), order_id=order_id,
                                                         ttl=duration_pb2.Duration(seconds=120)))).reservation
    assert held.status == ACTIVE and [i.product_id for i in held.items] == [lamp.id, desk.id]
    assert held.expire_time.seconds - held.create_time.seconds in (119, 120)
    repeat = (await inventory.ReserveStock(reserve_request((desk.id, 2), (lamp.id, 3),
                                                           order_id=order_id))).reservation
    assert repeat == held
    code, info, _ = await failure(inventory.ReserveStock(reserve_request((lamp.id, 1), order_id=order_id)))
    assert (code, info.reason, dict(info.metadata)) == (
        grpc.StatusCode.ALREADY_EXISTS, "RESERVATION_MISMATCH", {"order_id": order_id, "reservation_id": held.id})
    assert levels((await inventory.GetProduct(svc.GetProductRequest(id=lamp.id))).product) == (5, 3, 2)

    code, info, err = await failure(inventory.ReserveStock(reserve_request((lamp.id, 2), (desk.id, 1))))
    assert (code, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_STOCK")
    assert dict(info.metadata) == {"product_id": desk.id, "sku": "DESK", "requested": "1", "available": "0"}
    status = status_pb2.Status.FromString(dict(err.trailing_metadata())["grpc-status-details-bin"])
    failure_detail = error_details_pb2.PreconditionFailure()
    assert any(d.Unpack(failure_detail) for d in status.details)
    assert [(v.type, v.subject) for v in failure_detail.violations] == [("STOCK", desk.id)]
    assert levels((await inventory.GetProduct(svc.GetProductRequest(id=lamp.id))).product) == (5, 3, 2), \
        "the lamp units of a failed reservation stayed held"

    code, info, _ = await failure(inventory.DeleteProduct(svc.DeleteProductRequest(id=lamp.id)))
    assert (code, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PRODUCT_HAS_RESERVATIONS")

    committed = (await inventory.CommitReservation(svc.CommitReservationRequest(id=held.id))).reservation
    assert committed.status == COMMITTED and committed.HasField("commit_time")
    assert (await inventory.CommitReservation(svc.CommitReservationRequest(id=held.id))).reservation == committed
    assert levels((await inventory.GetProduct(svc.GetProductRequest(id=lamp.id))).product) == (2, 0, 2)
    assert (await inventory.ReserveStock(reserve_request((lamp.id, 3), (desk.id, 2),
                                                         order_id=order_id))).reservation.status == COMMITTED

    returned = (await inventory.ReleaseReservation(svc.ReleaseReservationRequest(
        id=held.id, reason="Order cancelled"))).reservation
    assert returned.status == RELEASED and returned.HasField("commit_time") and returned.HasField("release_time")
    assert levels((await inventory.GetProduct(svc.GetProductRequest(id=lamp.id))).product) == (5, 0, 5)
    assert (await inventory.ReleaseReservation(svc.ReleaseReservationRequest(id=held.id))).reservation == returned
    code, info, _ = await failure(inventory.CommitReservation(svc.CommitReservationRequest(id=held.id)))
    assert (code, info.reason, dict(info.metadata)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_NOT_ACTIVE",
        {"reservation_id": held.id, "status": "RESERVATION_STATUS_RELEASED"})

    second = (await inventory.ReserveStock(reserve_request((desk.id, 1)))).reservation
    released = (await inventory.ReleaseReservation(svc.ReleaseReservationRequest(id=second.id))).reservation
    assert released.status == RELEASED and not released.HasField("commit_time")
    assert levels((await inventory.GetProduct(svc.GetProductRequest(id=desk.id))).product) == (2, 0, 2)
    assert (await inventory.GetReservation(svc.GetReservationRequest(id=second.id))).reservation == released
    assert (await event_types(db_url, outbox))[2:] == ["StockReserved", "ReservationCommitted", "StockReleased",
                                                       "StockReserved", "StockReleased"]


async def test_releasing_a_committed_reservation_never_takes_stock_above_the_limit(inventory, db_url):
    # Sold units coming back are stock received like any other: the 1,000,000,000 units on hand AdjustStock keeps
    # to hold for them too. A release that would cross it is refused with the product named and changes nothing.
    lamp = (await inventory.CreateProduct(new_product("LAMP", stock=10))).product
    held = (await inventory.ReserveStock(reserve_request((lamp.id, 4)))).reservation
    await inventory.CommitReservation(svc.CommitReservationRequest(id=held.id))
    await inventory.AdjustStock(svc.AdjustStockRequest(product_id=lamp.id, delta=1_000_000_000 - 8,
                                                       reason="Delivery", request_id=str(uuid.uuid4())))
    events_before = await event_types(db_url, outbox)
    code, info, _ = await failure(inventory.ReleaseReservation(svc.ReleaseReservationRequest(
        id=held.id, reason="Order cancelled")))
    assert (code, info.reason, dict(info.metadata)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "STOCK_LIMIT_EXCEEDED",
        {"product_id": lamp.id, "stock_on_hand": "999999998"})
    assert levels((await inventory.GetProduct(svc.GetProductRequest(id=lamp.id))).product) == (999_999_998, 0,
                                                                                               999_999_998)
    assert (await inventory.GetReservation(svc.GetReservationRequest(id=held.id))).reservation.status == COMMITTED
    assert await event_types(db_url, outbox) == events_before

    await inventory.AdjustStock(svc.AdjustStockRequest(product_id=lamp.id, delta=-2, reason="Damaged",
                                                       request_id=str(uuid.uuid4())))
    returned = (await inventory.ReleaseReservation(svc.ReleaseReservationRequest(id=held.id))).reservation
    assert returned.status == RELEASED
    assert levels((await inventory.GetProduct(svc.GetProductRequest(id=lamp.id))).product) == (1_000_000_000, 0,
                                                                                               1_000_000_000)


async def test_concurrent_reservations_of_the_last_units_never_oversell(inventory):
    # Twenty orders race for 5 lamps and 7 desks, each taking one of each, half of them naming the products in
    # the opposite order (which would deadlock row locks taken in request order).
    lamp = (await inventory.CreateProduct(new_product("LAMP", stock=5))).product
    desk = (await inventory.CreateProduct(new_product("DESK", stock=7))).product

    async def order(i: int) -> grpc.StatusCode:
        items = [(lamp.id, 1), (desk.id, 1)]
        try:
            await inventory.ReserveStock(reserve_request(*(items if i % 2 else items[::-1])), timeout=60)
        except grpc.aio.AioRpcError as err:
            return err.code()
        return grpc.StatusCode.OK

    outcomes = await asyncio.gather(*(order(i) for i in range(20)))
    assert outcomes.count(grpc.StatusCode.OK) == 5
    assert outcomes.count(grpc.StatusCode.FAILED_PRECONDITION) == 15
    got = (await inventory.BatchGetProducts(svc.BatchGetProductsRequest(ids=[lamp.id, desk.id]))).products
    assert [levels(p) for p in got] == [(5, 5, 0), (7, 5, 2)]


async def test_concurrent_repeats_for_one_order_make_one_reservation(inventory, db_url):
    lamp = (await inventory.CreateProduct(new_product("LAMP", stock=50))).product
    request = reserve_request((lamp.id, 3))
    replies = await asyncio.gather(*(inventory.ReserveStock(request, timeout=60) for _ in range(8)))
    assert len({r.reservation.id for r in replies}) == 1
    assert levels((await inventory.GetProduct(svc.GetProductRequest(id=lamp.id))).product) == (50, 3, 47)
    assert await count_rows(db_url, reservations) == 1


async def test_concurrent_creates_make_one_product_per_request_id_and_per_sku(inventory, db_url):
    # The same request eight times at once: one product, every caller gets it.
    request = new_product("LAMP", stock=5)
    replies = await asyncio.gather(*(inventory.CreateProduct(request, timeout=60) for _ in range(8)))
    assert len({r.product.id for r in replies}) == 1
    # Eight different requests for one new SKU at once: one wins, the others are told the SKU is taken.
    outcomes = await asyncio.gather(*(inventory.CreateProduct(new_product("DESK"), timeout=60) for _ in range(8)),
                                    return_exceptions=True)
    created = [o for o in outcomes if not isinstance(o, BaseException)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(created) == 1 and len(refused) == 7
    assert {(e.code(), error_details(e)[0].reason) for e in refused} == {
        (grpc.StatusCode.ALREADY_EXISTS, "SKU_ALREADY_EXISTS")}
    assert await count_rows(db_url, products) == 2
    assert await event_types(db_url, outbox) == ["ProductCreated", "ProductCreated"]


async def test_sweeper_expires_a_reservation_and_gives_its_units_back(db_url):
    env = {"TESSERA_RESERVATION_DEFAULT_TTL_SECONDS": "0.5", "TESSERA_RESERVATION_SWEEP_SECONDS": "0.1"}
    async with inventory_service(db_url, **env) as (inventory, _):
        lamp = (await inventory.CreateProduct(new_product("LAMP", stock=4))).product
        held = (await inventory.ReserveStock(reserve_request((lamp.id, 3)))).reservation
        assert held.status == ACTIVE
        for _ in range(300):
            got = (await inventory.GetReservation(svc.GetReservationRequest(id=held.id))).reservation
            if got.status != ACTIVE:
                break
            await asyncio.sleep(0.05)
        assert got.status == EXPIRED and got.HasField("release_time")
        assert levels((await inventory.GetProduct(svc.GetProductRequest(id=lamp.id))).product) == (4, 0, 4)
        code, info, _ = await failure(inventory.CommitReservation(svc.CommitReservationRequest(id=held.id)))
        assert (code, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED")
        assert (await inventory.ReleaseReservation(svc.ReleaseReservationRequest(id=held.id))).reservation == got
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            payload = (await conn.execute(select(outbox.c.payload).where(
                outbox.c.event_type == "tessera.inventory.v1.StockReleased"))).scalar_one()
    finally:
        await db.dispose()
    event = events_pb2.StockReleased.FromString(payload)
    assert event.reason == events_pb2.STOCK_RELEASE_REASON_EXPIRED and event.reservation.status == EXPIRED


async def test_a_reservation_the_sweeper_cannot_expire_does_not_hold_up_the_others(db_url, caplog):
    """A reservation whose product was edited by hand (it no longer holds the reserved units) cannot be expired:
    the sweeper logs it with its id, passes over it, and goes on with the reservations behind it, in batches of
    one here so that the bad row alone fills a batch. Once the row is repaired, it is expired in a later round."""
    env = {"TESSERA_RESERVATION_DEFAULT_TTL_SECONDS": "0.3", "TESSERA_RESERVATION_SWEEP_SECONDS": "0.1",
           "TESSERA_RESERVATION_SWEEP_BATCH": "1"}
    async with inventory_service(db_url, **env) as (inventory, _):
        lamp = (await inventory.CreateProduct(new_product("LAMP", stock=4))).product
        desk = (await inventory.CreateProduct(new_product("DESK", stock=4))).product
        stuck = (await inventory.ReserveStock(reserve_request((lamp.id, 3)))).reservation
        await execute(db_url, update(products).where(products.c.id == lamp.id).values(stock_reserved=0))
        later = [(await inventory.ReserveStock(reserve_request((desk.id, 1)))).reservation for _ in range(3)]

        async def status(reservation_id: str) -> int:
            return (await inventory.GetReservation(svc.GetReservationRequest(id=reservation_id))).reservation.status

        for _ in range(300):
            if [await status(r.id) for r in later] == [EXPIRED] * 3:
                break
            await asyncio.sleep(0.05)
        assert [await status(r.id) for r in later] == [EXPIRED] * 3
        assert levels((await inventory.GetProduct(svc.GetProductRequest(id=desk.id))).product) == (4, 0, 4)
        assert await status(stuck.id) == ACTIVE
        passed_over = [r for r in caplog.records if r.name == "tessera.inventory.sweeper" and r.levelname == "ERROR"]
        assert passed_over and {getattr(r, "item_id", None) for r in passed_over} == {stuck.id}

        await execute(db_url, update(products).where(products.c.id == lamp.id).values(stock_reserved=3))
        for _ in range(300):
            if await status(stuck.id) == EXPIRED:
                break
            await asyncio.sleep(0.05)
        assert await status(stuck.id) == EXPIRED
        assert levels((await inventory.GetProduct(svc.GetProductRequest(id=lamp.id))).product) == (4, 0, 4)


async def test_a_page_of_the_largest_products_fits_a_default_grpc_message(inventory):
    """200 products (the largest page) with the longest name and description in characters of 4 UTF-8 bytes each,
    the largest stock and price, and a million units of each reserved, weigh more than the 4 MiB a gRPC client
    accepts by default: the page ends early with a next_page_token, and following the tokens lists every product
    once."""
    heavy = "\U0001F9F1"
    created = await asyncio.gather(*(inventory.CreateProduct(new_product(
        f"SKU-{i:03}-" + "X" * 56, stock=1_000_000_000, amount=10_000_000_000, name=heavy * 200,
        description=heavy * 5000)) for i in range(200)))
    ids = [c.product.id for c in created]
    for part in (ids[:100], ids[100:]):
        await inventory.ReserveStock(reserve_request(*((pid, 1_000_000) for pid in part)))
    seen, token, pages = [], "", 0
    while True:
        page = await inventory.ListProducts(svc.ListProductsRequest(page_size=200, page_token=token))
        assert page.ByteSize() < 4 * 1024 * 1024
        assert {p.stock_reserved for p in page.products} == {1_000_000}
        seen += [p.id for p in page.products]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(ids) and pages == 2


async def test_a_customer_cannot_change_the_catalogue(inventory):
    customer = (("x-user-id", str(uuid.uuid4())), ("x-user-scopes", "order:write"))
    code, info, _ = await failure(inventory.CreateProduct(new_product("X"), metadata=customer))
    assert (code, info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    admin = (("x-user-id", "ops"), ("x-user-scopes", "admin"))
    created = (await inventory.CreateProduct(new_product("X"), metadata=admin)).product
    assert (await inventory.GetProduct(svc.GetProductRequest(id=created.id), metadata=customer)).product == created


# CommitReservation's write: on PostgreSQL the reservation, its products and its event as one statement, guarded by
# the reservation's status; elsewhere one transaction.

@contextlib.asynccontextmanager
async def _handlers_on(db_url: str):
    from tessera_inventory import bootstrap
    from tessera_inventory.service_layer.unit_of_work import InventoryUnitOfWork

    async with migrated(bootstrap.MIGRATIONS, db_url) as db:
        yield db, InventoryUnitOfWork(db)


async def _reserved(uow, *stocks: int):
    """Products with these stocks, and a reservation of 2 units of each."""
    from tessera_inventory.domain.model import Money, ReservationItem
    from tessera_inventory.service_layer import commands, handlers

    ids = []
    for stock in stocks:
        product = await handlers.create_product(commands.CreateProduct(
            sku=f"SKU-{uuid.uuid4().hex[:8]}", name="Lamp", description="", price=Money("EUR", 1999),
            stock_on_hand=stock, request_id=uuid.uuid4().hex), uow)
        ids.append(product.id)
    reservation = await handlers.reserve_stock(commands.ReserveStock(
        order_id=str(uuid.uuid4()), items=tuple(ReservationItem(product_id=i, quantity=2) for i in ids)), uow)
    return ids, reservation


async def _stock(db: Database, ids: list[str]) -> list[tuple[int, int]]:
    async with db.engine.connect() as conn:
        rows = (await conn.execute(select(products.c.id, products.c.stock_on_hand, products.c.stock_reserved)
                                   .where(products.c.id.in_(ids)))).all()
    return [(r.stock_on_hand, r.stock_reserved) for r in sorted(rows, key=lambda r: ids.index(r.id))]


async def test_a_commit_takes_its_units_out_of_stock_with_its_event_in_one_statement(db_url):
    from sqlalchemy import text

    from tessera_inventory.service_layer import commands, handlers

    async with _handlers_on(db_url) as (db, uow):
        ids, reservation = await _reserved(uow, 5, 7)
        through_engine: list[str] = []
        sqlalchemy_event.listen(db.engine.sync_engine, "before_cursor_execute",
                                lambda _c, _cur, statement, *_a: through_engine.append(statement.split()[0]))
        committed = await handlers.commit_reservation(commands.CommitReservation(reservation.id), uow)
        assert committed.status.value == "COMMITTED"
        if db.dialect == "postgresql":  # through SQLAlchemy only the read: the write is one statement on asyncpg
            assert through_engine == ["SELECT"]
            async with db.engine.connect() as conn:
                xmins = (await conn.execute(text(
                    "SELECT xmin::text FROM reservations UNION ALL SELECT xmin::text FROM products "
                    "UNION ALL SELECT xmin::text FROM outbox WHERE event_type LIKE '%ReservationCommitted'"
                ))).scalars().all()
            assert len(xmins) == 1 + 2 + 1 and len(set(xmins)) == 1
        assert await _stock(db, ids) == [(3, 0), (5, 0)]
        assert (await event_types(db_url, outbox))[-1] == "ReservationCommitted"
        again = await handlers.commit_reservation(commands.CommitReservation(reservation.id), uow)
        assert again == committed and await _stock(db, ids) == [(3, 0), (5, 0)]


async def test_a_commit_that_lost_to_a_release_or_whose_stock_disagrees_writes_nothing(db_url):
    from sqlalchemy import update

    from tessera_inventory.adapters.repository import ReservationChanged
    from tessera_inventory.service_layer import commands, handlers
    from tessera_runtime.db import utcnow

    async with _handlers_on(db_url) as (db, uow):
        ids, reservation = await _reserved(uow, 5)
        async with uow:
            stale = await uow.reservations.get(reservation.id)
        await handlers.release_reservation(commands.ReleaseReservation(reservation.id), uow)
        events = await event_types(db_url, outbox)
        now = utcnow()
        stale.commit(now)
        # The reservation left ACTIVE after it was read: its commit changes nothing and says so, at once or (where the
        # write is one statement) at commit.
        applied = raised = False
        try:
            async with uow.one_statement():
                applied = await uow.reservations.commit_sold(stale, now)
                uow.add_event("reservation", stale.id, events_pb2.ReservationCommitted())
                if applied:
                    await uow.commit()
        except ReservationChanged:
            raised = True
        assert (applied, raised) == ((True, True) if db.dialect == "postgresql" else (False, False))
        async with uow:
            assert (await uow.reservations.get(reservation.id)).status.value == "RELEASED"
        assert await _stock(db, ids) == [(5, 0)] and await event_types(db_url, outbox) == events
        _, reason = await failure_of(handlers.commit_reservation(commands.CommitReservation(reservation.id), uow))
        assert reason == "RESERVATION_NOT_ACTIVE"

        # Stock that disagrees with a reservation (fewer units held than it holds) refuses the whole write.
        ids, reservation = await _reserved(uow, 5)
        async with db.engine.begin() as conn:
            await conn.execute(update(products).where(products.c.id == ids[0]).values(stock_reserved=1))
        events = await event_types(db_url, outbox)
        with pytest.raises(RuntimeError, match="does not match its reservations"):
            await handlers.commit_reservation(commands.CommitReservation(reservation.id), uow)
        async with uow:
            assert (await uow.reservations.get(reservation.id)).status.value == "ACTIVE"
        assert await _stock(db, ids) == [(5, 1)] and await event_types(db_url, outbox) == events


async def failure_of(call):
    from tessera_runtime.errors import DomainError

    with pytest.raises(DomainError) as err:
        await call
    return err.value, err.value.reason


async def test_a_commit_locks_its_products_in_product_id_order(pg_database):
    """As every change to several products does, so that a commit and a reservation of the same products (each
    locking in id order) never deadlock, whatever order the reservation lists its items in."""
    import asyncpg

    from tessera_inventory.domain.model import Money, ReservationItem
    from tessera_inventory.service_layer import commands, handlers

    _, url = pg_database
    async with _handlers_on(url) as (db, uow):
        blocker = probe = None
        try:
            ids = sorted([(await handlers.create_product(commands.CreateProduct(
                sku=f"SKU-{uuid.uuid4().hex[:8]}", name="Lamp", description="", price=Money("EUR", 1999),
                stock_on_hand=5, request_id=uuid.uuid4().hex), uow)).id for _ in range(2)])
            low, high = ids
            reservation = await handlers.reserve_stock(commands.ReserveStock(order_id=str(uuid.uuid4()), items=(
                ReservationItem(product_id=high, quantity=2), ReservationItem(product_id=low, quantity=1))), uow)
            dsn = url.replace("postgresql+asyncpg://", "postgresql://")
            blocker, probe = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
            holding = blocker.transaction()
            await holding.start()
            await blocker.execute("SELECT 1 FROM products WHERE id = $1 FOR UPDATE", high)
            commit = asyncio.ensure_future(handlers.commit_reservation(commands.CommitReservation(reservation.id), uow))
            await asyncio.sleep(0.5)
            assert not commit.done()  # it waits for the higher id ...
            with pytest.raises(asyncpg.exceptions.LockNotAvailableError):  # ... holding the lower one already
                await probe.execute("SELECT 1 FROM products WHERE id = $1 FOR UPDATE NOWAIT", low)
            await holding.rollback()
            committed = await asyncio.wait_for(commit, 10)
            assert committed.status.value == "COMMITTED"
            assert await _stock(db, [low, high]) == [(4, 0), (3, 0)]
        finally:
            for conn in (blocker, probe):
                if conn is not None:
                    await conn.close()


async def test_ids_are_the_same_in_either_case(inventory, db_url):
    """A UUID's letters may come in either case: an order's repeat in upper case is the same reservation (order_id
    is the idempotency key), and products and reservations are found by their ids in upper case."""
    lamp = (await inventory.CreateProduct(new_product("LAMP", stock=10))).product
    order_id = str(uuid.uuid4())
    first = (await inventory.ReserveStock(reserve_request((lamp.id, 4), order_id=order_id))).reservation
    again = (await inventory.ReserveStock(reserve_request((lamp.id.upper(), 4), order_id=order_id.upper()))).reservation
    assert again.id == first.id and await count_rows(db_url, reservations) == 1
    assert levels((await inventory.GetProduct(svc.GetProductRequest(id=lamp.id.upper()))).product) == (10, 4, 6)
    got = (await inventory.BatchGetProducts(svc.BatchGetProductsRequest(ids=[lamp.id.upper()]))).products
    assert [p.id for p in got] == [lamp.id]
    assert (await inventory.GetReservation(svc.GetReservationRequest(id=first.id.upper()))).reservation == first
    committed = (await inventory.CommitReservation(svc.CommitReservationRequest(id=first.id.upper()))).reservation
    assert committed.id == first.id
    assert levels((await inventory.GetProduct(svc.GetProductRequest(id=lamp.id))).product) == (6, 0, 6)


async def test_product_names_may_hold_the_spaces_and_joiners_of_any_script(inventory, db_url):
    """A name may hold a space of any script (an ideographic space, a narrow no-break space before a colon) and
    zero-width joiners; control characters, line breaks, direction overrides and a name of nothing else than
    spaces and joiners stay refused."""
    tower = (await inventory.CreateProduct(new_product("TOWER", name="東京\u3000タワー"))).product
    assert tower.name == "東京\u3000タワー"
    renamed = (await inventory.UpdateProduct(svc.UpdateProductRequest(
        product=product_pb2.Product(id=tower.id, name="Tour\u202f: modèle réduit"),
        update_mask=field_mask_pb2.FieldMask(paths=["name"])))).product
    assert renamed.name == "Tour\u202f: modèle réduit"
    for i, name in enumerate(("Lamp\nShade", "Lamp\u2029", "Lamp\u202eedahS", "Lamp\x1b[31m", "\u200d\u3000")):
        code, info, err = await failure(inventory.CreateProduct(new_product(f"BAD-{i}", name=name)))
        assert (code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), name
        assert [v.field for v in error_details(err)[1].field_violations] == ["product.name"]
    assert await count_rows(db_url, products) == 1


# gRPC's default limit on the metadata a client accepts (grpc.max_metadata_size), made strict: above it a client
# refuses a reply's trailers, the status details among them, at random up to twice the limit and always beyond.
STRICT_METADATA_LIMIT = (("grpc.max_metadata_size", 8192), ("grpc.absolute_max_metadata_size", 8192))


async def test_a_request_with_many_invalid_fields_gets_its_error(db_url):
    """The status details travel in a trailer, which a gRPC client refuses above 8 KiB (and then reports
    RESOURCE_EXHAUSTED, without the error): however many fields are invalid, the caller gets INVALID_ARGUMENT with
    the first invalid fields named and the count of those left out."""
    async with inventory_service(db_url, channel_options=STRICT_METADATA_LIMIT) as (inventory, _):
        existing = (await inventory.CreateProduct(new_product("KEEP", stock=5))).product
        calls = [
            (inventory.BatchGetProducts(svc.BatchGetProductsRequest(ids=["not-a-product-id"] * 100)), "ids[0]"),
            (inventory.ReserveStock(reserve_request(*[("not-a-product-id", 0)] * 100, order_id="not-an-order-id")),
             "order_id"),
            (inventory.UpdateProduct(svc.UpdateProductRequest(
                product=product_pb2.Product(id=existing.id, name="n"),
                update_mask=field_mask_pb2.FieldMask(paths=[f"no_such_field_{i}" for i in range(2000)]))),
             "update_mask"),
        ]
        for call, first in calls:
            code, info, err = await failure(call)
            assert (code, info.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"), err.details()
            violations = error_details(err)[1].field_violations
            assert violations[0].field == first
            assert "more" in violations[-1].description and len(err.details()) < 1000
        assert (await inventory.GetProduct(svc.GetProductRequest(id=existing.id))).product == existing
    assert await count_rows(db_url, reservations) == 0


async def test_a_reservation_short_of_every_product_names_them_all_within_the_metadata_limit(db_url):
    """A ReserveStock of 100 products none of which has the units: the PreconditionFailure lists every product (its
    description only while there is room), and the whole error fits the trailers every client accepts."""
    async with inventory_service(db_url, channel_options=STRICT_METADATA_LIMIT) as (inventory, _):
        created = await asyncio.gather(*(inventory.CreateProduct(new_product(f"SHORT-{i}", stock=1))
                                         for i in range(100)))
        ids = [c.product.id for c in created]
        code, info, err = await failure(inventory.ReserveStock(reserve_request(*[(i, 2) for i in ids])))
        assert (code, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_STOCK"), err.details()
        status = status_pb2.Status.FromString(dict(err.trailing_metadata())["grpc-status-details-bin"])
        (failure_any,) = [d for d in status.details if d.Is(error_details_pb2.PreconditionFailure.DESCRIPTOR)]
        shortages = error_details_pb2.PreconditionFailure()
        failure_any.Unpack(shortages)
        assert [(v.type, v.subject) for v in shortages.violations] == [("STOCK", i) for i in ids]
        assert shortages.violations[0].description == "2 units requested, 1 available"


async def test_reads_on_sqlite_never_wait_for_a_writer(tmp_path):
    """In WAL mode SQLite readers do not wait for the writer: GetProduct, GetReservation and ListProducts answer
    while another connection holds the write lock (a long write, the sweeper's), instead of queueing behind it for
    up to the busy timeout of 10 s."""
    import sqlite3

    path = tmp_path / "inventory.db"
    async with inventory_service(f"sqlite+aiosqlite:///{path}") as (inventory, _):
        lamp = (await inventory.CreateProduct(new_product("LAMP", stock=10))).product
        held = (await inventory.ReserveStock(reserve_request((lamp.id, 4)))).reservation
        writer = sqlite3.connect(path, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            got = await inventory.GetProduct(svc.GetProductRequest(id=lamp.id), timeout=2)
            assert levels(got.product) == (10, 4, 6)
            got = await inventory.GetReservation(svc.GetReservationRequest(id=held.id), timeout=2)
            assert got.reservation == held
            listed = await inventory.ListProducts(svc.ListProductsRequest(), timeout=2)
            assert [p.id for p in listed.products] == [lamp.id]
        finally:
            writer.execute("ROLLBACK")
            writer.close()
