"""The order service and its CreateOrder saga against real user, inventory and payment servers over real channels,
with the order database on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
import uuid

import grpc
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text, update
from tessera.inventory.v1 import product_pb2
from tessera.order.v1 import order_events_pb2, order_pb2
from tessera.order.v1 import order_service_pb2 as svc
from tessera.payment.v1 import payment_pb2, payment_service_pb2, payment_service_pb2_grpc

from tessera_order.adapters.downstream import GrpcCustomerDirectory, GrpcInventory, GrpcPayments
from tessera_order.adapters.orm import order_items, order_saga_steps, order_sagas, orders, outbox
from tessera_order.adapters.repository import Lease, SagaCaller
from tessera_order.domain.model import Failure, Order, OrderItem, StepName
from tessera_order.service_layer.ports import Downstream, DownstreamError
from tessera_order.service_layer.unit_of_work import OrderUnitOfWork
from tessera_payment.adapters.orm import payments
from tessera_runtime.clients import error_details, open_channel
from tessera_runtime.db import Database, utcnow
from tests.integration.conftest_payment import payment_service
from tests.support.databases import execute
from tests.support.order_stack import InProcessOrder, Neighbours, count_rows
from tests.support.tcp_proxy import TcpProxy

EUR = "EUR"
STEP = order_pb2.SagaStepName
STATUS = order_pb2.SagaStepStatus


@pytest.fixture(scope="module")
async def neighbours(tmp_path_factory):
    stack = await Neighbours(tmp_path_factory.mktemp("order-neighbours")).start()
    yield stack
    await stack.stop()


@pytest.fixture
async def order_service(neighbours, db_url):
    service = await InProcessOrder.start(neighbours.order_env(db_url))
    yield service
    await service.stop()


def request(customer: str, *items: tuple[str, int], method: str = "pm_sandbox_ok", currency: str = EUR,
            request_id: str | None = None) -> svc.CreateOrderRequest:
    return svc.CreateOrderRequest(
        customer_id=customer, payment_method=method, currency_code=currency, request_id=request_id or uuid.uuid4().hex,
        items=[svc.CreateOrderRequest.Item(product_id=p, quantity=q) for p, q in items])


async def create(order_service, req: svc.CreateOrderRequest, timeout: float = 20) -> order_pb2.Order:
    return (await order_service.stub.CreateOrder(req, timeout=timeout)).order


async def create_fails(order_service, req: svc.CreateOrderRequest, code: grpc.StatusCode, reason: str):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await order_service.stub.CreateOrder(req, timeout=20)
    info, bad = error_details(caught.value)
    assert (caught.value.code(), info.reason, info.domain) == (code, reason, "order.tessera.dev"), caught.value
    return info, bad


async def get(order_service, order_id: str) -> order_pb2.Order:
    return (await order_service.stub.GetOrder(svc.GetOrderRequest(id=order_id))).order


def saga(order: order_pb2.Order) -> dict[str, str]:
    return {STEP.Name(s.name).removeprefix("SAGA_STEP_NAME_"): STATUS.Name(s.status).removeprefix("SAGA_STEP_STATUS_")
            for s in order.saga}


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


class Moved:
    """The saga outcome counters now, to assert by how much an order moved them."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        self.before = self._read()

    def _read(self) -> tuple[float, float, float]:
        return (metric("tessera_orders_failed_total", reason=self.reason), metric("tessera_orders_compensated_total"),
                metric("tessera_orders_confirmed_total"))

    def since(self) -> tuple[float, float, float]:
        """(failed with this reason, compensated, confirmed) since construction."""
        return tuple(now - then for now, then in zip(self._read(), self.before, strict=True))


async def events(db_url: str) -> list[str]:
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            rows = (await conn.execute(outbox.select().order_by(outbox.c.seq))).all()
    finally:
        await db.dispose()
    return [r._mapping["event_type"].rsplit(".", 1)[1] for r in rows]


async def test_happy_path_confirms_charges_and_sells_the_stock(order_service, neighbours, db_url):
    customer = await neighbours.customer()
    pen, ink = await neighbours.product(10, price=1250), await neighbours.product(4, price=399)
    order = await create(order_service, request(customer, (pen, 2), (ink, 3)))
    assert order.status == order_pb2.ORDER_STATUS_CONFIRMED
    assert order.total.amount_minor == 2 * 1250 + 3 * 399 and order.total.currency_code == EUR
    assert [(i.quantity, i.unit_price.amount_minor, i.line_total.amount_minor) for i in order.items] == [
        (2, 1250, 2500), (3, 399, 1197)]
    assert set(saga(order).values()) == {"SUCCEEDED"} and order.HasField("confirm_time")
    pen_now, ink_now = await neighbours.stock(pen), await neighbours.stock(ink)
    assert (pen_now.stock_on_hand, pen_now.stock_reserved, ink_now.stock_on_hand) == (8, 0, 1)
    assert (await neighbours.reservation(order.reservation_id)).status == product_pb2.RESERVATION_STATUS_COMMITTED
    [payment] = await neighbours.order_payments(order.id)
    assert payment.status == payment_pb2.PAYMENT_STATUS_SUCCEEDED and payment.id == order.payment_id
    assert payment.amount.amount_minor == order.total.amount_minor and payment.idempotency_key == f"order:{order.id}"
    assert await get(order_service, order.id) == order
    assert await events(db_url) == ["OrderCreated", "OrderConfirmed"]


# Failures before the order is stored: no order exists afterwards.

async def test_unknown_customer(order_service, neighbours, db_url):
    product = await neighbours.product(5)
    moved = Moved("CUSTOMER_NOT_FOUND")
    info, _ = await create_fails(order_service, request(str(uuid.uuid4()), (product, 1)),
                                 grpc.StatusCode.NOT_FOUND, "CUSTOMER_NOT_FOUND")
    assert "order_id" not in info.metadata
    assert await count_rows(db_url, orders) == 0
    assert moved.since() == (1, 0, 0)  # failed up front: nothing to compensate


async def test_inactive_customer(order_service, neighbours, db_url):
    customer, product = await neighbours.customer(active=False), await neighbours.product(5)
    info, _ = await create_fails(order_service, request(customer, (product, 1)),
                                 grpc.StatusCode.FAILED_PRECONDITION, "CUSTOMER_INACTIVE")
    assert info.metadata["customer_id"] == customer
    assert await count_rows(db_url, orders) == 0 and await neighbours.customer_payments(customer) == []


async def test_unknown_product(order_service, neighbours, db_url):
    customer, product, missing = await neighbours.customer(), await neighbours.product(5), str(uuid.uuid4())
    info, _ = await create_fails(order_service, request(customer, (product, 1), (missing, 1)),
                                 grpc.StatusCode.NOT_FOUND, "PRODUCT_NOT_FOUND")
    assert dict(info.metadata) == {"product_id": missing}
    assert await count_rows(db_url, orders) == 0 and (await neighbours.stock(product)).stock_reserved == 0


# Failures after the order is stored: the order ends FAILED and every completed step is undone.

async def test_insufficient_stock(order_service, neighbours, db_url):
    customer, product = await neighbours.customer(), await neighbours.product(2)
    moved = Moved("INSUFFICIENT_STOCK")
    info, _ = await create_fails(order_service, request(customer, (product, 3)),
                                 grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_STOCK")
    assert (info.metadata["product_id"], info.metadata["requested"], info.metadata["available"]) == (product, "3", "2")
    order = await get(order_service, info.metadata["order_id"])
    assert order.status == order_pb2.ORDER_STATUS_FAILED and order.failure.reason == "INSUFFICIENT_STOCK"
    assert order.failure.step == STEP.SAGA_STEP_NAME_RESERVE_STOCK
    assert saga(order)["RESERVE_STOCK"] == "FAILED" and saga(order)["CREATE_ORDER"] == "COMPENSATED"
    assert await neighbours.order_payments(order.id) == []
    stock = await neighbours.stock(product)
    assert (stock.stock_on_hand, stock.stock_reserved) == (2, 0)
    assert await events(db_url) == ["OrderCreated", "OrderFailed"]
    assert moved.since() == (1, 1, 0)


async def test_declined_payment_releases_the_stock(order_service, neighbours):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    moved = Moved("PAYMENT_DECLINED")
    compensated_sagas = metric("tessera_saga_duration_seconds_count", outcome="compensated")
    info, _ = await create_fails(order_service, request(customer, (product, 2), method="pm_sandbox_declined"),
                                 grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_DECLINED")
    assert info.metadata["decline_code"] == "card_declined"
    order = await get(order_service, info.metadata["order_id"])
    assert order.status == order_pb2.ORDER_STATUS_FAILED and order.payment_id == ""
    assert saga(order)["PROCESS_PAYMENT"] == "FAILED" and saga(order)["RESERVE_STOCK"] == "COMPENSATED"
    assert (await neighbours.reservation(order.reservation_id)).status == product_pb2.RESERVATION_STATUS_RELEASED
    [payment] = await neighbours.order_payments(order.id)
    assert payment.status == payment_pb2.PAYMENT_STATUS_DECLINED and payment.id == info.metadata["payment_id"]
    stock = await neighbours.stock(product)
    assert (stock.stock_on_hand, stock.stock_reserved) == (5, 0)
    # One failed order, by the reason the customer was told, whose compensations all completed.
    assert moved.since() == (1, 1, 0)
    assert metric("tessera_saga_duration_seconds_count", outcome="compensated") == compensated_sagas + 1


async def test_transient_payment_failure_is_retried_then_succeeds(neighbours, db_url, tmp_path):
    # A payment service of its own: the neighbours' processor timeout (0.5 s, kept short for the tests of a processor
    # that hangs) is the whole budget of a charge's attempts, and two attempts with their SQLite commits between
    # them can take longer than that on a loaded host. Here the budget is what a deployment gives it.
    payment_db = f"sqlite+aiosqlite:///{tmp_path / 'payment.db'}"
    async with payment_service(payment_db, TESSERA_PAYMENT_PROCESSOR_TIMEOUT_SECONDS="5") as (_, _, payment_port):
        service = await InProcessOrder.start(neighbours.order_env(
            db_url, TESSERA_PAYMENT_SERVICE_ADDR=f"127.0.0.1:{payment_port}",
            TESSERA_ORDER_PAYMENT_DEADLINE_SECONDS="10"))
        try:
            customer, product = await neighbours.customer(), await neighbours.product(5)
            order = await create(service, request(customer, (product, 1), method="pm_sandbox_transient"))
            [payment] = await neighbours_payments(payment_port, order.id)
        finally:
            await service.stop()
    assert order.status == order_pb2.ORDER_STATUS_CONFIRMED, order.failure
    assert payment.status == payment_pb2.PAYMENT_STATUS_SUCCEEDED and payment.attempts >= 2
    assert (await neighbours.stock(product)).stock_on_hand == 4


@pytest.mark.parametrize("payment_deadline", ["5", "0.2"], ids=["processor-timeout", "own-deadline"])
async def test_payment_timeout_fails_the_order_and_takes_no_money(neighbours, db_url, payment_deadline):
    # Either the payment service's processor timeout (0.5 s) answers first, or the order service's own deadline on
    # the call does, while the charge is still PENDING: compensation then waits for it to settle.
    service = await InProcessOrder.start(neighbours.order_env(
        db_url, TESSERA_ORDER_PAYMENT_DEADLINE_SECONDS=payment_deadline, TESSERA_ORDER_COMPENSATION_MAX_ATTEMPTS="30"))
    try:
        customer, product = await neighbours.customer(), await neighbours.product(5)
        info, _ = await create_fails(service, request(customer, (product, 2), method="pm_sandbox_timeout"),
                                     grpc.StatusCode.DEADLINE_EXCEEDED, "PAYMENT_TIMEOUT")
        order = await get(service, info.metadata["order_id"])
    finally:
        await service.stop()
    assert order.status == order_pb2.ORDER_STATUS_FAILED and order.failure.reason == "PAYMENT_TIMEOUT"
    assert order.payment_id == "" and saga(order)["PROCESS_PAYMENT"] == "FAILED"
    # Voided by the compensation, so that no later ProcessPayment with the order's key charges it.
    assert [p.status for p in await neighbours.order_payments(order.id)] == [payment_pb2.PAYMENT_STATUS_VOIDED]
    assert (await neighbours.reservation(order.reservation_id)).status == product_pb2.RESERVATION_STATUS_RELEASED
    assert (await neighbours.stock(product)).stock_available == 5


class ReleasingInventory(GrpcInventory):
    """The real inventory client, except that the reservation is released (as if it expired) just before the
    saga commits it."""

    async def commit_reservation(self, reservation_id: str):
        await super().release_reservation(reservation_id, "released before the commit")
        return await super().commit_reservation(reservation_id)


async def test_failure_at_confirmation_refunds_the_payment(neighbours, db_url):
    channels = [open_channel(neighbours.address(s), []) for s in ("user", "inventory", "payment")]
    downstream = Downstream(GrpcCustomerDirectory(channels[0]), ReleasingInventory(channels[1]),
                            GrpcPayments(channels[2], 5.0))
    service = await InProcessOrder.start(neighbours.order_env(db_url), downstream=downstream)
    try:
        customer, product = await neighbours.customer(), await neighbours.product(5)
        info, _ = await create_fails(service, request(customer, (product, 2)),
                                     grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED")
        order = await get(service, info.metadata["order_id"])
    finally:
        await service.stop()
        for channel in channels:
            await channel.close()
    assert dict(info.metadata) == {"order_id": order.id, "reservation_id": order.reservation_id,
                                   "reservation_status": "RESERVATION_STATUS_RELEASED"}
    assert dict(order.failure.metadata) == {"reservation_id": order.reservation_id,
                                            "reservation_status": "RESERVATION_STATUS_RELEASED"}
    assert order.status == order_pb2.ORDER_STATUS_FAILED and order.failure.step == STEP.SAGA_STEP_NAME_CONFIRM_ORDER
    assert saga(order) == {"VALIDATE_CUSTOMER": "SUCCEEDED", "CREATE_ORDER": "COMPENSATED",
                           "RESERVE_STOCK": "COMPENSATED", "PROCESS_PAYMENT": "COMPENSATED",
                           "CONFIRM_ORDER": "FAILED"}
    [payment] = await neighbours.order_payments(order.id)
    assert payment.status == payment_pb2.PAYMENT_STATUS_REFUNDED and payment.id == order.payment_id
    stock = await neighbours.stock(product)
    assert (stock.stock_on_hand, stock.stock_reserved) == (5, 0)
    failed = [e for e in await events(db_url) if e == "OrderFailed"]
    assert failed == ["OrderFailed"]


class ReleasedOnReserveInventory(GrpcInventory):
    """The real inventory client, except that the reservation is released (as if it expired) as soon as it is made,
    so that the saga's ReserveStock finds it no longer holding the stock."""

    async def reserve_stock(self, order_id, items, ttl_seconds):
        made = await super().reserve_stock(order_id, items, ttl_seconds)
        await super().release_reservation(made.id, "released before the saga saw it")
        return await super().reserve_stock(order_id, items, ttl_seconds)


async def test_a_reservation_lost_at_reserve_stock_reports_it_as_one_lost_at_confirmation_does(neighbours, db_url):
    """RESERVATION_EXPIRED has one metadata form on every path: "reservation_id" and "reservation_status", the
    inventory's ReservationStatus name."""
    channels = [open_channel(neighbours.address(s), []) for s in ("user", "inventory", "payment")]
    downstream = Downstream(GrpcCustomerDirectory(channels[0]), ReleasedOnReserveInventory(channels[1]),
                            GrpcPayments(channels[2], 5.0))
    service = await InProcessOrder.start(neighbours.order_env(db_url), downstream=downstream)
    try:
        customer, product = await neighbours.customer(), await neighbours.product(5)
        info, _ = await create_fails(service, request(customer, (product, 2)),
                                     grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED")
        order = await get(service, info.metadata["order_id"])
    finally:
        await service.stop()
        for channel in channels:
            await channel.close()
    assert order.status == order_pb2.ORDER_STATUS_FAILED and order.failure.step == STEP.SAGA_STEP_NAME_RESERVE_STOCK
    assert dict(info.metadata) == {"order_id": order.id, "reservation_id": order.reservation_id,
                                   "reservation_status": "RESERVATION_STATUS_RELEASED"}
    assert dict(order.failure.metadata) == {"reservation_id": order.reservation_id,
                                            "reservation_status": "RESERVATION_STATUS_RELEASED"}
    assert not await neighbours.order_payments(order.id)


class HeldPayments(GrpcPayments):
    """The real payments client of the order service, on a real payment service whose processor fails an attempt
    at pm_sandbox_transient once (one processor attempt per call). For its first calls the order's charge is held
    PENDING in the payment database, leased to another call (as a charge a crashed order process started is), so
    the payment service answers PAYMENT_IN_PROGRESS; then that charge ends FAILED without having charged, and the
    order service "crashes" while waiting (an unexpected error interrupts the saga, which recovery resumes)."""

    def __init__(self, channel: grpc.aio.Channel, payment_db_url: str) -> None:
        super().__init__(channel, 5.0)
        self.payment_db_url = payment_db_url
        self.calls = 0

    async def _set(self, key: str, **values) -> None:
        await execute(self.payment_db_url, update(payments).where(payments.c.idempotency_key == key).values(**values))

    async def process_payment(self, **kw):
        self.calls += 1
        key = kw["idempotency_key"]
        if self.calls == 1:
            with contextlib.suppress(DownstreamError):
                await super().process_payment(**kw)  # makes the payment (its processor attempt fails)
            await self._set(key, status="PENDING", attempts=0,
                            lease_expire_time=dt.datetime.now(dt.UTC) + dt.timedelta(minutes=5))
        elif self.calls == 4:
            await self._set(key, status="FAILED", attempts=0, lease_expire_time=None)
            raise RuntimeError("the order process died while its saga waited for the charge")
        return await super().process_payment(**kw)


async def test_waiting_for_a_charge_in_progress_uses_no_attempt_even_across_a_crash(neighbours, db_url, tmp_path):
    """PAYMENT_IN_PROGRESS answers are waited for without counting as attempts of PROCESS_PAYMENT: the saga resumed
    after a crash during the wait still has its attempts for real failures (here: one transient processor failure,
    then the charge)."""
    payment_db = f"sqlite+aiosqlite:///{tmp_path / 'payment.db'}"
    async with payment_service(payment_db, TESSERA_PAYMENT_PROCESSOR_MAX_ATTEMPTS="1") as (_, _, payment_port):
        channels = [open_channel(neighbours.address(s), []) for s in ("user", "inventory")]
        payment_channel = open_channel(f"127.0.0.1:{payment_port}", [])
        held = HeldPayments(payment_channel, payment_db)
        downstream = Downstream(GrpcCustomerDirectory(channels[0]), GrpcInventory(channels[1]), held)
        service = await InProcessOrder.start(neighbours.order_env(db_url, TESSERA_ORDER_STEP_MAX_ATTEMPTS="3"),
                                             downstream=downstream)
        try:
            customer, product = await neighbours.customer(), await neighbours.product(5)
            req = request(customer, (product, 1), method="pm_sandbox_transient")
            order = None
            deadline = time.monotonic() + 30
            while order is None or order.status not in (order_pb2.ORDER_STATUS_CONFIRMED,
                                                         order_pb2.ORDER_STATUS_FAILED):
                assert time.monotonic() < deadline, order
                try:
                    order = await create(service, req, timeout=5)
                except grpc.aio.AioRpcError as err:
                    info, _ = error_details(err)
                    if info is not None and "order_id" in info.metadata:
                        order = await get(service, info.metadata["order_id"])
                await asyncio.sleep(0.1)
            (payment,) = await neighbours_payments(payment_port, order.id)
        finally:
            await service.stop()
            for channel in (*channels, payment_channel):
                await channel.close()
    pay_step = next(s for s in order.saga if s.name == STEP.SAGA_STEP_NAME_PROCESS_PAYMENT)
    print("order:", order_pb2.OrderStatus.Name(order.status), order.failure.reason, "payment step attempts:",
          pay_step.attempts, "payment calls:", held.calls)
    assert order.status == order_pb2.ORDER_STATUS_CONFIRMED, order.failure
    assert (pay_step.attempts, held.calls) == (3, 6)  # the first call, then one per real failure; three waits
    assert (payment.status, payment.attempts, payment.id) == (payment_pb2.PAYMENT_STATUS_SUCCEEDED, 2,
                                                              order.payment_id)


async def neighbours_payments(port: int, order_id: str) -> list[payment_pb2.Payment]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = payment_service_pb2_grpc.PaymentServiceStub(channel)
        return list((await stub.ListPayments(payment_service_pb2.ListPaymentsRequest(order_id=order_id))).payments)


# Idempotency, bad input, concurrency.

async def test_same_request_id_places_one_order_and_one_payment(order_service, neighbours, db_url):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    req = request(customer, (product, 1))
    first = await create(order_service, req)
    again = await create(order_service, req)
    assert again == first
    assert len(await neighbours.order_payments(first.id)) == 1 and await count_rows(db_url, orders) == 1
    assert (await neighbours.stock(product)).stock_on_hand == 4
    other = request(customer, (product, 2), request_id=req.request_id)
    info, _ = await create_fails(order_service, other, grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert info.metadata["order_id"] == first.id


async def test_concurrent_repeats_of_one_request_place_one_order(order_service, neighbours, db_url):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    req = request(customer, (product, 1))
    outcomes = await asyncio.gather(*(create(order_service, req) for _ in range(4)), return_exceptions=True)
    placed = {o.id for o in outcomes if isinstance(o, order_pb2.Order)}
    busy = [error_details(o)[0].reason for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(placed) == 1 and set(busy) <= {"ORDER_IN_PROGRESS"}, outcomes
    assert await count_rows(db_url, orders) == 1
    [order_id] = placed
    assert len(await neighbours.order_payments(order_id)) == 1
    assert (await neighbours.stock(product)).stock_on_hand == 4


BAD_INPUT = [
    (lambda r: r.ClearField("items"), ["items"]),
    (lambda r: setattr(r.items[0], "quantity", 0), ["items[0].quantity"]),
    (lambda r: setattr(r.items[0], "quantity", -2), ["items[0].quantity"]),
    (lambda r: setattr(r, "currency_code", "XXZ"), ["currency_code"]),
    (lambda r: setattr(r, "customer_id", "customer-1"), ["customer_id"]),
    (lambda r: setattr(r.items[0], "product_id", "p1"), ["items[0].product_id"]),
    # A payment method of spaces only, which the payment service refuses: it stored an order, reserved and released
    # stock, and answered UNAVAILABLE.
    (lambda r: setattr(r, "payment_method", " "), ["payment_method"]),
    (lambda r: setattr(r, "payment_method", "\u3000"), ["payment_method"]),
    (lambda r: (setattr(r, "customer_id", ""), setattr(r, "request_id", "")), ["customer_id", "request_id"]),
]


async def test_bad_input_is_refused_and_creates_nothing(order_service, neighbours, db_url):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    for mutate, fields in BAD_INPUT:
        req = request(customer, (product, 1))
        mutate(req)
        _, bad = await create_fails(order_service, req, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
        assert [v.field for v in bad.field_violations] == fields
    assert await count_rows(db_url, orders) == 0
    assert (await neighbours.stock(product)).stock_reserved == 0
    assert await neighbours.customer_payments(customer) == []


async def test_parallel_orders_for_the_last_units_sell_exactly_the_stock(order_service, neighbours, db_url):
    customers = [await neighbours.customer() for _ in range(8)]
    product = await neighbours.product(3)
    outcomes = await asyncio.gather(*(create(order_service, request(c, (product, 1)), timeout=60) for c in customers),
                                    return_exceptions=True)
    confirmed = [o for o in outcomes if isinstance(o, order_pb2.Order)]
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
    assert len(confirmed) == 3 and len(refused) == 5, outcomes
    assert all(error_details(e)[0].reason == "INSUFFICIENT_STOCK" for e in refused)
    stock = await neighbours.stock(product)
    assert (stock.stock_on_hand, stock.stock_reserved, stock.stock_available) == (0, 0, 0)
    assert await count_rows(db_url, orders, orders.c.status == "CONFIRMED") == 3
    assert await count_rows(db_url, orders, orders.c.status == "FAILED") == 5
    for order in confirmed:
        assert [p.status for p in await neighbours.order_payments(order.id)] == [payment_pb2.PAYMENT_STATUS_SUCCEEDED]


# Reads, cancellation and who may do what.

async def test_list_orders_newest_first_in_stable_pages(order_service, neighbours):
    customer, other, product = await neighbours.customer(), await neighbours.customer(), await neighbours.product(20)
    placed = [await create(order_service, request(customer, (product, 1))) for _ in range(3)]
    await create(order_service, request(other, (product, 1)))
    first = await order_service.stub.ListOrders(svc.ListOrdersRequest(customer_id=customer, page_size=2))
    assert [o.id for o in first.orders] == [placed[2].id, placed[1].id] and first.next_page_token
    await create(order_service, request(customer, (product, 1)))
    second = await order_service.stub.ListOrders(svc.ListOrdersRequest(customer_id=customer, page_size=2,
                                                                       page_token=first.next_page_token))
    assert [o.id for o in second.orders] == [placed[0].id] and second.next_page_token == ""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await order_service.stub.ListOrders(svc.ListOrdersRequest(customer_id=other, page_size=2,
                                                                  page_token=first.next_page_token))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def store_largest_order(db: Database, customer: str, products: list[str]) -> str:
    """A FAILED order as large as the contract allows: 50 lines whose names (200 characters) and SKUs (64) were
    copied from products with the longest ones in characters of 4 UTF-8 bytes, a failure with the longest message
    and the most metadata, and the longest step error."""
    heavy, now = "\U0001F9F1", utcnow()
    items = tuple(OrderItem(p, heavy * 200, f"SKU-{i:02}-" + "X" * 57, 1000, 10_000_000_000)
                  for i, p in enumerate(products))
    order = Order.place(customer_id=customer, items=items, currency_code=EUR, payment_method="pm_sandbox_ok",
                        request_id=uuid.uuid4().hex, request_hash="h", now=now)
    order.start_step(StepName.RESERVE_STOCK, now)
    order.fail(StepName.RESERVE_STOCK, Failure("INSUFFICIENT_STOCK", heavy * 1000, StepName.RESERVE_STOCK,
                                               {f"key_{i}": heavy * 50 for i in range(20)}), now)
    order.finish_compensation(now)
    async with OrderUnitOfWork(db) as uow:
        await uow.orders.add(order, Lease("test", now), SagaCaller())
        await uow.commit()
    return order.id


async def test_a_page_of_the_largest_orders_fits_a_default_grpc_message(order_service, db_url):
    """100 orders as large as the contract allows weigh more than the 4 MiB a gRPC client accepts by default: the
    page ends early with a next_page_token, and following the tokens lists every order once."""
    customer, products = str(uuid.uuid4()), [str(uuid.uuid4()) for _ in range(50)]
    db = Database(db_url)
    try:
        ids = [await store_largest_order(db, customer, products) for _ in range(100)]
    finally:
        await db.dispose()
    seen, token, pages = [], "", 0
    while True:
        page = await order_service.stub.ListOrders(svc.ListOrdersRequest(customer_id=customer, page_size=200,
                                                                         page_token=token))
        assert page.ByteSize() < 4 * 1024 * 1024
        assert {len(o.items) for o in page.orders} == {50}
        seen += [o.id for o in page.orders]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert sorted(seen) == sorted(ids) and pages == 2


async def test_list_orders_refuses_a_status_the_contract_does_not_define(order_service, neighbours):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    await create(order_service, request(customer, (product, 1)))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await order_service.stub.ListOrders(svc.ListOrdersRequest(customer_id=customer, status=99))
    info, bad = error_details(caught.value)
    assert (caught.value.code(), info.domain) == (grpc.StatusCode.INVALID_ARGUMENT, "order.tessera.dev")
    assert [v.field for v in bad.field_violations] == ["status"]


async def store_unfinished_order(db: Database, customer: str, product: str, lease: Lease) -> str:
    """A PENDING order whose saga stopped before RESERVE_STOCK, as a crash leaves it."""
    order = Order.place(customer_id=customer, items=(OrderItem(product, "Pen", "PEN", 1, 1250),), currency_code=EUR,
                        payment_method="pm_sandbox_ok", request_id=uuid.uuid4().hex, request_hash="h", now=utcnow())
    async with OrderUnitOfWork(db) as uow:
        await uow.orders.add(order, lease, SagaCaller())
        await uow.commit()
    return order.id


async def test_a_saga_the_recovery_cannot_resume_does_not_hold_up_the_others(order_service, neighbours, db_url,
                                                                              caplog):
    """A saga whose row was edited by hand so that it cannot be read (a lease expiry past the year 9999, stored as
    free) is at the front of the recovery's backlog: the recovery logs it with its id, passes over it, and resumes
    the sagas behind it, which end CONFIRMED."""
    customer, product = await neighbours.customer(), await neighbours.product(10)
    db = Database(db_url)
    try:
        bad = await store_unfinished_order(db, customer, product, Lease("gone", utcnow() + dt.timedelta(minutes=5)))
        await execute(db_url, text("UPDATE order_sagas SET lease_owner = NULL, lease_expires_at = "
                                   "'20000-01-01 00:00:00' WHERE order_id = :id").bindparams(id=bad))
        good = [await store_unfinished_order(db, customer, product, Lease("gone", utcnow() - dt.timedelta(seconds=1)))
                for _ in range(3)]
    finally:
        await db.dispose()
    for _ in range(200):
        if [(await get(order_service, g)).status for g in good] == [order_pb2.ORDER_STATUS_CONFIRMED] * 3:
            break
        await asyncio.sleep(0.1)
    assert [(await get(order_service, g)).status for g in good] == [order_pb2.ORDER_STATUS_CONFIRMED] * 3
    assert (await get(order_service, bad)).status == order_pb2.ORDER_STATUS_PENDING
    passed_over = [r for r in caplog.records if r.name == "tessera.order.saga_recovery" and r.levelname == "ERROR"]
    assert passed_over and {getattr(r, "item_id", None) for r in passed_over} == {bad}


async def test_a_saga_whose_order_cannot_be_loaded_is_passed_over_by_the_recovery(order_service, neighbours, db_url,
                                                                                 caplog):
    """A saga whose rows were edited by hand so that its order cannot be loaded (a step status no saga writes),
    though its saga row reads, is logged by the recovery with its id in item_id and counted in
    tessera_batch_job_items_passed_over_total once per round, as the other backlog jobs' poison rows are (before,
    only its saga task failed, logged as "saga interrupted"); the sagas behind it are resumed."""
    customer, product = await neighbours.customer(), await neighbours.product(10)
    before = REGISTRY.get_sample_value("tessera_batch_job_items_passed_over_total",
                                       {"job": "order.saga_recovery"}) or 0
    db = Database(db_url)
    try:
        bad = await store_unfinished_order(db, customer, product, Lease("gone", utcnow() + dt.timedelta(minutes=5)))
        await execute(db_url, text("UPDATE order_saga_steps SET status = 'MELTED' WHERE order_id = :id "
                                   "AND step = 'RESERVE_STOCK'").bindparams(id=bad))
        await execute(db_url, text("UPDATE order_sagas SET lease_owner = NULL WHERE order_id = :id").bindparams(id=bad))
        good = [await store_unfinished_order(db, customer, product, Lease("gone", utcnow() - dt.timedelta(seconds=1)))
                for _ in range(3)]
    finally:
        await db.dispose()
    for _ in range(200):
        if [(await get(order_service, g)).status for g in good] == [order_pb2.ORDER_STATUS_CONFIRMED] * 3:
            break
        await asyncio.sleep(0.1)
    assert [(await get(order_service, g)).status for g in good] == [order_pb2.ORDER_STATUS_CONFIRMED] * 3
    # The recovery runs on this event loop: nothing is logged or counted between these two reads.
    records = list(caplog.records)
    counted = (REGISTRY.get_sample_value("tessera_batch_job_items_passed_over_total",
                                         {"job": "order.saga_recovery"}) or 0) - before
    passed_over = [r for r in records if r.name == "tessera.order.saga_recovery" and r.levelname == "ERROR"]
    assert passed_over and {getattr(r, "item_id", None) for r in passed_over} == {bad}
    assert counted == len(passed_over)
    assert not [r for r in records if getattr(r, "order_id", None) == bad and "interrupted" in r.getMessage()]


async def test_a_saga_that_loads_but_whose_run_fails_is_passed_over_and_resumed_once_repaired(neighbours, db_url,
                                                                                            caplog):
    """A saga whose rows were edited by hand into a state the engine cannot run (a PENDING order whose steps all
    read SUCCEEDED: nothing left to run, yet not confirmed) loads, but its run raises every time. The recovery logs
    it at ERROR with its id in item_id and counts it in tessera_batch_job_items_passed_over_total once per round
    (before, it was only "saga interrupted", counted nowhere), and frees its lease. With one recovery slot and
    batches of two it is the first due item of every round, yet the sagas behind it are all resumed; once its row is
    repaired, the next round resumes it to CONFIRMED."""
    service = await InProcessOrder.start(neighbours.order_env(db_url, TESSERA_ORDER_RECOVERY_BATCH_SIZE="2",
                                                              TESSERA_ORDER_RECOVERY_CONCURRENCY="1"))
    try:
        customer, product = await neighbours.customer(), await neighbours.product(20)
        before = metric("tessera_batch_job_items_passed_over_total", job="order.saga_recovery")
        db = Database(db_url)
        try:
            bad = await store_unfinished_order(db, customer, product,
                                               Lease("gone", utcnow() - dt.timedelta(seconds=1)))
            await execute(db_url, text("UPDATE order_saga_steps SET status = 'SUCCEEDED' WHERE order_id = :id "
                                       "AND step IN ('RESERVE_STOCK', 'PROCESS_PAYMENT', 'CONFIRM_ORDER')"
                                       ).bindparams(id=bad))
            good = [await store_unfinished_order(db, customer, product,
                                                 Lease("gone", utcnow() - dt.timedelta(seconds=1)))
                    for _ in range(5)]
        finally:
            await db.dispose()
        confirmed = [order_pb2.ORDER_STATUS_CONFIRMED] * len(good)
        for _ in range(300):
            if [(await get(service, g)).status for g in good] == confirmed:
                break
            await asyncio.sleep(0.1)
        assert [(await get(service, g)).status for g in good] == confirmed
        # The recovery runs on this event loop: nothing is logged or counted between these two reads.
        records = list(caplog.records)
        counted = metric("tessera_batch_job_items_passed_over_total", job="order.saga_recovery") - before
        passed_over = [r for r in records if r.name == "tessera.order.saga_recovery" and r.levelname == "ERROR"]
        assert passed_over and {getattr(r, "item_id", None) for r in passed_over} == {bad}
        assert counted == len(passed_over)
        assert all(r.exc_info and r.exc_info[0] is AssertionError for r in passed_over)
        assert (await get(service, bad)).status == order_pb2.ORDER_STATUS_PENDING
        # Repaired by hand: the next round resumes it from its stored state.
        await execute(db_url, text("UPDATE order_saga_steps SET status = 'PENDING' WHERE order_id = :id "
                                   "AND step IN ('RESERVE_STOCK', 'PROCESS_PAYMENT', 'CONFIRM_ORDER')"
                                   ).bindparams(id=bad))
        repaired = await wait_for(service, bad, order_pb2.ORDER_STATUS_CONFIRMED)
    finally:
        await service.stop()
    assert saga(repaired)["CONFIRM_ORDER"] == "SUCCEEDED"
    assert (await neighbours.stock(product)).stock_on_hand == 20 - len(good) - 1


async def test_cancel_refunds_and_restocks(order_service, neighbours, db_url):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    order = await create(order_service, request(customer, (product, 2)))
    cancelled = (await order_service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id, reason="Changed my mind"),
                                                      timeout=20)).order
    assert cancelled.status == order_pb2.ORDER_STATUS_CANCELLED and cancelled.cancel_reason == "Changed my mind"
    assert not cancelled.HasField("failure") and cancelled.HasField("cancel_time")
    assert saga(cancelled)["CONFIRM_ORDER"] == "COMPENSATED" and saga(cancelled)["PROCESS_PAYMENT"] == "COMPENSATED"
    [payment] = await neighbours.order_payments(order.id)
    assert payment.status == payment_pb2.PAYMENT_STATUS_REFUNDED
    stock = await neighbours.stock(product)
    assert (stock.stock_on_hand, stock.stock_reserved) == (5, 0)
    again = (await order_service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id))).order
    assert again == cancelled
    assert (await events(db_url))[-1] == "OrderCancelled"
    # A repeat of the CreateOrder returns the order as it is now.
    assert (await create(order_service, request(customer, (product, 2), request_id=order.request_id))) == cancelled


async def test_cancel_is_refused_for_a_failed_order(order_service, neighbours):
    customer, product = await neighbours.customer(), await neighbours.product(5)
    info, _ = await create_fails(order_service, request(customer, (product, 1), method="pm_sandbox_declined"),
                                 grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_DECLINED")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await order_service.stub.CancelOrder(svc.CancelOrderRequest(id=info.metadata["order_id"]))
    cancel_info, _ = error_details(caught.value)
    assert (caught.value.code(), cancel_info.reason) == (grpc.StatusCode.FAILED_PRECONDITION, "ORDER_NOT_CANCELLABLE")
    assert cancel_info.metadata["status"] == "ORDER_STATUS_FAILED"
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await get(order_service, str(uuid.uuid4()))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_customers_act_only_for_themselves_and_the_identity_reaches_the_other_services(
        order_service, neighbours):
    customer, stranger, product = await neighbours.customer(), await neighbours.customer(), await neighbours.product(5)
    as_customer = (("x-user-id", customer), ("x-user-scopes", "orders"))
    order = (await order_service.stub.CreateOrder(request(customer, (product, 1)), metadata=as_customer,
                                                  timeout=20)).order
    assert order.status == order_pb2.ORDER_STATUS_CONFIRMED  # payment and inventory accepted the customer's identity
    as_stranger = (("x-user-id", stranger),)
    for call in (order_service.stub.GetOrder(svc.GetOrderRequest(id=order.id), metadata=as_stranger),
                 order_service.stub.CreateOrder(request(customer, (product, 1)), metadata=as_stranger)):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    listed = await order_service.stub.ListOrders(svc.ListOrdersRequest(), metadata=as_stranger)
    assert list(listed.orders) == []


async def test_a_token_that_spells_the_customers_id_in_upper_case_is_that_customer(order_service, neighbours):
    # A UUID reads the same in either case: an identity provider that writes subjects in upper case names the same
    # account, for its orders and for the services the saga calls on its behalf.
    customer, product = await neighbours.customer(), await neighbours.product(5)
    as_customer = (("x-user-id", customer.upper()), ("x-user-scopes", "orders"))
    order = (await order_service.stub.CreateOrder(request(customer, (product, 1)), metadata=as_customer,
                                                  timeout=20)).order
    assert order.status == order_pb2.ORDER_STATUS_CONFIRMED
    assert (await order_service.stub.GetOrder(svc.GetOrderRequest(id=order.id), metadata=as_customer)).order == order
    listed = await order_service.stub.ListOrders(svc.ListOrdersRequest(), metadata=as_customer)
    assert [o.id for o in listed.orders] == [order.id]


async def test_order_confirmed_event_carries_the_receipt(order_service, neighbours, db_url):
    customer, product = await neighbours.customer(), await neighbours.product(5, price=700)
    order = await create(order_service, request(customer, (product, 3)))
    db = Database(db_url)
    try:
        async with db.engine.connect() as conn:
            row = (await conn.execute(outbox.select().where(
                outbox.c.event_type == "tessera.order.v1.OrderConfirmed"))).one()
            assert await conn.scalar(order_items.select().with_only_columns(order_items.c.quantity)) == 3
            assert (await conn.execute(order_sagas.select())).one()._mapping["lease_owner"] is None
            assert len((await conn.execute(order_saga_steps.select())).all()) == 5
    finally:
        await db.dispose()
    event = order_events_pb2.OrderConfirmed.FromString(row._mapping["payload"])
    assert (event.order_id, event.customer_id, event.payment_id) == (order.id, customer, order.payment_id)
    assert event.total.amount_minor == 2100 and event.items[0].product_name == order.items[0].product_name
    assert row._mapping["aggregate_id"] == order.id


# A dependency that cannot be reached during compensation.

@pytest.fixture
async def payment_proxy(neighbours):
    host, port = neighbours.address("payment").split(":")
    proxy = TcpProxy(host, int(port)).start()
    yield proxy
    proxy.close()


async def service_behind(neighbours, db_url, proxy, **env):
    return await InProcessOrder.start(neighbours.order_env(
        db_url, TESSERA_PAYMENT_SERVICE_ADDR=f"127.0.0.1:{proxy.port}", **env))


async def wait_for(service, order_id: str, status: int, timeout: float = 30) -> order_pb2.Order:
    deadline = time.monotonic() + timeout
    while (order := await get(service, order_id)).status != status:
        assert time.monotonic() < deadline, order
        await asyncio.sleep(0.05)
    return order


async def test_cancel_while_payment_is_unreachable_continues_when_it_returns(neighbours, db_url, payment_proxy):
    service = await service_behind(neighbours, db_url, payment_proxy,
                                   TESSERA_ORDER_RETRY_INITIAL_BACKOFF_SECONDS="0.5",
                                   TESSERA_ORDER_RETRY_MAX_BACKOFF_SECONDS="0.5",
                                   TESSERA_ORDER_COMPENSATION_MAX_ATTEMPTS="40")
    try:
        customer, product = await neighbours.customer(), await neighbours.product(5)
        order = await create(service, request(customer, (product, 2)))
        payment_proxy.cut()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id, reason="Too late"), timeout=20)
        info, _ = error_details(caught.value)
        assert (caught.value.code(), info.reason) == (grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE")
        assert dict(info.metadata) == {"order_id": order.id, "service": "payment"}
        pending = await get(service, order.id)
        assert pending.status == order_pb2.ORDER_STATUS_COMPENSATING and pending.cancel_reason == "Too late"
        assert saga(pending)["CONFIRM_ORDER"] == "COMPENSATED" and saga(pending)["PROCESS_PAYMENT"] == "SUCCEEDED"
        # What the customer reads names the service, not the addresses gRPC's own error text carries.
        assert next(s.error for s in pending.saga if s.name == STEP.SAGA_STEP_NAME_PROCESS_PAYMENT) == (
            "UNAVAILABLE: the payment service could not be reached")

        payment_proxy.restore()
        cancelled = await wait_for(service, order.id, order_pb2.ORDER_STATUS_CANCELLED)
        repeat = (await service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id), timeout=20)).order
    finally:
        await service.stop()
    assert repeat == cancelled and cancelled.cancel_reason == "Too late"
    assert [p.status for p in await neighbours.order_payments(order.id)] == [payment_pb2.PAYMENT_STATUS_REFUNDED]
    stock = await neighbours.stock(product)
    assert (stock.stock_on_hand, stock.stock_reserved) == (5, 0)


async def test_a_repeat_cancel_during_the_pause_before_a_retry_still_says_the_payment_service_is_unreachable(
        neighbours, db_url, payment_proxy):
    # The payment service cannot be reached: this process's cancellation failed to refund and waits 2-4 s before
    # trying again. A repeat of the call that comes during that pause meets no new failure before its deadline, but
    # the dependency is still failing: it must say so (UNAVAILABLE, naming the service), not that the order is busy.
    service = await service_behind(neighbours, db_url, payment_proxy,
                                   TESSERA_ORDER_RETRY_INITIAL_BACKOFF_SECONDS="4",
                                   TESSERA_ORDER_RETRY_MAX_BACKOFF_SECONDS="4",
                                   TESSERA_ORDER_COMPENSATION_MAX_ATTEMPTS="40")
    try:
        customer, product = await neighbours.customer(), await neighbours.product(5)
        order = await create(service, request(customer, (product, 2)))
        payment_proxy.cut()
        answers = []
        for timeout in (20, 1):  # the first meets the failed refund; the repeat comes during the pause after it
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id, reason="Too late"),
                                               timeout=timeout)
            info, _ = error_details(caught.value)
            answers.append((caught.value.code(), info.reason, dict(info.metadata)))
        payment_proxy.restore()
        cancelled = await wait_for(service, order.id, order_pb2.ORDER_STATUS_CANCELLED)
    finally:
        await service.stop()
    unreachable = (grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE", {"order_id": order.id, "service": "payment"})
    assert answers == [unreachable, unreachable]
    assert cancelled.cancel_reason == "Too late"
    assert [p.status for p in await neighbours.order_payments(order.id)] == [payment_pb2.PAYMENT_STATUS_REFUNDED]


async def test_cancel_that_outlasts_its_deadline_on_a_slow_inventory_answers_busy_and_a_repeat_follows_it(
        neighbours, db_url):
    # The inventory answers, only slowly: this process's cancellation is still waiting for its first compensating
    # call (releasing the stock) when the call's deadline comes. Nothing failed, so the call must not answer that
    # the inventory could not be reached: it answers that the order's saga is busy, as for another process's
    # cancellation, and a repeat follows the cancellation to its end.
    host, port = neighbours.address("inventory").split(":")
    proxy = TcpProxy(host, int(port)).start()
    service = await InProcessOrder.start(neighbours.order_env(
        db_url, TESSERA_INVENTORY_SERVICE_ADDR=f"127.0.0.1:{proxy.port}"))
    try:
        customer, product = await neighbours.customer(), await neighbours.product(5)
        order = await create(service, request(customer, (product, 2)))
        held = proxy.hold()  # the inventory's answers are kept back: slow, not failing
        try:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id, reason="Too slow"), timeout=1.5)
            busy = await get(service, order.id)
        finally:
            proxy.release(held)
        info, _ = error_details(caught.value)
        assert (caught.value.code(), info.reason, info.domain, dict(info.metadata)) == (
            grpc.StatusCode.ABORTED, "ORDER_BUSY", "order.tessera.dev", {"order_id": order.id}), caught.value
        assert (busy.status, busy.cancel_reason) == (order_pb2.ORDER_STATUS_COMPENSATING, "Too slow")
        assert not [s.error for s in busy.saga if s.error]  # no call failed
        repeat = (await service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id), timeout=20)).order
    finally:
        await service.stop()
        proxy.close()
    assert (repeat.status, repeat.cancel_reason) == (order_pb2.ORDER_STATUS_CANCELLED, "Too slow")
    assert [p.status for p in await neighbours.order_payments(order.id)] == [payment_pb2.PAYMENT_STATUS_REFUNDED]
    assert (await neighbours.stock(product)).stock_on_hand == 5


async def test_refund_that_keeps_failing_leaves_the_order_compensation_failed(neighbours, db_url, payment_proxy):
    before = REGISTRY.get_sample_value("tessera_saga_compensation_failures_total", {"step": "PROCESS_PAYMENT"}) or 0
    compensated = metric("tessera_orders_compensated_total")
    service = await service_behind(neighbours, db_url, payment_proxy, TESSERA_ORDER_COMPENSATION_MAX_ATTEMPTS="3")
    try:
        customer, product = await neighbours.customer(), await neighbours.product(5)
        order = await create(service, request(customer, (product, 2)))
        payment_proxy.cut()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id), timeout=20)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        stuck = await wait_for(service, order.id, order_pb2.ORDER_STATUS_COMPENSATION_FAILED)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id), timeout=20)
    finally:
        payment_proxy.restore()
        await service.stop()
    assert error_details(refused.value)[0].reason == "ORDER_NOT_CANCELLABLE"
    [pay_step] = [s for s in stuck.saga if s.name == STEP.SAGA_STEP_NAME_PROCESS_PAYMENT]
    assert (pay_step.status, pay_step.attempts) == (STATUS.SAGA_STEP_STATUS_COMPENSATION_FAILED, 3)
    assert pay_step.error.startswith("UNAVAILABLE")
    assert saga(stuck)["CONFIRM_ORDER"] == "COMPENSATED" and saga(stuck)["RESERVE_STOCK"] == "COMPENSATED"
    assert REGISTRY.get_sample_value("tessera_saga_compensation_failures_total", {"step": "PROCESS_PAYMENT"}) == (
        before + 1)
    assert metric("tessera_orders_compensated_total") == compensated  # a compensation was given up on
    assert (await events(db_url))[-1] == "OrderCompensationFailed"
    # The money is still taken, for an operator to resolve; the stock came back.
    assert [p.status for p in await neighbours.order_payments(order.id)] == [payment_pb2.PAYMENT_STATUS_SUCCEEDED]
    assert (await neighbours.stock(product)).stock_on_hand == 5


async def hold_lease(db_url: str, order_id: str, owner: str, seconds: float) -> None:
    """Takes the order's saga lease for `owner`, as a process that began a cancellation would before writing it."""
    db = Database(db_url)
    try:
        async with db.engine.begin() as conn:
            await conn.execute(order_sagas.update().where(order_sagas.c.order_id == order_id).values(
                lease_owner=owner, lease_expires_at=utcnow() + dt.timedelta(seconds=seconds)))
    finally:
        await db.dispose()


async def test_cancel_of_an_order_another_runner_holds_waits_for_it_and_cancels(order_service, neighbours, db_url):
    # Another process took the lease of a CONFIRMED order to cancel it and died before writing anything (or is about
    # to write its cancellation): nothing is under way that a customer could wait for, so the call must not answer
    # that a dependency failed and the cancellation continues. It waits for the lease and cancels the order itself.
    customer, product = await neighbours.customer(), await neighbours.product(5)
    order = await create(order_service, request(customer, (product, 2)))
    await hold_lease(db_url, order.id, "another-process:1:dead", 1.0)
    cancelled = (await order_service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id, reason="Double click"),
                                                      timeout=20)).order
    assert cancelled.status == order_pb2.ORDER_STATUS_CANCELLED and cancelled.cancel_reason == "Double click"
    assert [p.status for p in await neighbours.order_payments(order.id)] == [payment_pb2.PAYMENT_STATUS_REFUNDED]
    assert (await neighbours.stock(product)).stock_on_hand == 5
    assert (await events(db_url))[-1] == "OrderCancelled"


async def test_cancel_of_an_order_a_gone_runner_holds_past_the_deadline_answers_busy_and_a_repeat_cancels(
        order_service, neighbours, db_url):
    # The process that took the lease of a CONFIRMED order died; its lease outlasts the call's deadline. No
    # dependency failed and nothing was cancelled: the call answers that another process runs the order's saga, and
    # a repeat once the lease expired cancels the order.
    customer, product = await neighbours.customer(), await neighbours.product(5)
    order = await create(order_service, request(customer, (product, 2)))
    await hold_lease(db_url, order.id, "another-process:1:dead", 4.0)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await order_service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id, reason="Double click"), timeout=1.5)
    info, _ = error_details(caught.value)
    assert (caught.value.code(), info.reason, info.domain, dict(info.metadata)) == (
        grpc.StatusCode.ABORTED, "ORDER_BUSY", "order.tessera.dev", {"order_id": order.id})
    got = (await order_service.stub.GetOrder(svc.GetOrderRequest(id=order.id))).order
    assert got.status == order_pb2.ORDER_STATUS_CONFIRMED and got.cancel_reason == ""
    assert (await neighbours.stock(product)).stock_on_hand == 3
    await asyncio.sleep(3.0)
    cancelled = (await order_service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id, reason="Double click"),
                                                      timeout=20)).order
    assert cancelled.status == order_pb2.ORDER_STATUS_CANCELLED
    assert [p.status for p in await neighbours.order_payments(order.id)] == [payment_pb2.PAYMENT_STATUS_REFUNDED]
    assert (await neighbours.stock(product)).stock_on_hand == 5


async def test_cancel_of_an_order_another_runner_is_cancelling_past_the_deadline_answers_busy_and_a_repeat_cancels(
        order_service, neighbours, db_url):
    # Another process began cancelling a CONFIRMED order (it committed COMPENSATING with its reason) and still holds
    # the saga's lease at the call's deadline: it is compensating, or it stopped before its lease ran out. No
    # dependency failed and the call changed nothing: it answers that another process runs the order's saga, as for
    # a CONFIRMED order, not that the inventory (the service of the step the order was at) could not be reached.
    customer, product = await neighbours.customer(), await neighbours.product(5)
    order = await create(order_service, request(customer, (product, 2)))
    await hold_lease(db_url, order.id, "another-process:1:cancelling", 4.0)
    await execute(db_url, update(orders).where(orders.c.id == order.id).values(
        status="COMPENSATING", cancel_reason="First click", version=orders.c.version + 1))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await order_service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id, reason="Second click"), timeout=1.5)
    info, _ = error_details(caught.value)
    assert (caught.value.code(), info.reason, info.domain, dict(info.metadata)) == (
        grpc.StatusCode.ABORTED, "ORDER_BUSY", "order.tessera.dev", {"order_id": order.id})
    got = await get(order_service, order.id)
    assert (got.status, got.cancel_reason) == (order_pb2.ORDER_STATUS_COMPENSATING, "First click")
    assert set(saga(got).values()) == {"SUCCEEDED"} and (await neighbours.stock(product)).stock_on_hand == 3
    await asyncio.sleep(3.0)
    # Once the lease ran out, a repeat continues the cancellation begun, with its reason.
    cancelled = (await order_service.stub.CancelOrder(svc.CancelOrderRequest(id=order.id, reason="Second click"),
                                                      timeout=20)).order
    assert (cancelled.status, cancelled.cancel_reason) == (order_pb2.ORDER_STATUS_CANCELLED, "First click")
    assert [p.status for p in await neighbours.order_payments(order.id)] == [payment_pb2.PAYMENT_STATUS_REFUNDED]
    assert (await neighbours.stock(product)).stock_on_hand == 5


async def test_the_same_cancel_sent_to_two_replicas_at_once_answers_the_cancelled_order_from_both(neighbours, db_url):
    # A customer's double click that the load balancer spreads over two replicas: one takes the lease and cancels,
    # the other must follow that cancellation, not answer that a dependency failed.
    replicas = [await InProcessOrder.start(neighbours.order_env(db_url)) for _ in range(2)]
    answers = []
    try:
        customer, product = await neighbours.customer(), await neighbours.product(10)
        for _ in range(5):
            order = await create(replicas[0], request(customer, (product, 1)))
            replies = await asyncio.gather(*(r.stub.CancelOrder(svc.CancelOrderRequest(id=order.id, reason="Oops"),
                                                                timeout=20) for r in replicas),
                                           return_exceptions=True)
            answers.append([reply.code().name if isinstance(reply, grpc.aio.AioRpcError)
                            else order_pb2.OrderStatus.Name(reply.order.status) for reply in replies])
    finally:
        for replica in replicas:
            await replica.stop()
    assert answers == [["ORDER_STATUS_CANCELLED"] * 2] * 5
    assert (await neighbours.stock(product)).stock_on_hand == 10


# A runner that froze past its lease.

class FrozenPayments(GrpcPayments):
    """The real payments client of a runner that freezes (a long GC pause, a suspended VM) right after it committed
    PROCESS_PAYMENT started, before its ProcessPayment leaves: the call goes out once `thaw` is set. `outcomes` has
    what each call got: the payment's status, or the error's reason."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__(channel, 5.0)
        self.frozen, self.thaw, self.answered = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self.order_id = ""
        self.outcomes: list[str] = []

    async def process_payment(self, **kw):
        self.order_id = kw["order_id"]
        self.frozen.set()
        await self.thaw.wait()
        try:
            payment = await super().process_payment(**kw)
            self.outcomes.append(payment.status)
            return payment
        except DownstreamError as err:
            self.outcomes.append(err.reason)
            raise
        finally:
            self.answered.set()


class LostChargePayments(GrpcPayments):
    """The real payments client, except that its charges go over a network that swallows them (a frozen proxy):
    they time out without the payment service ever seeing them. Every other call goes through."""

    def __init__(self, channel: grpc.aio.Channel, lost: grpc.aio.Channel) -> None:
        super().__init__(channel, 1.0)
        self.lost = GrpcPayments(lost, 1.0)

    async def process_payment(self, **kw):
        return await self.lost.process_payment(**kw)


class WakingPayments(GrpcPayments):
    """The real payments client of the runner that took over, whose compensation happens to void the payment just
    after the frozen runner woke and charged it."""

    def __init__(self, channel: grpc.aio.Channel, frozen: FrozenPayments) -> None:
        super().__init__(channel, 5.0)
        self.frozen = frozen

    async def void_payment(self, **kw):
        self.frozen.thaw.set()
        await self.frozen.answered.wait()
        return await super().void_payment(**kw)


async def lease_runs_out(db_url: str, order_id: str) -> None:
    """What a frozen runner's missed heartbeats do to its saga lease: it expires, and the runner cannot renew it
    any more (here the frozen runner's heartbeat still beats, so the lease is also no longer in its name)."""
    await execute(db_url, order_sagas.update().where(order_sagas.c.order_id == order_id).values(
        lease_owner="runner-frozen-past-its-lease", lease_expires_at=utcnow() - dt.timedelta(seconds=1)))


@pytest.mark.parametrize("takeover", ["payment-failed", "payment-timeout", "charged-before-the-void"])
async def test_a_runner_frozen_past_its_lease_never_charges_for_the_order_its_successor_failed(
        neighbours, db_url, tmp_path, takeover):
    """Runner A commits PROCESS_PAYMENT started and freezes past its lease. Runner B takes the saga over and fails
    the order: its charge FAILED at the processor (a repeat would charge), or timed out without reaching the payment
    service. Then A wakes and sends its ProcessPayment under the order's key. The customer must not end up paying
    for the FAILED order: the key's payment was voided when B compensated, so A's charge is refused; or, when A
    charged before B's compensation voided the payment, the void finds it SUCCEEDED and B refunds it."""
    payment_db = f"sqlite+aiosqlite:///{tmp_path / 'payment.db'}"
    # One processor attempt per call: pm_sandbox_transient fails B's call and would charge the next one.
    async with payment_service(payment_db, TESSERA_PAYMENT_PROCESSOR_MAX_ATTEMPTS="1") as (stub, _, payment_port):
        proxy = TcpProxy("127.0.0.1", payment_port).start()
        channels = [open_channel(neighbours.address(s), []) for s in ("user", "inventory")]
        pay_channels = [open_channel(f"127.0.0.1:{payment_port}", []) for _ in range(2)]
        lost = open_channel(f"127.0.0.1:{proxy.port}", [])
        frozen = FrozenPayments(pay_channels[0])
        b_payments = {"payment-failed": GrpcPayments(pay_channels[1], 5.0),
                      "payment-timeout": LostChargePayments(pay_channels[1], lost),
                      "charged-before-the-void": WakingPayments(pay_channels[1], frozen)}[takeover]
        runner_a = await InProcessOrder.start(neighbours.order_env(db_url), downstream=Downstream(
            GrpcCustomerDirectory(channels[0]), GrpcInventory(channels[1]), frozen))
        runner_b = None
        try:
            await asyncio.wait_for(lost.channel_ready(), 10)
            proxy.freeze()
            customer, product = await neighbours.customer(), await neighbours.product(5)
            method = "pm_sandbox_ok" if takeover == "payment-timeout" else "pm_sandbox_transient"
            placing = asyncio.create_task(create(runner_a, request(customer, (product, 2), method=method), timeout=3))
            await asyncio.wait_for(frozen.frozen.wait(), 20)
            order_id = frozen.order_id
            await lease_runs_out(db_url, order_id)
            # B's one attempt (A's counted the first) fails the order.
            runner_b = await InProcessOrder.start(
                neighbours.order_env(db_url, TESSERA_ORDER_STEP_MAX_ATTEMPTS="2"),
                downstream=Downstream(GrpcCustomerDirectory(channels[0]), GrpcInventory(channels[1]), b_payments))
            failed = await wait_for(runner_b, order_id, order_pb2.ORDER_STATUS_FAILED)
            frozen.thaw.set()
            await asyncio.wait_for(frozen.answered.wait(), 20)
            with contextlib.suppress(grpc.aio.AioRpcError):
                await placing
            await asyncio.sleep(0.5)  # A's write after the call, refused: its lease is lost
            order = await get(runner_b, order_id)
            found = list((await stub.ListPayments(payment_service_pb2.ListPaymentsRequest(order_id=order_id))).payments)
        finally:
            for runner in (runner_a, runner_b):
                if runner is not None:
                    await runner.stop()
            for channel in (*channels, *pay_channels, lost):
                await channel.close()
            proxy.close()
    statuses = [payment_pb2.PaymentStatus.Name(p.status) for p in found]
    print("order:", order_pb2.OrderStatus.Name(order.status), order.failure.reason, "payments:", statuses,
          "the thawed runner's ProcessPayment got:", frozen.outcomes)
    assert failed.failure.reason == ("PAYMENT_TIMEOUT" if takeover == "payment-timeout" else "PAYMENT_FAILED")
    assert order.status == order_pb2.ORDER_STATUS_FAILED
    assert "PAYMENT_STATUS_SUCCEEDED" not in statuses, "the customer paid for a FAILED order and was not refunded"
    if takeover == "charged-before-the-void":
        assert statuses == ["PAYMENT_STATUS_REFUNDED"] and frozen.outcomes == ["SUCCEEDED"]
        assert order.payment_id == found[0].id and saga(order)["PROCESS_PAYMENT"] == "COMPENSATED"
    else:
        assert statuses == ["PAYMENT_STATUS_VOIDED"] and frozen.outcomes == ["PAYMENT_VOIDED"]
        assert order.payment_id == "" and saga(order)["PROCESS_PAYMENT"] == "FAILED"
    assert (await neighbours.stock(product)).stock_available == 5
