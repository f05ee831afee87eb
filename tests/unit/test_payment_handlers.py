"""Payment use cases through the service layer, with the in-memory unit of work and a scripted processor."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import logging
import uuid

import pytest
from tessera.payment.v1 import payment_events_pb2 as events_pb2

from tessera_payment.adapters.processor import (
    Charged,
    ChargeRequest,
    Declined,
    PaymentProcessor,
    ProcessorUnavailable,
    Refunded,
    RefundRequest,
)
from tessera_payment.domain.model import Money, PaymentStatus
from tessera_payment.service_layer import commands, handlers
from tessera_payment.service_layer.unit_of_work import FakePaymentUnitOfWork
from tessera_runtime import context as callctx
from tessera_runtime.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unavailable,
)

CUSTOMER = str(uuid.uuid4())


class ScriptedProcessor(PaymentProcessor):
    """Answers each charge attempt with the next scripted step: "ok", "declined", "unavailable", "hang" (never
    answers), or "late" (charges, then never answers). Charges at most once per key, like a real processor."""

    def __init__(self, *steps: str, refund_fails: int = 0) -> None:
        self.steps = list(steps)
        self.charges: dict[str, str] = {}
        self.charge_calls: list[ChargeRequest] = []
        self.refunds: dict[str, str] = {}
        self.refund_calls = 0
        self.refund_fails = refund_fails
        self.release = asyncio.Event()
        self.called = asyncio.Event()

    async def charge(self, request: ChargeRequest) -> Charged | Declined:
        self.charge_calls.append(request)
        self.called.set()
        if request.charge_key in self.charges:
            return Charged(self.charges[request.charge_key])
        step = self.steps.pop(0) if self.steps else "ok"
        if step == "hang":
            await asyncio.Event().wait()
        if step == "unavailable":
            raise ProcessorUnavailable("processor hiccup")
        if step == "declined":
            return Declined("insufficient_funds", "Not enough money.")
        if step == "wait":
            await self.release.wait()
        self.charges[request.charge_key] = f"ch_{len(self.charges) + 1}"
        if step == "late":
            await asyncio.Event().wait()
        return Charged(self.charges[request.charge_key])

    async def find_charge(self, charge_key: str) -> Charged | None:
        ref = self.charges.get(charge_key)
        return None if ref is None else Charged(ref)

    async def refund(self, request: RefundRequest) -> Refunded:
        self.refund_calls += 1
        if self.refund_fails:
            self.refund_fails -= 1
            raise ProcessorUnavailable("refunds are down")
        return Refunded(self.refunds.setdefault(request.charge_reference, f"re_{len(self.refunds) + 1}"))

    async def find_refund(self, charge_reference: str) -> Refunded | None:
        reference = self.refunds.get(charge_reference)
        return None if reference is None else Refunded(reference)


def processing(processor: PaymentProcessor, **policy) -> handlers.Processing:
    policy = {"timeout_seconds": 0.3, "retry_backoff_seconds": 0.0, "lookup_timeout_seconds": 0.2, **policy}
    return handlers.Processing(processor=processor, policy=handlers.ChargePolicy(**policy),
                               inflight=handlers.InFlight())


def pay(key: str = "key-1", method: str = "card", **kw) -> commands.ProcessPayment:
    return commands.ProcessPayment(order_id=kw.pop("order_id", "6f1d1b9f-1e2a-4d1a-9a59-0b6f7d2c3c1e"),
                                   customer_id=kw.pop("customer_id", CUSTOMER),
                                   amount=kw.pop("amount", Money("EUR", 4200)), payment_method=method,
                                   idempotency_key=key)


def fields(err: InvalidArgument) -> list[str]:
    return [v.field for v in err.violations]


def kinds(uow: FakePaymentUnitOfWork) -> list[str]:
    return [type(e[2]).__name__ for e in uow.published]


def only_payment(uow: FakePaymentUnitOfWork):
    (payment,) = uow.payments.payments.values()
    return payment


def abandon(uow: FakePaymentUnitOfWork, payment_id: str) -> None:
    """Leaves the payment as a crashed call would: PENDING with its lease run out."""
    p = uow.payments.payments[payment_id]
    uow.payments.payments[payment_id] = dataclasses.replace(
        p, status=PaymentStatus.PENDING, lease_expire_time=dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1))


class as_principal:
    def __init__(self, subject: str, *scopes: str) -> None:
        self.principal = callctx.Principal(subject, frozenset(scopes))

    def __enter__(self) -> None:
        self.token = callctx.principal_var.set(self.principal)

    def __exit__(self, *exc: object) -> None:
        callctx.principal_var.reset(self.token)


# ProcessPayment ------------------------------------------------------------------------------------------------

BAD_PAYMENTS = [
    (pay(order_id=""), "order_id"),
    (pay(order_id="order-1"), "order_id"),
    (pay(customer_id="0b6f7d2c"), "customer_id"),
    (pay(amount=None), "amount"),
    (pay(amount=Money("", 100)), "amount.currency_code"),
    (pay(amount=Money("eur", 100)), "amount.currency_code"),
    (pay(amount=Money("XXX", 100)), "amount.currency_code"),
    (pay(amount=Money("EUR", 0)), "amount.amount_minor"),
    (pay(amount=Money("EUR", -5)), "amount.amount_minor"),
    (pay(amount=Money("EUR", 1_000_000_000_000_001)), "amount.amount_minor"),
    (pay(amount=Money("EUR", 1_000_000_000_000_000_001)), "amount.amount_minor"),
    (pay(method=""), "payment_method"),
    (pay(method="m" * 256), "payment_method"),
    (pay(key=""), "idempotency_key"),
    (pay(key="k" * 65), "idempotency_key"),
]


@pytest.mark.parametrize(("cmd", "field"), BAD_PAYMENTS, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD_PAYMENTS)])
async def test_invalid_payment_field_is_named_and_nothing_is_charged(cmd, field):
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor()
    with pytest.raises(InvalidArgument) as err:
        await handlers.process_payment(cmd, uow, processing(processor))
    assert fields(err.value) == [field]
    assert not uow.payments.payments and not processor.charge_calls


async def test_success_is_recorded_and_a_repeat_returns_it_without_charging():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("ok")
    p = await handlers.process_payment(pay(), uow, processing(processor))
    assert (p.status, p.attempts, p.processor_reference, p.failure_message) == (PaymentStatus.SUCCEEDED, 1,
                                                                               "ch_1", "")
    again = await handlers.process_payment(pay(), uow, processing(processor))
    assert again == p and len(processor.charge_calls) == 1
    assert kinds(uow) == ["PaymentSucceeded"]
    with pytest.raises(AlreadyExists) as reused:
        await handlers.process_payment(pay(amount=Money("EUR", 4201)), uow, processing(processor))
    assert (reused.value.reason, reused.value.metadata) == ("IDEMPOTENCY_KEY_REUSED", {"payment_id": p.id})


async def test_a_new_payment_is_claimed_with_its_first_attempt_counted_before_the_processor_is_asked():
    uow = FakePaymentUnitOfWork()
    seen: list[tuple[PaymentStatus, int]] = []

    class Watching(ScriptedProcessor):
        async def charge(self, request):
            [stored] = uow.payments.payments.values()
            seen.append((stored.status, stored.attempts))
            return await super().charge(request)

    p = await handlers.process_payment(pay(), uow, processing(Watching("ok")))
    assert seen == [(PaymentStatus.PENDING, 1)]
    assert uow.commits == 2, "one commit claims the payment and counts the attempt, one records the outcome"
    assert (p.status, p.attempts) == (PaymentStatus.SUCCEEDED, 1)


async def test_decline_is_final_and_repeats_give_the_same_decline():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("declined", "ok")
    for _ in range(2):
        with pytest.raises(FailedPrecondition) as err:
            await handlers.process_payment(pay(), uow, processing(processor))
        assert err.value.reason == "PAYMENT_DECLINED"
        assert err.value.metadata == {"payment_id": only_payment(uow).id, "decline_code": "insufficient_funds"}
    p = only_payment(uow)
    assert (p.status, p.decline_code, p.attempts) == (PaymentStatus.DECLINED, "insufficient_funds", 1)
    assert len(processor.charge_calls) == 1 and kinds(uow) == ["PaymentDeclined"]


async def test_transient_failure_is_retried_within_the_call():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("unavailable", "ok")
    p = await handlers.process_payment(pay(), uow, processing(processor))
    assert (p.status, p.attempts, p.failure_message) == (PaymentStatus.SUCCEEDED, 2, "processor hiccup")
    assert [c.attempt for c in processor.charge_calls] == [1, 2]
    assert {c.charge_key for c in processor.charge_calls} == {p.id}


async def test_processor_that_keeps_failing_leaves_a_failed_payment_that_a_repeat_retries():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("unavailable", "unavailable", "ok")
    with pytest.raises(Unavailable) as err:
        await handlers.process_payment(pay(), uow, processing(processor, max_attempts=2))
    p = only_payment(uow)
    assert (err.value.reason, err.value.metadata) == ("PAYMENT_FAILED", {"payment_id": p.id})
    assert (p.status, p.attempts) == (PaymentStatus.FAILED, 2)
    failed = uow.published[-1][2]
    assert isinstance(failed, events_pb2.PaymentFailed) and (failed.timed_out, failed.attempts) == (False, 2)
    retried = await handlers.process_payment(pay(), uow, processing(processor, max_attempts=2))
    assert (retried.id, retried.status, retried.attempts) == (p.id, PaymentStatus.SUCCEEDED, 3)
    assert kinds(uow) == ["PaymentFailed", "PaymentSucceeded"]


async def test_processor_timeout_records_failed_and_charges_nothing():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("hang")
    with pytest.raises(DeadlineExceeded) as err:
        await handlers.process_payment(pay(), uow, processing(processor))
    p = only_payment(uow)
    assert (err.value.reason, err.value.metadata) == ("PROCESSOR_TIMEOUT", {"payment_id": p.id})
    assert p.status is PaymentStatus.FAILED and not processor.charges
    assert uow.published[-1][2].timed_out


async def test_a_charge_that_answers_too_late_is_found_and_recorded_as_succeeded():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("late")
    p = await handlers.process_payment(pay(), uow, processing(processor))
    assert (p.status, p.processor_reference) == (PaymentStatus.SUCCEEDED, "ch_1")


def test_processor_budget_leaves_room_before_the_callers_deadline():
    policy = handlers.ChargePolicy(timeout_seconds=10.0)
    assert policy.budget(None) == 10.0
    assert policy.budget(60.0) == 10.0
    assert 0 < policy.budget(2.0) < 2.0
    assert policy.budget(0.05) == 0.0


async def test_a_caller_that_gives_up_does_not_stop_the_charge_from_being_recorded():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("wait")
    work = processing(processor, timeout_seconds=5.0)
    call = asyncio.create_task(handlers.process_payment(pay(), uow, work))
    await asyncio.wait_for(processor.called.wait(), 10)
    call.cancel()  # what a deadline or a dropped connection does to the RPC
    with pytest.raises(asyncio.CancelledError):
        await call
    processor.release.set()
    await work.inflight.drain(5.0)
    assert only_payment(uow).status is PaymentStatus.SUCCEEDED
    again = await handlers.process_payment(pay(), uow, work)
    assert again.status is PaymentStatus.SUCCEEDED and len(processor.charges) == 1


async def test_repeat_while_the_first_call_is_charging_is_aborted():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("wait")
    work = processing(processor, timeout_seconds=5.0)
    first = asyncio.create_task(handlers.process_payment(pay(), uow, work))
    await asyncio.wait_for(processor.called.wait(), 10)
    with pytest.raises(Aborted) as err:
        await handlers.process_payment(pay(), uow, work)
    assert (err.value.reason, err.value.metadata) == ("PAYMENT_IN_PROGRESS", {"payment_id": only_payment(uow).id})
    processor.release.set()
    assert (await first).status is PaymentStatus.SUCCEEDED


async def test_repeat_resolves_a_payment_abandoned_after_the_processor_charged():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("ok")
    p = await handlers.process_payment(pay(), uow, processing(processor))
    abandon(uow, p.id)  # the crash came between the processor's answer and the write of SUCCEEDED
    again = await handlers.process_payment(pay(), uow, processing(processor))
    assert (again.status, again.processor_reference, again.attempts) == (PaymentStatus.SUCCEEDED, "ch_1", 1)
    assert len(processor.charge_calls) == 1, "the processor was asked to charge again"


async def test_repeat_charges_a_payment_abandoned_before_the_processor_answered():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("hang", "ok")
    with pytest.raises(DeadlineExceeded):
        await handlers.process_payment(pay(), uow, processing(processor))
    p = only_payment(uow)
    abandon(uow, p.id)
    again = await handlers.process_payment(pay(), uow, processing(processor))
    assert (again.status, again.attempts) == (PaymentStatus.SUCCEEDED, 2)
    assert len(processor.charges) == 1


async def test_recovery_settles_abandoned_payments_from_the_processors_books_without_charging():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("ok", "hang")
    charged = await handlers.process_payment(pay("k1"), uow, processing(processor))
    with pytest.raises(DeadlineExceeded):
        await handlers.process_payment(pay("k2"), uow, processing(processor))
    never = next(p for p in uow.payments.payments.values() if p.id != charged.id)
    live = await handlers.process_payment(pay("k3"), uow, processing(processor))
    abandon(uow, charged.id)
    abandon(uow, never.id)
    uow.payments.payments[live.id] = dataclasses.replace(
        uow.payments.payments[live.id], status=PaymentStatus.PENDING,
        lease_expire_time=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=1))
    calls = len(processor.charge_calls)
    keys = await handlers.abandoned_payments(uow, None, 100)
    assert {key[1] for key in keys} == {charged.id, never.id}
    assert [await handlers.recover_abandoned_payment(uow, processing(processor), key[1]) for key in keys] == [True] * 2
    assert await handlers.recover_abandoned_payment(uow, processing(processor), live.id) is False
    assert uow.payments.payments[charged.id].status is PaymentStatus.SUCCEEDED
    assert uow.payments.payments[never.id].status is PaymentStatus.FAILED
    assert uow.payments.payments[never.id].failure_message == handlers.INTERRUPTED_MESSAGE
    assert uow.payments.payments[live.id].status is PaymentStatus.PENDING, "a payment still owned was taken over"
    assert len(processor.charge_calls) == calls


class SettledMeanwhile(ScriptedProcessor):
    """While the recovery asks whether it charged, another call (a repeat that took the payment over once the
    recovery's lease ran out) settles the payment."""

    def __init__(self, uow: FakePaymentUnitOfWork) -> None:
        super().__init__("ok")
        self.uow = uow

    async def find_charge(self, charge_key: str) -> Charged | None:
        stored = self.uow.payments.payments[charge_key]
        self.settled = self.uow.payments.payments[charge_key] = dataclasses.replace(
            stored, status=PaymentStatus.SUCCEEDED, processor_reference=self.charges[charge_key],
            lease_expire_time=None, version=stored.version + 1)
        return await super().find_charge(charge_key)


async def test_a_recovery_another_call_beat_to_the_payment_says_so_and_not_that_it_settled_it(caplog):
    uow = FakePaymentUnitOfWork()
    processor = SettledMeanwhile(uow)
    p = await handlers.process_payment(pay(), uow, processing(processor))
    abandon(uow, p.id)
    caplog.set_level(logging.INFO, logger="tessera.payment")
    recovered = await handlers.recover_abandoned_payment(uow, processing(processor), p.id)
    about = [r.getMessage() for r in caplog.records if getattr(r, "payment_id", None) == p.id]
    assert about == ["abandoned payment was settled by another call"]
    assert recovered is False
    assert uow.payments.payments[p.id] is processor.settled, "the other call's outcome was overwritten"


async def test_customer_may_only_pay_and_see_their_own():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor()
    other = str(uuid.uuid4())
    with as_principal(CUSTOMER, "order:write"):
        with pytest.raises(PermissionDenied):
            await handlers.process_payment(pay(customer_id=other), uow, processing(processor))
        mine = await handlers.process_payment(pay("k-mine"), uow, processing(processor))
    theirs = await handlers.process_payment(pay("k-theirs", customer_id=other), uow, processing(processor))
    with as_principal(CUSTOMER):
        assert (await handlers.get_payment(commands.GetPayment(mine.id), uow)).id == mine.id
        with pytest.raises(PermissionDenied):
            await handlers.get_payment(commands.GetPayment(theirs.id), uow)
        with pytest.raises(PermissionDenied):  # AIP-211: unknown and not-yours look the same
            await handlers.get_payment(commands.GetPayment(str(uuid.uuid4())), uow)
        listed, _ = await handlers.list_payments(commands.ListPayments(0, ""), uow)
        assert [p.id for p in listed] == [mine.id]
        with pytest.raises(PermissionDenied):
            await handlers.list_payments(commands.ListPayments(0, "", customer_id=other), uow)
        with pytest.raises(PermissionDenied):
            await handlers.refund_payment(commands.RefundPayment(theirs.id, "r"), uow, processing(processor))
    with as_principal("ops", "admin"):
        listed, _ = await handlers.list_payments(commands.ListPayments(0, ""), uow)
        assert {p.id for p in listed} == {mine.id, theirs.id}
        with pytest.raises(NotFound):
            await handlers.get_payment(commands.GetPayment(str(uuid.uuid4())), uow)


async def test_list_is_newest_first_paged_and_filtered():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("ok", "declined", "ok", "ok", "ok")
    order = str(uuid.uuid4())
    made = []
    for i in range(5):
        try:
            made.append((await handlers.process_payment(pay(f"k{i}", order_id=order if i < 3 else str(uuid.uuid4())),
                                                        uow, processing(processor))).id)
        except FailedPrecondition:
            made.append(next(p.id for p in uow.payments.payments.values() if p.idempotency_key == f"k{i}"))
    seen, token = [], ""
    while True:
        page, token = await handlers.list_payments(commands.ListPayments(2, token), uow)
        seen += [p.id for p in page]
        if not token:
            break
    assert seen == made[::-1]
    by_order, _ = await handlers.list_payments(commands.ListPayments(0, "", order_id=order), uow)
    assert [p.id for p in by_order] == made[2::-1]
    declined, _ = await handlers.list_payments(commands.ListPayments(0, "", status=PaymentStatus.DECLINED), uow)
    assert [p.id for p in declined] == [made[1]]
    _, token = await handlers.list_payments(commands.ListPayments(1, ""), uow)
    with pytest.raises(InvalidArgument) as err:
        await handlers.list_payments(commands.ListPayments(1, token, order_id=order), uow)
    assert fields(err.value) == ["page_token"]
    with pytest.raises(InvalidArgument) as bad:
        await handlers.list_payments(commands.ListPayments(0, "", order_id="x", customer_id="y", unknown_status=9),
                                     uow)
    assert fields(bad.value) == ["order_id", "customer_id", "status"]


# RefundPayment -------------------------------------------------------------------------------------------------

async def test_refund_is_full_and_idempotent_whatever_the_key():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("ok")
    p = await handlers.process_payment(pay(), uow, processing(processor))
    refunded = await handlers.refund_payment(commands.RefundPayment(p.id, "refund-1", "order cancelled"), uow,
                                             processing(processor))
    assert (refunded.status, refunded.refunded_amount_minor, refunded.refund_reason) == (
        PaymentStatus.REFUNDED, 4200, "order cancelled")
    again = await handlers.refund_payment(commands.RefundPayment(p.id, "refund-2"), uow, processing(processor))
    assert again == refunded and processor.refund_calls == 1
    assert kinds(uow) == ["PaymentSucceeded", "PaymentRefunded"]
    assert (await handlers.process_payment(pay(), uow, processing(processor))).status is PaymentStatus.REFUNDED


async def test_refund_failure_keeps_the_payment_succeeded_and_a_repeat_tries_again():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("ok", refund_fails=1)
    p = await handlers.process_payment(pay(), uow, processing(processor))
    with pytest.raises(Unavailable) as err:
        await handlers.refund_payment(commands.RefundPayment(p.id, "r"), uow, processing(processor))
    assert (err.value.reason, err.value.metadata) == ("REFUND_FAILED", {"payment_id": p.id})
    assert only_payment(uow).status is PaymentStatus.SUCCEEDED
    assert (await handlers.refund_payment(commands.RefundPayment(p.id, "r"), uow, processing(processor))).status \
        is PaymentStatus.REFUNDED


async def test_only_succeeded_payments_are_refundable():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("declined")
    with pytest.raises(FailedPrecondition):
        await handlers.process_payment(pay(), uow, processing(processor))
    p = only_payment(uow)
    with pytest.raises(FailedPrecondition) as err:
        await handlers.refund_payment(commands.RefundPayment(p.id, "r"), uow, processing(processor))
    assert err.value.reason == "PAYMENT_NOT_REFUNDABLE"
    assert err.value.metadata == {"payment_id": p.id, "status": "PAYMENT_STATUS_DECLINED"}
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as nf:
        await handlers.refund_payment(commands.RefundPayment(missing, "r"), uow, processing(processor))
    assert (nf.value.reason, nf.value.metadata) == ("PAYMENT_NOT_FOUND", {"payment_id": missing})
    with pytest.raises(InvalidArgument) as bad:
        await handlers.refund_payment(commands.RefundPayment("x", "", "y" * 501), uow, processing(processor))
    assert fields(bad.value) == ["payment_id", "idempotency_key", "reason"]
    # NUL, which PostgreSQL's text cannot store, is refused before the processor refunds anything.
    with pytest.raises(InvalidArgument) as nul:
        await handlers.refund_payment(commands.RefundPayment(p.id, "k", "Order cancelled\x00"), uow,
                                      processing(processor))
    assert fields(nul.value) == ["reason"]
    assert processor.refund_calls == 0


# VoidPayment ---------------------------------------------------------------------------------------------------

def void(key: str = "key-1", method: str = "card", **kw) -> commands.VoidPayment:
    charge = pay(key, method, **kw)
    return commands.VoidPayment(order_id=charge.order_id, customer_id=charge.customer_id, amount=charge.amount,
                                payment_method=charge.payment_method, idempotency_key=charge.idempotency_key)


def voiding(cmd: commands.VoidPayment, uow: FakePaymentUnitOfWork, processor: PaymentProcessor | None = None):
    return handlers.void_payment(cmd, uow, processing(processor or ScriptedProcessor()))


def test_only_a_failed_payment_can_be_voided_and_a_voided_one_is_never_charged_again():
    uow = FakePaymentUnitOfWork()
    now = dt.datetime.now(dt.UTC)
    p = handlers._new_payment(pay(), PaymentStatus.FAILED, 1, now)
    p.void(now)
    assert (p.status, p.version, p.lease_expire_time) == (PaymentStatus.VOIDED, 2, None)
    with pytest.raises(ValueError):
        p.take_over(now, now)  # what ProcessPayment does to a FAILED payment it tries again
    for status in (PaymentStatus.PENDING, PaymentStatus.SUCCEEDED, PaymentStatus.DECLINED, PaymentStatus.REFUNDED,
                   PaymentStatus.VOIDED):
        with pytest.raises(ValueError):
            dataclasses.replace(p, status=status).void(now)
    assert not uow.payments.payments


async def test_a_failed_payment_that_is_voided_is_never_charged_by_a_repeat():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("unavailable", "ok")
    with pytest.raises(Unavailable):
        await handlers.process_payment(pay(), uow, processing(processor, max_attempts=1))
    failed = only_payment(uow)
    voided = await voiding(void(), uow)
    assert (voided.id, voided.status, voided.attempts, voided.failure_message) == (
        failed.id, PaymentStatus.VOIDED, 1, "processor hiccup")
    assert voided.version == failed.version + 1 and only_payment(uow) == voided
    with pytest.raises(FailedPrecondition) as refused:
        await handlers.process_payment(pay(), uow, processing(processor))
    assert (refused.value.reason, refused.value.metadata) == ("PAYMENT_VOIDED", {"payment_id": failed.id})
    assert len(processor.charge_calls) == 1 and not processor.charges
    assert await voiding(void(), uow) == voided, "a repeat returns the VOIDED payment unchanged"
    assert kinds(uow) == ["PaymentFailed", "PaymentVoided"], "the void's event, once: a repeat writes none"
    event = uow.published[-1][2]
    assert (event.payment_id, event.attempts, event.failure_message) == (failed.id, 1, "processor hiccup")


async def test_voiding_a_key_no_charge_was_made_with_records_a_voided_payment_that_blocks_it():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("ok")
    voided = await voiding(void(), uow)
    assert (voided.status, voided.attempts, voided.idempotency_key, voided.amount) == (
        PaymentStatus.VOIDED, 0, "key-1", Money("EUR", 4200))
    with pytest.raises(FailedPrecondition) as refused:
        await handlers.process_payment(pay(), uow, processing(processor))
    assert (refused.value.reason, refused.value.metadata) == ("PAYMENT_VOIDED", {"payment_id": voided.id})
    assert not processor.charge_calls and only_payment(uow) == voided and kinds(uow) == ["PaymentVoided"]
    # The key stays bound to the request it was voided with, as a ProcessPayment's is.
    for other in (handlers.process_payment(pay(amount=Money("EUR", 1)), uow, processing(processor)),
                  voiding(void(method="other"), uow)):
        with pytest.raises(AlreadyExists) as reused:
            await other
        assert (reused.value.reason, reused.value.metadata) == ("IDEMPOTENCY_KEY_REUSED", {"payment_id": voided.id})


async def test_a_payment_being_charged_is_not_voided_and_one_that_took_money_is_not_voidable():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("wait")
    work = processing(processor, timeout_seconds=5.0)
    charging = asyncio.create_task(handlers.process_payment(pay(), uow, work))
    await asyncio.wait_for(processor.called.wait(), 10)
    with pytest.raises(Aborted) as busy:
        await voiding(void(), uow)
    p = only_payment(uow)
    assert (busy.value.reason, busy.value.metadata) == ("PAYMENT_IN_PROGRESS", {"payment_id": p.id})
    assert p.status is PaymentStatus.PENDING
    processor.release.set()
    assert (await charging).status is PaymentStatus.SUCCEEDED
    with pytest.raises(FailedPrecondition) as took_money:
        await voiding(void(), uow)
    assert (took_money.value.reason, took_money.value.metadata) == (
        "PAYMENT_NOT_VOIDABLE", {"payment_id": p.id, "status": "PAYMENT_STATUS_SUCCEEDED"})
    await handlers.refund_payment(commands.RefundPayment(p.id, "r"), uow, work)
    with pytest.raises(FailedPrecondition) as refunded:
        await voiding(void(), uow)
    assert refunded.value.metadata == {"payment_id": p.id, "status": "PAYMENT_STATUS_REFUNDED"}
    assert only_payment(uow).status is PaymentStatus.REFUNDED


async def test_a_declined_payment_is_returned_unchanged_by_a_void():
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("declined")
    with pytest.raises(FailedPrecondition):
        await handlers.process_payment(pay(), uow, processing(processor))
    declined = only_payment(uow)
    assert await voiding(void(), uow) == declined


async def test_a_repeat_charge_that_takes_a_failed_payment_over_first_wins_over_the_void():
    # The void read the payment FAILED, but a repeat of ProcessPayment took it over (PENDING) before the void's save:
    # the version fence refuses the void's save, and the void reads the payment again and waits for that charge.
    uow, processor = FakePaymentUnitOfWork(), ScriptedProcessor("unavailable")
    with pytest.raises(Unavailable):
        await handlers.process_payment(pay(), uow, processing(processor, max_attempts=1))
    failed = only_payment(uow)
    save = uow.payments.save

    async def charge_comes_first(payment, expected_version):
        uow.payments.save = save
        stored = uow.payments.payments[failed.id]
        stored.take_over(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=30), dt.datetime.now(dt.UTC))
        return await save(payment, expected_version)

    uow.payments.save = charge_comes_first
    with pytest.raises(Aborted) as busy:
        await voiding(void(), uow)
    assert busy.value.reason == "PAYMENT_IN_PROGRESS"
    assert only_payment(uow).status is PaymentStatus.PENDING, "the charge's claim stands"


async def test_an_invalid_void_is_refused_naming_the_fields_and_a_customer_voids_only_their_own():
    uow = FakePaymentUnitOfWork()
    with pytest.raises(InvalidArgument) as bad:
        await voiding(void(key=" ", method="", order_id="x", amount=None), uow)
    assert fields(bad.value) == ["order_id", "amount", "payment_method", "idempotency_key"]
    with as_principal(str(uuid.uuid4()), "order:write"), pytest.raises(PermissionDenied):
        await voiding(void(), uow)
    assert not uow.payments.payments
    with as_principal(CUSTOMER, "order:write"):
        assert (await voiding(void(), uow)).status is PaymentStatus.VOIDED


class UnsurePayments(ScriptedProcessor):
    """A processor whose first `unsure` look-ups of a charge cannot answer."""

    def __init__(self, *steps: str, unsure: int = 1) -> None:
        super().__init__(*steps)
        self.unsure = unsure

    async def find_charge(self, charge_key: str) -> Charged | None:
        if self.unsure:
            self.unsure -= 1
            raise ProcessorUnavailable("processor hiccup")
        return await super().find_charge(charge_key)


async def test_a_void_leaves_an_abandoned_charge_pending_while_the_processor_cannot_say_whether_it_charged():
    processor = UnsurePayments("unavailable")
    uow = FakePaymentUnitOfWork()
    with pytest.raises(Unavailable):
        await handlers.process_payment(pay(), uow, processing(processor, max_attempts=1))
    stored = uow.payments.payments[only_payment(uow).id]
    stored.status, stored.lease_expire_time = PaymentStatus.PENDING, dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    with pytest.raises(Aborted) as unsure:
        await voiding(void(), uow, processor)
    assert unsure.value.reason == "PAYMENT_IN_PROGRESS"
    held = only_payment(uow)
    assert held.status is PaymentStatus.PENDING and held.owned_until(dt.datetime.now(dt.UTC)), "held by the void"
    assert kinds(uow) == ["PaymentFailed"], "nothing recorded while the outcome is unknown"
    with pytest.raises(Aborted):  # a repeat while the void's lease runs waits, as for any call holding it
        await voiding(void(), uow, processor)
    uow.payments.payments[held.id].lease_expire_time = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    voided = await voiding(void(), uow, processor)
    assert (voided.status, voided.attempts, voided.lease_expire_time) == (PaymentStatus.VOIDED, 1, None)
    assert kinds(uow) == ["PaymentFailed", "PaymentVoided"] and not processor.charges
