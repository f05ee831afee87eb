"""Product and reservation repositories: SQLAlchemy ones used by the service, in-memory ones for unit tests.

Stock changes are conditional updates (`... WHERE on_hand - reserved >= q`) whose row count says whether they
happened: the database serialises concurrent writers of one product row, so two reservations can never both take
the last units, on SQLite (BEGIN IMMEDIATE) and PostgreSQL (row lock, condition re-checked) alike.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import datetime as dt
from collections.abc import Iterable
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from tessera_inventory.adapters.orm import products, reservation_items, reservations, stock_adjustments
from tessera_inventory.domain.model import (
    MAX_STOCK,
    Money,
    Product,
    Reservation,
    ReservationItem,
    ReservationStatus,
)
from tessera_runtime.db import insert_row, keyset_page, update_guarded


class DuplicateSku(Exception):
    """Another product that is not deleted has this SKU."""


class DuplicateRequestId(Exception):
    """Another request with the same request_id committed first."""


class StockLimitExceeded(Exception):
    """Returning sold units would take the product's stock on hand above MAX_STOCK."""

    def __init__(self, product_id: str, stock_on_hand: int) -> None:
        super().__init__(product_id)
        self.product_id, self.stock_on_hand = product_id, stock_on_hand


class ReservationChanged(Exception):
    """Another change to the reservation came first: it is no longer in the status the write expected."""


class DuplicateOrder(Exception):
    """Another reservation for the same order_id committed first."""


Key = tuple[dt.datetime, str]


class ProductRepository(abc.ABC):
    @abc.abstractmethod
    async def add(self, product: Product, request_id: str, request_hash: str) -> None: ...

    @abc.abstractmethod
    async def get(self, product_id: str, *, lock: bool = False) -> Product | None:
        """The product, or None when it does not exist or was deleted. With `lock`, its row stays locked until the
        transaction ends (SELECT ... FOR UPDATE on PostgreSQL; a SQLite transaction that writes holds the whole
        database already), so that a change made from what was read cannot undo a concurrent one."""

    @abc.abstractmethod
    async def get_many(self, product_ids: Iterable[str]) -> dict[str, Product]: ...

    @abc.abstractmethod
    async def get_by_request_id(self, request_id: str) -> tuple[str, str] | None:
        """(product id, request hash) of the product CreateProduct made with this request_id."""

    @abc.abstractmethod
    async def sku_taken(self, sku: str) -> bool: ...

    @abc.abstractmethod
    async def list_after(self, key: Key | None, limit: int, sku: str, in_stock_only: bool) -> list[Product]: ...

    @abc.abstractmethod
    async def update_details(self, product_id: str, name: str, description: str, price: Money,
                             now: dt.datetime) -> None: ...

    @abc.abstractmethod
    async def reserve(self, product_id: str, quantity: int, now: dt.datetime) -> bool:
        """Holds units if at least `quantity` are available; False (and nothing changed) otherwise."""

    @abc.abstractmethod
    async def unreserve(self, product_id: str, quantity: int, now: dt.datetime) -> None: ...

    @abc.abstractmethod
    async def sell(self, product_id: str, quantity: int, now: dt.datetime) -> None:
        """Reserved units leave the warehouse: on hand and reserved both decrease."""

    @abc.abstractmethod
    async def restock(self, product_id: str, quantity: int, now: dt.datetime) -> None:
        """Sold units come back: on hand increases. Raises StockLimitExceeded, changing nothing, when that would take
        it above MAX_STOCK."""

    @abc.abstractmethod
    async def adjust(self, product_id: str, delta: int, now: dt.datetime) -> bool:
        """Adds delta to on hand if the result stays within [reserved, MAX_STOCK]; False otherwise."""

    @abc.abstractmethod
    async def delete(self, product_id: str, now: dt.datetime) -> bool:
        """Deletes the product if it exists and no units of it are reserved; False otherwise."""

    @abc.abstractmethod
    async def get_adjustment(self, request_id: str) -> tuple[str, str] | None:
        """(product id, request hash) of the AdjustStock request with this request_id."""

    @abc.abstractmethod
    async def add_adjustment(self, request_id: str, request_hash: str, product_id: str, delta: int, reason: str,
                             now: dt.datetime) -> None: ...


class ReservationRepository(abc.ABC):
    @abc.abstractmethod
    async def add(self, reservation: Reservation) -> None: ...

    @abc.abstractmethod
    async def get(self, reservation_id: str) -> Reservation | None: ...

    @abc.abstractmethod
    async def get_by_order(self, order_id: str) -> Reservation | None: ...

    @abc.abstractmethod
    async def save_status(self, reservation: Reservation, expected: ReservationStatus) -> bool:
        """Stores the reservation's new status if it still has `expected`; False when another change won."""

    @abc.abstractmethod
    async def commit_sold(self, reservation: Reservation, now: dt.datetime) -> bool:
        """Stores `reservation`, just committed, if it is still ACTIVE, and takes its units out of the warehouse
        (each product's on hand and reserved both decrease), in one write; False when another change came first.
        In a one_statement() unit of work on PostgreSQL it returns True and its commit raises ReservationChanged
        instead (the write and the reservation's events are then one statement, the events only if it applied)."""

    @abc.abstractmethod
    async def due(self, now: dt.datetime, limit: int, after: Key | None = None) -> list[Key]:
        """(expire_time, id) of ACTIVE reservations whose expire_time has passed, oldest deadline first, from the
        one after `after`."""


def _product_row(p: Product) -> dict[str, Any]:
    return {
        "id": p.id, "sku": p.sku, "name": p.name, "description": p.description,
        "currency_code": p.price.currency_code, "price_minor": p.price.amount_minor,
        "stock_on_hand": p.stock_on_hand, "stock_reserved": p.stock_reserved,
        "create_time": p.create_time, "update_time": p.update_time, "version": p.version,
    }


def _product(row: Any) -> Product:
    m = row._mapping
    return Product(
        id=m["id"], sku=m["sku"], name=m["name"], description=m["description"],
        price=Money(m["currency_code"], m["price_minor"]), stock_on_hand=m["stock_on_hand"],
        stock_reserved=m["stock_reserved"], create_time=m["create_time"], update_time=m["update_time"],
        version=m["version"],
    )


def _changed(now: dt.datetime) -> dict[str, Any]:
    """Every change of a product, stock included, bumps its version and update_time."""
    return {"version": products.c.version + 1, "update_time": now}


class SqlAlchemyProductRepository(ProductRepository):
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, product: Product, request_id: str, request_hash: str) -> None:
        """A duplicate request_id or live SKU fails the transaction, which the caller then abandons: no savepoint.
        In an inserting() unit of work the row is written, and the duplicate raised, at commit."""
        def clash(exc: IntegrityError) -> Exception | None:
            text = str(exc.orig).lower()
            if "request_id" in text:
                return DuplicateRequestId(request_id)
            if "sku" in text:
                return DuplicateSku(product.sku)
            return None

        await insert_row(self.session, products, {
            **_product_row(product), "create_request_id": request_id, "create_request_hash": request_hash}, clash)

    async def get(self, product_id: str, *, lock: bool = False) -> Product | None:
        query = select(products).where(products.c.id == product_id, products.c.delete_time.is_(None))
        row = (await self.session.execute(query.with_for_update() if lock else query)).first()
        return None if row is None else _product(row)

    async def get_many(self, product_ids: Iterable[str]) -> dict[str, Product]:
        ids = sorted(set(product_ids))
        rows = (await self.session.execute(
            select(products).where(products.c.id.in_(ids), products.c.delete_time.is_(None)))).all()
        return {r._mapping["id"]: _product(r) for r in rows}

    async def get_by_request_id(self, request_id: str) -> tuple[str, str] | None:
        row = (await self.session.execute(
            select(products.c.id, products.c.create_request_hash)
            .where(products.c.create_request_id == request_id))).first()
        return None if row is None else (row[0], row[1])

    async def sku_taken(self, sku: str) -> bool:
        row = (await self.session.execute(
            select(products.c.id).where(products.c.sku == sku, products.c.delete_time.is_(None)))).first()
        return row is not None

    async def list_after(self, key: Key | None, limit: int, sku: str, in_stock_only: bool) -> list[Product]:
        query = select(products).where(products.c.delete_time.is_(None))
        if sku:
            query = query.where(products.c.sku == sku)
        if in_stock_only:
            query = query.where(products.c.stock_on_hand - products.c.stock_reserved > 0)
        query = keyset_page(query, products, key, limit)
        return [_product(r) for r in (await self.session.execute(query)).all()]

    async def update_details(self, product_id: str, name: str, description: str, price: Money,
                             now: dt.datetime) -> None:
        await self.session.execute(update(products).where(products.c.id == product_id).values(
            name=name, description=description, currency_code=price.currency_code,
            price_minor=price.amount_minor, **_changed(now)))

    async def reserve(self, product_id: str, quantity: int, now: dt.datetime) -> bool:
        c = products.c
        result = await self.session.execute(
            update(products)
            .where(c.id == product_id, c.delete_time.is_(None), c.stock_on_hand - c.stock_reserved >= quantity)
            .values(stock_reserved=c.stock_reserved + quantity, **_changed(now)))
        return result.rowcount == 1

    async def unreserve(self, product_id: str, quantity: int, now: dt.datetime) -> None:
        c = products.c
        await self._must(update(products).where(c.id == product_id, c.stock_reserved >= quantity)
                         .values(stock_reserved=c.stock_reserved - quantity, **_changed(now)), product_id)

    async def sell(self, product_id: str, quantity: int, now: dt.datetime) -> None:
        c = products.c
        await self._must(update(products).where(c.id == product_id, c.stock_reserved >= quantity)
                         .values(stock_on_hand=c.stock_on_hand - quantity,
                                 stock_reserved=c.stock_reserved - quantity, **_changed(now)), product_id)

    async def restock(self, product_id: str, quantity: int, now: dt.datetime) -> None:
        c = products.c
        result = await self.session.execute(
            update(products).where(c.id == product_id, c.stock_on_hand + quantity <= MAX_STOCK)
            .values(stock_on_hand=c.stock_on_hand + quantity, **_changed(now)))
        if result.rowcount == 1:
            return
        on_hand = (await self.session.execute(select(c.stock_on_hand).where(c.id == product_id))).scalar()
        if on_hand is None:
            raise RuntimeError(f"stock of product {product_id} does not match its reservations")
        raise StockLimitExceeded(product_id, on_hand)

    async def _must(self, statement: Any, product_id: str) -> None:
        result = await self.session.execute(statement)
        if result.rowcount != 1:
            # Reservations and stock counts disagree: refuse (the transaction rolls back) rather than corrupt stock.
            raise RuntimeError(f"stock of product {product_id} does not match its reservations")

    async def adjust(self, product_id: str, delta: int, now: dt.datetime) -> bool:
        c = products.c
        result = await self.session.execute(
            update(products)
            .where(c.id == product_id, c.delete_time.is_(None), c.stock_on_hand + delta >= c.stock_reserved,
                   c.stock_on_hand + delta <= MAX_STOCK)
            .values(stock_on_hand=c.stock_on_hand + delta, **_changed(now)))
        return result.rowcount == 1

    async def delete(self, product_id: str, now: dt.datetime) -> bool:
        c = products.c
        result = await self.session.execute(
            update(products).where(c.id == product_id, c.delete_time.is_(None), c.stock_reserved == 0)
            .values(delete_time=now, **_changed(now)))
        return result.rowcount == 1

    async def get_adjustment(self, request_id: str) -> tuple[str, str] | None:
        row = (await self.session.execute(
            select(stock_adjustments.c.product_id, stock_adjustments.c.request_hash)
            .where(stock_adjustments.c.request_id == request_id))).first()
        return None if row is None else (row[0], row[1])

    async def add_adjustment(self, request_id: str, request_hash: str, product_id: str, delta: int, reason: str,
                             now: dt.datetime) -> None:
        try:
            async with self.session.begin_nested():
                await self.session.execute(insert(stock_adjustments).values(
                    request_id=request_id, request_hash=request_hash, product_id=product_id, delta=delta,
                    reason=reason, create_time=now))
        except IntegrityError:
            raise DuplicateRequestId(request_id) from None


def _reservation(row: Any, items: list[ReservationItem]) -> Reservation:
    m = row._mapping
    return Reservation(
        id=m["id"], order_id=m["order_id"], items=tuple(items), status=ReservationStatus(m["status"]),
        expire_time=m["expire_time"], create_time=m["create_time"], update_time=m["update_time"],
        commit_time=m["commit_time"], release_time=m["release_time"],
    )


def _status_values(r: Reservation) -> dict[str, Any]:
    return {"status": r.status.value, "update_time": r.update_time, "commit_time": r.commit_time,
            "release_time": r.release_time}


async def _commit_then_sell(reservations: ReservationRepository, stock: ProductRepository, reservation: Reservation,
                            now: dt.datetime) -> bool:
    """commit_sold a statement at a time, in the caller's transaction: the reservation if still ACTIVE, then each
    product (sell refuses stock that disagrees with the reservation)."""
    if not await reservations.save_status(reservation, ReservationStatus.ACTIVE):
        return False
    for item in sorted(reservation.items, key=lambda i: i.product_id):
        await stock.sell(item.product_id, item.quantity, now)
    return True


def _build_commit_sold() -> tuple[Any, Any]:
    """The reservation's UPDATE from ACTIVE to COMMITTED (the guard of tessera_runtime.db.update_guarded), then of its
    products, through its items, only where the guard matched. A product whose reserved units fall short breaks the
    products' check constraint, which fails the whole statement (SQLite's path checks each row instead)."""
    r, items, p = reservations.c, reservation_items.c, products.c
    committed = (update(reservations)
                 .where(r.id == bindparam("b_id"), r.status == ReservationStatus.ACTIVE.value)
                 .values(**{k: bindparam(f"r_{k}", type_=reservations.c[k].type)
                            for k in ("status", "update_time", "commit_time", "release_time")})
                 .returning(r.id).cte("committed"))
    # Its products are locked in product id order first, as every transaction that changes several products does
    # (see the handlers), so that a commit and a reservation of the same products never deadlock.
    locked = (select(p.id, items.quantity).join(reservation_items, items.product_id == p.id)
              .where(items.reservation_id.in_(select(committed.c.id)))
              .order_by(p.id).with_for_update(of=products).cte("locked"))
    sold = (update(products)
            .where(p.id == locked.c.id)
            .values(stock_on_hand=p.stock_on_hand - locked.c.quantity,
                    stock_reserved=p.stock_reserved - locked.c.quantity,
                    version=p.version + 1, update_time=bindparam("b_now", type_=p.update_time.type))
            .returning(p.id).cte("sold"))
    return committed, sold


_COMMITTED, _SOLD = _build_commit_sold()


class SqlAlchemyReservationRepository(ReservationRepository):
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def commit_sold(self, reservation: Reservation, now: dt.datetime) -> bool:
        params = {"b_id": reservation.id, "b_now": now,
                  **{f"r_{k}": v for k, v in _status_values(reservation).items()}}
        def disagrees(exc: IntegrityError) -> Exception | None:
            # As the statement-at-a-time path refuses (sell): fewer units held than the reservation holds.
            if "ck_products_stock" not in str(exc.orig):
                return None
            return RuntimeError(f"stock of the products of reservation {reservation.id} does not match its "
                                "reservations")

        try:
            if await update_guarded(self.session, _COMMITTED, params, lambda: ReservationChanged(reservation.id),
                                    _SOLD, translate=disagrees):
                return True
        except ReservationChanged:
            return False
        # SQLite has no data-modifying CTEs.
        return await _commit_then_sell(self, SqlAlchemyProductRepository(self.session), reservation, now)

    async def add(self, reservation: Reservation) -> None:
        """A duplicate order_id fails the transaction, which the caller then abandons: no savepoint needed."""
        try:
            await self.session.execute(insert(reservations).values(
                id=reservation.id, order_id=reservation.order_id, expire_time=reservation.expire_time,
                create_time=reservation.create_time, **_status_values(reservation)))
        except IntegrityError as exc:
            if "order_id" in str(exc.orig).lower():
                raise DuplicateOrder(reservation.order_id) from None
            raise
        await self.session.execute(insert(reservation_items), [
            {"reservation_id": reservation.id, "position": i, "product_id": item.product_id,
             "quantity": item.quantity}
            for i, item in enumerate(reservation.items)
        ])

    async def _load(self, condition: Any) -> Reservation | None:
        """The reservation and its items in one statement: a row per item, the reservation's columns on each."""
        rows = (await self.session.execute(
            select(reservations, reservation_items.c.product_id.label("item_product_id"),
                   reservation_items.c.quantity.label("item_quantity"))
            .outerjoin(reservation_items, reservation_items.c.reservation_id == reservations.c.id)
            .where(condition).order_by(reservation_items.c.position))).all()
        if not rows:
            return None
        return _reservation(rows[0], [ReservationItem(product_id=r._mapping["item_product_id"],
                                                      quantity=r._mapping["item_quantity"])
                                      for r in rows if r._mapping["item_product_id"] is not None])

    async def get(self, reservation_id: str) -> Reservation | None:
        return await self._load(reservations.c.id == reservation_id)

    async def get_by_order(self, order_id: str) -> Reservation | None:
        return await self._load(reservations.c.order_id == order_id)

    async def save_status(self, reservation: Reservation, expected: ReservationStatus) -> bool:
        result = await self.session.execute(
            update(reservations)
            .where(reservations.c.id == reservation.id, reservations.c.status == expected.value)
            .values(**_status_values(reservation)))
        return result.rowcount == 1

    async def due(self, now: dt.datetime, limit: int, after: Key | None = None) -> list[Key]:
        c = reservations.c
        rows = (await self.session.execute(keyset_page(
            select(c.expire_time, c.id).where(c.status == ReservationStatus.ACTIVE.value, c.expire_time <= now),
            reservations, after, limit, time_column="expire_time"))).all()
        return [(r[0], r[1]) for r in rows]


@dataclasses.dataclass
class InventoryState:
    """Everything the in-memory repositories hold; copied on begin so that a rollback can restore it."""

    products: dict[str, Product] = dataclasses.field(default_factory=dict)
    deleted: set[str] = dataclasses.field(default_factory=set)
    create_requests: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    adjustments: dict[str, tuple[str, str]] = dataclasses.field(default_factory=dict)
    reservations: dict[str, Reservation] = dataclasses.field(default_factory=dict)

    def copy(self) -> InventoryState:
        return copy.deepcopy(self)


class InMemoryProductRepository(ProductRepository):
    def __init__(self, state: InventoryState) -> None:
        self.state = state

    def _live(self, product_id: str) -> Product | None:
        if product_id in self.state.deleted:
            return None
        return self.state.products.get(product_id)

    async def add(self, product: Product, request_id: str, request_hash: str) -> None:
        if request_id in self.state.create_requests:
            raise DuplicateRequestId(request_id)
        if await self.sku_taken(product.sku):
            raise DuplicateSku(product.sku)
        self.state.products[product.id] = dataclasses.replace(product)
        self.state.create_requests[request_id] = (product.id, request_hash)

    async def get(self, product_id: str, *, lock: bool = False) -> Product | None:
        p = self._live(product_id)  # one unit of work at a time: nothing to lock
        return None if p is None else dataclasses.replace(p)

    async def get_many(self, product_ids: Iterable[str]) -> dict[str, Product]:
        return {pid: dataclasses.replace(p) for pid in set(product_ids) if (p := self._live(pid)) is not None}

    async def get_by_request_id(self, request_id: str) -> tuple[str, str] | None:
        return self.state.create_requests.get(request_id)

    async def sku_taken(self, sku: str) -> bool:
        return any(p.sku == sku and p.id not in self.state.deleted for p in self.state.products.values())

    async def list_after(self, key: Key | None, limit: int, sku: str, in_stock_only: bool) -> list[Product]:
        live = sorted((p for p in self.state.products.values() if p.id not in self.state.deleted),
                      key=lambda p: (p.create_time, p.id))
        selected = [p for p in live if (not sku or p.sku == sku) and (not in_stock_only or p.stock_available > 0)
                    and (key is None or (p.create_time, p.id) > key)]
        return [dataclasses.replace(p) for p in selected[:limit]]

    def _touch(self, p: Product, now: dt.datetime) -> None:
        p.version += 1
        p.update_time = now

    async def update_details(self, product_id: str, name: str, description: str, price: Money,
                             now: dt.datetime) -> None:
        p = self.state.products[product_id]
        p.name, p.description, p.price = name, description, price
        self._touch(p, now)

    async def reserve(self, product_id: str, quantity: int, now: dt.datetime) -> bool:
        p = self._live(product_id)
        if p is None or p.stock_available < quantity:
            return False
        p.stock_reserved += quantity
        self._touch(p, now)
        return True

    async def unreserve(self, product_id: str, quantity: int, now: dt.datetime) -> None:
        p = self.state.products[product_id]
        if p.stock_reserved < quantity:
            raise RuntimeError(f"stock of product {product_id} does not match its reservations")
        p.stock_reserved -= quantity
        self._touch(p, now)

    async def sell(self, product_id: str, quantity: int, now: dt.datetime) -> None:
        p = self.state.products[product_id]
        if p.stock_reserved < quantity:
            raise RuntimeError(f"stock of product {product_id} does not match its reservations")
        p.stock_reserved -= quantity
        p.stock_on_hand -= quantity
        self._touch(p, now)

    async def restock(self, product_id: str, quantity: int, now: dt.datetime) -> None:
        p = self.state.products[product_id]
        if p.stock_on_hand + quantity > MAX_STOCK:
            raise StockLimitExceeded(product_id, p.stock_on_hand)
        p.stock_on_hand += quantity
        self._touch(p, now)

    async def adjust(self, product_id: str, delta: int, now: dt.datetime) -> bool:
        p = self._live(product_id)
        if p is None or not p.stock_reserved <= p.stock_on_hand + delta <= MAX_STOCK:
            return False
        p.stock_on_hand += delta
        self._touch(p, now)
        return True

    async def delete(self, product_id: str, now: dt.datetime) -> bool:
        p = self._live(product_id)
        if p is None or p.stock_reserved != 0:
            return False
        self.state.deleted.add(product_id)
        self._touch(p, now)
        return True

    async def get_adjustment(self, request_id: str) -> tuple[str, str] | None:
        return self.state.adjustments.get(request_id)

    async def add_adjustment(self, request_id: str, request_hash: str, product_id: str, delta: int, reason: str,
                             now: dt.datetime) -> None:
        if request_id in self.state.adjustments:
            raise DuplicateRequestId(request_id)
        self.state.adjustments[request_id] = (product_id, request_hash)


class InMemoryReservationRepository(ReservationRepository):
    def __init__(self, state: InventoryState) -> None:
        self.state = state

    async def add(self, reservation: Reservation) -> None:
        if any(r.order_id == reservation.order_id for r in self.state.reservations.values()):
            raise DuplicateOrder(reservation.order_id)
        self.state.reservations[reservation.id] = dataclasses.replace(reservation)

    async def get(self, reservation_id: str) -> Reservation | None:
        r = self.state.reservations.get(reservation_id)
        return None if r is None else dataclasses.replace(r)

    async def get_by_order(self, order_id: str) -> Reservation | None:
        return next((dataclasses.replace(r) for r in self.state.reservations.values() if r.order_id == order_id),
                    None)

    async def save_status(self, reservation: Reservation, expected: ReservationStatus) -> bool:
        stored = self.state.reservations.get(reservation.id)
        if stored is None or stored.status is not expected:
            return False
        self.state.reservations[reservation.id] = dataclasses.replace(reservation)
        return True

    async def commit_sold(self, reservation: Reservation, now: dt.datetime) -> bool:
        return await _commit_then_sell(self, InMemoryProductRepository(self.state), reservation, now)

    async def due(self, now: dt.datetime, limit: int, after: Key | None = None) -> list[Key]:
        due = sorted((r.expire_time, r.id) for r in self.state.reservations.values() if r.is_due(now))
        return [key for key in due if after is None or key > after][:limit]
