"""Payment repositories: the SQLAlchemy one used by the service, an in-memory one for unit tests.

Every change is saved with a compare-and-set on the version read, so two calls that race on one payment (a
repeat and the original, or a call and the recovery loop) can never both win.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime as dt
from typing import Any

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from tessera_payment.adapters.orm import payments
from tessera_payment.domain.model import Money, Payment, PaymentStatus
from tessera_runtime.db import insert_row, keyset_page, update_guarded


class StalePayment(Exception):
    """Another change to the payment came first: its stored version is no longer the one the save expected."""


class DuplicateIdempotencyKey(Exception):
    """Another payment with the same idempotency key committed first."""


Key = tuple[dt.datetime, str]


@dataclasses.dataclass(frozen=True)
class PaymentFilter:
    order_id: str = ""
    customer_id: str = ""
    status: PaymentStatus | None = None


class PaymentRepository(abc.ABC):
    @abc.abstractmethod
    async def add(self, payment: Payment, request_hash: str) -> None: ...

    @abc.abstractmethod
    async def get(self, payment_id: str) -> Payment | None: ...

    @abc.abstractmethod
    async def get_by_key(self, idempotency_key: str) -> tuple[Payment, str] | None:
        """The payment made with this idempotency key, with the hash of the request that made it."""

    @abc.abstractmethod
    async def save(self, payment: Payment, expected_version: int) -> bool:
        """Stores the payment if its stored version is still `expected_version`; False when another change won (in
        a one_statement() unit of work on PostgreSQL: True, and its commit raises StalePayment)."""

    @abc.abstractmethod
    async def list_before(self, key: Key | None, limit: int, where: PaymentFilter) -> list[Payment]:
        """Payments newest first, after the one whose (create_time, id) is `key`."""

    @abc.abstractmethod
    async def abandoned(self, now: dt.datetime, limit: int, after: Key | None = None) -> list[Key]:
        """(lease_expire_time, id) of payments whose lease ran out, the longest gone first, from the one after
        `after`: PENDING ones (the call charging them is gone) and SUCCEEDED ones, which have a lease only while a
        refund is claimed (the call refunding them is gone)."""


_MUTABLE = ("status", "decline_code", "failure_message", "refunded_amount_minor", "processor_reference", "attempts",
            "refund_reason", "refund_time", "refund_reference", "refund_key", "lease_expire_time", "update_time",
            "version")


# A save: the version-fenced UPDATE, built once; on PostgreSQL it is the guard of tessera_runtime.db.update_guarded.
_UPDATE = (update(payments).where(payments.c.id == bindparam("b_id"), payments.c.version == bindparam("b_expected"))
           .values(**{name: bindparam(f"p_{name}", type_=payments.c[name].type) for name in _MUTABLE}))
_SAVE = _UPDATE.returning(payments.c.id).cte("saved")


def _row(p: Payment) -> dict[str, Any]:
    return {
        "id": p.id, "order_id": p.order_id, "customer_id": p.customer_id,
        "currency_code": p.amount.currency_code, "amount_minor": p.amount.amount_minor,
        "payment_method": p.payment_method, "idempotency_key": p.idempotency_key, "create_time": p.create_time,
        **{name: getattr(p, name) for name in _MUTABLE}, "status": p.status.value,
    }


def _payment(row: Any) -> Payment:
    m = row._mapping
    return Payment(
        id=m["id"], order_id=m["order_id"], customer_id=m["customer_id"],
        amount=Money(m["currency_code"], m["amount_minor"]), payment_method=m["payment_method"],
        idempotency_key=m["idempotency_key"], create_time=m["create_time"],
        **{name: m[name] for name in _MUTABLE if name != "status"}, status=PaymentStatus(m["status"]),
    )


class SqlAlchemyPaymentRepository(PaymentRepository):
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def add(self, payment: Payment, request_hash: str) -> None:
        """A duplicate idempotency key fails the transaction, which the caller then abandons: no savepoint. In an
        inserting() unit of work the row is written, and the duplicate raised, at commit."""
        def clash(exc: IntegrityError) -> Exception | None:
            if "idempotency_key" in str(exc.orig).lower():
                return DuplicateIdempotencyKey(payment.idempotency_key)
            return None

        await insert_row(self.session, payments, {**_row(payment), "request_hash": request_hash}, clash)

    async def get(self, payment_id: str) -> Payment | None:
        row = (await self.session.execute(select(payments).where(payments.c.id == payment_id))).first()
        return None if row is None else _payment(row)

    async def get_by_key(self, idempotency_key: str) -> tuple[Payment, str] | None:
        row = (await self.session.execute(
            select(payments).where(payments.c.idempotency_key == idempotency_key))).first()
        return None if row is None else (_payment(row), row._mapping["request_hash"])

    async def save(self, payment: Payment, expected_version: int) -> bool:
        """See PaymentRepository.save. In a one_statement() unit of work on PostgreSQL it returns True and its
        commit raises StalePayment instead (the save and the payment's events are then one statement, the events
        written only if the version matched)."""
        values = {name: value for name, value in _row(payment).items() if name in _MUTABLE}
        params = {"b_id": payment.id, "b_expected": expected_version, **{f"p_{k}": v for k, v in values.items()}}
        try:
            if await update_guarded(self.session, _SAVE, params, lambda: StalePayment(payment.id)):
                return True
        except StalePayment:
            return False
        return (await self.session.execute(_UPDATE, params)).rowcount == 1

    async def list_before(self, key: Key | None, limit: int, where: PaymentFilter) -> list[Payment]:
        c = payments.c
        query = select(payments)
        if where.order_id:
            query = query.where(c.order_id == where.order_id)
        if where.customer_id:
            query = query.where(c.customer_id == where.customer_id)
        if where.status is not None:
            query = query.where(c.status == where.status.value)
        query = keyset_page(query, payments, key, limit, newest_first=True)
        return [_payment(r) for r in (await self.session.execute(query)).all()]

    async def abandoned(self, now: dt.datetime, limit: int, after: Key | None = None) -> list[Key]:
        c = payments.c
        rows = (await self.session.execute(keyset_page(
            select(c.lease_expire_time, c.id).where(
                c.status.in_((PaymentStatus.PENDING.value, PaymentStatus.SUCCEEDED.value)),
                c.lease_expire_time <= now),
            payments, after, limit, time_column="lease_expire_time"))).all()
        return [(r[0], r[1]) for r in rows]


class InMemoryPaymentRepository(PaymentRepository):
    """Keeps payments in a dict; shared across units of work of one FakePaymentUnitOfWork."""

    def __init__(self) -> None:
        self.payments: dict[str, Payment] = {}
        self.hashes: dict[str, str] = {}

    async def add(self, payment: Payment, request_hash: str) -> None:
        if any(p.idempotency_key == payment.idempotency_key for p in self.payments.values()):
            raise DuplicateIdempotencyKey(payment.idempotency_key)
        self.payments[payment.id] = dataclasses.replace(payment)
        self.hashes[payment.id] = request_hash

    async def get(self, payment_id: str) -> Payment | None:
        p = self.payments.get(payment_id)
        return None if p is None else dataclasses.replace(p)

    async def get_by_key(self, idempotency_key: str) -> tuple[Payment, str] | None:
        for p in self.payments.values():
            if p.idempotency_key == idempotency_key:
                return dataclasses.replace(p), self.hashes[p.id]
        return None

    async def save(self, payment: Payment, expected_version: int) -> bool:
        stored = self.payments.get(payment.id)
        if stored is None or stored.version != expected_version:
            return False
        self.payments[payment.id] = dataclasses.replace(payment)
        return True

    async def list_before(self, key: Key | None, limit: int, where: PaymentFilter) -> list[Payment]:
        ordered = sorted(self.payments.values(), key=lambda p: (p.create_time, p.id), reverse=True)
        selected = [p for p in ordered
                    if (not where.order_id or p.order_id == where.order_id)
                    and (not where.customer_id or p.customer_id == where.customer_id)
                    and (where.status is None or p.status is where.status)
                    and (key is None or (p.create_time, p.id) < key)]
        return [dataclasses.replace(p) for p in selected[:limit]]

    async def abandoned(self, now: dt.datetime, limit: int, after: Key | None = None) -> list[Key]:
        due = sorted((p.lease_expire_time, p.id) for p in self.payments.values()
                     if p.status in (PaymentStatus.PENDING, PaymentStatus.SUCCEEDED)
                     and p.lease_expire_time is not None and p.lease_expire_time <= now)
        return [key for key in due if after is None or key > after][:limit]
