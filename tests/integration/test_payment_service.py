"""The payment service over a real channel to a real server on port 0, on SQLite and PostgreSQL, with the sandbox
processor: every documented test method, timeouts, lost replies, idempotency, refunds and crash leftovers."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid

import grpc
import pytest
from sqlalchemy import select, update
from tessera.common.v1 import money_pb2
from tessera.payment.v1 import payment_events_pb2 as events_pb2
from tessera.payment.v1 import payment_pb2, payment_service_pb2_grpc
from tessera.payment.v1 import payment_service_pb2 as svc

from tessera_payment import bootstrap
from tessera_payment.adapters.orm import outbox, payments, sandbox_charges
from tessera_payment.adapters.processor import ChargeRequest, Refunded, RefundRequest
from tessera_payment.adapters.sandbox_processor import SandboxProcessor
from tessera_payment.domain.model import Money
from tessera_runtime.clients import error_details
from tests.integration.conftest_payment import (
    ReplyHoldingProxy,
    event_types,
    eventually,
    outbox_count,
    payment_request,
    payment_service,
    query,
    sandbox_charges_of,
)
from tests.support.databases import execute, migrated

SUCCEEDED = payment_pb2.PAYMENT_STATUS_SUCCEEDED
DECLINED = payment_pb2.PAYMENT_STATUS_DECLINED
FAILED = payment_pb2.PAYMENT_STATUS_FAILED
REFUNDED = payment_pb2.PAYMENT_STATUS_REFUNDED
PENDING = payment_pb2.PAYMENT_STATUS_PENDING


@pytest.fixture
async def payment(db_url):
    async with payment_service(db_url) as (stub, _, _):
        yield stub


async def failure(call):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    info, _ = error_details(err.value)
    assert info is not None and info.domain == "payment.tessera.dev", err.value
    return err.value.code(), info


async def only_payment_of(stub, order_id: str) -> payment_pb2.Payment:
    (p,) = (await stub.ListPayments(svc.ListPaymentsRequest(order_id=order_id))).payments
    return p


async def test_each_sandbox_method(payment, db_url):
    ok = (await payment.ProcessPayment(payment_request("pm_sandbox_ok"))).payment
    assert (ok.status, ok.attempts, ok.failure_message, ok.amount.amount_minor) == (SUCCEEDED, 1, "", 4200)
    assert ok.processor_reference.startswith("sbx_ch_") and ok.refunded_amount.currency_code == "EUR"
    assert len(await sandbox_charges_of(db_url, ok.id)) == 1

    transient = (await payment.ProcessPayment(payment_request("pm_sandbox_transient"))).payment
    assert (transient.status, transient.attempts) == (SUCCEEDED, 2)
    assert transient.failure_message == "The payment processor is temporarily unavailable."

    for method, code in (("pm_sandbox_declined", "card_declined"), ("pm_visa_4242", "unknown_payment_method")):
        request = payment_request(method)
        status, info = await failure(payment.ProcessPayment(request))
        declined = await only_payment_of(payment, request.order_id)
        assert (status, info.reason, dict(info.metadata)) == (
            grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_DECLINED", {"payment_id": declined.id,
                                                                      "decline_code": code})
        assert (declined.status, declined.decline_code, declined.attempts) == (DECLINED, code, 1)
        assert declined.failure_message and not await sandbox_charges_of(db_url, declined.id)
        status, _ = await failure(payment.ProcessPayment(request))  # a decline is final: same answer
        assert status == grpc.StatusCode.FAILED_PRECONDITION
        assert (await only_payment_of(payment, request.order_id)).attempts == 1
    assert await event_types(db_url) == ["PaymentSucceeded", "PaymentSucceeded", "PaymentDeclined",
                                         "PaymentDeclined"]
    payload = (await query(db_url, select(outbox.c.payload).order_by(outbox.c.seq)))[0][0]
    event = events_pb2.PaymentSucceeded.FromString(payload)
    assert (event.payment_id, event.processor_reference) == (ok.id, ok.processor_reference)


async def test_transient_failure_past_the_services_retries_is_failed_then_retried(db_url):
    async with payment_service(db_url, TESSERA_PAYMENT_PROCESSOR_MAX_ATTEMPTS="1") as (stub, _, _):
        request = payment_request("pm_sandbox_transient")
        status, info = await failure(stub.ProcessPayment(request))
        failed = await only_payment_of(stub, request.order_id)
        assert (status, info.reason, dict(info.metadata)) == (grpc.StatusCode.UNAVAILABLE, "PAYMENT_FAILED",
                                                              {"payment_id": failed.id})
        assert (failed.status, failed.attempts) == (FAILED, 1)
        retried = (await stub.ProcessPayment(request)).payment
        assert (retried.id, retried.status, retried.attempts) == (failed.id, SUCCEEDED, 2)
        assert len(await sandbox_charges_of(db_url, failed.id)) == 1
    assert await event_types(db_url) == ["PaymentFailed", "PaymentSucceeded"]
    event = events_pb2.PaymentFailed.FromString((await query(db_url, select(outbox.c.payload)))[0][0])
    assert (event.timed_out, event.attempts) == (False, 1)


async def test_processor_timeout_is_recorded_failed_and_never_charges(db_url):
    async with payment_service(db_url, TESSERA_PAYMENT_PROCESSOR_TIMEOUT_SECONDS="0.3") as (stub, _, _):
        request = payment_request("pm_sandbox_timeout")
        status, info = await failure(stub.ProcessPayment(request))
        timed_out = await only_payment_of(stub, request.order_id)
        assert (status, info.reason, dict(info.metadata)) == (
            grpc.StatusCode.DEADLINE_EXCEEDED, "PROCESSOR_TIMEOUT", {"payment_id": timed_out.id})
        assert (timed_out.status, timed_out.attempts) == (FAILED, 1)
        status, _ = await failure(stub.ProcessPayment(request))  # FAILED is tried again, on the same record
        assert status == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (await only_payment_of(stub, request.order_id)).attempts == 2
        assert not await sandbox_charges_of(db_url, timed_out.id)
    event = events_pb2.PaymentFailed.FromString((await query(db_url, select(outbox.c.payload)))[0][0])
    assert event.timed_out


async def test_the_callers_deadline_bounds_the_processor_call(payment, db_url):
    # The processor timeout is 10 s; the caller allows 1.5 s. The service gives up on the processor in time to
    # record the payment FAILED instead of charging after the caller has gone.
    request = payment_request("pm_sandbox_timeout")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await payment.ProcessPayment(request, timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    info, _ = error_details(err.value)
    assert info is None or info.reason == "PROCESSOR_TIMEOUT"  # None only when the reply lost the race

    async def failed() -> payment_pb2.Payment | None:
        p = await only_payment_of(payment, request.order_id)
        return p if p.status == FAILED else None

    settled = await eventually(failed, timeout=8.0)  # well before the 10 s processor timeout could end it
    assert settled.attempts == 1 and not await sandbox_charges_of(db_url, settled.id)


async def test_a_lost_reply_never_charges_twice(db_url):
    async with payment_service(db_url) as (direct, _, port):
        proxy = await ReplyHoldingProxy(port).start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.port}") as channel:
                via_proxy = payment_service_pb2_grpc.PaymentServiceStub(channel)
                await via_proxy.ListPayments(svc.ListPaymentsRequest(), timeout=10)  # connected
                proxy.hold_replies()
                request = payment_request("pm_sandbox_ok")
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await via_proxy.ProcessPayment(request, timeout=2.0)
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        finally:
            await proxy.close()

        async def charged() -> payment_pb2.Payment | None:
            found = (await direct.ListPayments(svc.ListPaymentsRequest(order_id=request.order_id))).payments
            return found[0] if found and found[0].status == SUCCEEDED else None

        first = await eventually(charged)  # the server charged and recorded it; only the reply was lost
        repeat = (await direct.ProcessPayment(request)).payment
        assert repeat == first and repeat.attempts == 1
        assert len(await sandbox_charges_of(db_url, first.id)) == 1


async def test_same_key_never_charges_twice_even_concurrently(payment, db_url):
    request = payment_request("pm_sandbox_ok")

    async def call() -> str:
        try:
            return (await payment.ProcessPayment(request)).payment.id
        except grpc.aio.AioRpcError as err:
            info, _ = error_details(err)
            assert (err.code(), info.reason) == (grpc.StatusCode.ABORTED, "PAYMENT_IN_PROGRESS")
            return info.metadata["payment_id"]

    ids = await asyncio.gather(*(call() for _ in range(8)))
    assert len(set(ids)) == 1
    final = (await payment.ProcessPayment(request)).payment
    assert final.id == ids[0] and final.status == SUCCEEDED and final.attempts == 1
    assert len(await query(db_url, select(payments.c.id))) == 1
    assert len(await sandbox_charges_of(db_url, final.id)) == 1
    changed = svc.ProcessPaymentRequest()
    changed.CopyFrom(request)
    changed.amount.amount_minor += 1
    status, info = await failure(payment.ProcessPayment(changed))
    assert (status, info.reason, dict(info.metadata)) == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED",
                                                          {"payment_id": final.id})


async def test_refund_is_full_once_and_idempotent(payment, db_url):
    request = payment_request("pm_sandbox_ok", amount=1999, currency="JPY")
    paid = (await payment.ProcessPayment(request)).payment
    refunded = (await payment.RefundPayment(svc.RefundPaymentRequest(
        payment_id=paid.id, idempotency_key="refund-1", reason="Order cancelled by customer"))).payment
    assert (refunded.status, refunded.refunded_amount.amount_minor, refunded.refunded_amount.currency_code,
            refunded.refund_reason, refunded.version) == (REFUNDED, 1999, "JPY", "Order cancelled by customer",
                                                          paid.version + 2)  # the refund's claim, then the refund
    assert refunded.HasField("refund_time")
    again = (await payment.RefundPayment(svc.RefundPaymentRequest(payment_id=paid.id,
                                                                  idempotency_key="refund-2"))).payment
    assert again == refunded
    assert (await payment.ProcessPayment(request)).payment == refunded  # the repeat reports what it is now
    (ledger,) = await sandbox_charges_of(db_url, paid.id)
    assert ledger._mapping["refund_reference"].startswith("sbx_re_")
    assert ledger._mapping["refund_idempotency_key"] == "refund-1"
    assert (await event_types(db_url)).count("PaymentRefunded") == 1

    declined_request = payment_request("pm_sandbox_declined")
    await failure(payment.ProcessPayment(declined_request))
    declined = await only_payment_of(payment, declined_request.order_id)
    status, info = await failure(payment.RefundPayment(svc.RefundPaymentRequest(payment_id=declined.id,
                                                                                idempotency_key="r")))
    assert (status, info.reason, dict(info.metadata)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_NOT_REFUNDABLE",
        {"payment_id": declined.id, "status": "PAYMENT_STATUS_DECLINED"})


async def test_get_and_list_newest_first(payment):
    customer, order = str(uuid.uuid4()), str(uuid.uuid4())
    made = [(await payment.ProcessPayment(payment_request(customer_id=customer, order_id=order))).payment
            for _ in range(3)]
    made.append((await payment.ProcessPayment(payment_request(customer_id=customer))).payment)
    await payment.ProcessPayment(payment_request())  # another customer's
    assert (await payment.GetPayment(svc.GetPaymentRequest(id=made[0].id))).payment == made[0]
    seen, token = [], ""
    while True:
        reply = await payment.ListPayments(svc.ListPaymentsRequest(customer_id=customer, page_size=3,
                                                                   page_token=token))
        seen += [p.id for p in reply.payments]
        token = reply.next_page_token
        if not token:
            break
    assert seen == [p.id for p in reversed(made)]
    by_order = await payment.ListPayments(svc.ListPaymentsRequest(order_id=order, customer_id=customer))
    assert [p.id for p in by_order.payments] == [p.id for p in reversed(made[:3])]
    assert len((await payment.ListPayments(svc.ListPaymentsRequest(status=SUCCEEDED))).payments) == 5
    assert not (await payment.ListPayments(svc.ListPaymentsRequest(status=REFUNDED))).payments
    missing = str(uuid.uuid4())
    for call in (payment.GetPayment(svc.GetPaymentRequest(id=missing)),
                 payment.RefundPayment(svc.RefundPaymentRequest(payment_id=missing, idempotency_key="k"))):
        status, info = await failure(call)
        assert (status, info.reason, dict(info.metadata)) == (grpc.StatusCode.NOT_FOUND, "PAYMENT_NOT_FOUND",
                                                              {"payment_id": missing})


async def test_customers_see_only_their_own_payments(payment):
    alice, bob = str(uuid.uuid4()), str(uuid.uuid4())
    as_alice = (("x-user-id", alice), ("x-user-scopes", "order:write"))
    mine = (await payment.ProcessPayment(payment_request(customer_id=alice), metadata=as_alice)).payment
    theirs = (await payment.ProcessPayment(payment_request(customer_id=bob))).payment
    status, info = await failure(payment.ProcessPayment(payment_request(customer_id=bob), metadata=as_alice))
    assert (status, info.reason) == (grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED")
    assert (await payment.GetPayment(svc.GetPaymentRequest(id=mine.id), metadata=as_alice)).payment == mine
    status, _ = await failure(payment.GetPayment(svc.GetPaymentRequest(id=theirs.id), metadata=as_alice))
    assert status == grpc.StatusCode.PERMISSION_DENIED
    listed = await payment.ListPayments(svc.ListPaymentsRequest(), metadata=as_alice)
    assert [p.id for p in listed.payments] == [mine.id]
    as_admin = (("x-user-id", "ops"), ("x-user-scopes", "admin"))
    assert len((await payment.ListPayments(svc.ListPaymentsRequest(), metadata=as_admin)).payments) == 2


async def test_a_customer_pays_for_themselves_with_their_id_in_either_case(payment, db_url):
    """A UUID reads the same in either case: a customer naming themselves in upper case pays for themselves, and
    the payment is theirs (stored, listed and shown by the lower-case id)."""
    alice = str(uuid.uuid4())
    as_alice = (("x-user-id", alice), ("x-user-scopes", "order:write"))
    paid = (await payment.ProcessPayment(payment_request(customer_id=alice.upper()), metadata=as_alice)).payment
    assert (paid.status, paid.customer_id) == (payment_pb2.PAYMENT_STATUS_SUCCEEDED, alice)
    listed = await payment.ListPayments(svc.ListPaymentsRequest(), metadata=as_alice)
    assert [p.id for p in listed.payments] == [paid.id]

def _invalid_cases() -> list[tuple[str, object, str]]:
    money = money_pb2.Money
    good = payment_request()

    def pay(**changes) -> svc.ProcessPaymentRequest:
        request = svc.ProcessPaymentRequest()
        request.CopyFrom(good)
        for name, value in changes.items():
            if value is None:
                request.ClearField(name)
            elif name == "amount":
                request.amount.CopyFrom(value)
            else:
                setattr(request, name, value)
        return request

    return [
        ("ProcessPayment", pay(order_id="o-1"), "order_id"),
        ("ProcessPayment", pay(customer_id=""), "customer_id"),
        ("ProcessPayment", pay(amount=None), "amount"),
        ("ProcessPayment", pay(amount=money(currency_code="EURO", amount_minor=1)), "amount.currency_code"),
        ("ProcessPayment", pay(amount=money(currency_code="ANG", amount_minor=1)), "amount.currency_code"),
        ("ProcessPayment", pay(amount=money(currency_code="EUR", amount_minor=0)), "amount.amount_minor"),
        ("ProcessPayment", pay(amount=money(currency_code="EUR", amount_minor=-100)), "amount.amount_minor"),
        # The contract's maximum is 1,000,000,000,000,000 minor units.
        ("ProcessPayment", pay(amount=money(currency_code="EUR", amount_minor=10**15 + 1)),
         "amount.amount_minor"),
        ("ProcessPayment", pay(amount=money(currency_code="EUR", amount_minor=10**18 + 1)),
         "amount.amount_minor"),
        ("ProcessPayment", pay(payment_method=""), "payment_method"),
        ("ProcessPayment", pay(payment_method="p" * 256), "payment_method"),
        ("ProcessPayment", pay(idempotency_key=""), "idempotency_key"),
        ("ProcessPayment", pay(idempotency_key="k" * 65), "idempotency_key"),
        # Required means more than spaces: " " is no processor token and no key a client chose.
        ("ProcessPayment", pay(payment_method=" "), "payment_method"),
        ("ProcessPayment", pay(payment_method="\t \u3000"), "payment_method"),
        ("ProcessPayment", pay(idempotency_key=" "), "idempotency_key"),
        ("GetPayment", svc.GetPaymentRequest(id="p-1"), "id"),
        ("ListPayments", svc.ListPaymentsRequest(page_size=-1), "page_size"),
        ("ListPayments", svc.ListPaymentsRequest(order_id="o"), "order_id"),
        ("ListPayments", svc.ListPaymentsRequest(customer_id="c"), "customer_id"),
        ("ListPayments", svc.ListPaymentsRequest(status=42), "status"),
        ("ListPayments", svc.ListPaymentsRequest(page_token="nope"), "page_token"),
        ("RefundPayment", svc.RefundPaymentRequest(payment_id="x", idempotency_key="k"), "payment_id"),
        ("RefundPayment", svc.RefundPaymentRequest(payment_id=str(uuid.uuid4())), "idempotency_key"),
        ("RefundPayment", svc.RefundPaymentRequest(payment_id=str(uuid.uuid4()), idempotency_key="  "),
         "idempotency_key"),
        ("RefundPayment", svc.RefundPaymentRequest(payment_id=str(uuid.uuid4()), idempotency_key="k",
                                                   reason="r" * 501), "reason"),
        # VoidPayment takes the ProcessPayment request it voids (the same fields, the same numbers), the same rules.
        ("VoidPayment", void_of(pay(order_id="o-1")), "order_id"),
        ("VoidPayment", void_of(pay(amount=None)), "amount"),
        ("VoidPayment", void_of(pay(amount=money(currency_code="EUR", amount_minor=0))), "amount.amount_minor"),
        ("VoidPayment", void_of(pay(payment_method=" ")), "payment_method"),
        ("VoidPayment", void_of(pay(idempotency_key="")), "idempotency_key"),
    ]


def void_of(request: svc.ProcessPaymentRequest) -> svc.VoidPaymentRequest:
    return svc.VoidPaymentRequest.FromString(request.SerializeToString())


async def test_each_invalid_field_is_named_and_nothing_is_written(payment, db_url):
    for rpc, request, field in _invalid_cases():
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await getattr(payment, rpc)(request)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, field, err.value.details())
        info, bad = error_details(err.value)
        assert info is not None and (info.reason, info.domain) == ("INVALID_ARGUMENT", "payment.tessera.dev")
        assert bad is not None and [v.field for v in bad.field_violations] == [field], (rpc, field)
    assert not await query(db_url, select(payments.c.id))
    assert not await query(db_url, select(sandbox_charges.c.charge_key))
    assert await outbox_count(db_url) == 0


async def test_pending_payments_left_by_a_crash_are_resolved(db_url):
    # Recovery runs at start only here, so that the repeat call is what resolves the payment.
    env = {"TESSERA_PAYMENT_RECOVERY_SECONDS": "600", "TESSERA_PAYMENT_PROCESSOR_TIMEOUT_SECONDS": "0.3"}
    async with payment_service(db_url, **env) as (stub, _, _):
        # 1. Crashed after the processor charged, before SUCCEEDED was written. The payment is set back to the
        # PENDING state such a crash leaves, with its lease still running: a repeat is told to wait.
        charged_request = payment_request("pm_sandbox_ok")
        charged = (await stub.ProcessPayment(charged_request)).payment
        running = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
        await execute(db_url, update(payments).where(payments.c.id == charged.id).values(
            status="PENDING", processor_reference="", lease_expire_time=running))
        status, info = await failure(stub.ProcessPayment(charged_request))
        assert (status, info.reason, dict(info.metadata)) == (grpc.StatusCode.ABORTED, "PAYMENT_IN_PROGRESS",
                                                              {"payment_id": charged.id})
        # Once the lease has run out, the repeat asks the processor, which remembers the charge.
        gone = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        await execute(db_url, update(payments).where(payments.c.id == charged.id).values(
            lease_expire_time=gone, version=charged.version + 1))
        resolved = (await stub.ProcessPayment(charged_request)).payment
        assert (resolved.status, resolved.processor_reference, resolved.attempts) == (
            SUCCEEDED, charged.processor_reference, 1)
        assert len(await sandbox_charges_of(db_url, charged.id)) == 1

        # 2. Crashed before the processor answered: nobody repeats the call. Left as such a crash leaves it...
        lost_request = payment_request("pm_sandbox_timeout")
        await failure(stub.ProcessPayment(lost_request))
        lost = await only_payment_of(stub, lost_request.order_id)
        await execute(db_url, update(payments).where(payments.c.id == lost.id).values(
            status="PENDING", lease_expire_time=gone))

    # ... it is found by the recovery loop of the service started again, which learns from the processor that
    # nothing was charged and records FAILED without charging.
    async with payment_service(db_url, TESSERA_PAYMENT_RECOVERY_SECONDS="0.1") as (stub, _, _):
        async def settled() -> payment_pb2.Payment | None:
            p = (await stub.GetPayment(svc.GetPaymentRequest(id=lost.id))).payment
            return p if p.status != PENDING else None

        recovered = await eventually(settled)
        assert recovered.status == FAILED and "interrupted" in recovered.failure_message
        assert recovered.attempts == lost.attempts and not await sandbox_charges_of(db_url, lost.id)


async def test_a_payment_recovery_cannot_settle_does_not_hold_up_the_others(db_url, caplog):
    """An abandoned payment whose row was edited by hand so that it cannot be taken over (its version at the
    largest integer the column holds) is logged with its id and passed over; the payments behind it are settled."""
    env = {"TESSERA_PAYMENT_RECOVERY_SECONDS": "600", "TESSERA_PAYMENT_PROCESSOR_TIMEOUT_SECONDS": "0.3"}
    async with payment_service(db_url, **env) as (stub, _, _):
        lost = []
        for _ in range(3):
            request = payment_request("pm_sandbox_timeout")
            await failure(stub.ProcessPayment(request))
            lost.append(await only_payment_of(stub, request.order_id))
    gone = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=10)
    for i, p in enumerate(lost):
        await execute(db_url, update(payments).where(payments.c.id == p.id).values(
            status="PENDING", lease_expire_time=gone + dt.timedelta(seconds=i)))
    bad = lost[0]
    await execute(db_url, update(payments).where(payments.c.id == bad.id).values(version=2**63 - 1))

    async with payment_service(db_url, TESSERA_PAYMENT_RECOVERY_SECONDS="0.1") as (stub, _, _):
        async def status(payment_id: str) -> int:
            return (await stub.GetPayment(svc.GetPaymentRequest(id=payment_id))).payment.status

        async def others_settled() -> bool | None:
            return True if [await status(p.id) for p in lost[1:]] == [FAILED, FAILED] else None

        await eventually(others_settled)
        assert await status(bad.id) == PENDING
    passed_over = [r for r in caplog.records if r.name == "tessera.payment.recovery" and r.levelname == "ERROR"]
    assert passed_over and {getattr(r, "item_id", None) for r in passed_over} == {bad.id}


async def test_the_sandbox_charges_a_key_once_however_often_and_concurrently_it_is_asked(db_url):
    async with migrated(bootstrap.MIGRATIONS, db_url) as db:
        sandbox = SandboxProcessor(db)
        key = str(uuid.uuid4())

        def request(method: str, attempt: int) -> ChargeRequest:
            return ChargeRequest(charge_key=key, amount=Money("EUR", 4200), payment_method=method, attempt=attempt)

        charged = await asyncio.gather(*(sandbox.charge(request("pm_sandbox_ok", 1)) for _ in range(6)))
        assert len({c.reference for c in charged}) == 1
        assert await sandbox.find_charge(key) == charged[0]
        # A later attempt, whatever it names, gets the charge the key already has.
        assert await sandbox.charge(request("pm_sandbox_transient", 2)) == charged[0]
        assert await sandbox.charge(request("pm_sandbox_declined", 3)) == charged[0]
        assert len(await sandbox_charges_of(db_url, key)) == 1
        assert await sandbox.find_charge(str(uuid.uuid4())) is None


async def test_a_settle_that_another_call_beat_returns_that_outcome_and_writes_nothing(db_url):
    """Two calls settle one payment (a charge and a recovery, say): the first wins; the second's save finds the
    version changed (on PostgreSQL at the commit of its one statement) and answers with the first's outcome, its own
    status and event never written."""
    from tessera_payment.adapters.processor import Charged, Declined
    from tessera_payment.domain.model import Payment, PaymentStatus
    from tessera_payment.service_layer import handlers
    from tessera_payment.service_layer.unit_of_work import PaymentUnitOfWork
    from tessera_runtime.db import utcnow

    async with migrated(bootstrap.MIGRATIONS, db_url) as db:
        uow = PaymentUnitOfWork(db)
        now = utcnow()
        payment = Payment(id=str(uuid.uuid4()), order_id=str(uuid.uuid4()), customer_id=str(uuid.uuid4()),
                          amount=Money("EUR", 1250), payment_method="pm_sandbox_ok", idempotency_key=uuid.uuid4().hex,
                          status=PaymentStatus.PENDING, attempts=1, create_time=now, update_time=now,
                          lease_expire_time=now + dt.timedelta(seconds=30))
        async with uow.inserting():
            await uow.payments.add(payment, "hash")
            await uow.commit()
        copies = []
        for _ in range(2):
            async with uow:
                copies.append(await uow.payments.get(payment.id))
        first = await handlers._settle(uow, copies[0], Charged("ref-1"))
        assert first.status is PaymentStatus.SUCCEEDED
        second = await handlers._settle(uow, copies[1], Declined("card_declined", "declined"))
        assert second.status is PaymentStatus.SUCCEEDED and second.processor_reference == "ref-1"
        assert await event_types(db_url) == ["PaymentSucceeded"]
        # Outside a one-statement block a stale save says so at once, and changes nothing either.
        stale = copies[1]
        async with uow:
            assert not await uow.payments.save(stale, stale.version - 1)
            await uow.commit()
        async with uow:
            stored = await uow.payments.get(payment.id)
        assert stored.status is PaymentStatus.SUCCEEDED and stored.version == first.version


async def test_reads_on_sqlite_never_wait_for_a_writer(tmp_path):
    """In WAL mode SQLite readers do not wait for the writer: GetPayment and ListPayments answer while another
    connection holds the write lock, instead of queueing behind it for up to the busy timeout of 10 s."""
    import sqlite3

    path = tmp_path / "payment.db"
    async with payment_service(f"sqlite+aiosqlite:///{path}") as (payment, _, _port):
        paid = (await payment.ProcessPayment(payment_request())).payment
        writer = sqlite3.connect(path, isolation_level=None)
        try:
            writer.execute("BEGIN IMMEDIATE")
            assert (await payment.GetPayment(svc.GetPaymentRequest(id=paid.id), timeout=2)).payment == paid
            listed = await payment.ListPayments(svc.ListPaymentsRequest(), timeout=2)
            assert [p.id for p in listed.payments] == [paid.id]
        finally:
            writer.execute("ROLLBACK")
            writer.close()


class PaysOutEveryRefund(SandboxProcessor):
    """The sandbox, except that its refunds behave as those of a processor that does not deduplicate them: every
    refund call pays out again, whatever was paid out before. Payouts are kept in `payouts`, by charge."""

    payouts: dict[str, list[str]] = {}

    async def refund(self, request: RefundRequest) -> Refunded:
        await asyncio.sleep(0.3)  # long enough for a concurrent refund to reach the processor too, if let through
        reference = f"sbx_re_{uuid.uuid4().hex}"
        self.payouts.setdefault(request.charge_reference, []).append(reference)
        return Refunded(reference)

    async def find_refund(self, charge_reference: str) -> Refunded | None:
        paid = self.payouts.get(charge_reference)
        return Refunded(paid[0]) if paid else None


async def test_concurrent_refunds_with_different_keys_pay_out_once_with_a_processor_that_does_not_check(
        db_url, monkeypatch):
    """A manual refund and an order's cancellation refund the same payment at once, each with its own key. The
    service itself lets only one of them reach the processor: the other answers with the refunded payment or
    ABORTED (REFUND_IN_PROGRESS) naming the payment, never with a second payout."""
    monkeypatch.setattr(PaysOutEveryRefund, "payouts", {})
    monkeypatch.setattr(bootstrap, "SandboxProcessor", PaysOutEveryRefund)
    async with payment_service(db_url) as (stub, _, _):
        paid = (await stub.ProcessPayment(payment_request("pm_sandbox_ok"))).payment

        async def refund(key: str) -> str:
            try:
                reply = await stub.RefundPayment(svc.RefundPaymentRequest(payment_id=paid.id, idempotency_key=key,
                                                                          reason=key))
            except grpc.aio.AioRpcError as err:
                info, _ = error_details(err)
                assert (err.code(), info.reason, dict(info.metadata)) == (
                    grpc.StatusCode.ABORTED, "REFUND_IN_PROGRESS", {"payment_id": paid.id}), err
                return "in progress"
            assert reply.payment.status == REFUNDED
            return "refunded"

        answers = await asyncio.gather(*(refund(key) for key in ("admin-refund", f"order:{paid.order_id}:refund",
                                                                 "another-admin-refund")))
        assert "refunded" in answers, answers
        print("answers:", answers, "payouts:", PaysOutEveryRefund.payouts)
        assert [len(p) for p in PaysOutEveryRefund.payouts.values()] == [1]
        final = (await stub.GetPayment(svc.GetPaymentRequest(id=paid.id))).payment
        assert final.status == REFUNDED
        again = (await stub.RefundPayment(svc.RefundPaymentRequest(payment_id=paid.id, idempotency_key="late"))).payment
        assert again == final
        assert [len(p) for p in PaysOutEveryRefund.payouts.values()] == [1]
    assert (await event_types(db_url)).count("PaymentRefunded") == 1


async def test_refunds_left_claimed_by_a_crash_are_resolved_without_paying_out_again(db_url):
    # Recovery runs at start only here, so that the repeat call is what resolves the first claim.
    async with payment_service(db_url, TESSERA_PAYMENT_RECOVERY_SECONDS="600") as (stub, _, _):
        # 1. Crashed after the processor paid out, before REFUNDED was written. The payment is set back to the
        # state such a crash leaves: SUCCEEDED with the refund claimed, its lease still running. A repeat, even with
        # another key, is told to wait.
        paid = (await stub.ProcessPayment(payment_request("pm_sandbox_ok"))).payment
        await stub.RefundPayment(svc.RefundPaymentRequest(payment_id=paid.id, idempotency_key="first", reason="why"))
        running = dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5)
        await execute(db_url, update(payments).where(payments.c.id == paid.id).values(
            status="SUCCEEDED", refund_reference="", refund_time=None, refunded_amount_minor=0,
            lease_expire_time=running))
        status, info = await failure(stub.RefundPayment(svc.RefundPaymentRequest(payment_id=paid.id,
                                                                                 idempotency_key="second")))
        assert (status, info.reason, dict(info.metadata)) == (grpc.StatusCode.ABORTED, "REFUND_IN_PROGRESS",
                                                              {"payment_id": paid.id})
        # Once the lease has run out, the repeat asks the processor, which remembers the payout.
        gone = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
        await execute(db_url, update(payments).where(payments.c.id == paid.id).values(lease_expire_time=gone))
        resolved = (await stub.RefundPayment(svc.RefundPaymentRequest(payment_id=paid.id,
                                                                      idempotency_key="second"))).payment
        (ledger,) = await sandbox_charges_of(db_url, paid.id)
        assert (resolved.status, resolved.refund_reason) == (REFUNDED, "why")
        assert ledger._mapping["refund_idempotency_key"] == "first"

        # 2. Crashed before the processor was asked: nobody repeats the call. Left as such a crash leaves it...
        lost = (await stub.ProcessPayment(payment_request("pm_sandbox_ok"))).payment
        await execute(db_url, update(payments).where(payments.c.id == lost.id).values(
            refund_key="lost", refund_reason="lost", lease_expire_time=gone))

    # ... it is found by the recovery loop of the service started again, which learns from the processor that
    # nothing was paid out and gives the claim up without refunding: a later refund pays out once.
    async with payment_service(db_url, TESSERA_PAYMENT_RECOVERY_SECONDS="0.1") as (stub, _, _):
        async def released() -> bool | None:
            (row,) = await query(db_url, select(payments.c.refund_key).where(payments.c.id == lost.id))
            return True if row[0] is None else None

        await eventually(released)
        assert (await stub.GetPayment(svc.GetPaymentRequest(id=lost.id))).payment.status == SUCCEEDED
        (ledger,) = await sandbox_charges_of(db_url, lost.id)
        assert ledger._mapping["refund_reference"] is None
        refunded = (await stub.RefundPayment(svc.RefundPaymentRequest(payment_id=lost.id, idempotency_key="later",
                                                                      reason="later"))).payment
        assert (refunded.status, refunded.refund_reason) == (REFUNDED, "later")
        (ledger,) = await sandbox_charges_of(db_url, lost.id)
        assert ledger._mapping["refund_idempotency_key"] == "later"


VOIDED = payment_pb2.PAYMENT_STATUS_VOIDED


async def test_a_void_makes_the_key_final_without_a_charge(db_url):
    async with payment_service(db_url, TESSERA_PAYMENT_PROCESSOR_MAX_ATTEMPTS="1") as (stub, _, _):
        # A FAILED payment, which the next ProcessPayment with its key would charge.
        request = payment_request("pm_sandbox_transient")
        await failure(stub.ProcessPayment(request))
        failed = await only_payment_of(stub, request.order_id)
        voided = (await stub.VoidPayment(void_of(request))).payment
        assert (voided.id, voided.status, voided.attempts, voided.version) == (failed.id, VOIDED, 1,
                                                                               failed.version + 1)
        assert voided.failure_message == failed.failure_message
        status, info = await failure(stub.ProcessPayment(request))
        assert (status, info.reason, dict(info.metadata)) == (grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_VOIDED",
                                                              {"payment_id": failed.id})
        assert (await stub.VoidPayment(void_of(request))).payment == voided
        assert (await only_payment_of(stub, request.order_id)) == voided

        # A key no charge was made with: the void records a VOIDED payment under it, which no charge then takes.
        never = payment_request("pm_sandbox_ok")
        blocked = (await stub.VoidPayment(void_of(never))).payment
        assert (blocked.status, blocked.attempts, blocked.idempotency_key, blocked.amount.amount_minor) == (
            VOIDED, 0, never.idempotency_key, 4200)
        status, info = await failure(stub.ProcessPayment(never))
        assert (status, info.reason, dict(info.metadata)) == (grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_VOIDED",
                                                              {"payment_id": blocked.id})

        # A payment that took money is not voided: it is refunded.
        charged = (await stub.ProcessPayment(payment_request("pm_sandbox_ok", key="charged"))).payment
        status, info = await failure(stub.VoidPayment(void_of(payment_request(
            "pm_sandbox_ok", key="charged", order_id=charged.order_id, customer_id=charged.customer_id))))
        assert (status, info.reason, dict(info.metadata)) == (
            grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_NOT_VOIDABLE",
            {"payment_id": charged.id, "status": "PAYMENT_STATUS_SUCCEEDED"})
    assert not await sandbox_charges_of(db_url, failed.id) and not await sandbox_charges_of(db_url, blocked.id)
    assert await event_types(db_url) == ["PaymentFailed", "PaymentVoided", "PaymentVoided", "PaymentSucceeded"], (
        "each void publishes PaymentVoided once; a repeat publishes nothing")


async def voided_events(db_url: str) -> list[events_pb2.PaymentVoided]:
    rows = await query(db_url, select(outbox.c.aggregate_type, outbox.c.aggregate_id, outbox.c.payload)
                       .where(outbox.c.event_type == "tessera.payment.v1.PaymentVoided").order_by(outbox.c.seq))
    events = [events_pb2.PaymentVoided.FromString(r[2]) for r in rows]
    assert [(r[0], r[1]) for r in rows] == [("payment", e.payment_id) for e in events]
    return events


async def test_a_void_publishes_payment_voided_once_in_the_transaction_that_voids(db_url):
    async with payment_service(db_url, TESSERA_PAYMENT_PROCESSOR_MAX_ATTEMPTS="1") as (stub, _, _):
        request = payment_request("pm_sandbox_transient", amount=1999, currency="JPY")
        await failure(stub.ProcessPayment(request))
        voided = (await stub.VoidPayment(void_of(request))).payment
        assert (await stub.VoidPayment(void_of(request))).payment == voided
        # A key no charge was made with, voided by several calls at once: one VOIDED payment, one event.
        never = payment_request("pm_sandbox_ok")
        replies = await asyncio.gather(*(stub.VoidPayment(void_of(never)) for _ in range(6)))
        (blocked,) = {r.payment.SerializeToString() for r in replies}
        blocked = payment_pb2.Payment.FromString(blocked)
        assert (await stub.VoidPayment(void_of(never))).payment == blocked
    failed_event, never_event = await voided_events(db_url)
    assert (failed_event.payment_id, failed_event.order_id, failed_event.customer_id) == (
        voided.id, request.order_id, request.customer_id)
    assert (failed_event.amount.currency_code, failed_event.amount.amount_minor) == ("JPY", 1999)
    assert (failed_event.attempts, failed_event.failure_message) == (1, voided.failure_message) and voided.attempts == 1
    assert failed_event.occur_time == voided.update_time
    assert (never_event.payment_id, never_event.order_id, never_event.attempts, never_event.failure_message) == (
        blocked.id, never.order_id, 0, "")
    assert never_event.occur_time == blocked.update_time
    assert await event_types(db_url) == ["PaymentFailed", "PaymentVoided", "PaymentVoided"]


async def test_charges_and_voids_racing_on_a_failed_payment_never_both_win(db_url):
    async with payment_service(db_url, TESSERA_PAYMENT_PROCESSOR_MAX_ATTEMPTS="1") as (stub, _, _):
        outcomes = []
        for _ in range(3):
            request = payment_request("pm_sandbox_transient")
            await failure(stub.ProcessPayment(request))  # FAILED: the next charge would take the money

            async def call(rpc, message) -> str:
                try:
                    return payment_pb2.PaymentStatus.Name((await rpc(message)).payment.status)
                except grpc.aio.AioRpcError as err:
                    return error_details(err)[0].reason

            answers = await asyncio.gather(*(call(stub.ProcessPayment, request) if i % 2 else
                                             call(stub.VoidPayment, void_of(request)) for i in range(8)))
            final = await only_payment_of(stub, request.order_id)
            charges = await sandbox_charges_of(db_url, final.id)
            outcomes.append((payment_pb2.PaymentStatus.Name(final.status), len(charges)))
            published = await event_types(db_url)
            if final.status == VOIDED:
                assert not charges and "PAYMENT_STATUS_SUCCEEDED" not in answers, answers
            else:
                assert (final.status, len(charges)) == (SUCCEEDED, 1), answers
                assert "PAYMENT_STATUS_VOIDED" not in answers, answers
            # Only the winner's change wrote its event: one PaymentVoided or one PaymentSucceeded per race so far.
            assert published.count("PaymentVoided") == [o[0] for o in outcomes].count("PAYMENT_STATUS_VOIDED")
            assert published.count("PaymentSucceeded") == [o[0] for o in outcomes].count("PAYMENT_STATUS_SUCCEEDED")
    print("final status and charges of each race:", outcomes)



async def abandon(db_url: str, payment_id: str, *, lease: dt.timedelta = dt.timedelta(seconds=-1)) -> None:
    """Leaves the payment as a ProcessPayment that claimed it (PENDING, leased) and then crashed, or lost its
    database, before the processor answered leaves it: its lease runs out after `lease`."""
    await execute(db_url, update(payments).where(payments.c.id == payment_id).values(
        status="PENDING", processor_reference="", lease_expire_time=dt.datetime.now(dt.UTC) + lease,
        version=payments.c.version + 1))


async def test_a_void_settles_an_abandoned_charge_from_the_processors_books(db_url):
    # Recovery runs at start only here, so that the void is what settles the abandoned charges.
    env = {"TESSERA_PAYMENT_RECOVERY_SECONDS": "600", "TESSERA_PAYMENT_PROCESSOR_MAX_ATTEMPTS": "1"}
    async with payment_service(db_url, **env) as (stub, _, _):
        # 1. The processor never charged it (the transient method's first attempt failed; the call that took it over
        # for a second attempt died before the processor answered).
        lost = payment_request("pm_sandbox_transient")
        await failure(stub.ProcessPayment(lost))
        failed = await only_payment_of(stub, lost.order_id)
        # While its lease runs the charging call may still answer: the void waits for it and changes nothing.
        await abandon(db_url, failed.id, lease=dt.timedelta(minutes=5))
        status, info = await failure(stub.VoidPayment(void_of(lost)))
        assert (status, info.reason) == (grpc.StatusCode.ABORTED, "PAYMENT_IN_PROGRESS")
        assert (await only_payment_of(stub, lost.order_id)).status == PENDING
        # Once the lease ran out the void asks the processor, which has no charge: VOIDED at once, not left for the
        # recovery loop.
        await abandon(db_url, failed.id)
        voided = (await stub.VoidPayment(void_of(lost))).payment
        assert (voided.id, voided.status, voided.attempts) == (failed.id, VOIDED, 1)
        assert "interrupted" in voided.failure_message
        assert (await stub.VoidPayment(void_of(lost))).payment == voided
        status, info = await failure(stub.ProcessPayment(lost))
        assert (status, info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_VOIDED")
        assert not await sandbox_charges_of(db_url, failed.id)

        # 2. The processor charged it, but the call died before it recorded SUCCEEDED (and its event).
        charged_request = payment_request("pm_sandbox_ok")
        charged = (await stub.ProcessPayment(charged_request)).payment
        await execute(db_url, outbox.delete().where(outbox.c.aggregate_id == charged.id))
        await abandon(db_url, charged.id)
        status, info = await failure(stub.VoidPayment(void_of(charged_request)))
        assert (status, info.reason, dict(info.metadata)) == (
            grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_NOT_VOIDABLE",
            {"payment_id": charged.id, "status": "PAYMENT_STATUS_SUCCEEDED"})
        settled = (await stub.GetPayment(svc.GetPaymentRequest(id=charged.id))).payment
        assert (settled.status, settled.processor_reference) == (SUCCEEDED, charged.processor_reference)
        # So the caller refunds it.
        refunded = (await stub.RefundPayment(svc.RefundPaymentRequest(payment_id=charged.id,
                                                                      idempotency_key="refund"))).payment
        assert refunded.status == REFUNDED
    assert len(await sandbox_charges_of(db_url, charged.id)) == 1
    voided_event, = await voided_events(db_url)
    assert (voided_event.payment_id, voided_event.attempts) == (failed.id, 1)
    assert await event_types(db_url) == ["PaymentFailed", "PaymentVoided", "PaymentSucceeded", "PaymentRefunded"]


async def test_charges_and_voids_racing_on_an_abandoned_charge_never_both_win(db_url):
    env = {"TESSERA_PAYMENT_RECOVERY_SECONDS": "600", "TESSERA_PAYMENT_PROCESSOR_MAX_ATTEMPTS": "1"}
    async with payment_service(db_url, **env) as (stub, _, _):
        outcomes = []
        for _ in range(4):
            request = payment_request("pm_sandbox_transient")  # a repeat's attempt 2 is charged
            await failure(stub.ProcessPayment(request))
            abandoned = await only_payment_of(stub, request.order_id)
            await abandon(db_url, abandoned.id)

            async def call(rpc, message) -> str:
                try:
                    return payment_pb2.PaymentStatus.Name((await rpc(message)).payment.status)
                except grpc.aio.AioRpcError as err:
                    return error_details(err)[0].reason

            answers = await asyncio.gather(*(call(stub.ProcessPayment, request) if i % 2 else
                                             call(stub.VoidPayment, void_of(request)) for i in range(8)))
            final = await only_payment_of(stub, request.order_id)
            charges = await sandbox_charges_of(db_url, final.id)
            outcomes.append((payment_pb2.PaymentStatus.Name(final.status), len(charges)))
            if final.status == VOIDED:
                assert not charges and "PAYMENT_STATUS_SUCCEEDED" not in answers, answers
            else:
                assert (final.status, len(charges)) == (SUCCEEDED, 1), answers
                assert "PAYMENT_STATUS_VOIDED" not in answers, answers
            published = await event_types(db_url)
            assert published.count("PaymentVoided") == [o[0] for o in outcomes].count("PAYMENT_STATUS_VOIDED")
            assert published.count("PaymentSucceeded") == [o[0] for o in outcomes].count("PAYMENT_STATUS_SUCCEEDED")
    print("final status and charges of each race:", outcomes)
