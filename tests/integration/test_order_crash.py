"""Crash recovery: the order service runs as a real process, dies between saga steps (the
TESSERA_ORDER_CRASH_AFTER_STEP fault injection, or a real SIGKILL) and is restarted on the same database. Every
saga must end CONFIRMED or FAILED with its compensations done: no double charge, no leaked reservation."""

from __future__ import annotations

import asyncio
import json
import signal
import time
import uuid

import grpc
import pytest
from sqlalchemy import select
from tessera.inventory.v1 import product_pb2
from tessera.order.v1 import order_pb2
from tessera.order.v1 import order_service_pb2 as svc
from tessera.payment.v1 import payment_pb2

from tessera_order.adapters.orm import order_sagas, orders, outbox
from tessera_order.service_layer.saga import RESUME_SPAN
from tessera_runtime.clients import error_details
from tessera_runtime.db import Database
from tests.support.order_stack import Neighbours, OrderProcess
from tests.support.otlp_receiver import ReceivedSpan

FINAL = (order_pb2.ORDER_STATUS_CONFIRMED, order_pb2.ORDER_STATUS_FAILED)
PROCESS_PAYMENT = "/tessera.payment.v1.PaymentService/ProcessPayment"
COMMIT_RESERVATION = "/tessera.inventory.v1.InventoryService/CommitReservation"
CRASHED = 137  # the fault injection exits like a SIGKILLed process


@pytest.fixture(scope="module")
async def neighbours(tmp_path_factory):
    stack = await Neighbours(tmp_path_factory.mktemp("order-crash-neighbours")).start()
    yield stack
    await stack.stop()


@pytest.fixture
def sqlite_url(tmp_path):
    return f"sqlite+aiosqlite:///{tmp_path / 'order.db'}"


async def _process(neighbours, database_url, tmp_path):
    process = OrderProcess(neighbours.order_env(database_url), tmp_path / "order.log")
    yield process
    await process.stop()


@pytest.fixture
async def order_process(neighbours, sqlite_url, tmp_path):
    """The order service process on SQLite: each scenario once (process restarts are the slow part)."""
    async for process in _process(neighbours, sqlite_url, tmp_path):
        yield process


@pytest.fixture
async def order_process_any_db(neighbours, db_url, tmp_path):
    """The order service process on SQLite and on PostgreSQL."""
    async for process in _process(neighbours, db_url, tmp_path):
        yield process


def request(customer: str, product: str, quantity: int = 1, method: str = "pm_sandbox_ok") -> svc.CreateOrderRequest:
    return svc.CreateOrderRequest(customer_id=customer, payment_method=method, currency_code="EUR",
                                  request_id=uuid.uuid4().hex,
                                  items=[svc.CreateOrderRequest.Item(product_id=product, quantity=quantity)])


async def stored(db_url: str, table=orders) -> list[dict]:
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            return [dict(r._mapping) for r in (await conn.execute(select(table))).all()]
    finally:
        await db.dispose()


def log_lines(path) -> list[dict]:
    return [json.loads(raw) for raw in path.read_text(errors="replace").splitlines() if raw.startswith("{")]


async def settled(process: OrderProcess, order_ids: list[str], timeout: float = 45.0) -> list[order_pb2.Order]:
    """Polls GetOrder until every order is CONFIRMED or FAILED."""
    deadline = time.monotonic() + timeout
    while True:
        found = [(await process.stub.GetOrder(svc.GetOrderRequest(id=i), timeout=5)).order for i in order_ids]
        if all(o.status in FINAL for o in found) or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.1)


async def crash_during(process: OrderProcess, req: svc.CreateOrderRequest) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await process.stub.CreateOrder(req, timeout=30)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert process.exit_code() == CRASHED


async def assert_clean(neighbours: Neighbours, order: order_pb2.Order) -> None:
    """Money and stock match the order's final status: one kept charge and a committed reservation when
    CONFIRMED; nothing kept and nothing held when FAILED."""
    payments = await neighbours.order_payments(order.id)
    kept = [p for p in payments if p.status == payment_pb2.PAYMENT_STATUS_SUCCEEDED]
    assert all(p.idempotency_key == f"order:{order.id}" for p in payments)
    assert len(payments) <= 1, "one payment record per order, however often the step ran"
    if order.status == order_pb2.ORDER_STATUS_CONFIRMED:
        assert len(kept) == 1 and kept[0].id == order.payment_id
        assert (await neighbours.reservation(order.reservation_id)).status == product_pb2.RESERVATION_STATUS_COMMITTED
    else:
        assert kept == []
        if order.reservation_id:
            assert (await neighbours.reservation(order.reservation_id)).status in (
                product_pb2.RESERVATION_STATUS_RELEASED, product_pb2.RESERVATION_STATUS_EXPIRED)


async def test_crash_after_reserving_stock_then_restart_confirms_the_order(order_process, neighbours, sqlite_url):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    await order_process.start(TESSERA_ORDER_CRASH_AFTER_STEP="RESERVE_STOCK")
    req = request(customer, product, quantity=2)
    await crash_during(order_process, req)
    [row] = await stored(sqlite_url)
    assert (row["status"], row["payment_id"]) == ("PENDING", "") and row["reservation_id"]
    assert (await neighbours.stock(product)).stock_reserved == 2, "the reservation outlived the process"

    await order_process.start()
    [order] = await settled(order_process, [row["id"]])
    assert order.status == order_pb2.ORDER_STATUS_CONFIRMED
    await assert_clean(neighbours, order)
    stock = await neighbours.stock(product)
    assert (stock.stock_on_hand, stock.stock_reserved) == (3, 0)
    # The client's retry with the same request_id gets the order, not a second one.
    again = (await order_process.stub.CreateOrder(req, timeout=30)).order
    assert again.id == order.id and len(await stored(sqlite_url)) == 1


async def test_crash_after_a_declined_payment_then_restart_compensates(order_process, neighbours, sqlite_url):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    await order_process.start(TESSERA_ORDER_CRASH_AFTER_STEP="PROCESS_PAYMENT")
    req = request(customer, product, quantity=2, method="pm_sandbox_declined")
    await crash_during(order_process, req)
    [row] = await stored(sqlite_url)
    assert (row["status"], row["failure_reason"]) == ("COMPENSATING", "PAYMENT_DECLINED")

    await order_process.start()
    [order] = await settled(order_process, [row["id"]])
    assert order.status == order_pb2.ORDER_STATUS_FAILED and order.failure.reason == "PAYMENT_DECLINED"
    await assert_clean(neighbours, order)
    assert (await neighbours.stock(product)).stock_available == 5
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await order_process.stub.CreateOrder(req, timeout=30)
    assert error_details(caught.value)[0].reason == "PAYMENT_DECLINED"


async def test_reservation_lost_while_the_service_was_down_is_compensated_on_restart(order_process, neighbours,
                                                                                      sqlite_url):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    await order_process.start(TESSERA_ORDER_CRASH_AFTER_STEP="PROCESS_PAYMENT")
    await crash_during(order_process, request(customer, product, quantity=2))
    [row] = await stored(sqlite_url)
    assert row["status"] == "PENDING" and row["payment_id"]
    await neighbours.release(row["reservation_id"])  # as if it expired while nobody confirmed it

    await order_process.start()
    [order] = await settled(order_process, [row["id"]])
    assert order.status == order_pb2.ORDER_STATUS_FAILED and order.failure.reason == "RESERVATION_EXPIRED"
    assert [p.status for p in await neighbours.order_payments(order.id)] == [payment_pb2.PAYMENT_STATUS_REFUNDED]
    await assert_clean(neighbours, order)
    assert (await neighbours.stock(product)).stock_available == 5


async def test_crash_with_many_sagas_in_flight_leaves_none_half_done(order_process_any_db, neighbours, db_url):
    order_process = order_process_any_db
    customers = [await neighbours.customer() for _ in range(6)]
    product = await neighbours.product(10)
    await order_process.start(TESSERA_ORDER_CRASH_AFTER_STEP="PROCESS_PAYMENT")
    requests = [request(c, product) for c in customers]
    outcomes = await asyncio.gather(*(order_process.stub.CreateOrder(r, timeout=30) for r in requests),
                                    return_exceptions=True)
    assert order_process.exit_code() == CRASHED
    assert any(isinstance(o, grpc.aio.AioRpcError) for o in outcomes)

    await order_process.start()
    found = await settled(order_process, [row["id"] for row in await stored(db_url)])
    # Clients retry what failed with the same request_id: each gets the one order placed for it.
    for r in requests:
        reply = await order_process.stub.CreateOrder(r, timeout=30)
        assert reply.order.status == order_pb2.ORDER_STATUS_CONFIRMED
    found = await settled(order_process, [row["id"] for row in await stored(db_url)])
    assert len(found) == len(requests)
    assert all(o.status == order_pb2.ORDER_STATUS_CONFIRMED for o in found), [o.status for o in found]
    for order in found:
        await assert_clean(neighbours, order)
    stock = await neighbours.stock(product)
    assert (stock.stock_on_hand, stock.stock_reserved) == (10 - len(requests), 0)


async def test_sigkill_while_charging_then_restart_compensates_the_timed_out_payment(order_process, neighbours,
                                                                                      sqlite_url):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    await order_process.start()
    call = asyncio.ensure_future(order_process.stub.CreateOrder(
        request(customer, product, quantity=2, method="pm_sandbox_timeout"), timeout=30))
    deadline = time.monotonic() + 20
    while not [r for r in await stored(sqlite_url) if r["payment_id"] == "" and r["reservation_id"]]:
        assert time.monotonic() < deadline, "the saga never reached the payment step"
        await asyncio.sleep(0.02)
    order_process.process.proc.send_signal(signal.SIGKILL)  # mid-charge: the payment is PENDING somewhere
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    assert order_process.exit_code() == -signal.SIGKILL

    await order_process.start()
    [row] = await stored(sqlite_url)
    [order] = await settled(order_process, [row["id"]])
    assert order.status == order_pb2.ORDER_STATUS_FAILED and order.failure.reason == "PAYMENT_TIMEOUT"
    await assert_clean(neighbours, order)
    # Voided by the compensation: no later ProcessPayment with the order's key may charge it.
    assert all(p.status == payment_pb2.PAYMENT_STATUS_VOIDED for p in await neighbours.order_payments(order.id))
    assert (await neighbours.stock(product)).stock_available == 5


async def test_a_saga_resumed_by_a_new_process_continues_the_trace_and_correlation_id_of_its_request(
        tracing, neighbours, db_url, tmp_path):
    receiver = tracing.receiver
    log_path = tmp_path / "order.log"
    process = OrderProcess(neighbours.order_env(db_url, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.endpoint,
                                                OTEL_BSP_SCHEDULE_DELAY="100"), log_path)
    try:
        customer, product = await neighbours.customer(), await neighbours.product(5)
        await process.start(TESSERA_ORDER_CRASH_AFTER_STEP="RESERVE_STOCK")
        trace_id, edge_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]  # as the gateway would send them
        correlation_id = f"corr-{uuid.uuid4().hex[:12]}"
        with pytest.raises(grpc.aio.AioRpcError):
            await process.stub.CreateOrder(request(customer, product, quantity=2), timeout=30, metadata=(
                ("traceparent", f"00-{trace_id}-{edge_span}-01"), ("x-correlation-id", correlation_id)))
        assert process.exit_code() == CRASHED
        [row] = await stored(db_url)
        # The crashed process's last line was written in the CreateOrder's server span (its spans died with it).
        [crash] = [line for line in log_lines(log_path) if line["message"].startswith("fault injection")]
        assert (crash["trace_id"], crash["correlation_id"]) == (trace_id, correlation_id)
        create_span = crash["span_id"]
        [saga] = await stored(db_url, order_sagas)
        assert saga["traceparent"] == f"00-{trace_id}-{create_span}-01"
        crashed_lines = len(log_lines(log_path))

        await process.start()  # a new process: its recovery loop resumes the saga
        [order] = await settled(process, [row["id"]])
        assert order.status == order_pb2.ORDER_STATUS_CONFIRMED
    finally:
        await process.stop()

    def resumed(r) -> list[ReceivedSpan]:
        return r.spans(lambda s: s.name == RESUME_SPAN and s.attributes.get("tessera.order_id") == order.id)

    def servers(r) -> set[str]:  # the neighbours' side of the resumed calls (they export from this process)
        return {s.name for s in r.trace(trace_id) if s.kind == "SERVER"}

    await tracing.wait(lambda r: bool(resumed(r)) and servers(r) >= {PROCESS_PAYMENT, COMMIT_RESERVATION},
                       timeout=60)
    [resume] = resumed(receiver)
    # A child of the request's server span, in the request's trace (see tessera_runtime/saga.py).
    assert (resume.trace_id, resume.parent_span_id, resume.kind) == (trace_id, create_span, "INTERNAL")
    assert resume.service == "order-service"
    assert resume.attributes["tessera.correlation_id"] == correlation_id
    assert (resume.attributes["tessera.saga.resumed_status"], resume.attributes["tessera.saga.resumed_step"],
            resume.attributes["tessera.saga.outcome"]) == ("PENDING", "PROCESS_PAYMENT", "CONFIRMED")
    spans = receiver.trace(trace_id)
    by_id = {s.span_id: s for s in spans}

    def under_resume(span: ReceivedSpan) -> bool:
        while span.parent_span_id in by_id:
            span = by_id[span.parent_span_id]
            if span == resume:
                return True
        return False

    # The calls the resumed saga made, on both sides: the order process's client spans and the servers' spans.
    resumed_calls = {PROCESS_PAYMENT, COMMIT_RESERVATION}
    calls = {s.name for s in spans if s.service == "order-service" and s.kind == "CLIENT" and under_resume(s)}
    served = [s for s in spans if s.kind == "SERVER" and s.name in resumed_calls]
    assert calls >= resumed_calls and {s.name for s in served} == resumed_calls
    assert all(by_id[s.parent_span_id].kind == "CLIENT" and under_resume(s) for s in served)
    assert any(s.scope == "opentelemetry.instrumentation.sqlalchemy" and under_resume(s) for s in spans), \
        "the resumed saga's database work is in the trace"

    # The event the resumed saga wrote carries the request's trace and correlation id to its publisher.
    [confirmed] = [e for e in await stored(db_url, outbox) if e["event_type"] == "tessera.order.v1.OrderConfirmed"]
    headers = json.loads(confirmed["headers"])
    assert headers["traceparent"].split("-")[1] == trace_id
    assert headers["x-correlation-id"] == correlation_id
    # Every line the new process wrote about the order carries the request's trace and correlation id.
    lines = [line for line in log_lines(log_path)[crashed_lines:] if line.get("order_id") == order.id]
    assert {line["message"] for line in lines} >= {"resuming saga", "order confirmed"}
    assert {(line["trace_id"], line["correlation_id"]) for line in lines} == {(trace_id, correlation_id)}
