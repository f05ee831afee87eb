"""Use cases of the inventory service. Handlers raise domain errors; the runtime turns them into statuses.

Every transaction that touches several products changes them in product id order, so that two transactions never
wait for each other's rows in opposite orders (no deadlocks on PostgreSQL).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from tessera_inventory import DOMAIN, mapping
from tessera_inventory.adapters.repository import (
    DuplicateOrder,
    DuplicateRequestId,
    DuplicateSku,
    ProductRepository,
    ReservationChanged,
    ReservationRepository,
    StockLimitExceeded,
)
from tessera_inventory.domain import model
from tessera_inventory.domain.model import (
    Money,
    Product,
    Reservation,
    ReservationItem,
    ReservationStatus,
    StockReleaseReason,
    StockShortage,
)
from tessera_inventory.service_layer import commands
from tessera_runtime import metrics, pagination
from tessera_runtime.context import current_principal
from tessera_runtime.db import utcnow
from tessera_runtime.errors import (
    NUL_REFUSED,
    AlreadyExists,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    check_uuid,
    has_nul,
)
from tessera_runtime.fieldmask import check_update_mask
from tessera_runtime.periodic import BacklogKey

PRODUCT = "product"
RESERVATION = "reservation"

MUTABLE_PATHS = frozenset({"name", "description", "price", "price.currency_code", "price.amount_minor"})
IMMUTABLE_PATHS = frozenset({"id", "sku", "stock_on_hand", "stock_reserved", "stock_available", "create_time",
                             "update_time", "version"})
# A status change that lost a race re-reads and decides again; each loss means the status moved on, and a
# reservation changes status at most twice, so this bound is never reached in practice.
_MAX_STATUS_RACES = 5

T = TypeVar("T")


class UnitOfWork(Protocol):
    products: ProductRepository
    reservations: ReservationRepository

    async def __aenter__(self) -> UnitOfWork: ...
    async def __aexit__(self, *exc: object) -> None: ...
    def reading(self) -> UnitOfWork: ...
    def inserting(self) -> UnitOfWork: ...
    def one_statement(self) -> UnitOfWork: ...
    def add_event(self, aggregate_type: str, aggregate_id: str, message) -> object: ...
    async def commit(self) -> None: ...


_MAX_SHORTAGE_DESCRIPTIONS = 2000


class InsufficientStock(FailedPrecondition):
    """FAILED_PRECONDITION (INSUFFICIENT_STOCK) with a PreconditionFailure listing every short product."""

    def __init__(self, shortages: list[StockShortage]) -> None:
        first = shortages[0]
        super().__init__(
            f"product {first.product_id} ({first.sku}) has {first.available} units available, "
            f"{first.requested} requested; nothing was reserved",
            reason="INSUFFICIENT_STOCK", domain=DOMAIN,
            metadata={"product_id": first.product_id, "sku": first.sku, "requested": str(first.requested),
                      "available": str(first.available)},
        )
        self.shortages = shortages

    def details(self) -> list[any_pb2.Any]:
        # Every product is listed, but the descriptions only up to _MAX_SHORTAGE_DESCRIPTIONS bytes: the status
        # travels in trailers, which a client refuses above 8 KiB, and 100 products described would take 8.
        violations, size = [], 0
        for s in self.shortages:
            violation = error_details_pb2.PreconditionFailure.Violation(type="STOCK", subject=s.product_id)
            description = f"{s.requested} units requested, {s.available} available"
            size += len(description) + 2
            if size <= _MAX_SHORTAGE_DESCRIPTIONS:
                violation.description = description
            violations.append(violation)
        failure = any_pb2.Any()
        failure.Pack(error_details_pb2.PreconditionFailure(violations=violations))
        return [*super().details(), failure]


def _product_not_found(product_id: str) -> NotFound:
    return NotFound(f"product {product_id} not found", reason="PRODUCT_NOT_FOUND", domain=DOMAIN,
                    metadata={"product_id": product_id})


def _reservation_not_found(reservation_id: str) -> NotFound:
    return NotFound(f"reservation {reservation_id} not found", reason="RESERVATION_NOT_FOUND", domain=DOMAIN,
                    metadata={"reservation_id": reservation_id})


def _request_id_reused(request_id: str) -> AlreadyExists:
    return AlreadyExists("request_id was already used with a different request", reason="REQUEST_ID_REUSED",
                         domain=DOMAIN, metadata={"request_id": request_id})


def _sku_taken(sku: str) -> AlreadyExists:
    return AlreadyExists(f"a product with SKU {sku!r} already exists", reason="SKU_ALREADY_EXISTS",
                         domain=DOMAIN, metadata={"sku": sku})


def _expired(reservation_id: str) -> FailedPrecondition:
    return FailedPrecondition(f"reservation {reservation_id} expired; its units are no longer held",
                              reason="RESERVATION_EXPIRED", domain=DOMAIN,
                              metadata={"reservation_id": reservation_id})


def _not_active(r: Reservation) -> FailedPrecondition:
    return FailedPrecondition(f"reservation {r.id} is {r.status.value}", reason="RESERVATION_NOT_ACTIVE",
                              domain=DOMAIN, metadata={"reservation_id": r.id, "status": mapping.status_name(r.status)})


def _require_admin(what: str) -> None:
    """Catalogue and stock changes are for staff; calls without an identity come from inside the mesh."""
    principal = current_principal()
    if principal is not None and not principal.is_admin:
        raise PermissionDenied(f"{what} needs the admin scope", reason="PERMISSION_DENIED", domain=DOMAIN)


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _check_id(value: str, field: str) -> None:
    v = model.new_violations()
    check_uuid(value, field, v)
    v.raise_if_any()


async def _until_settled(attempt: Callable[[], Awaitable[T | None]]) -> T:
    """Runs a read-decide-write transaction again while it loses races on a status change (it returns None)."""
    for _ in range(_MAX_STATUS_RACES):
        result = await attempt()
        if result is not None:
            return result
    raise RuntimeError("reservation kept changing concurrently")


# Products ------------------------------------------------------------------------------------------------------

async def create_product(cmd: commands.CreateProduct, uow: UnitOfWork) -> Product:
    v = model.new_violations()
    for field in cmd.output_only_set:
        v.add(f"product.{field}", "is output only and must be left empty")
    model.check_key(cmd.request_id, "request_id", v)
    model.check_sku(cmd.sku, "product.sku", v)
    model.check_name(cmd.name, "product.name", v)
    model.check_description(cmd.description, "product.description", v)
    model.check_price(cmd.price, "product.price", v)
    if not 0 <= cmd.stock_on_hand <= model.MAX_STOCK:
        v.add("product.stock_on_hand", f"must be between 0 and {model.MAX_STOCK:,}")
    v.raise_if_any()
    _require_admin("creating a product")
    assert cmd.price is not None
    request_hash = _hash(cmd.sku, cmd.name, cmd.description, cmd.price.currency_code, cmd.price.amount_minor,
                         cmd.stock_on_hand)

    for _ in range(2):  # a second pass only if the row that clashed was gone before it could be read
        # Insert first: the unique indexes on request_id and on the live SKU decide, so the common path is the
        # product's row and its event written together with no reads before them (on PostgreSQL one statement).
        now = utcnow()
        product = Product(id=str(uuid.uuid4()), sku=cmd.sku, name=cmd.name.strip(), description=cmd.description,
                          price=cmd.price, stock_on_hand=cmd.stock_on_hand, stock_reserved=0, create_time=now,
                          update_time=now)
        async with uow.inserting():
            try:
                await uow.products.add(product, cmd.request_id, request_hash)
                uow.add_event(PRODUCT, product.id, mapping.product_created(product))
                await uow.commit()
            except (DuplicateSku, DuplicateRequestId):
                pass  # nothing was written: see what clashed, below
            else:
                return product
        # Which unique index reports a clash depends on the database and on timing, so look the request_id up
        # first: the same request_id replays (or is refused if its request differed); otherwise the SKU is taken.
        async with uow:
            previous = await uow.products.get_by_request_id(cmd.request_id)
            if previous is not None:
                return await _replay_create(uow, previous, request_hash, cmd.request_id)
            if await uow.products.sku_taken(cmd.sku):
                raise _sku_taken(cmd.sku)
    # Both passes clashed with a row that was gone when read (a racing create rolled back, a product deleted).
    raise AlreadyExists("a concurrent request with this request_id is in progress", reason="REQUEST_ID_REUSED",
                        domain=DOMAIN, metadata={"request_id": cmd.request_id})


async def _replay_create(uow: UnitOfWork, previous: tuple[str, str], request_hash: str, request_id: str) -> Product:
    product_id, stored_hash = previous
    if stored_hash != request_hash:
        raise _request_id_reused(request_id)
    product = await uow.products.get(product_id)
    if product is None:  # created, then deleted: a repeat does not bring it back
        raise _product_not_found(product_id)
    return product


async def get_product(cmd: commands.GetProduct, uow: UnitOfWork) -> Product:
    _check_id(cmd.product_id, "id")
    async with uow.reading():
        product = await uow.products.get(cmd.product_id)
    if product is None:
        raise _product_not_found(cmd.product_id)
    return product


async def batch_get_products(cmd: commands.BatchGetProducts, uow: UnitOfWork) -> list[Product]:
    v = model.new_violations()
    if not cmd.product_ids:
        v.add("ids", "is required")
    elif len(cmd.product_ids) > model.MAX_BATCH:
        v.add("ids", f"must have at most {model.MAX_BATCH} ids")
    for i, product_id in enumerate(cmd.product_ids[:model.MAX_BATCH]):
        check_uuid(product_id, f"ids[{i}]", v)
    v.raise_if_any()
    async with uow.reading():  # one statement: no transaction needed
        found = await uow.products.get_many(cmd.product_ids)
    for product_id in cmd.product_ids:
        if product_id not in found:
            raise _product_not_found(product_id)
    return [found[product_id] for product_id in cmd.product_ids]


async def list_products(cmd: commands.ListProducts, uow: UnitOfWork) -> tuple[list[Product], str]:
    size = pagination.page_size(cmd.page_size, DOMAIN)
    v = model.new_violations()
    if len(cmd.sku) > model.MAX_SKU:
        v.add("sku", f"must be at most {model.MAX_SKU} characters")
    elif has_nul(cmd.sku):
        v.add("sku", NUL_REFUSED)
    v.raise_if_any()
    filters = {"sku": cmd.sku, "in_stock_only": cmd.in_stock_only}
    after = pagination.decode_time_key(cmd.page_token, "ListProducts", filters, DOMAIN)
    async with uow.reading():
        page = await uow.products.list_after(after, size + 1, cmd.sku, cmd.in_stock_only)
    page, token = pagination.next_page(page, size, "ListProducts", filters, weight=_encoded_bytes)
    return page, token


# What a Product takes in a response besides its name, description and SKU, at most: its id, price, three stock
# levels, two timestamps, its version, and the tags and lengths of all of them and of itself.
_PRODUCT_FIXED_BYTES = 200


def _encoded_bytes(p: Product) -> int:
    """At least the bytes a product takes in a ListProductsResponse: 200 products with the longest name and
    description in characters of 4 UTF-8 bytes take more than the 4 MiB a gRPC client accepts by default."""
    return len(p.name.encode()) + len(p.description.encode()) + len(p.sku.encode()) + _PRODUCT_FIXED_BYTES


async def update_product(cmd: commands.UpdateProduct, uow: UnitOfWork) -> Product:
    _check_id(cmd.product_id, "product.id")
    v = model.new_violations()
    paths = check_update_mask(cmd.paths, mutable=MUTABLE_PATHS, immutable=IMMUTABLE_PATHS, resource="Product",
                              violations=v)
    v.raise_if_any()
    price = cmd.price or Money("", 0)
    if "name" in paths:
        model.check_name(cmd.name, "product.name", v)
    if "description" in paths:
        model.check_description(cmd.description, "product.description", v)
    if "price" in paths:
        model.check_price(cmd.price, "product.price", v)
    else:
        # Each part is checked on its own; with the other part kept from a valid price, the whole is valid.
        if "price.currency_code" in paths:
            model.check_currency(price.currency_code, "product.price.currency_code", v)
        if "price.amount_minor" in paths:
            model.check_price_amount(price.amount_minor, "product.price.amount_minor", v)
    v.raise_if_any()
    _require_admin("changing a product")

    async with uow:
        # Locked: the fields the mask leaves alone are written back as read, so a concurrent change must wait.
        product = await uow.products.get(cmd.product_id, lock=True)
        if product is None:
            raise _product_not_found(cmd.product_id)
        name = cmd.name.strip() if "name" in paths else product.name
        description = cmd.description if "description" in paths else product.description
        currency = price.currency_code if paths & {"price", "price.currency_code"} else product.price.currency_code
        amount = price.amount_minor if paths & {"price", "price.amount_minor"} else product.price.amount_minor
        changed = [path for path, old, new in (
            ("name", product.name, name), ("description", product.description, description),
            ("price.currency_code", product.price.currency_code, currency),
            ("price.amount_minor", product.price.amount_minor, amount)) if old != new]
        if not changed:
            return product
        await uow.products.update_details(product.id, name, description, Money(currency, amount), utcnow())
        updated = await uow.products.get(product.id)
        assert updated is not None
        uow.add_event(PRODUCT, updated.id, mapping.product_updated(updated, changed))
        await uow.commit()
    return updated


async def delete_product(cmd: commands.DeleteProduct, uow: UnitOfWork) -> None:
    _check_id(cmd.product_id, "id")
    _require_admin("deleting a product")
    async with uow:
        product = await uow.products.get(cmd.product_id)
        if product is None:
            raise _product_not_found(cmd.product_id)
        now = utcnow()
        if not await uow.products.delete(product.id, now):
            if await uow.products.get(product.id) is None:
                raise _product_not_found(cmd.product_id)
            raise FailedPrecondition(
                f"product {product.id} has units held by active reservations", reason="PRODUCT_HAS_RESERVATIONS",
                domain=DOMAIN, metadata={"product_id": product.id})
        uow.add_event(PRODUCT, product.id, mapping.product_deleted(product.id, product.sku, now))
        await uow.commit()


async def adjust_stock(cmd: commands.AdjustStock, uow: UnitOfWork) -> Product:
    v = model.new_violations()
    check_uuid(cmd.product_id, "product_id", v)
    if cmd.delta == 0:
        v.add("delta", "must not be 0")
    elif abs(cmd.delta) > model.MAX_DELTA:
        v.add("delta", f"must be between -{model.MAX_DELTA:,} and {model.MAX_DELTA:,}")
    model.check_reason(cmd.reason, "reason", v, required=True)
    model.check_key(cmd.request_id, "request_id", v)
    v.raise_if_any()
    _require_admin("adjusting stock")
    request_hash = _hash(cmd.product_id, cmd.delta, cmd.reason)

    for _ in range(2):  # a second pass only after losing a race on the same request_id
        async with uow:
            previous = await uow.products.get_adjustment(cmd.request_id)
            if previous is not None:
                return await _replay_adjustment(uow, previous, request_hash, cmd.request_id)
            now = utcnow()
            try:
                await uow.products.add_adjustment(cmd.request_id, request_hash, cmd.product_id, cmd.delta,
                                                  cmd.reason, now)
            except DuplicateRequestId:
                continue
            if not await uow.products.adjust(cmd.product_id, cmd.delta, now):
                raise await _adjustment_refused(uow, cmd)
            product = await uow.products.get(cmd.product_id)
            assert product is not None
            uow.add_event(PRODUCT, product.id, mapping.stock_adjusted(product, cmd.delta, cmd.reason,
                                                                      cmd.request_id))
            await uow.commit()
            return product
    async with uow:
        previous = await uow.products.get_adjustment(cmd.request_id)
        if previous is None:
            raise AlreadyExists("a concurrent request with this request_id is in progress",
                                reason="REQUEST_ID_REUSED", domain=DOMAIN, metadata={"request_id": cmd.request_id})
        return await _replay_adjustment(uow, previous, request_hash, cmd.request_id)


async def _replay_adjustment(uow: UnitOfWork, previous: tuple[str, str], request_hash: str,
                             request_id: str) -> Product:
    product_id, stored_hash = previous
    if stored_hash != request_hash:
        raise _request_id_reused(request_id)
    product = await uow.products.get(product_id)
    if product is None:
        raise _product_not_found(product_id)
    return product


async def _adjustment_refused(uow: UnitOfWork, cmd: commands.AdjustStock) -> Exception:
    """Why the adjustment of a product that exists was refused. The sign of delta says which bound it crossed: the
    levels read here may already include a change committed after the refused update (on PostgreSQL each statement
    sees the latest commits), so they report the current levels but cannot tell which bound it was."""
    product = await uow.products.get(cmd.product_id)
    if product is None:
        return _product_not_found(cmd.product_id)
    if cmd.delta < 0:
        return FailedPrecondition(
            f"removing {-cmd.delta} units would leave fewer on hand than the {product.stock_reserved} reserved "
            f"({product.stock_on_hand} on hand)", reason="STOCK_BELOW_RESERVED", domain=DOMAIN,
            metadata={"product_id": product.id, "stock_on_hand": str(product.stock_on_hand),
                      "stock_reserved": str(product.stock_reserved)})
    return _stock_limit_exceeded(f"adding {cmd.delta} units", product.id, product.stock_on_hand)


def _stock_limit_exceeded(change: str, product_id: str, stock_on_hand: int) -> FailedPrecondition:
    return FailedPrecondition(
        f"{change} would take stock on hand above {model.MAX_STOCK:,}", reason="STOCK_LIMIT_EXCEEDED",
        domain=DOMAIN, metadata={"product_id": product_id, "stock_on_hand": str(stock_on_hand)})


# Reservations --------------------------------------------------------------------------------------------------

def _check_reserve(cmd: commands.ReserveStock) -> None:
    v = model.new_violations()
    check_uuid(cmd.order_id, "order_id", v)
    if not cmd.items:
        v.add("items", "is required")
    elif len(cmd.items) > model.MAX_ITEMS:
        v.add("items", f"must have at most {model.MAX_ITEMS} items")
    seen: set[str] = set()
    for i, item in enumerate(cmd.items[:model.MAX_ITEMS]):
        check_uuid(item.product_id, f"items[{i}].product_id", v)
        if item.product_id and item.product_id.lower() in seen:
            v.add(f"items[{i}].product_id", "appears more than once; each product at most once per reservation")
        seen.add(item.product_id.lower())
        if not 1 <= item.quantity <= model.MAX_QUANTITY:
            v.add(f"items[{i}].quantity", f"must be between 1 and {model.MAX_QUANTITY:,}")
    if cmd.ttl is not None and not model.MIN_TTL <= cmd.ttl <= model.MAX_TTL:
        v.add("ttl", "must be between 1 minute and 24 hours, or unset for the default of 15 minutes")
    v.raise_if_any()


async def reserve_stock(cmd: commands.ReserveStock, uow: UnitOfWork,
                        default_ttl: dt.timedelta = model.DEFAULT_TTL) -> Reservation:
    """The first call for an order writes its reservation row before anything else: the unique order_id makes a
    repeat (or a concurrent twin, which waits for the first to commit) fail there, before touching any stock, and
    such a call then answers with the reservation the order already has. The usual first call thus needs no
    read: it inserts, holds the units and commits."""
    _check_reserve(cmd)
    ttl = cmd.ttl or default_ttl
    async with uow:
        now = utcnow()
        reservation = Reservation(id=str(uuid.uuid4()), order_id=cmd.order_id, items=cmd.items,
                                  status=ReservationStatus.ACTIVE, expire_time=now + ttl, create_time=now,
                                  update_time=now)
        try:
            await uow.reservations.add(reservation)
        except DuplicateOrder:
            pass  # leaving the block rolls back; the reservation the order has is read below
        else:
            short = [item for item in sorted(cmd.items, key=lambda i: i.product_id)
                     if not await uow.products.reserve(item.product_id, item.quantity, now)]
            if short:
                raise await _refused(uow, cmd.items, {i.product_id for i in short})
            uow.add_event(RESERVATION, reservation.id, mapping.stock_reserved(reservation))
            await uow.commit()
            return reservation
    async with uow:
        existing = await uow.reservations.get_by_order(cmd.order_id)
        assert existing is not None, "a reservation for this order_id is committed, so it exists"
        return await _repeat_reservation(uow, existing, cmd.items)


async def _refused(uow: UnitOfWork, items: tuple[ReservationItem, ...], short_ids: set[str]) -> Exception:
    """Why some units could not be held: the first product that does not exist (or was deleted), else every
    product short of units. The caller rolls back what this transaction held; products it did not hold are
    read as they are now."""
    current = await uow.products.get_many(i.product_id for i in items)
    for item in items:
        if item.product_id not in current:
            return _product_not_found(item.product_id)
    return InsufficientStock([
        StockShortage(product_id=item.product_id, sku=current[item.product_id].sku, requested=item.quantity,
                      available=current[item.product_id].stock_available)
        for item in items if item.product_id in short_ids])


async def _repeat_reservation(uow: UnitOfWork, existing: Reservation,
                              items: tuple[ReservationItem, ...]) -> Reservation:
    if not existing.has_items(items):
        raise AlreadyExists(
            f"order {existing.order_id} already has a reservation with different items",
            reason="RESERVATION_MISMATCH", domain=DOMAIN,
            metadata={"order_id": existing.order_id, "reservation_id": existing.id})
    now = utcnow()
    if existing.is_due(now):
        if await _expire(uow, existing, now):
            await _commit_expiry(uow)
            return existing
        current = await uow.reservations.get(existing.id)  # another change came first: report what it left
        assert current is not None
        return current
    return existing


async def _expire(uow: UnitOfWork, r: Reservation, now: dt.datetime) -> bool:
    """Expires an ACTIVE reservation whose time is up and gives its units back; False if another change won."""
    r.expire(now)
    if not await uow.reservations.save_status(r, ReservationStatus.ACTIVE):
        return False
    for item in sorted(r.items, key=lambda i: i.product_id):
        await uow.products.unreserve(item.product_id, item.quantity, now)
    uow.add_event(RESERVATION, r.id, mapping.stock_released(r, StockReleaseReason.EXPIRED, ""))
    return True


async def _commit_expiry(uow: UnitOfWork) -> None:
    await uow.commit()
    metrics.RESERVATION_EXPIRIES.inc()


async def get_reservation(cmd: commands.GetReservation, uow: UnitOfWork) -> Reservation:
    _check_id(cmd.reservation_id, "id")
    async with uow.reading():
        reservation = await uow.reservations.get(cmd.reservation_id)
    if reservation is None:
        raise _reservation_not_found(cmd.reservation_id)
    return reservation


async def release_reservation(cmd: commands.ReleaseReservation, uow: UnitOfWork) -> Reservation:
    v = model.new_violations()
    check_uuid(cmd.reservation_id, "id", v)
    model.check_reason(cmd.reason, "reason", v, required=False)
    v.raise_if_any()

    async def attempt() -> Reservation | None:
        async with uow:
            r = await uow.reservations.get(cmd.reservation_id)
            if r is None:
                raise _reservation_not_found(cmd.reservation_id)
            if r.status in (ReservationStatus.RELEASED, ReservationStatus.EXPIRED):
                return r
            now = utcnow()
            if r.is_due(now):
                # Its time was up before the sweeper got to it: it ends EXPIRED, as the contract says.
                if not await _expire(uow, r, now):
                    return None
                await _commit_expiry(uow)
                return r
            before = r.status
            reason = r.release(now)
            if not await uow.reservations.save_status(r, before):
                return None
            for item in sorted(r.items, key=lambda i: i.product_id):
                if reason is StockReleaseReason.RETURNED:
                    try:
                        await uow.products.restock(item.product_id, item.quantity, now)
                    except StockLimitExceeded as err:  # the transaction rolls back: nothing changes
                        raise _stock_limit_exceeded(f"returning {item.quantity} sold units of product "
                                                    f"{err.product_id}", err.product_id, err.stock_on_hand) from None
                else:
                    await uow.products.unreserve(item.product_id, item.quantity, now)
            uow.add_event(RESERVATION, r.id, mapping.stock_released(r, reason, cmd.reason))
            await uow.commit()
            return r

    return await _until_settled(attempt)


async def commit_reservation(cmd: commands.CommitReservation, uow: UnitOfWork) -> Reservation:
    _check_id(cmd.reservation_id, "id")

    async def attempt() -> Reservation | None:
        # The write below is fenced by the status read here, so the read needs no transaction of its own.
        async with uow.reading():
            r = await uow.reservations.get(cmd.reservation_id)
        if r is None:
            raise _reservation_not_found(cmd.reservation_id)
        if r.status is ReservationStatus.COMMITTED:
            return r
        if r.status is ReservationStatus.EXPIRED:
            raise _expired(r.id)
        if r.status is not ReservationStatus.ACTIVE:
            raise _not_active(r)
        now = utcnow()
        if r.is_due(now):
            async with uow:
                if not await _expire(uow, r, now):
                    return None
                await _commit_expiry(uow)
            raise _expired(r.id)
        r.commit(now)
        try:
            async with uow.one_statement():  # on PostgreSQL the reservation, its products and its event at once
                if not await uow.reservations.commit_sold(r, now):
                    return None
                uow.add_event(RESERVATION, r.id, mapping.reservation_committed(r))
                await uow.commit()
        except ReservationChanged:
            return None  # another change came first: read again
        return r

    return await _until_settled(attempt)


async def due_reservations(uow: UnitOfWork, after: BacklogKey | None, limit: int,
                           now: dt.datetime | None = None) -> list[BacklogKey]:
    """The sweeper's backlog: (expire_time, id) of up to `limit` ACTIVE reservations past expire_time, soonest
    deadline first, from the one after `after`."""
    async with uow.reading():
        return await uow.reservations.due(now or utcnow(), limit, after)


async def expire_due_reservation(uow: UnitOfWork, reservation_id: str, now: dt.datetime | None = None) -> bool:
    """The sweeper's work on one reservation: expires it, in a transaction of its own, if it is still ACTIVE past
    its expire_time. False if a commit or release came first."""
    now = now or utcnow()
    async with uow:
        r = await uow.reservations.get(reservation_id)
        # A commit or release may have come first; the status check inside _expire settles any race.
        if r is None or not r.is_due(now) or not await _expire(uow, r, now):
            return False
        await _commit_expiry(uow)
    return True
