"""Inventory use cases through the service layer, with the in-memory unit of work (which rolls back like a
transaction when a handler raises)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid

import pytest
from google.rpc import error_details_pb2
from prometheus_client import REGISTRY
from tessera.inventory.v1 import inventory_events_pb2 as events_pb2

from tessera_inventory.domain.model import Money, ReservationItem, ReservationStatus
from tessera_inventory.service_layer import commands, handlers
from tessera_inventory.service_layer.unit_of_work import FakeInventoryUnitOfWork
from tessera_runtime import context as callctx
from tessera_runtime.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, PermissionDenied


def product(sku: str = "SKU-1", stock: int = 10, request_id: str | None = None, **kw) -> commands.CreateProduct:
    return commands.CreateProduct(sku=sku, name=kw.pop("name", "Widget"), description=kw.pop("description", ""),
                                  price=kw.pop("price", Money("EUR", 1999)), stock_on_hand=stock,
                                  request_id=request_id or f"req-{sku[:40]}", **kw)


def fields(err: InvalidArgument) -> list[str]:
    return [v.field for v in err.violations]


def kinds(uow: FakeInventoryUnitOfWork) -> list[str]:
    return [type(e[2]).__name__ for e in uow.published]


async def reserve(uow, *items: tuple[str, int], order_id: str | None = None, ttl=None):
    cmd = commands.ReserveStock(order_id=order_id or str(uuid.uuid4()),
                                items=tuple(ReservationItem(pid, q) for pid, q in items), ttl=ttl)
    return await handlers.reserve_stock(cmd, uow)


async def stock(uow, product_id: str) -> tuple[int, int, int]:
    p = await handlers.get_product(commands.GetProduct(product_id), uow)
    return p.stock_on_hand, p.stock_reserved, p.stock_available


def make_due(uow: FakeInventoryUnitOfWork, reservation_id: str) -> None:
    r = uow.state.reservations[reservation_id]
    uow.state.reservations[reservation_id] = dataclasses.replace(
        r, expire_time=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))


# Products ------------------------------------------------------------------------------------------------------

async def test_create_is_idempotent_per_request_id_and_sku_is_unique():
    uow = FakeInventoryUnitOfWork()
    first = await handlers.create_product(product(), uow)
    assert (first.stock_on_hand, first.stock_reserved, first.stock_available, first.version) == (10, 0, 10, 1)
    again = await handlers.create_product(product(), uow)
    assert again.id == first.id and kinds(uow) == ["ProductCreated"]
    with pytest.raises(AlreadyExists) as reused:
        await handlers.create_product(product(name="Other"), uow)
    assert reused.value.reason == "REQUEST_ID_REUSED"
    with pytest.raises(AlreadyExists) as taken:
        await handlers.create_product(product(request_id="another"), uow)
    assert (taken.value.reason, taken.value.metadata) == ("SKU_ALREADY_EXISTS", {"sku": "SKU-1"})
    assert len(uow.state.products) == 1


BAD_PRODUCTS = [
    (product(sku=""), "product.sku"),
    (product(sku="has space"), "product.sku"),
    (product(sku="x" * 65), "product.sku"),
    (product(name=" "), "product.name"),
    (product(name="x" * 201), "product.name"),
    (product(description="x" * 5001), "product.description"),
    (product(description="line one\nline two\x00"), "product.description"),  # NUL: PostgreSQL cannot store it
    (product(price=None), "product.price"),
    (product(price=Money("EURO", 100)), "product.price.currency_code"),
    (product(price=Money("ABC", 100)), "product.price.currency_code"),
    (product(price=Money("EUR", 0)), "product.price.amount_minor"),
    (product(price=Money("EUR", 10_000_000_001)), "product.price.amount_minor"),
    (product(stock=-1), "product.stock_on_hand"),
    (product(stock=1_000_000_001), "product.stock_on_hand"),
    (product(request_id="x" * 65), "request_id"),
    (product(output_only_set=("stock_reserved",)), "product.stock_reserved"),
]


@pytest.mark.parametrize(("cmd", "field"), BAD_PRODUCTS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_PRODUCTS)])
async def test_invalid_product_field_is_named_and_nothing_is_written(cmd, field):
    uow = FakeInventoryUnitOfWork()
    with pytest.raises(InvalidArgument) as err:
        await handlers.create_product(cmd, uow)
    assert fields(err.value) == [field]
    assert not uow.state.products and not uow.published


async def test_catalogue_changes_need_admin_when_a_customer_calls():
    uow = FakeInventoryUnitOfWork()
    token = callctx.principal_var.set(callctx.Principal("customer-1", frozenset({"order:write"})))
    try:
        with pytest.raises(PermissionDenied):
            await handlers.create_product(product(), uow)
    finally:
        callctx.principal_var.reset(token)
    admin = callctx.principal_var.set(callctx.Principal("ops", frozenset({"admin"})))
    try:
        created = await handlers.create_product(product(), uow)
    finally:
        callctx.principal_var.reset(admin)
    customer = callctx.principal_var.set(callctx.Principal("customer-1", frozenset()))
    try:
        with pytest.raises(PermissionDenied):
            await handlers.adjust_stock(commands.AdjustStock(created.id, 5, "delivery", "adj-1"), uow)
        with pytest.raises(PermissionDenied):
            await handlers.delete_product(commands.DeleteProduct(created.id), uow)
        # Reservations are made for the customer's order with the customer's identity propagated.
        assert (await reserve(uow, (created.id, 1))).status is ReservationStatus.ACTIVE
    finally:
        callctx.principal_var.reset(customer)


async def test_update_changes_only_masked_paths_and_reports_them():
    uow = FakeInventoryUnitOfWork()
    p = await handlers.create_product(product(description="old"), uow)
    updated = await handlers.update_product(commands.UpdateProduct(
        p.id, ("name", "price.amount_minor"), name="Gadget", description="ignored", price=Money("", 2500)), uow)
    assert (updated.name, updated.description, updated.price) == ("Gadget", "old", Money("EUR", 2500))
    assert updated.version == 2
    event = uow.published[-1][2]
    assert isinstance(event, events_pb2.ProductUpdated)
    assert list(event.changed_paths) == ["name", "price.amount_minor"]
    same = await handlers.update_product(commands.UpdateProduct(p.id, ("name",), name="Gadget"), uow)
    assert same.version == 2 and len(uow.published) == 2  # nothing changed, nothing written


@pytest.mark.parametrize(("paths", "kw", "field"), [
    ((), {}, "update_mask"),
    (("sku",), {}, "update_mask"),
    (("stock_on_hand",), {}, "update_mask"),
    (("colour",), {}, "update_mask"),
    (("name",), {"name": ""}, "product.name"),
    (("price",), {"price": None}, "product.price"),
    (("price",), {"price": Money("EUR", 0)}, "product.price.amount_minor"),
    (("price.currency_code",), {"price": Money("XYZ", 0)}, "product.price.currency_code"),
])
async def test_update_refusals(paths, kw, field):
    uow = FakeInventoryUnitOfWork()
    p = await handlers.create_product(product(), uow)
    with pytest.raises(InvalidArgument) as err:
        await handlers.update_product(commands.UpdateProduct(p.id, paths, **kw), uow)
    assert fields(err.value) == [field]
    assert (await handlers.get_product(commands.GetProduct(p.id), uow)) == p


async def test_adjust_stock_rules_and_idempotency():
    uow = FakeInventoryUnitOfWork()
    p = await handlers.create_product(product(stock=5), uow)
    await reserve(uow, (p.id, 3))
    after = await handlers.adjust_stock(commands.AdjustStock(p.id, 10, "delivery", "adj-1"), uow)
    assert (after.stock_on_hand, after.stock_reserved, after.stock_available) == (15, 3, 12)
    again = await handlers.adjust_stock(commands.AdjustStock(p.id, 10, "delivery", "adj-1"), uow)
    assert again.stock_on_hand == 15
    with pytest.raises(AlreadyExists) as reused:
        await handlers.adjust_stock(commands.AdjustStock(p.id, 11, "delivery", "adj-1"), uow)
    assert reused.value.reason == "REQUEST_ID_REUSED"
    with pytest.raises(FailedPrecondition) as below:
        await handlers.adjust_stock(commands.AdjustStock(p.id, -13, "damaged", "adj-2"), uow)
    assert below.value.reason == "STOCK_BELOW_RESERVED"
    assert below.value.metadata == {"product_id": p.id, "stock_on_hand": "15", "stock_reserved": "3"}
    with pytest.raises(FailedPrecondition) as limit:
        await handlers.adjust_stock(commands.AdjustStock(p.id, 999_999_990, "count", "adj-3"), uow)
    assert limit.value.reason == "STOCK_LIMIT_EXCEEDED"
    # A refused adjustment is not recorded: the same request_id may be used once the stock allows it.
    assert (await handlers.adjust_stock(commands.AdjustStock(p.id, -12, "damaged", "adj-2"), uow)).stock_on_hand == 3
    assert [e[2].delta for e in uow.published if isinstance(e[2], events_pb2.StockAdjusted)] == [10, -12]


async def test_a_removal_refused_is_below_reserved_even_when_a_delivery_lands_before_the_levels_are_read():
    """On PostgreSQL the levels an error reports are read after the refused update, in a statement of their own: a
    delivery committed in between must not turn a removal refused for the reserved units into STOCK_LIMIT_EXCEEDED
    ("adding -10 units would take stock on hand above 1,000,000,000")."""
    uow = FakeInventoryUnitOfWork()
    p = await handlers.create_product(product(stock=5), uow)
    await reserve(uow, (p.id, 3))
    refuse = uow.products.adjust

    async def refused_then_delivered(product_id, delta, now):
        applied = await refuse(product_id, delta, now)
        uow.state.products[product_id].stock_on_hand += 100  # another transaction's delivery commits just then
        return applied

    uow.products.adjust = refused_then_delivered
    with pytest.raises(FailedPrecondition) as below:
        await handlers.adjust_stock(commands.AdjustStock(p.id, -10, "damaged", "adj-1"), uow)
    assert below.value.reason == "STOCK_BELOW_RESERVED"
    assert below.value.metadata == {"product_id": p.id, "stock_on_hand": "105", "stock_reserved": "3"}

@pytest.mark.parametrize(("cmd", "field"), [
    (commands.AdjustStock("nope", 1, "r", "k"), "product_id"),
    (commands.AdjustStock(str(uuid.uuid4()), 0, "r", "k"), "delta"),
    (commands.AdjustStock(str(uuid.uuid4()), -1_000_000_001, "r", "k"), "delta"),
    (commands.AdjustStock(str(uuid.uuid4()), 1, "", "k"), "reason"),
    (commands.AdjustStock(str(uuid.uuid4()), 1, "x" * 501, "k"), "reason"),
    (commands.AdjustStock(str(uuid.uuid4()), 1, "recount\x00", "k"), "reason"),
    (commands.AdjustStock(str(uuid.uuid4()), 1, "r", ""), "request_id"),
])
async def test_invalid_adjustment(cmd, field):
    with pytest.raises(InvalidArgument) as err:
        await handlers.adjust_stock(cmd, FakeInventoryUnitOfWork())
    assert fields(err.value) == [field]


async def test_delete_refused_while_reserved_then_sku_reusable():
    uow = FakeInventoryUnitOfWork()
    p = await handlers.create_product(product(), uow)
    r = await reserve(uow, (p.id, 1))
    with pytest.raises(FailedPrecondition) as held:
        await handlers.delete_product(commands.DeleteProduct(p.id), uow)
    assert held.value.reason == "PRODUCT_HAS_RESERVATIONS"
    await handlers.release_reservation(commands.ReleaseReservation(r.id), uow)
    await handlers.delete_product(commands.DeleteProduct(p.id), uow)
    with pytest.raises(NotFound):
        await handlers.get_product(commands.GetProduct(p.id), uow)
    with pytest.raises(NotFound):
        await handlers.delete_product(commands.DeleteProduct(p.id), uow)
    with pytest.raises(NotFound):  # a repeat of the create does not bring the deleted product back
        await handlers.create_product(product(), uow)
    assert (await handlers.create_product(product(request_id="new"), uow)).sku == "SKU-1"
    assert kinds(uow)[-2:] == ["ProductDeleted", "ProductCreated"]


async def test_batch_get_keeps_request_order_and_fails_on_the_first_unknown():
    uow = FakeInventoryUnitOfWork()
    a = await handlers.create_product(product("A"), uow)
    b = await handlers.create_product(product("B"), uow)
    got = await handlers.batch_get_products(commands.BatchGetProducts((b.id, a.id, b.id)), uow)
    assert [p.sku for p in got] == ["B", "A", "B"]
    unknown = [str(uuid.uuid4()), str(uuid.uuid4())]
    with pytest.raises(NotFound) as err:
        await handlers.batch_get_products(commands.BatchGetProducts((a.id, unknown[0], unknown[1])), uow)
    assert err.value.metadata == {"product_id": unknown[0]}
    with pytest.raises(InvalidArgument) as bad:
        await handlers.batch_get_products(commands.BatchGetProducts((a.id, "x")), uow)
    assert fields(bad.value) == ["ids[1]"]
    with pytest.raises(InvalidArgument) as many:
        await handlers.batch_get_products(commands.BatchGetProducts((a.id,) * 101), uow)
    assert fields(many.value) == ["ids"]


async def test_list_pages_filters_and_tokens():
    uow = FakeInventoryUnitOfWork()
    made = [await handlers.create_product(product(f"P{i}", stock=i % 2), uow) for i in range(5)]
    seen, token = [], ""
    while True:
        page, token = await handlers.list_products(commands.ListProducts(2, token), uow)
        seen += [p.id for p in page]
        if not token:
            break
    assert seen == [p.id for p in made]
    in_stock, _ = await handlers.list_products(commands.ListProducts(0, "", in_stock_only=True), uow)
    assert [p.sku for p in in_stock] == ["P1", "P3"]
    by_sku, _ = await handlers.list_products(commands.ListProducts(0, "", sku="P2"), uow)
    assert [p.sku for p in by_sku] == ["P2"]
    _, token = await handlers.list_products(commands.ListProducts(1, ""), uow)
    with pytest.raises(InvalidArgument) as err:
        await handlers.list_products(commands.ListProducts(1, token, in_stock_only=True), uow)
    assert fields(err.value) == ["page_token"]
    with pytest.raises(InvalidArgument):
        await handlers.list_products(commands.ListProducts(-1, ""), uow)
    with pytest.raises(InvalidArgument) as nul:
        await handlers.list_products(commands.ListProducts(0, "", sku="P\x00"), uow)
    assert fields(nul.value) == ["sku"]


# Reservations --------------------------------------------------------------------------------------------------

async def test_reserve_is_all_or_nothing_and_names_every_short_product():
    uow = FakeInventoryUnitOfWork()
    a = await handlers.create_product(product("A", stock=5), uow)
    b = await handlers.create_product(product("B", stock=1), uow)
    c = await handlers.create_product(product("C", stock=0), uow)
    with pytest.raises(FailedPrecondition) as err:
        await reserve(uow, (a.id, 5), (c.id, 1), (b.id, 2))
    assert err.value.reason == "INSUFFICIENT_STOCK"
    assert err.value.metadata == {"product_id": c.id, "sku": "C", "requested": "1", "available": "0"}
    failure = error_details_pb2.PreconditionFailure()
    assert err.value.details()[1].Unpack(failure)
    assert [(v.type, v.subject) for v in failure.violations] == [("STOCK", c.id), ("STOCK", b.id)]
    assert await stock(uow, a.id) == (5, 0, 5), "A's units were held although the reservation failed"
    assert not uow.state.reservations and not uow.published[3:]


async def test_reserve_is_idempotent_per_order_and_refuses_other_items():
    uow = FakeInventoryUnitOfWork()
    a = await handlers.create_product(product("A", stock=5), uow)
    b = await handlers.create_product(product("B", stock=5), uow)
    order_id = str(uuid.uuid4())
    first = await reserve(uow, (a.id, 2), (b.id, 1), order_id=order_id)
    assert first.status is ReservationStatus.ACTIVE
    assert first.expire_time - first.create_time == dt.timedelta(minutes=15)
    again = await reserve(uow, (b.id, 1), (a.id, 2), order_id=order_id)
    assert again.id == first.id and await stock(uow, a.id) == (5, 2, 3)
    with pytest.raises(AlreadyExists) as mismatch:
        await reserve(uow, (a.id, 3), order_id=order_id)
    assert mismatch.value.reason == "RESERVATION_MISMATCH"
    assert mismatch.value.metadata == {"order_id": order_id, "reservation_id": first.id}
    assert kinds(uow).count("StockReserved") == 1


async def test_a_repeat_gets_the_order_s_reservation_even_once_the_stock_ran_out():
    uow = FakeInventoryUnitOfWork()
    a = await handlers.create_product(product("A", stock=2), uow)
    order_id = str(uuid.uuid4())
    commits = uow.commits
    first = await reserve(uow, (a.id, 2), order_id=order_id)
    assert uow.commits == commits + 1, "a first reservation is one transaction"
    again = await reserve(uow, (a.id, 2), order_id=order_id)  # nothing is left to hold for a second one
    assert again.id == first.id and await stock(uow, a.id) == (2, 2, 0)
    assert uow.commits == commits + 1 and kinds(uow).count("StockReserved") == 1


async def test_a_refused_reservation_leaves_nothing_so_the_order_may_reserve_again():
    uow = FakeInventoryUnitOfWork()
    a = await handlers.create_product(product("A", stock=1), uow)
    order_id = str(uuid.uuid4())
    with pytest.raises(FailedPrecondition):
        await reserve(uow, (a.id, 2), order_id=order_id)
    assert not uow.state.reservations
    await handlers.adjust_stock(commands.AdjustStock(a.id, 1, "restock", "adj-1"), uow)
    reservation = await reserve(uow, (a.id, 2), order_id=order_id)
    assert reservation.status is ReservationStatus.ACTIVE and await stock(uow, a.id) == (2, 2, 0)


async def test_an_unknown_product_is_not_found_even_when_another_is_short():
    uow = FakeInventoryUnitOfWork()
    a = await handlers.create_product(product("A", stock=0), uow)
    unknown = str(uuid.uuid4())
    with pytest.raises(NotFound) as err:
        await reserve(uow, (a.id, 1), (unknown, 1))
    assert (err.value.reason, err.value.metadata) == ("PRODUCT_NOT_FOUND", {"product_id": unknown})


async def test_reserve_unknown_product_is_not_found_naming_the_first_in_request_order():
    uow = FakeInventoryUnitOfWork()
    a = await handlers.create_product(product("A"), uow)
    unknown = str(uuid.uuid4())
    with pytest.raises(NotFound) as err:
        await reserve(uow, (a.id, 1), (unknown, 1))
    assert (err.value.reason, err.value.metadata) == ("PRODUCT_NOT_FOUND", {"product_id": unknown})
    assert await stock(uow, a.id) == (10, 0, 10)


@pytest.mark.parametrize(("order_id", "items", "ttl", "field"), [
    ("not-a-uuid", [("P", 1)], None, "order_id"),
    (None, [], None, "items"),
    (None, [("U", 1)] * 101, None, "items"),
    (None, [("bad", 1)], None, "items[0].product_id"),
    (None, [("P", 0)], None, "items[0].quantity"),
    (None, [("P", 1_000_001)], None, "items[0].quantity"),
    (None, [("P", 1), ("P", 2)], None, "items[1].product_id"),
    (None, [("P", 1)], dt.timedelta(seconds=59), "ttl"),
    (None, [("P", 1)], dt.timedelta(hours=24, seconds=1), "ttl"),
    (None, [("P", 1)], dt.timedelta(seconds=-60), "ttl"),
])
async def test_invalid_reservation(order_id, items, ttl, field):
    pid = str(uuid.uuid4())
    cmd = commands.ReserveStock(order_id=order_id or str(uuid.uuid4()), ttl=ttl,
                                items=tuple(ReservationItem({"P": pid, "U": str(uuid.uuid4())}.get(p, p), q)
                                            for p, q in items))
    with pytest.raises(InvalidArgument) as err:
        await handlers.reserve_stock(cmd, FakeInventoryUnitOfWork())
    assert fields(err.value) == [field]


async def test_commit_then_release_returns_units_and_repeats_change_nothing():
    uow = FakeInventoryUnitOfWork()
    p = await handlers.create_product(product(stock=5), uow)
    r = await reserve(uow, (p.id, 2))
    committed = await handlers.commit_reservation(commands.CommitReservation(r.id), uow)
    assert committed.status is ReservationStatus.COMMITTED and committed.commit_time is not None
    assert await stock(uow, p.id) == (3, 0, 3)
    assert (await handlers.commit_reservation(commands.CommitReservation(r.id), uow)).status is \
        ReservationStatus.COMMITTED
    released = await handlers.release_reservation(commands.ReleaseReservation(r.id, "order cancelled"), uow)
    assert released.status is ReservationStatus.RELEASED and released.commit_time is not None
    assert await stock(uow, p.id) == (5, 0, 5)
    assert (await handlers.release_reservation(commands.ReleaseReservation(r.id), uow)).status is \
        ReservationStatus.RELEASED
    assert await stock(uow, p.id) == (5, 0, 5)
    with pytest.raises(FailedPrecondition) as err:
        await handlers.commit_reservation(commands.CommitReservation(r.id), uow)
    assert err.value.reason == "RESERVATION_NOT_ACTIVE"
    assert err.value.metadata == {"reservation_id": r.id, "status": "RESERVATION_STATUS_RELEASED"}
    released_events = [e[2] for e in uow.published if isinstance(e[2], events_pb2.StockReleased)]
    assert [(e.reason, e.message) for e in released_events] == [
        (events_pb2.STOCK_RELEASE_REASON_RETURNED, "order cancelled")]
    assert kinds(uow).count("ReservationCommitted") == 1


async def test_release_of_active_reservation_makes_units_available():
    uow = FakeInventoryUnitOfWork()
    p = await handlers.create_product(product(stock=5), uow)
    r = await reserve(uow, (p.id, 4))
    assert await stock(uow, p.id) == (5, 4, 1)
    await handlers.release_reservation(commands.ReleaseReservation(r.id, "payment declined"), uow)
    assert await stock(uow, p.id) == (5, 0, 5)
    assert uow.published[-1][2].reason == events_pb2.STOCK_RELEASE_REASON_REQUESTED


async def test_commit_after_expire_time_expires_instead():
    uow = FakeInventoryUnitOfWork()
    p = await handlers.create_product(product(stock=5), uow)
    r = await reserve(uow, (p.id, 2))
    make_due(uow, r.id)
    with pytest.raises(FailedPrecondition) as err:
        await handlers.commit_reservation(commands.CommitReservation(r.id), uow)
    assert (err.value.reason, err.value.metadata) == ("RESERVATION_EXPIRED", {"reservation_id": r.id})
    assert await stock(uow, p.id) == (5, 0, 5)
    got = await handlers.get_reservation(commands.GetReservation(r.id), uow)
    assert got.status is ReservationStatus.EXPIRED and got.release_time is not None
    assert uow.published[-1][2].reason == events_pb2.STOCK_RELEASE_REASON_EXPIRED
    released = await handlers.release_reservation(commands.ReleaseReservation(r.id), uow)
    assert released.status is ReservationStatus.EXPIRED
    with pytest.raises(FailedPrecondition) as again:
        await handlers.commit_reservation(commands.CommitReservation(r.id), uow)
    assert again.value.reason == "RESERVATION_EXPIRED"


async def test_sweeper_expires_only_due_reservations_once():
    uow = FakeInventoryUnitOfWork()
    p = await handlers.create_product(product(stock=10), uow)
    due = await reserve(uow, (p.id, 2))
    fresh = await reserve(uow, (p.id, 3))
    make_due(uow, due.id)
    counted = REGISTRY.get_sample_value("tessera_inventory_reservation_expiries_total") or 0
    keys = await handlers.due_reservations(uow, None, limit=10)
    assert [key[1] for key in keys] == [due.id]
    assert await handlers.expire_due_reservation(uow, due.id) is True
    assert await handlers.expire_due_reservation(uow, due.id) is False
    assert await handlers.expire_due_reservation(uow, fresh.id) is False
    assert await handlers.due_reservations(uow, None, limit=10) == []
    assert REGISTRY.get_sample_value("tessera_inventory_reservation_expiries_total") == counted + 1
    assert uow.state.reservations[due.id].status is ReservationStatus.EXPIRED
    assert uow.state.reservations[fresh.id].status is ReservationStatus.ACTIVE
    assert await stock(uow, p.id) == (10, 3, 7)
    assert kinds(uow).count("StockReleased") == 1


async def test_reserve_repeat_after_expire_time_reports_expired():
    uow = FakeInventoryUnitOfWork()
    p = await handlers.create_product(product(stock=10), uow)
    order_id = str(uuid.uuid4())
    r = await reserve(uow, (p.id, 2), order_id=order_id)
    make_due(uow, r.id)
    again = await reserve(uow, (p.id, 2), order_id=order_id)
    assert (again.id, again.status) == (r.id, ReservationStatus.EXPIRED)
    assert await stock(uow, p.id) == (10, 0, 10)


async def test_unknown_reservation_and_malformed_ids():
    uow = FakeInventoryUnitOfWork()
    missing = str(uuid.uuid4())
    for call in (handlers.get_reservation(commands.GetReservation(missing), uow),
                 handlers.commit_reservation(commands.CommitReservation(missing), uow),
                 handlers.release_reservation(commands.ReleaseReservation(missing), uow)):
        with pytest.raises(NotFound) as err:
            await call
        assert (err.value.reason, err.value.metadata) == ("RESERVATION_NOT_FOUND", {"reservation_id": missing})
    with pytest.raises(InvalidArgument) as bad:
        await handlers.release_reservation(commands.ReleaseReservation("x", "y" * 501), uow)
    assert fields(bad.value) == ["id", "reason"]
