"""The sandbox payment processor: a real implementation of the processor port with documented test methods.

It behaves like a card processor's test mode, deterministically by payment method:

| payment_method          | outcome                                                                              |
|-------------------------|--------------------------------------------------------------------------------------|
| `pm_sandbox_ok`         | charged                                                                              |
| `pm_sandbox_declined`   | declined with decline_code "card_declined"                                           |
| `pm_sandbox_transient`  | attempt 1 of a charge fails with ProcessorUnavailable; any later attempt is charged  |
| `pm_sandbox_timeout`    | never answers (until the caller gives up); never charged                             |
| anything else           | declined with decline_code "unknown_payment_method"                                  |

Attempts are counted by the payment service in the payment record and passed in, so the transient method behaves
the same in every process. Charges and refunds are kept in the `sandbox_charges` table, written in the sandbox's
own transactions: a charge key is charged at most once and a charge refunded at most once, across retries,
timeouts and restarts, which is what lets the service prove that it never charges twice.
"""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy import insert, select, update
from sqlalchemy.exc import IntegrityError

from tessera_payment.adapters.orm import sandbox_charges
from tessera_payment.adapters.processor import (
    Charged,
    ChargeRequest,
    Declined,
    PaymentProcessor,
    ProcessorUnavailable,
    Refunded,
    RefundRequest,
)
from tessera_runtime.db import Database, utcnow

OK = "pm_sandbox_ok"
DECLINED = "pm_sandbox_declined"
TRANSIENT = "pm_sandbox_transient"
TIMEOUT = "pm_sandbox_timeout"
TEST_METHODS = (OK, DECLINED, TRANSIENT, TIMEOUT)


class SandboxProcessor(PaymentProcessor):
    def __init__(self, db: Database) -> None:
        self.db = db
        # A write or read of one statement needs no transaction around it: on PostgreSQL it runs in autocommit,
        # one round trip instead of three (BEGIN, statement, COMMIT or ROLLBACK). SQLite keeps its transactions:
        # its BEGIN IMMEDIATE is what orders its writers.
        self.single = (db.engine.execution_options(isolation_level="AUTOCOMMIT") if db.dialect == "postgresql"
                       else db.engine)

    async def charge(self, request: ChargeRequest) -> Charged | Declined:
        method = request.payment_method
        if method == OK or (method == TRANSIENT and request.attempt > 1):
            # Charged. The charge key is the table's primary key, so a repeat finds the charge it made instead of
            # charging again, without a look-up first.
            return await self._record_charge(request)
        existing = await self.find_charge(request.charge_key)
        if existing is not None:
            return existing  # idempotent per key: a repeat never charges again
        if method == TIMEOUT:
            await asyncio.Event().wait()  # hangs until the caller's timeout cancels it; nothing is recorded
        if method == TRANSIENT:  # its first attempt
            raise ProcessorUnavailable("The payment processor is temporarily unavailable.")
        if method == DECLINED:
            return Declined("card_declined", "The card was declined.")
        return Declined("unknown_payment_method", "The payment method is not known to the payment processor.")

    async def _record_charge(self, request: ChargeRequest) -> Charged:
        reference = f"sbx_ch_{uuid.uuid4().hex}"
        try:
            async with self.single.begin() as conn:
                await conn.execute(insert(sandbox_charges).values(
                    charge_key=request.charge_key, reference=reference,
                    currency_code=request.amount.currency_code, amount_minor=request.amount.amount_minor,
                    payment_method=request.payment_method, create_time=utcnow()))
        except IntegrityError:
            existing = await self.find_charge(request.charge_key)  # a concurrent charge with the key won
            if existing is None:
                raise
            return existing
        return Charged(reference)

    async def find_charge(self, charge_key: str) -> Charged | None:
        async with self.single.connect() as conn:
            row = (await conn.execute(select(sandbox_charges.c.reference)
                                      .where(sandbox_charges.c.charge_key == charge_key))).first()
        return None if row is None else Charged(row[0])

    async def refund(self, request: RefundRequest) -> Refunded:
        reference = f"sbx_re_{uuid.uuid4().hex}"
        c = sandbox_charges.c
        async with self.db.engine.begin() as conn:
            # Only the first refund of a charge pays out; any later one, whatever its key, gets the same answer.
            await conn.execute(update(sandbox_charges)
                               .where(c.reference == request.charge_reference, c.refund_reference.is_(None))
                               .values(refund_reference=reference, refund_idempotency_key=request.idempotency_key,
                                       refund_time=utcnow()))
            row = (await conn.execute(select(c.refund_reference)
                                      .where(c.reference == request.charge_reference))).first()
        if row is None:
            raise ProcessorUnavailable(f"The payment processor has no charge {request.charge_reference}.")
        return Refunded(row[0])

    async def find_refund(self, charge_reference: str) -> Refunded | None:
        c = sandbox_charges.c
        async with self.single.connect() as conn:
            row = (await conn.execute(select(c.refund_reference).where(c.reference == charge_reference))).first()
        return None if row is None or row[0] is None else Refunded(row[0])
