"""Order repositories: the SQLAlchemy one used by the service, an in-memory one for unit tests. Both are the
CreateOrder saga's store (tessera_runtime.saga.SagaStore).

Every change to an order made by its saga is fenced by the saga's lease: a save succeeds only while the caller
still holds the lease and nobody else changed the order since it was read, so two runners can never both
advance the same saga.
"""

from __future__ import annotations

import abc
import copy
import dataclasses
import datetime as dt
import json
from typing import Any

from sqlalchemy import Boolean, Integer, String, bindparam, column, func, or_, select, update
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from tessera_order.adapters.orm import order_items, order_saga_steps, order_sagas, orders
from tessera_order.domain.model import (
    STEPS,
    UNFINISHED,
    Failure,
    Order,
    OrderItem,
    OrderStatus,
    SagaStep,
    StepName,
    StepStatus,
)
from tessera_runtime.context import split_scopes
from tessera_runtime.db import UtcDateTime, insert_row, insert_rows, keyset_page, read_first, update_guarded
from tessera_runtime.periodic import BacklogKey
from tessera_runtime.saga import InMemorySagaLeases, Lease, LeaseLost, SagaCaller

__all__ = ["DuplicateRequestId", "InMemoryOrderRepository", "Lease", "LeaseLost", "OrderRepository", "SagaCaller",
           "SqlAlchemyOrderRepository"]



class DuplicateRequestId(Exception):
    """Another order with the same request_id was stored first."""


class OrderRepository(abc.ABC):
    """The orders, and the store of their sagas (tessera_runtime.saga.SagaStore)."""

    @abc.abstractmethod
    async def add(self, order: Order, lease: Lease, caller: SagaCaller) -> None:
        """Stores a new order with its saga, leased to lease.owner. Raises DuplicateRequestId."""

    @abc.abstractmethod
    async def get(self, order_id: str) -> Order | None: ...

    @abc.abstractmethod
    async def get_by_request_id(self, request_id: str) -> Order | None: ...

    @abc.abstractmethod
    async def id_by_request_id(self, request_id: str) -> str | None:
        """The id of the order placed with this request_id, in one statement (the usual answer is None)."""

    @abc.abstractmethod
    async def list(self, *, customer_id: str | None, status: OrderStatus | None,
                   after: tuple[dt.datetime, str] | None, limit: int) -> list[Order]:
        """Orders newest first (create_time, id descending), strictly after the key `after`."""

    @abc.abstractmethod
    async def save(self, order: Order, lease: Lease, *, release: bool = False) -> None:
        """Writes the order and its saga if lease.owner still holds the lease and the order's version is the
        one read; extends the lease to lease.expires_at, or with `release` frees it in the same write (the saga
        is over). Raises LeaseLost otherwise (in a one_statement() unit of work, its commit does)."""

    @abc.abstractmethod
    async def acquire_lease(self, order_id: str, lease: Lease, now: dt.datetime) -> bool:
        """Takes the saga's lease when it is free, expired, or already lease.owner's."""

    @abc.abstractmethod
    async def renew_lease(self, order_id: str, lease: Lease) -> bool: ...

    @abc.abstractmethod
    async def release_lease(self, order_id: str, owner: str) -> None: ...

    @abc.abstractmethod
    async def release_leases(self, owner: str) -> int:
        """Frees every lease `owner` holds, so that another runner may resume those sagas at once."""

    @abc.abstractmethod
    async def claimable(self, now: dt.datetime, limit: int, after: BacklogKey | None = None) -> list[BacklogKey]:
        """(update_time, id) of at most `limit` unfinished sagas whose lease is free or expired, least recently
        changed first, from the one after `after`."""

    @abc.abstractmethod
    async def caller(self, order_id: str) -> SagaCaller: ...


def _order_row(order: Order) -> dict[str, Any]:
    failure = order.failure
    return {
        "customer_id": order.customer_id, "request_id": order.request_id, "request_hash": order.request_hash,
        "status": order.status.value, "currency_code": order.currency_code,
        "payment_method": order.payment_method, "payment_id": order.payment_id,
        "reservation_id": order.reservation_id, "cancel_reason": order.cancel_reason,
        "failure_reason": failure.reason if failure else None,
        "failure_message": failure.message if failure else None,
        "failure_step": failure.step.value if failure else None,
        "failure_metadata": json.dumps(dict(failure.metadata), sort_keys=True) if failure else None,
        "create_time": order.create_time, "update_time": order.update_time,
        "confirm_time": order.confirm_time, "cancel_time": order.cancel_time,
    }


def _step_rows(order: Order, *, changed_only: bool = False) -> list[dict[str, Any]]:
    """The saga step rows of the order; with `changed_only`, those that differ from what the database has."""
    return [{
        "b_order_id": order.id, "b_step": s.name.value, "position": i, "status": s.status.value,
        "attempts": s.attempts, "compensation_attempts": s.compensation_attempts, "error": s.error,
        "outcome_unknown": s.outcome_unknown, "update_time": s.update_time or order.update_time,
    } for i, s in enumerate(order.steps[name] for name in STEPS)
        if not changed_only or order.stored_steps.get(s.name) != s]


def _stored(order: Order) -> None:
    """Notes the order's steps as the database now has them."""
    order.stored_steps = {name: dataclasses.replace(step) for name, step in order.steps.items()}


def _order(row: Any, items: list[OrderItem], steps: dict[StepName, SagaStep], current_step: str) -> Order:
    m = row._mapping
    failure = None
    if m["failure_reason"] is not None:
        failure = Failure(reason=m["failure_reason"], message=m["failure_message"] or "",
                          step=StepName(m["failure_step"]), metadata=json.loads(m["failure_metadata"] or "{}"))
    return Order(
        id=m["id"], customer_id=m["customer_id"], items=tuple(items), currency_code=m["currency_code"],
        payment_method=m["payment_method"], request_id=m["request_id"], request_hash=m["request_hash"],
        status=OrderStatus(m["status"]), steps=steps, current_step=StepName(current_step),
        create_time=m["create_time"], update_time=m["update_time"], version=m["version"],
        payment_id=m["payment_id"], reservation_id=m["reservation_id"], failure=failure,
        cancel_reason=m["cancel_reason"], confirm_time=m["confirm_time"], cancel_time=m["cancel_time"],
    )


_STEP_UPDATE = (
    update(order_saga_steps)
    .where(order_saga_steps.c.order_id == bindparam("b_order_id"), order_saga_steps.c.step == bindparam("b_step"))
    .values(status=bindparam("status"), attempts=bindparam("attempts"),
            compensation_attempts=bindparam("compensation_attempts"), error=bindparam("error"),
            outcome_unknown=bindparam("outcome_unknown"), update_time=bindparam("update_time"))
)

# PostgreSQL runs a whole save as one statement of data-modifying CTEs: one round trip instead of one per table (an
# add is staged inserts, see tessera_runtime.db.insert_row). The step rows travel as one array per column (unnest),
# so that the statement has one shape whatever the number of rows, and SQLAlchemy compiles it once.
_ORDER_FIELDS = tuple(c.name for c in orders.c if c.name not in ("id", "version"))  # what _order_row gives
_STEP_COLUMNS = {"step": String, "position": Integer, "status": String, "attempts": Integer,
                 "compensation_attempts": Integer, "error": String, "outcome_unknown": Boolean,
                 "update_time": UtcDateTime}
_STEP_FIELDS = ("status", "attempts", "compensation_attempts", "error", "outcome_unknown", "update_time")


def _unnest(prefix: str, columns: dict[str, Any], name: str) -> Any:
    """`unnest(:prefix_a, :prefix_b, ...) AS name(a, b, ...)`: rows given as one array parameter per column."""
    return (func.unnest(*(bindparam(f"{prefix}_{c}", type_=ARRAY(t())) for c, t in columns.items()))
            .table_valued(*(column(c, t()) for c, t in columns.items())).render_derived(name=name))


def _build_save_statement(release: bool) -> tuple[Any, tuple[Any, ...]]:
    """The order row locked if its version is the one read (the version fence), then UPDATE of the saga row only
    if so and the lease is held (the lease fence), then of the order row only if the saga row changed, then of the
    given step rows only if the order row changed: the order row's UPDATE is the guard
    (tessera_runtime.db.update_guarded), the others go with it.

    The saga row is fenced by the version too because a data-modifying CTE runs whether or not the statement reads
    its rows: fenced by its lease alone, a stale save by the lease's own holder would still write its current step
    and free the lease. The order row is locked rather than merely read so that a save of the same version
    committed meanwhile is seen (the lock waits for it, then finds another version) and nothing is written."""
    lease = ({"lease_owner": None, "lease_expires_at": None} if release
             else {"lease_expires_at": bindparam("b_lease_expires_at")})
    same_version = (select(orders.c.id)
                    .where(orders.c.id == bindparam("b_order_id"), orders.c.version == bindparam("b_version"))
                    .with_for_update(key_share=True).cte("same_version"))
    saga = (update(order_sagas)
            .where(order_sagas.c.order_id == same_version.c.id,
                   order_sagas.c.lease_owner == bindparam("b_lease_owner"))
            .values(current_step=bindparam("b_current_step"), **lease)
            .returning(order_sagas.c.order_id).cte("saga"))
    changed = (update(orders)
               .where(orders.c.id == saga.c.order_id, orders.c.version == bindparam("b_version"))
               .values(version=orders.c.version + 1, **{f: bindparam(f"o_{f}") for f in _ORDER_FIELDS})
               .returning(orders.c.id).cte("changed"))
    rows = _unnest("s", _STEP_COLUMNS, "new_steps")
    steps = (update(order_saga_steps)
             .where(order_saga_steps.c.order_id == changed.c.id, order_saga_steps.c.step == rows.c.step)
             .values(**{f: rows.c[f] for f in _STEP_FIELDS})
             .returning(order_saga_steps.c.step).cte("steps"))
    return changed, (saga, steps)


_SAVE = {release: _build_save_statement(release) for release in (False, True)}


def _order_params(order: Order) -> dict[str, Any]:
    return {f"o_{name}": value for name, value in _order_row(order).items()}


def _array_params(prefix: str, columns: dict[str, Any], rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {f"{prefix}_{c}": [row[c] for row in rows] for c in columns}


def _step_params(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return _array_params("s", _STEP_COLUMNS, [{**row, "step": row["b_step"]} for row in rows])


# How often a read of orders is made when saves keep coming between its statements; the last one is returned as
# read.
_READ_ATTEMPTS = 5

# CreateOrder's first read, built once: in a read session on PostgreSQL it runs straight on asyncpg (read_first).
_ID_BY_REQUEST_ID = select(orders.c.id).where(orders.c.request_id == bindparam("request_id"))


class SqlAlchemyOrderRepository(OrderRepository):
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, order: Order, lease: Lease, caller: SagaCaller) -> None:
        """A duplicate request_id fails the transaction, which the caller then abandons: no savepoint needed. In an
        inserting() unit of work (on PostgreSQL one statement with the order's events) the rows are written, and
        the duplicate raised, at commit."""
        def clash(exc: IntegrityError) -> Exception | None:
            return DuplicateRequestId(order.request_id) if "request_id" in str(exc.orig).lower() else None

        await insert_row(self.session, orders, {"id": order.id, "version": order.version, **_order_row(order)},
                         clash)
        await insert_rows(self.session, order_items, [
            {"order_id": order.id, "position": i, "product_id": it.product_id, "product_name": it.product_name,
             "sku": it.sku, "quantity": it.quantity, "unit_price_minor": it.unit_price_minor}
            for i, it in enumerate(order.items)])
        await insert_row(self.session, order_sagas, {
            "order_id": order.id, "current_step": order.current_step.value, "lease_owner": lease.owner,
            "lease_expires_at": lease.expires_at, "principal_subject": caller.subject,
            "principal_scopes": " ".join(caller.scopes), "correlation_id": caller.correlation_id,
            "traceparent": caller.traceparent, "tracestate": caller.tracestate})
        await insert_rows(self.session, order_saga_steps,
                          [{k.removeprefix("b_"): v for k, v in row.items()} for row in _step_rows(order)])
        _stored(order)

    async def _load(self, rows: list[Any], *, check: bool = True) -> list[Order] | None:
        """The orders of `rows` (read from `orders`) with their items, steps and saga rows; with `check`, None when a
        save of one of them was committed since `rows` were read (see _read)."""
        if not rows:
            return []
        versions = {r._mapping["id"]: r._mapping["version"] for r in rows}
        ids = list(versions)
        items: dict[str, list[OrderItem]] = {i: [] for i in ids}
        for r in (await self.session.execute(select(order_items).where(order_items.c.order_id.in_(ids))
                                             .order_by(order_items.c.order_id, order_items.c.position))).all():
            m = r._mapping
            items[m["order_id"]].append(OrderItem(product_id=m["product_id"], product_name=m["product_name"],
                                                  sku=m["sku"], quantity=m["quantity"],
                                                  unit_price_minor=m["unit_price_minor"]))
        steps: dict[str, dict[StepName, SagaStep]] = {i: {} for i in ids}
        for r in (await self.session.execute(select(order_saga_steps)
                                             .where(order_saga_steps.c.order_id.in_(ids)))).all():
            m = r._mapping
            name = StepName(m["step"])
            steps[m["order_id"]][name] = SagaStep(
                name=name, status=StepStatus(m["status"]), attempts=m["attempts"],
                compensation_attempts=m["compensation_attempts"], error=m["error"],
                outcome_unknown=m["outcome_unknown"], update_time=m["update_time"])
        # Read last, with each order's version as it is now: every save moves the version on with the order's steps
        # and current step, so an unchanged version means that no save came between this statement and the first.
        current: dict[str, str] = {}
        for order_id, step, version in (await self.session.execute(
                select(order_sagas.c.order_id, order_sagas.c.current_step, orders.c.version)
                .join(orders, orders.c.id == order_sagas.c.order_id)
                .where(order_sagas.c.order_id.in_(ids)))).all():
            if check and version != versions[order_id]:
                return None
            current[order_id] = step
        loaded = [_order(r, items[r._mapping["id"]], {n: steps[r._mapping["id"]][n] for n in STEPS},
                         current[r._mapping["id"]]) for r in rows]
        for order in loaded:
            _stored(order)
        return loaded

    async def _read(self, query: Any) -> list[Order]:
        """The orders `query` selects, whole. Their items, steps and saga rows are read by statements of their own,
        and on PostgreSQL (READ COMMITTED) each statement sees every save committed before it started: a save
        committed between them would give the order row of one version with the steps of the next (PENDING with
        every step done, a state the saga never had). The last statement reads the versions again, and a read that
        a save came between is made again. A transaction on SQLite reads one snapshot: its check always holds."""
        for attempt in range(_READ_ATTEMPTS):
            rows = list((await self.session.execute(query)).all())
            loaded = await self._load(rows, check=attempt < _READ_ATTEMPTS - 1)
            if loaded is not None:
                return loaded
        raise AssertionError("the last read is returned unchecked")

    async def get(self, order_id: str) -> Order | None:
        loaded = await self._read(select(orders).where(orders.c.id == order_id))
        return loaded[0] if loaded else None

    async def get_by_request_id(self, request_id: str) -> Order | None:
        loaded = await self._read(select(orders).where(orders.c.request_id == request_id))
        return loaded[0] if loaded else None

    async def id_by_request_id(self, request_id: str) -> str | None:
        row = await read_first(self.session, _ID_BY_REQUEST_ID, {"request_id": request_id})
        return None if row is None else row["id"]

    async def list(self, *, customer_id: str | None, status: OrderStatus | None,
                   after: tuple[dt.datetime, str] | None, limit: int) -> list[Order]:
        query = select(orders)
        if customer_id is not None:
            query = query.where(orders.c.customer_id == customer_id)
        if status is not None:
            query = query.where(orders.c.status == status.value)
        return await self._read(keyset_page(query, orders, after, limit, newest_first=True))

    async def save(self, order: Order, lease: Lease, *, release: bool = False) -> None:
        """See OrderRepository.save. In a one_statement() unit of work LeaseLost is raised by its commit, and the
        order is noted as saved (its version advanced) when the save is staged: a caller whose commit fails drops
        it, as the saga does, and reads the order again."""
        steps = _step_rows(order, changed_only=True)
        guard, others = _SAVE[release]
        params = {"b_order_id": order.id, "b_lease_owner": lease.owner, "b_lease_expires_at": lease.expires_at,
                  "b_current_step": order.current_step.value, "b_version": order.version, **_order_params(order),
                  **_step_params(steps)}
        # On PostgreSQL one statement; in a one_statement() unit of work it is written, with the order's events
        # only if the fences held, and LeaseLost raised, at commit.
        if not await update_guarded(self.session, guard, params, lambda: LeaseLost(order.id), *others):
            # SQLite has no data-modifying CTEs: each table is written by a statement of its own.
            held = await self.session.execute(
                update(order_sagas)
                .where(order_sagas.c.order_id == order.id, order_sagas.c.lease_owner == lease.owner)
                .values(current_step=order.current_step.value,
                        **({"lease_owner": None, "lease_expires_at": None} if release
                           else {"lease_expires_at": lease.expires_at})))
            if held.rowcount != 1:
                raise LeaseLost(order.id)
            changed = await self.session.execute(
                update(orders).where(orders.c.id == order.id, orders.c.version == order.version)
                .values(version=order.version + 1, **_order_row(order)))
            if changed.rowcount != 1:
                raise LeaseLost(order.id)
            if steps:
                await self.session.execute(_STEP_UPDATE, steps)
        order.version += 1
        _stored(order)

    async def acquire_lease(self, order_id: str, lease: Lease, now: dt.datetime) -> bool:
        result = await self.session.execute(
            update(order_sagas)
            .where(order_sagas.c.order_id == order_id,
                   or_(order_sagas.c.lease_owner.is_(None), order_sagas.c.lease_owner == lease.owner,
                       order_sagas.c.lease_expires_at < now))
            .values(lease_owner=lease.owner, lease_expires_at=lease.expires_at))
        return result.rowcount == 1

    async def renew_lease(self, order_id: str, lease: Lease) -> bool:
        result = await self.session.execute(
            update(order_sagas)
            .where(order_sagas.c.order_id == order_id, order_sagas.c.lease_owner == lease.owner)
            .values(lease_expires_at=lease.expires_at))
        return result.rowcount == 1

    async def release_lease(self, order_id: str, owner: str) -> None:
        await self.session.execute(
            update(order_sagas)
            .where(order_sagas.c.order_id == order_id, order_sagas.c.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None))

    async def release_leases(self, owner: str) -> int:
        result = await self.session.execute(
            update(order_sagas).where(order_sagas.c.lease_owner == owner)
            .values(lease_owner=None, lease_expires_at=None))
        return result.rowcount

    async def claimable(self, now: dt.datetime, limit: int, after: BacklogKey | None = None) -> list[BacklogKey]:
        query = (
            select(orders.c.update_time, orders.c.id)
            .join(order_sagas, order_sagas.c.order_id == orders.c.id)
            .where(orders.c.status.in_([s.value for s in UNFINISHED]),
                   or_(order_sagas.c.lease_owner.is_(None), order_sagas.c.lease_expires_at < now))
        )
        rows = await self.session.execute(keyset_page(query, orders, after, limit, time_column="update_time"))
        return [(r.update_time, r.id) for r in rows]

    async def caller(self, order_id: str) -> SagaCaller:
        row = (await self.session.execute(select(order_sagas).where(order_sagas.c.order_id == order_id))).first()
        if row is None:
            return SagaCaller()
        m = row._mapping
        return SagaCaller(subject=m["principal_subject"], scopes=tuple(sorted(split_scopes(m["principal_scopes"]))),
                          correlation_id=m["correlation_id"], traceparent=m["traceparent"],
                          tracestate=m["tracestate"])


class InMemoryOrderRepository(InMemorySagaLeases, OrderRepository):
    """Keeps orders in dicts, shared across the units of work of one FakeOrderUnitOfWork. Applies the same
    lease and version rules as the SQLAlchemy repository."""

    def __init__(self) -> None:
        super().__init__()
        self.orders: dict[str, Order] = {}

    @staticmethod
    def _copy(order: Order) -> Order:
        return copy.deepcopy(order)

    async def add(self, order: Order, lease: Lease, caller: SagaCaller) -> None:
        if any(o.request_id == order.request_id for o in self.orders.values()):
            raise DuplicateRequestId(order.request_id)
        self.orders[order.id] = self._copy(order)
        self.hold(order.id, lease, caller)

    async def get(self, order_id: str) -> Order | None:
        order = self.orders.get(order_id)
        return None if order is None else self._copy(order)

    async def get_by_request_id(self, request_id: str) -> Order | None:
        return next((self._copy(o) for o in self.orders.values() if o.request_id == request_id), None)

    async def id_by_request_id(self, request_id: str) -> str | None:
        return next((o.id for o in self.orders.values() if o.request_id == request_id), None)

    async def list(self, *, customer_id: str | None, status: OrderStatus | None,
                   after: tuple[dt.datetime, str] | None, limit: int) -> list[Order]:
        ordered = sorted(self.orders.values(), key=lambda o: (o.create_time, o.id), reverse=True)
        chosen = [o for o in ordered if (customer_id is None or o.customer_id == customer_id)
                  and (status is None or o.status is status)
                  and (after is None or (o.create_time, o.id) < after)]
        return [self._copy(o) for o in chosen[:limit]]

    async def save(self, order: Order, lease: Lease, *, release: bool = False) -> None:
        stored = self.orders.get(order.id)
        self.fence(order.id, lease, stored is not None and stored.version == order.version, release=release)
        order.version += 1
        self.orders[order.id] = self._copy(order)

    async def claimable(self, now: dt.datetime, limit: int, after: BacklogKey | None = None) -> list[BacklogKey]:
        free = [(o.update_time, o.id) for o in self.orders.values() if o.status in UNFINISHED and self.free(o.id, now)]
        return [key for key in sorted(free) if after is None or key > after][:limit]
