"""Use cases of the payment service. Handlers raise domain errors; the runtime turns them into statuses.

How a charge never happens twice:
1. The payment is written PENDING, with a lease, in its own transaction before the processor is asked, so a crash
   leaves evidence. The idempotency key is unique: a repeat finds this payment instead of making another.
2. Each attempt is counted in the payment record (committed) before the processor is asked, and the processor is
   asked with the payment id as its idempotency key, so however often a payment is tried, at most one charge
   exists at the processor.
3. The charge runs detached from the RPC: when the caller's deadline passes or its connection drops, the charge
   still completes and is recorded, and the caller's repeat returns the recorded outcome.
4. A PENDING payment whose lease ran out (its call crashed) is resolved by asking the processor what happened: on
   a repeat call (then charged if it never was), or by the recovery loop (never charges, only records).

A refund is made the same way (see RefundPayment below): claimed in the payment record before the processor is
asked, so that one call at a time can pay it out, whatever idempotency key each call brings.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import uuid
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from tessera_payment import DOMAIN, mapping
from tessera_payment.adapters.processor import (
    Charged,
    ChargeRequest,
    Declined,
    PaymentProcessor,
    ProcessorUnavailable,
    Refunded,
    RefundRequest,
)
from tessera_payment.adapters.repository import DuplicateIdempotencyKey, PaymentFilter, PaymentRepository, StalePayment
from tessera_payment.domain import model
from tessera_payment.domain.model import Payment, PaymentStatus
from tessera_payment.service_layer import commands
from tessera_runtime import pagination
from tessera_runtime.context import current_principal, remaining_seconds
from tessera_runtime.db import utcnow
from tessera_runtime.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    DomainError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
    check_uuid,
)
from tessera_runtime.periodic import BacklogKey

log = logging.getLogger("tessera.payment")

AGGREGATE = "payment"
TIMEOUT_MESSAGE = "The payment processor did not answer in time; no money was taken."
INTERRUPTED_MESSAGE = "The charge was interrupted before the payment processor answered; no money was taken."
NO_TIME_MESSAGE = "There was no time left to try the payment processor again; no money was taken."

T = TypeVar("T")


class UnitOfWork(Protocol):
    payments: PaymentRepository

    def reading(self) -> UnitOfWork: ...
    def inserting(self) -> UnitOfWork: ...
    def one_statement(self) -> UnitOfWork: ...
    async def __aenter__(self) -> UnitOfWork: ...
    async def __aexit__(self, *exc: object) -> None: ...
    def add_event(self, aggregate_type: str, aggregate_id: str, message) -> object: ...
    async def commit(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class ChargePolicy:
    """How long and how often the service tries the processor (from PaymentSettings)."""

    timeout_seconds: float = 10.0
    max_attempts: int = 3
    retry_backoff_seconds: float = 0.2
    # How long to wait for the processor to say whether a timed-out charge happened after all.
    lookup_timeout_seconds: float = 1.0
    # Added to a PENDING payment's lease beyond the time its call may take, before others may take it over.
    lease_grace_seconds: float = 5.0

    def budget(self, remaining: float | None) -> float:
        """Seconds the processor may take: the processor timeout, cut short so that the outcome can still be
        recorded and returned before the caller's own deadline."""
        if remaining is None:
            return self.timeout_seconds
        margin = min(1.0, max(0.1, remaining * 0.2))
        return max(0.0, min(self.timeout_seconds, remaining - margin))

    def lease(self, now: dt.datetime, budget: float) -> dt.datetime:
        return now + dt.timedelta(seconds=budget + self.lookup_timeout_seconds + self.lease_grace_seconds)


class InFlight:
    """Runs processor work detached from the RPC that started it, so that a caller who gives up (deadline,
    cancellation) never leaves a charge half recorded. stop() waits for what is still running."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    async def run(self, work: Coroutine[Any, Any, T]) -> T:
        task = asyncio.get_running_loop().create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self._done)
        return await asyncio.shield(task)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved here: the caller may have gone, the outcome is in the database

    async def drain(self, timeout: float) -> None:
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)


@dataclasses.dataclass(frozen=True)
class Processing:
    """What a charge or refund needs besides its unit of work."""

    processor: PaymentProcessor
    policy: ChargePolicy
    inflight: InFlight


# Errors --------------------------------------------------------------------------------------------------------

def _not_found(payment_id: str) -> NotFound:
    return NotFound(f"payment {payment_id} not found", reason="PAYMENT_NOT_FOUND", domain=DOMAIN,
                    metadata={"payment_id": payment_id})


def _declined(p: Payment) -> FailedPrecondition:
    return FailedPrecondition(f"the payment was declined: {p.failure_message}", reason="PAYMENT_DECLINED",
                              domain=DOMAIN, metadata={"payment_id": p.id, "decline_code": p.decline_code})


def _failed(p: Payment) -> Unavailable:
    return Unavailable(f"the payment failed: {p.failure_message}", reason="PAYMENT_FAILED", domain=DOMAIN,
                       metadata={"payment_id": p.id})


def _timed_out(p: Payment) -> DeadlineExceeded:
    return DeadlineExceeded("the payment processor did not answer in time; no money was taken",
                            reason="PROCESSOR_TIMEOUT", domain=DOMAIN, metadata={"payment_id": p.id})


def _in_progress(p: Payment) -> Aborted:
    return Aborted("another call with this idempotency key is still charging the payment; retry shortly",
                   reason="PAYMENT_IN_PROGRESS", domain=DOMAIN, metadata={"payment_id": p.id})


def _voided(p: Payment) -> FailedPrecondition:
    return FailedPrecondition("the payment was voided and is never charged", reason="PAYMENT_VOIDED", domain=DOMAIN,
                              metadata={"payment_id": p.id})


def _not_voidable(p: Payment) -> FailedPrecondition:
    return FailedPrecondition(f"the payment took money and cannot be voided; it is {p.status.value}",
                              reason="PAYMENT_NOT_VOIDABLE", domain=DOMAIN,
                              metadata={"payment_id": p.id, "status": mapping.status_name(p.status)})


def _outcome(p: Payment) -> Payment:
    """What a call learns about a payment another call settled: the payment, or the error its status means."""
    if p.status in (PaymentStatus.SUCCEEDED, PaymentStatus.REFUNDED):
        return p
    if p.status is PaymentStatus.DECLINED:
        raise _declined(p)
    if p.status is PaymentStatus.FAILED:
        raise _failed(p)
    if p.status is PaymentStatus.VOIDED:
        raise _voided(p)
    raise _in_progress(p)


def _may_see(p_customer_id: str | None) -> None:
    """AIP-211: a customer asking about a payment that is not theirs (or does not exist) is refused either way."""
    principal = current_principal()
    if principal is not None and not principal.is_admin and principal.subject != p_customer_id:
        raise PermissionDenied("you may only see your own payments", reason="PERMISSION_DENIED", domain=DOMAIN)


def _hash(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


# ProcessPayment ------------------------------------------------------------------------------------------------

def _checked_request(cmd: commands.ProcessPayment | commands.VoidPayment) -> str:
    """Validates a charge request (ProcessPayment's, or the one VoidPayment voids) and whether the caller may act
    for its customer; returns the request's hash, which the payment made with its idempotency key keeps."""
    v = model.new_violations()
    check_uuid(cmd.order_id, "order_id", v)
    check_uuid(cmd.customer_id, "customer_id", v)
    model.check_amount(cmd.amount, "amount", v)
    model.check_payment_method(cmd.payment_method, "payment_method", v)
    model.check_key(cmd.idempotency_key, "idempotency_key", v)
    v.raise_if_any()
    principal = current_principal()
    # Compared as the payment stores it (and the caller's subject is read): in lower case.
    if principal is not None and not principal.may_act_for(cmd.customer_id.lower()):
        raise PermissionDenied("you may only pay for yourself", reason="PERMISSION_DENIED", domain=DOMAIN,
                               metadata={"customer_id": cmd.customer_id})
    assert cmd.amount is not None
    return _hash(cmd.order_id.lower(), cmd.customer_id.lower(), cmd.amount.currency_code, cmd.amount.amount_minor,
                 cmd.payment_method)


def _key_reused(p: Payment) -> AlreadyExists:
    return AlreadyExists("idempotency_key was already used with a different request", reason="IDEMPOTENCY_KEY_REUSED",
                         domain=DOMAIN, metadata={"payment_id": p.id})


def _new_payment(cmd: commands.ProcessPayment | commands.VoidPayment, status: PaymentStatus, attempts: int,
                 now: dt.datetime, lease: dt.datetime | None = None) -> Payment:
    assert cmd.amount is not None
    return Payment(id=str(uuid.uuid4()), order_id=cmd.order_id.lower(), customer_id=cmd.customer_id.lower(),
                   amount=cmd.amount, payment_method=cmd.payment_method, idempotency_key=cmd.idempotency_key,
                   status=status, attempts=attempts, create_time=now, update_time=now, lease_expire_time=lease)


async def process_payment(cmd: commands.ProcessPayment, uow: UnitOfWork, processing: Processing) -> Payment:
    request_hash = _checked_request(cmd)
    budget = processing.policy.budget(remaining_seconds())
    payment, resumed, counted = await _claim(cmd, request_hash, budget, uow, processing.policy)
    if payment.status is not PaymentStatus.PENDING:
        return payment
    return await processing.inflight.run(_charge(payment, resumed, budget, uow, processing, counted=counted))


async def _claim(cmd: commands.ProcessPayment, request_hash: str, budget: float, uow: UnitOfWork,
                 policy: ChargePolicy) -> tuple[Payment, bool, bool]:
    """The payment this call is to charge, now PENDING and leased to it, with whether a crashed call may have
    charged it already and whether its first attempt is already counted; or a settled payment to return. Raises
    for a settled outcome that is an error.

    The first pass inserts a new payment without reading: the unique idempotency key makes a repeat (or a
    concurrent twin, which waits for the first to commit) fail there, and the next pass reads what the key
    already has. A new payment is stored with its first attempt counted, in the same commit that claims it."""
    assert cmd.amount is not None
    for attempt in range(3):  # the last pass only after losing a race on the same idempotency key
        # The first pass only inserts (on PostgreSQL one statement); a later one reads and may update.
        async with uow.inserting() if attempt == 0 else uow:
            now = utcnow()
            found = None if attempt == 0 else await uow.payments.get_by_key(cmd.idempotency_key)
            if found is None:
                payment = _new_payment(cmd, PaymentStatus.PENDING, 1, now, policy.lease(now, budget))
                try:
                    await uow.payments.add(payment, request_hash)
                    await uow.commit()
                except DuplicateIdempotencyKey:
                    continue  # nothing was written; the next pass reads the key's payment
                return payment, False, True
            payment, stored_hash = found
            if stored_hash != request_hash:
                raise _key_reused(payment)
            if payment.status is not PaymentStatus.FAILED and (
                    payment.status is not PaymentStatus.PENDING or payment.owned_until(now)):
                return _outcome(payment), False, False
            # FAILED: tried again on the same record. PENDING with its lease run out: the call that was charging
            # it is gone, perhaps after the processor charged, which the processor's idempotency sorts out.
            resumed = payment.status is PaymentStatus.PENDING
            expected = payment.version
            payment.take_over(policy.lease(now, budget), now)
            if not await uow.payments.save(payment, expected):
                raise _in_progress(payment)
            await uow.commit()
            return payment, resumed, False
    raise RuntimeError("a payment with this idempotency key exists but cannot be read")


async def _charge(payment: Payment, resumed: bool, budget: float, uow: UnitOfWork,
                  processing: Processing, *, counted: bool = False) -> Payment:
    """Asks the processor, attempt after attempt, each counted (committed) before it is made; `counted`: the
    first one already is."""
    processor, policy = processing.processor, processing.policy
    loop = asyncio.get_running_loop()
    deadline = loop.time() + budget
    if resumed:
        charged = await _find_charge(processor, payment, policy)
        if charged is not None:
            return await _settle(uow, payment, charged)
    last_failure = ""
    for attempt in range(policy.max_attempts):
        if attempt:
            pause = policy.retry_backoff_seconds * 2 ** (attempt - 1)
            if deadline - loop.time() <= pause:
                last_failure = last_failure or NO_TIME_MESSAGE
                break
            await asyncio.sleep(pause)
        if attempt or not counted:
            payment = await _count_attempt(uow, payment)
        request = ChargeRequest(charge_key=payment.id, amount=payment.amount, payment_method=payment.payment_method,
                                attempt=payment.attempts, order_id=payment.order_id, customer_id=payment.customer_id)
        try:
            async with asyncio.timeout(max(0.0, deadline - loop.time())):
                outcome = await processor.charge(request)
        except TimeoutError:
            charged = await _find_charge(processor, payment, policy)
            if charged is not None:  # it answered too late, but it did charge
                return await _settle(uow, payment, charged)
            settled = await _settle(uow, payment, TIMEOUT_MESSAGE, timed_out=True)
            if settled.status is PaymentStatus.FAILED:
                raise _timed_out(settled) from None
            return _outcome(settled)
        except ProcessorUnavailable as exc:
            last_failure = exc.message
            payment.note_failure(exc.message)
            log.warning("payment processor attempt failed", extra={"payment_id": payment.id,
                                                                   "attempt": payment.attempts})
            continue
        if isinstance(outcome, Charged):
            return await _settle(uow, payment, outcome)
        return _outcome(await _settle(uow, payment, outcome))
    return _outcome(await _settle(uow, payment, last_failure))


class _NoAnswer(Exception):
    """The processor could not say, within the lookup timeout, what it did."""


async def _look_up(policy: ChargePolicy, lookup: Coroutine[Any, Any, T]) -> T:
    """The processor's answer to a lookup (find_charge, find_refund), or _NoAnswer when it is unavailable or does not
    answer within `lookup_timeout_seconds`: the outcome is then unknown, and the caller must not settle as if it
    were known."""
    try:
        async with asyncio.timeout(policy.lookup_timeout_seconds):
            return await lookup
    except (TimeoutError, ProcessorUnavailable):
        raise _NoAnswer from None


async def _find_charge(processor: PaymentProcessor, payment: Payment, policy: ChargePolicy) -> Charged | None:
    """Whether the processor charged this payment, when a call that was charging it did not learn the answer."""
    try:
        return await _look_up(policy, processor.find_charge(payment.id))
    except _NoAnswer:
        # The outcome is unknown: the payment stays PENDING and its lease runs out, then the recovery loop (or a
        # repeat call) asks again. Recording FAILED here could hide a charge.
        log.warning("payment processor could not say whether it charged", extra={"payment_id": payment.id})
        raise _timed_out(payment) from None


async def _count_attempt(uow: UnitOfWork, payment: Payment) -> Payment:
    async with uow:
        expected = payment.version
        payment.count_attempt(utcnow())
        if not await uow.payments.save(payment, expected):
            raise _in_progress(payment)  # its lease ran out and another call took it over
        await uow.commit()
    return payment


async def _settle(uow: UnitOfWork, payment: Payment, outcome: Charged | Declined | str, *,
                  timed_out: bool = False) -> Payment:
    """Records the processor's answer and its event and returns the payment; if another call settled the
    payment first, returns (or raises) that call's outcome instead, which stands: the processor's idempotency
    makes both answers about the same single charge."""
    expected = payment.version
    now = utcnow()
    if isinstance(outcome, Charged):
        payment.succeed(outcome.reference, now)
    elif isinstance(outcome, Declined):
        payment.decline(outcome.decline_code, outcome.message, now)
    else:
        payment.fail(outcome, now)
    if not await _save_with_event(uow, payment, expected, _event(payment, timed_out)):
        async with uow.reading():
            current = await uow.payments.get(payment.id)
        assert current is not None
        return _outcome(current)
    return payment


async def _save_with_event(uow: UnitOfWork, payment: Payment, expected: int, event: Any) -> bool:
    """Saves the payment, fenced by its `expected` version, with its event (on PostgreSQL as one statement). False,
    and nothing written, if another call changed the payment first."""
    try:
        async with uow.one_statement():
            if not await uow.payments.save(payment, expected):
                raise StalePayment(payment.id)
            uow.add_event(AGGREGATE, payment.id, event)
            await uow.commit()
    except StalePayment:
        return False
    return True


def _event(p: Payment, timed_out: bool):
    if p.status is PaymentStatus.SUCCEEDED:
        return mapping.payment_succeeded(p)
    if p.status is PaymentStatus.DECLINED:
        return mapping.payment_declined(p)
    return mapping.payment_failed(p, timed_out)


# VoidPayment ---------------------------------------------------------------------------------------------------
#
# How a payment that failed stays uncharged: ProcessPayment tries a FAILED payment again under its key, so a caller
# that paused past its turn (an order saga runner that lost its lease) could still charge for an order already
# failed. VoidPayment makes the key's payment final first. It changes only a FAILED payment (or records a VOIDED one
# where none exists), with a version-fenced save: a charge that takes the payment over first makes it PENDING, and
# the void answers PAYMENT_IN_PROGRESS until that charge settled; a void that comes first leaves the charge nothing
# to take over. The change and its PaymentVoided event are one transaction; a repeated void finds the payment VOIDED
# already and writes nothing.
#
# A PENDING payment whose lease ran out was abandoned by the call that was charging it (it crashed, or lost its
# database, before the processor answered). The void settles it as the recovery loop would, instead of answering
# PAYMENT_IN_PROGRESS until the loop comes round: it takes the payment over (a version-fenced save with a lease of
# its own, so that a repeat of ProcessPayment, the recovery or another void now waits for it), asks the processor
# whether it charged, and records the answer: VOIDED when the processor has no charge (no call can make one any
# more: the charging call's lease covered its processor call, and a repeat would find the payment VOIDED), SUCCEEDED
# (PaymentSucceeded, then PAYMENT_NOT_VOIDABLE, so that the caller refunds it) when it has. When the processor cannot
# say, the payment stays PENDING under the void's lease and the void answers PAYMENT_IN_PROGRESS, to be repeated.

async def void_payment(cmd: commands.VoidPayment, uow: UnitOfWork, processing: Processing) -> Payment:
    """Makes the payment of the key final without a charge (see above); returns it, VOIDED or DECLINED. Raises
    PAYMENT_IN_PROGRESS while it is being charged and PAYMENT_NOT_VOIDABLE once it took money."""
    request_hash = _checked_request(cmd)
    policy = processing.policy
    payment: Payment | None = None
    for attempt in range(3):  # the last pass only after losing a race on the same payment
        abandoned = False
        # The first pass only inserts, as ProcessPayment's does: the unique key refuses it when a payment exists.
        async with uow.inserting() if attempt == 0 else uow:
            now = utcnow()
            found = None if attempt == 0 else await uow.payments.get_by_key(cmd.idempotency_key)
            if found is None:
                payment = _new_payment(cmd, PaymentStatus.VOIDED, 0, now)
                try:
                    await uow.payments.add(payment, request_hash)
                    uow.add_event(AGGREGATE, payment.id, mapping.payment_voided(payment))
                    await uow.commit()
                except DuplicateIdempotencyKey:
                    continue  # nothing was written; the next pass reads the key's payment
                log.info("payment voided before any charge", extra={"payment_id": payment.id})
                return payment
            payment, stored_hash = found
            if stored_hash != request_hash:
                raise _key_reused(payment)
            if payment.status in model.UNCHARGED_FINAL:
                return payment
            if payment.status is PaymentStatus.PENDING:
                if payment.owned_until(now):
                    raise _in_progress(payment)
                expected = payment.version
                payment.take_over(policy.lease(now, 0.0), now)  # abandoned: this call settles it (see above)
                if not await uow.payments.save(payment, expected):
                    continue  # a repeat, the recovery or another void took it over first: read what it is now
                await uow.commit()
                abandoned = True
            elif payment.status is not PaymentStatus.FAILED:
                raise _not_voidable(payment)
            else:
                expected = payment.version
                payment.void(now)
                if not await uow.payments.save(payment, expected):
                    continue  # a charge took it over first: read what it is now
                uow.add_event(AGGREGATE, payment.id, mapping.payment_voided(payment))
                await uow.commit()
                log.info("failed payment voided", extra={"payment_id": payment.id})
                return payment
        if abandoned:
            settled = await processing.inflight.run(_void_abandoned(payment, uow, processing))
            if settled is not None:
                return settled
    assert payment is not None
    raise _in_progress(payment)


async def _void_abandoned(payment: Payment, uow: UnitOfWork, processing: Processing) -> Payment | None:
    """Settles an abandoned PENDING payment this void took over, from the processor's books: VOIDED (returned) if
    it has no charge, SUCCEEDED (PAYMENT_NOT_VOIDABLE raised) if it has. None when another call took the payment over
    meanwhile (this void's lease ran out first), so that the void reads it again."""
    try:
        charged = await _look_up(processing.policy, processing.processor.find_charge(payment.id))
    except _NoAnswer:
        # Unknown: the payment stays PENDING under this call's lease, which runs out; a repeat of the void (or the
        # recovery loop) asks again. Voiding now could hide a charge.
        log.warning("payment processor could not say whether it charged; not voided yet",
                    extra={"payment_id": payment.id})
        raise _in_progress(payment) from None
    expected = payment.version
    now = utcnow()
    if charged is not None:
        payment.succeed(charged.reference, now)
        event = mapping.payment_succeeded(payment)
    else:
        payment.void_interrupted(INTERRUPTED_MESSAGE, now)
        event = mapping.payment_voided(payment)
    if not await _save_with_event(uow, payment, expected, event):
        return None
    if charged is not None:
        log.info("abandoned payment found charged; not voided", extra={"payment_id": payment.id})
        raise _not_voidable(payment)
    log.info("abandoned payment voided", extra={"payment_id": payment.id})
    return payment


# Recovery ------------------------------------------------------------------------------------------------------

async def abandoned_payments(uow: UnitOfWork, after: BacklogKey | None, limit: int) -> list[BacklogKey]:
    """The recovery's backlog: (lease_expire_time, id) of up to `limit` payments whose call is gone (lease run out:
    a PENDING charge, or a SUCCEEDED payment's claimed refund), the longest gone first, from the one after `after`."""
    async with uow.reading():
        return await uow.payments.abandoned(utcnow(), limit, after)


async def recover_abandoned_payment(uow: UnitOfWork, processing: Processing, payment_id: str) -> bool:
    """Settles one row of the recovery's backlog (abandoned_payments), from the processor's books, never charging or
    refunding: a PENDING payment whose call is gone becomes SUCCEEDED if the processor charged it, FAILED (tried
    again on a repeat) if not; a refund claimed by a call that is gone is recorded (REFUNDED) if the processor paid
    it out, else the claim is released and the payment is SUCCEEDED, refundable again by a repeat. True if this call
    settled it; False if it is no longer abandoned, another call settled it first, or the processor could not say
    (it is asked again later)."""
    policy = processing.policy
    async with uow:
        now = utcnow()
        payment = await uow.payments.get(payment_id)
        if payment is None:
            return False
        charge = payment.status is PaymentStatus.PENDING
        expected = payment.version
        if charge and not payment.owned_until(now):
            payment.take_over(policy.lease(now, 0.0), now)
        elif not charge and payment.refund_claimed and not payment.refund_owned_until(now):
            assert payment.refund_key is not None
            payment.claim_refund(payment.refund_key, payment.refund_reason, policy.lease(now, 0.0), now)
        else:
            return False
        if not await uow.payments.save(payment, expected):
            return False
        await uow.commit()
    what = "charged" if charge else "refunded"
    try:
        found = await _look_up(policy, processing.processor.find_charge(payment.id) if charge
                               else processing.processor.find_refund(payment.processor_reference))
    except _NoAnswer:
        log.warning("payment processor could not say whether it %s; will ask again", what,
                    extra={"payment_id": payment.id})
        return False
    try:
        if charge:
            settled = await _settle(uow, payment, found if found is not None else INTERRUPTED_MESSAGE) is payment
        elif found is not None:
            settled = await _record_refund(uow, payment, found) is payment
        else:
            settled = await _release_refund(uow, payment)
    except DomainError:  # a repeat call took the payment over meanwhile; its outcome stands
        settled = False
    if not settled:  # another call's outcome stands, not the one this call found
        log.info("abandoned %s was settled by another call", "payment" if charge else "refund",
                 extra={"payment_id": payment.id})
        return False
    log.info("abandoned %s settled", "payment" if charge else "refund",
             extra={"payment_id": payment.id, "status": payment.status.value})
    return True


# Reads ---------------------------------------------------------------------------------------------------------

async def get_payment(cmd: commands.GetPayment, uow: UnitOfWork) -> Payment:
    v = model.new_violations()
    check_uuid(cmd.payment_id, "id", v)
    v.raise_if_any()
    async with uow.reading():
        payment = await uow.payments.get(cmd.payment_id.lower())
    _may_see(payment.customer_id if payment else None)
    if payment is None:
        raise _not_found(cmd.payment_id)
    return payment


async def list_payments(cmd: commands.ListPayments, uow: UnitOfWork) -> tuple[list[Payment], str]:
    size = pagination.page_size(cmd.page_size, DOMAIN)
    v = model.new_violations()
    check_uuid(cmd.order_id, "order_id", v, required=False)
    check_uuid(cmd.customer_id, "customer_id", v, required=False)
    if cmd.unknown_status is not None:
        v.add("status", f"{cmd.unknown_status} is not a PaymentStatus")
    v.raise_if_any()
    customer_id = cmd.customer_id.lower()
    principal = current_principal()
    if principal is not None and not principal.is_admin:
        if customer_id and customer_id != principal.subject:
            raise PermissionDenied("you may only list your own payments", reason="PERMISSION_DENIED",
                                   domain=DOMAIN)
        customer_id = principal.subject  # a customer's list is always of their own payments
    where = PaymentFilter(order_id=cmd.order_id.lower(), customer_id=customer_id, status=cmd.status)
    filters = {"order_id": where.order_id, "customer_id": where.customer_id,
               "status": where.status.value if where.status else None}
    before = pagination.decode_time_key(cmd.page_token, "ListPayments", filters, DOMAIN)
    async with uow.reading():
        page = await uow.payments.list_before(before, size + 1, where)
    page, token = pagination.next_page(page, size, "ListPayments", filters)
    return page, token


# RefundPayment -------------------------------------------------------------------------------------------------
#
# How a refund never pays out twice, whatever the processor does with a second refund of a charge: the refund is
# claimed in the payment record (its key and a lease, a version-fenced save committed) before the processor is
# asked, the way a charge is claimed PENDING. While a live call holds the claim, every other refund of the payment
# answers ABORTED (REFUND_IN_PROGRESS); a claim whose call is gone (lease run out) is taken over by a repeat call,
# or by the recovery loop, which first asks the processor whether the refund was paid out and records it if so.

def _refund_in_progress(p: Payment) -> Aborted:
    return Aborted("another call is refunding the payment; retry shortly", reason="REFUND_IN_PROGRESS",
                   domain=DOMAIN, metadata={"payment_id": p.id})


def _refund_failed(p: Payment) -> Unavailable:
    return Unavailable("the payment processor could not refund the payment; it stays SUCCEEDED, retry later",
                       reason="REFUND_FAILED", domain=DOMAIN, metadata={"payment_id": p.id})


async def refund_payment(cmd: commands.RefundPayment, uow: UnitOfWork, processing: Processing) -> Payment:
    v = model.new_violations()
    check_uuid(cmd.payment_id, "payment_id", v)
    model.check_key(cmd.idempotency_key, "idempotency_key", v)
    model.check_reason(cmd.reason, "reason", v)
    v.raise_if_any()
    budget = processing.policy.budget(remaining_seconds())
    payment, resumed = await _claim_refund(cmd, budget, uow, processing.policy)
    if payment.status is PaymentStatus.REFUNDED:
        return payment
    return await processing.inflight.run(_refund(payment, resumed, budget, uow, processing))


async def _claim_refund(cmd: commands.RefundPayment, budget: float, uow: UnitOfWork,
                        policy: ChargePolicy) -> tuple[Payment, bool]:
    """The payment this call is to refund, its refund now claimed by this call (committed), with whether a call
    that is gone may have been paid out already; or the REFUNDED payment to return. Raises when the payment is not
    refundable or another live call is refunding it."""
    payment_id = cmd.payment_id.lower()
    for _ in range(3):  # a save that lost a race reads again what the winner did
        async with uow:
            now = utcnow()
            payment = await uow.payments.get(payment_id)
            _may_see(payment.customer_id if payment else None)
            if payment is None:
                raise _not_found(cmd.payment_id)
            if payment.status is PaymentStatus.REFUNDED:
                return payment, False
            if payment.status is not PaymentStatus.SUCCEEDED:
                raise FailedPrecondition(
                    f"only a SUCCEEDED payment can be refunded; this one is {payment.status.value}",
                    reason="PAYMENT_NOT_REFUNDABLE", domain=DOMAIN,
                    metadata={"payment_id": payment.id, "status": mapping.status_name(payment.status)})
            if payment.refund_owned_until(now):
                raise _refund_in_progress(payment)
            resumed = payment.refund_claimed  # its call is gone, perhaps after the processor paid out
            expected = payment.version
            payment.claim_refund(cmd.idempotency_key, cmd.reason, policy.lease(now, budget), now)
            if not await uow.payments.save(payment, expected):
                continue
            await uow.commit()
            return payment, resumed
    raise _refund_in_progress(payment)


async def _refund(payment: Payment, resumed: bool, budget: float, uow: UnitOfWork,
                  processing: Processing) -> Payment:
    """Asks the processor to refund the payment whose refund this call claimed, and records the answer. A claim
    taken over from a call that is gone is first looked up at the processor, which may have paid it out."""
    processor, policy = processing.processor, processing.policy
    if resumed:
        refunded = await _find_refund(processor, payment, policy)
        if refunded is not None:
            return await _record_refund(uow, payment, refunded)
    assert payment.refund_key is not None
    request = RefundRequest(charge_reference=payment.processor_reference, amount=payment.amount,
                            idempotency_key=payment.refund_key)
    try:
        async with asyncio.timeout(budget):
            refunded = await processor.refund(request)
    except TimeoutError:
        found = await _find_refund(processor, payment, policy)
        if found is None:
            await _release_refund(uow, payment)
            raise _refund_failed(payment) from None
        refunded = found  # it answered too late, but it did pay out
    except ProcessorUnavailable:
        log.warning("refund failed at the payment processor", extra={"payment_id": payment.id})
        await _release_refund(uow, payment)
        raise _refund_failed(payment) from None
    return await _record_refund(uow, payment, refunded)


async def _find_refund(processor: PaymentProcessor, payment: Payment, policy: ChargePolicy) -> Refunded | None:
    """Whether the processor refunded this payment, when a call that was refunding it did not learn the answer."""
    try:
        return await _look_up(policy, processor.find_refund(payment.processor_reference))
    except _NoAnswer:
        # The outcome is unknown: the claim stays and its lease runs out, then the recovery loop (or a repeat call)
        # asks again. Releasing it here could let a second refund pay out.
        log.warning("payment processor could not say whether it refunded", extra={"payment_id": payment.id})
        raise _refund_failed(payment) from None


async def _release_refund(uow: UnitOfWork, payment: Payment) -> bool:
    """The claimed refund was not paid out: the claim is given up, so that a repeat may refund. If another call
    took the claim over meanwhile, it is left to that call. True if this call gave it up."""
    async with uow:
        expected = payment.version
        payment.release_refund(utcnow())
        if not await uow.payments.save(payment, expected):
            return False
        await uow.commit()
    return True


async def _record_refund(uow: UnitOfWork, payment: Payment, refunded: Refunded) -> Payment:
    """Records the refund the processor made and its event, and returns the payment; if another call that took the
    claim over recorded it first, returns that call's outcome (which found this same refund at the processor)."""
    expected = payment.version
    payment.refund(payment.refund_reason, refunded.reference, utcnow())
    if not await _save_with_event(uow, payment, expected, mapping.payment_refunded(payment)):
        async with uow.reading():
            current = await uow.payments.get(payment.id)
        assert current is not None
        if current.status is PaymentStatus.REFUNDED:
            return current
        raise _refund_in_progress(current) from None
    return payment
