"""Order repositories: the SQLAlchemy one used by the service, an in-memory one for unit tests.

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

from sqlalchemy import bindparam, insert, or_, select, update
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
from tessera_runtime.db import keyset_page


class DuplicateRequestId(Exception):
    """Another order with the same request_id was stored first."""


class LeaseLost(Exception):
    """The saga's lease is held by another runner, or the order changed under the caller: stop running it."""


@dataclasses.dataclass(frozen=True)
class Lease:
    owner: str
    expires_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class SagaCaller:
    """Identity and correlation id of the call that started a saga, used again when the saga is resumed."""

    subject: str | None = None
    scopes: tuple[str, ...] = ()
    correlation_id: str | None = None


class OrderRepository(abc.ABC):
    @abc.abstractmethod
    async def add(self, order: Order, lease: Lease, caller: SagaCaller) -> None:
        """Stores a new order with its saga, leased to lease.owner. Raises DuplicateRequestId."""

    @abc.abstractmethod
    async def get(self, order_id: str) -> Order | None: ...

    @abc.abstractmethod
    async def get_by_request_id(self, request_id: str) -> Order | None: ...

    @abc.abstractmethod
    async def list(self, *, customer_id: str | None, status: OrderStatus | None,
                   after: tuple[dt.datetime, str] | None, limit: int) -> list[Order]:
        """Orders newest first (create_time, id descending), strictly after the key `after`."""

    @abc.abstractmethod
    async def save(self, order: Order, lease: Lease) -> None:
        """Writes the order and its saga if lease.owner still holds the lease and the order's version is the
        one read; extends the lease to lease.expires_at. Raises LeaseLost otherwise."""

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
    async def claimable(self, now: dt.datetime, limit: int) -> list[str]:
        """Ids of unfinished sagas whose lease is free or expired, least recently changed first."""

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


def _step_rows(order: Order) -> list[dict[str, Any]]:
    return [{
        "b_order_id": order.id, "b_step": s.name.value, "position": i, "status": s.status.value,
        "attempts": s.attempts, "compensation_attempts": s.compensation_attempts, "error": s.error,
        "outcome_unknown": s.outcome_unknown, "update_time": s.update_time or order.update_time,
    } for i, s in enumerate(order.steps[name] for name in STEPS)]


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


class SqlAlchemyOrderRepository(OrderRepository):
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, order: Order, lease: Lease, caller: SagaCaller) -> None:
        try:
            async with self.session.begin_nested():
                await self.session.execute(insert(orders).values(id=order.id, version=order.version,
                                                                 **_order_row(order)))
        except IntegrityError as exc:
            if "request_id" in str(exc.orig).lower():
                raise DuplicateRequestId(order.request_id) from None
            raise
        await self.session.execute(insert(order_items), [{
            "order_id": order.id, "position": i, "product_id": it.product_id, "product_name": it.product_name,
            "sku": it.sku, "quantity": it.quantity, "unit_price_minor": it.unit_price_minor,
        } for i, it in enumerate(order.items)])
        await self.session.execute(insert(order_sagas).values(
            order_id=order.id, current_step=order.current_step.value, lease_owner=lease.owner,
            lease_expires_at=lease.expires_at, principal_subject=caller.subject,
            principal_scopes=" ".join(caller.scopes), correlation_id=caller.correlation_id))
        await self.session.execute(insert(order_saga_steps), [
            {k.removeprefix("b_"): v for k, v in row.items()} for row in _step_rows(order)])

    async def _load(self, rows: list[Any]) -> list[Order]:
        if not rows:
            return []
        ids = [r._mapping["id"] for r in rows]
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
        current = {order_id: step for order_id, step in (await self.session.execute(
            select(order_sagas.c.order_id, order_sagas.c.current_step)
            .where(order_sagas.c.order_id.in_(ids)))).all()}
        return [_order(r, items[r._mapping["id"]], {n: steps[r._mapping["id"]][n] for n in STEPS},
                       current[r._mapping["id"]]) for r in rows]

    async def get(self, order_id: str) -> Order | None:
        rows = (await self.session.execute(select(orders).where(orders.c.id == order_id))).all()
        loaded = await self._load(list(rows))
        return loaded[0] if loaded else None

    async def get_by_request_id(self, request_id: str) -> Order | None:
        rows = (await self.session.execute(select(orders).where(orders.c.request_id == request_id))).all()
        loaded = await self._load(list(rows))
        return loaded[0] if loaded else None

    async def list(self, *, customer_id: str | None, status: OrderStatus | None,
                   after: tuple[dt.datetime, str] | None, limit: int) -> list[Order]:
        query = select(orders)
        if customer_id is not None:
            query = query.where(orders.c.customer_id == customer_id)
        if status is not None:
            query = query.where(orders.c.status == status.value)
        query = keyset_page(query, orders, after, limit, newest_first=True)
        return await self._load(list((await self.session.execute(query)).all()))

    async def save(self, order: Order, lease: Lease) -> None:
        held = await self.session.execute(
            update(order_sagas)
            .where(order_sagas.c.order_id == order.id, order_sagas.c.lease_owner == lease.owner)
            .values(current_step=order.current_step.value, lease_expires_at=lease.expires_at))
        if held.rowcount != 1:
            raise LeaseLost(order.id)
        changed = await self.session.execute(
            update(orders).where(orders.c.id == order.id, orders.c.version == order.version)
            .values(version=order.version + 1, **_order_row(order)))
        if changed.rowcount != 1:
            raise LeaseLost(order.id)
        await self.session.execute(_STEP_UPDATE, _step_rows(order))
        order.version += 1

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

    async def claimable(self, now: dt.datetime, limit: int) -> list[str]:
        query = (
            select(orders.c.id)
            .join(order_sagas, order_sagas.c.order_id == orders.c.id)
            .where(orders.c.status.in_([s.value for s in UNFINISHED]),
                   or_(order_sagas.c.lease_owner.is_(None), order_sagas.c.lease_expires_at < now))
            .order_by(orders.c.update_time, orders.c.id)
            .limit(limit)
        )
        return list((await self.session.execute(query)).scalars().all())

    async def caller(self, order_id: str) -> SagaCaller:
        row = (await self.session.execute(select(order_sagas).where(order_sagas.c.order_id == order_id))).first()
        if row is None:
            return SagaCaller()
        m = row._mapping
        return SagaCaller(subject=m["principal_subject"], scopes=tuple(m["principal_scopes"].split()),
                          correlation_id=m["correlation_id"])


@dataclasses.dataclass
class _SagaRow:
    lease_owner: str | None
    lease_expires_at: dt.datetime | None
    caller: SagaCaller


class InMemoryOrderRepository(OrderRepository):
    """Keeps orders in dicts, shared across the units of work of one FakeOrderUnitOfWork. Applies the same
    lease and version rules as the SQLAlchemy repository."""

    def __init__(self) -> None:
        self.orders: dict[str, Order] = {}
        self.sagas: dict[str, _SagaRow] = {}

    @staticmethod
    def _copy(order: Order) -> Order:
        return copy.deepcopy(order)

    async def add(self, order: Order, lease: Lease, caller: SagaCaller) -> None:
        if any(o.request_id == order.request_id for o in self.orders.values()):
            raise DuplicateRequestId(order.request_id)
        self.orders[order.id] = self._copy(order)
        self.sagas[order.id] = _SagaRow(lease.owner, lease.expires_at, caller)

    async def get(self, order_id: str) -> Order | None:
        order = self.orders.get(order_id)
        return None if order is None else self._copy(order)

    async def get_by_request_id(self, request_id: str) -> Order | None:
        return next((self._copy(o) for o in self.orders.values() if o.request_id == request_id), None)

    async def list(self, *, customer_id: str | None, status: OrderStatus | None,
                   after: tuple[dt.datetime, str] | None, limit: int) -> list[Order]:
        ordered = sorted(self.orders.values(), key=lambda o: (o.create_time, o.id), reverse=True)
        chosen = [o for o in ordered if (customer_id is None or o.customer_id == customer_id)
                  and (status is None or o.status is status)
                  and (after is None or (o.create_time, o.id) < after)]
        return [self._copy(o) for o in chosen[:limit]]

    async def save(self, order: Order, lease: Lease) -> None:
        saga = self.sagas.get(order.id)
        stored = self.orders.get(order.id)
        if saga is None or stored is None or saga.lease_owner != lease.owner or stored.version != order.version:
            raise LeaseLost(order.id)
        saga.lease_expires_at = lease.expires_at
        order.version += 1
        self.orders[order.id] = self._copy(order)

    async def acquire_lease(self, order_id: str, lease: Lease, now: dt.datetime) -> bool:
        saga = self.sagas.get(order_id)
        if saga is None:
            return False
        if saga.lease_owner not in (None, lease.owner) and saga.lease_expires_at is not None \
                and saga.lease_expires_at >= now:
            return False
        saga.lease_owner, saga.lease_expires_at = lease.owner, lease.expires_at
        return True

    async def renew_lease(self, order_id: str, lease: Lease) -> bool:
        saga = self.sagas.get(order_id)
        if saga is None or saga.lease_owner != lease.owner:
            return False
        saga.lease_expires_at = lease.expires_at
        return True

    async def release_lease(self, order_id: str, owner: str) -> None:
        saga = self.sagas.get(order_id)
        if saga is not None and saga.lease_owner == owner:
            saga.lease_owner = saga.lease_expires_at = None

    async def release_leases(self, owner: str) -> int:
        released = [s for s in self.sagas.values() if s.lease_owner == owner]
        for saga in released:
            saga.lease_owner = saga.lease_expires_at = None
        return len(released)

    async def claimable(self, now: dt.datetime, limit: int) -> list[str]:
        free = [o for o in self.orders.values() if o.status in UNFINISHED and (
            self.sagas[o.id].lease_owner is None or (self.sagas[o.id].lease_expires_at or now) < now)]
        return [o.id for o in sorted(free, key=lambda o: (o.update_time, o.id))[:limit]]

    async def caller(self, order_id: str) -> SagaCaller:
        saga = self.sagas.get(order_id)
        return SagaCaller() if saga is None else saga.caller
