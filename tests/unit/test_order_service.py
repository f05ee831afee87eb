"""Order use cases and the CreateOrder saga through the service layer, with in-memory fakes of the other services."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
import uuid
from collections.abc import Callable

import grpc
import pytest
from opentelemetry import trace
from prometheus_client import REGISTRY

from tessera_order.adapters.repository import Lease, LeaseLost, SagaCaller
from tessera_order.domain.model import Failure, Order, OrderItem, OrderStatus, StepName, StepStatus
from tessera_order.service_layer import commands, handlers
from tessera_order.service_layer.ports import (
    Customer,
    Downstream,
    DownstreamError,
    Payment,
    Product,
    Reservation,
)
from tessera_order.service_layer.saga import SagaCoordinator, SagaPolicy, payment_key
from tessera_order.service_layer.unit_of_work import FakeOrderUnitOfWork
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

EUR = "EUR"


def err(service: str, code: grpc.StatusCode, reason: str, answered: bool = True, **metadata: str) -> DownstreamError:
    return DownstreamError(service, code, reason, f"{reason.lower()} from {service}", metadata, answered=answered)


def unavailable(service: str) -> DownstreamError:
    return err(service, grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE", answered=False)


def refused(service: str) -> DownstreamError:
    """The service itself answered UNAVAILABLE with its ErrorInfo: it did nothing this time."""
    return err(service, grpc.StatusCode.UNAVAILABLE, "UNAVAILABLE")


def answering(fake: object, method: str, *answers: DownstreamError) -> None:
    """`fake.method` fails with each answer in turn; where the answer was lost, the call did its work first (the
    stock was reserved, the charge went through). Once the answers are used up, it answers as usual."""
    real, queued = getattr(fake, method), list(answers)

    async def call(*args, **kwargs):
        if not queued:
            return await real(*args, **kwargs)
        answer = queued.pop(0)
        if answer.outcome_unknown:
            await real(*args, **kwargs)
        raise answer

    setattr(fake, method, call)


def reserve_answering(world: World, *answers: DownstreamError) -> None:
    answering(world.inventory, "reserve_stock", *answers)


def charge_answering(world: World, *answers: DownstreamError) -> None:
    answering(world.payments, "process_payment", *answers)


class Script:
    """Errors (or callables run before the real work) queued per method; each call takes the next one."""

    def __init__(self) -> None:
        self.queued: dict[str, list[DownstreamError | Callable[[], None]]] = {}
        self.calls: list[tuple[str, tuple]] = []
        self.principals: list[callctx.Principal | None] = []

    def fail_next(self, method: str, *outcomes: DownstreamError | Callable[[], None]) -> None:
        self.queued.setdefault(method, []).extend(outcomes)

    def enter(self, method: str, *args: object) -> None:
        self.calls.append((method, args))
        self.principals.append(callctx.current_principal())
        queue = self.queued.get(method)
        if queue:
            outcome = queue.pop(0)
            if isinstance(outcome, DownstreamError):
                raise outcome
            outcome()

    def count(self, method: str) -> int:
        return sum(1 for m, _ in self.calls if m == method)


class FakeUsers(Script):
    def __init__(self) -> None:
        super().__init__()
        self.customers: dict[str, bool] = {}

    async def get_customer(self, customer_id: str) -> Customer:
        self.enter("get_customer", customer_id)
        if customer_id not in self.customers:
            raise err("user", grpc.StatusCode.NOT_FOUND, "USER_NOT_FOUND", user_id=customer_id)
        return Customer(customer_id, self.customers[customer_id])


@dataclasses.dataclass
class FakeReservation:
    id: str
    order_id: str
    items: list[tuple[str, int]]
    status: str = "ACTIVE"


class FakeInventory(Script):
    def __init__(self) -> None:
        super().__init__()
        self.products: dict[str, Product] = {}
        self.on_hand: dict[str, int] = {}
        self.reserved: dict[str, int] = {}
        self.reservations: dict[str, FakeReservation] = {}

    def add_product(self, stock: int, price: int = 250, currency: str = EUR) -> str:
        pid = str(uuid.uuid4())
        self.products[pid] = Product(pid, f"Product {len(self.products)}", f"SKU-{len(self.products)}", price, currency)
        self.on_hand[pid], self.reserved[pid] = stock, 0
        return pid

    def available(self, pid: str) -> int:
        return self.on_hand[pid] - self.reserved[pid]

    def by_order(self, order_id: str) -> FakeReservation | None:
        return next((r for r in self.reservations.values() if r.order_id == order_id), None)

    async def batch_get_products(self, product_ids):
        self.enter("batch_get_products", tuple(product_ids))
        for pid in product_ids:
            if pid not in self.products:
                raise err("inventory", grpc.StatusCode.NOT_FOUND, "PRODUCT_NOT_FOUND", product_id=pid)
        return [self.products[p] for p in product_ids]

    def _reserve(self, order_id: str, items) -> Reservation:
        existing = self.by_order(order_id)
        if existing is not None:
            return Reservation(existing.id, existing.status)
        for pid, qty in items:
            if self.available(pid) < qty:
                raise err("inventory", grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_STOCK", product_id=pid,
                          sku=self.products[pid].sku, requested=str(qty), available=str(self.available(pid)))
        for pid, qty in items:
            self.reserved[pid] += qty
        r = FakeReservation(str(uuid.uuid4()), order_id, list(items))
        self.reservations[r.id] = r
        return Reservation(r.id, r.status)

    async def reserve_stock(self, order_id, items, ttl_seconds):
        self.enter("reserve_stock", order_id)
        return self._reserve(order_id, items)

    def expire(self, reservation_id: str) -> None:
        r = self.reservations[reservation_id]
        for pid, qty in r.items:
            self.reserved[pid] -= qty
        r.status = "EXPIRED"

    async def commit_reservation(self, reservation_id):
        self.enter("commit_reservation", reservation_id)
        r = self.reservations[reservation_id]
        if r.status == "EXPIRED":
            raise err("inventory", grpc.StatusCode.FAILED_PRECONDITION, "RESERVATION_EXPIRED",
                      reservation_id=reservation_id)
        if r.status == "ACTIVE":
            for pid, qty in r.items:
                self.reserved[pid] -= qty
                self.on_hand[pid] -= qty
            r.status = "COMMITTED"
        return Reservation(r.id, r.status)

    async def release_reservation(self, reservation_id, reason):
        self.enter("release_reservation", reservation_id)
        r = self.reservations[reservation_id]
        if r.status == "ACTIVE":
            for pid, qty in r.items:
                self.reserved[pid] -= qty
            r.status = "RELEASED"
        elif r.status == "COMMITTED":
            for pid, qty in r.items:
                self.on_hand[pid] += qty
            r.status = "RELEASED"
        return Reservation(r.id, r.status)


@dataclasses.dataclass
class FakePayment:
    id: str
    order_id: str
    key: str
    amount: int
    status: str
    attempts: int = 1


class FakePayments(Script):
    """Sandbox-like: pm_ok charges; pm_declined declines; pm_timeout times out leaving `timeout_leaves`."""

    def __init__(self) -> None:
        super().__init__()
        self.by_key: dict[str, FakePayment] = {}
        self.timeout_leaves = "FAILED"

    def view(self, p: FakePayment) -> Payment:
        return Payment(p.id, p.status, p.key)

    async def process_payment(self, *, order_id, customer_id, amount_minor, currency_code, payment_method,
                              idempotency_key):
        self.enter("process_payment", order_id, amount_minor, idempotency_key)
        p = self.by_key.get(idempotency_key)
        if p is None:
            p = self.by_key[idempotency_key] = FakePayment(str(uuid.uuid4()), order_id, idempotency_key,
                                                           amount_minor, "PENDING", attempts=0)
        elif p.status in ("SUCCEEDED", "REFUNDED"):
            return self.view(p)
        elif p.status == "VOIDED":
            raise err("payment", grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_VOIDED", payment_id=p.id)
        p.attempts += 1
        if payment_method == "pm_declined":
            p.status = "DECLINED"
            raise err("payment", grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_DECLINED", payment_id=p.id,
                      decline_code="card_declined")
        if payment_method == "pm_timeout":
            p.status = self.timeout_leaves
            raise err("payment", grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", answered=False)
        p.status = "SUCCEEDED"
        return self.view(p)

    async def refund_payment(self, payment_id, idempotency_key, reason):
        self.enter("refund_payment", payment_id)
        p = next(p for p in self.by_key.values() if p.id == payment_id)
        if p.status == "SUCCEEDED":
            p.status = "REFUNDED"
        elif p.status != "REFUNDED":
            raise err("payment", grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_NOT_REFUNDABLE", payment_id=p.id,
                      status=f"PAYMENT_STATUS_{p.status}")
        return self.view(p)

    async def void_payment(self, *, order_id, customer_id, amount_minor, currency_code, payment_method,
                           idempotency_key):
        self.enter("void_payment", order_id, idempotency_key)
        p = self.by_key.get(idempotency_key)
        if p is None:
            p = self.by_key[idempotency_key] = FakePayment(str(uuid.uuid4()), order_id, idempotency_key,
                                                           amount_minor, "VOIDED", attempts=0)
        elif p.status == "PENDING":
            raise err("payment", grpc.StatusCode.ABORTED, "PAYMENT_IN_PROGRESS", payment_id=p.id)
        elif p.status in ("SUCCEEDED", "REFUNDED"):
            raise err("payment", grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_NOT_VOIDABLE", payment_id=p.id,
                      status=f"PAYMENT_STATUS_{p.status}")
        elif p.status == "FAILED":
            p.status = "VOIDED"
        return self.view(p)


class Clock:
    def __init__(self) -> None:
        self.now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

    def __call__(self) -> dt.datetime:
        self.now += dt.timedelta(microseconds=1)
        return self.now


@dataclasses.dataclass
class World:
    uow: FakeOrderUnitOfWork
    users: FakeUsers
    inventory: FakeInventory
    payments: FakePayments
    sagas: SagaCoordinator
    clock: Clock
    customer: str
    product: str

    def coordinator(self, **kw) -> SagaCoordinator:
        return SagaCoordinator(self.uow.factory, self.sagas.downstream, self.sagas.policy, clock=self.clock,
                               sleep=self.sagas.sleep, **kw)

    def create(self, *, items=None, method="pm_ok", request_id=None, customer=None,
               currency=EUR) -> commands.CreateOrder:
        return commands.CreateOrder(
            customer_id=customer or self.customer,
            items=tuple(commands.OrderLine(p, q) for p, q in (items if items is not None else [(self.product, 2)])),
            payment_method=method, currency_code=currency, request_id=request_id or uuid.uuid4().hex)

    async def place(self, **kw) -> Order:
        return await handlers.create_order(self.create(**kw), self.uow.factory, self.sagas)

    async def fail(self, error_type, **kw):
        with pytest.raises(error_type) as caught:
            await self.place(**kw)
        return caught.value

    async def stored(self, order_id: str | None = None) -> Order:
        orders = list(self.uow.orders.orders.values())
        return await self.uow.orders.get(order_id or orders[-1].id)

    def events(self) -> list[str]:
        return [type(e[2]).__name__ for e in self.uow.published]


POLICY = SagaPolicy(step_max_attempts=3, compensation_max_attempts=3, initial_backoff_seconds=0.001,
                    max_backoff_seconds=0.002, lease_seconds=30)


@pytest.fixture
def world() -> World:
    uow, users, inventory, payments = FakeOrderUnitOfWork(), FakeUsers(), FakeInventory(), FakePayments()
    clock = Clock()
    customer = str(uuid.uuid4())
    users.customers[customer] = True
    product = inventory.add_product(stock=10, price=250)
    sagas = SagaCoordinator(uow.factory, Downstream(users, inventory, payments), POLICY, clock=clock)
    return World(uow, users, inventory, payments, sagas, clock, customer, product)


def steps(order: Order) -> dict[str, str]:
    return {s.name.value: s.status.value for s in order.steps.values()}


# The happy path.

async def test_places_order_priced_from_inventory_and_confirms_it(world):
    other = world.inventory.add_product(stock=5, price=1999)
    order = await world.place(items=[(world.product, 2), (other, 1)])
    assert order.status is OrderStatus.CONFIRMED
    assert [(i.product_name, i.unit_price_minor, i.line_total_minor) for i in order.items] == [
        ("Product 0", 250, 500), ("Product 1", 1999, 1999)]
    assert order.total_minor == 2499
    assert set(steps(order).values()) == {"SUCCEEDED"}
    assert all(s.attempts == 1 for s in order.steps.values())
    reservation = world.inventory.reservations[order.reservation_id]
    assert reservation.status == "COMMITTED" and reservation.order_id == order.id
    assert world.inventory.on_hand[world.product] == 8 and world.inventory.reserved[world.product] == 0
    payment = world.payments.by_key[payment_key(order.id)]
    assert (payment.status, payment.amount, payment.id) == ("SUCCEEDED", 2499, order.payment_id)
    assert world.events() == ["OrderCreated", "OrderConfirmed"]
    confirmed = world.uow.published[1][2]
    assert confirmed.total.amount_minor == 2499 and [i.sku for i in confirmed.items] == ["SKU-0", "SKU-1"]
    assert confirmed.payment_id == order.payment_id and confirmed.reservation_id == order.reservation_id


async def test_a_placement_commits_the_order_then_once_per_step_and_frees_its_lease_with_the_last(world):
    order = await world.place()
    # The order with its first step started, then each step's outcome with the next step started, then the
    # confirmation with the lease freed: no separate commit to start a step or to release the lease.
    assert world.uow.commits == 4
    assert world.uow.orders.sagas[order.id].lease_owner is None
    assert order == await world.stored(order.id), "the answer is the order as committed"
    assert [s.attempts for s in order.steps.values()] == [1] * len(order.steps)


async def test_every_remote_step_is_counted_as_started_before_its_call(world):
    seen: list[tuple[str, int, str]] = []

    def recorder(name, step):
        original = getattr(world.inventory if name != "process_payment" else world.payments, name)

        async def record(*args, **kwargs):
            stored = next(iter(world.uow.orders.orders.values()))
            seen.append((name, stored.steps[step].attempts, stored.current_step.value))
            return await original(*args, **kwargs)
        return record

    world.inventory.reserve_stock = recorder("reserve_stock", StepName.RESERVE_STOCK)
    world.payments.process_payment = recorder("process_payment", StepName.PROCESS_PAYMENT)
    world.inventory.commit_reservation = recorder("commit_reservation", StepName.CONFIRM_ORDER)
    await world.place()
    assert seen == [("reserve_stock", 1, "RESERVE_STOCK"), ("process_payment", 1, "PROCESS_PAYMENT"),
                    ("commit_reservation", 1, "CONFIRM_ORDER")]


async def test_a_resumed_step_that_was_counted_before_a_crash_counts_its_new_attempt(world):
    order = crashed_order(world, done=(StepName.RESERVE_STOCK,))
    order.start_step(StepName.PROCESS_PAYMENT, world.clock())  # committed with RESERVE_STOCK's outcome
    await store_crashed(world, order)
    await world.sagas.recover_once()
    await world.sagas.running(order.id).task
    done = await world.stored(order.id)
    assert done.status is OrderStatus.CONFIRMED
    assert done.steps[StepName.PROCESS_PAYMENT].attempts == 2, "the call the crash interrupted counts"
    assert world.payments.count("process_payment") == 1


# Bad input: nothing is called and nothing is stored.

@pytest.mark.parametrize(("change", "fields"), [
    ({"items": []}, ["items"]),
    ({"items": [("P", 0)]}, ["items[0].quantity"]),
    ({"items": [("P", -3)]}, ["items[0].quantity"]),
    ({"items": [("P", 1001)]}, ["items[0].quantity"]),
    ({"items": [("P", 1), ("P", 2)]}, ["items[1].product_id"]),
    ({"items": [("not-a-uuid", 1)]}, ["items[0].product_id"]),
    ({"items": [(str(uuid.uuid4()), 1)] * 0 + [(str(uuid.uuid4()), 1) for _ in range(51)]}, ["items"]),
    ({"customer": "42"}, ["customer_id"]),
    ({"currency": "XYZ"}, ["currency_code"]),
    ({"currency": "eur"}, ["currency_code"]),
    ({"currency": ""}, ["currency_code"]),
    ({"method": ""}, ["payment_method"]),
    ({"method": " "}, ["payment_method"]),
    ({"method": "x" * 256}, ["payment_method"]),
    ({"request_id": "r" * 65}, ["request_id"]),
])
async def test_bad_input_is_refused_with_field_violations(world, change, fields):
    change = dict(change)
    if "items" in change:
        change["items"] = [(world.product if p == "P" else p, q) for p, q in change["items"]]
    error = await world.fail(InvalidArgument, **change)
    assert [v.field for v in error.violations] == fields
    assert error.reason == "INVALID_ARGUMENT" and "order_id" not in error.metadata
    assert world.uow.orders.orders == {} and world.users.calls == [] and world.inventory.calls == []


async def test_every_invalid_field_is_reported_at_once(world):
    cmd = commands.CreateOrder(customer_id="", items=(commands.OrderLine("x", 0),), payment_method="",
                               currency_code="EURO", request_id="")
    with pytest.raises(InvalidArgument) as caught:
        await handlers.create_order(cmd, world.uow.factory, world.sagas)
    assert [v.field for v in caught.value.violations] == [
        "customer_id", "items[0].product_id", "items[0].quantity", "payment_method", "currency_code", "request_id"]


# Failures before the order is stored: no order, no order_id.

async def test_unknown_customer(world):
    error = await world.fail(NotFound, customer=str(uuid.uuid4()))
    assert error.reason == "CUSTOMER_NOT_FOUND" and "order_id" not in error.metadata
    assert world.uow.orders.orders == {} and world.inventory.calls == []


async def test_inactive_customer(world):
    world.users.customers[world.customer] = False
    error = await world.fail(FailedPrecondition)
    assert (error.reason, error.metadata) == ("CUSTOMER_INACTIVE", {"customer_id": world.customer})
    assert world.uow.orders.orders == {}


async def test_unknown_product(world):
    missing = str(uuid.uuid4())
    error = await world.fail(NotFound, items=[(world.product, 1), (missing, 1)])
    assert (error.reason, error.metadata) == ("PRODUCT_NOT_FOUND", {"product_id": missing})
    assert world.uow.orders.orders == {} and world.inventory.count("reserve_stock") == 0


async def test_currency_mismatch(world):
    usd = world.inventory.add_product(stock=3, currency="USD")
    error = await world.fail(FailedPrecondition, items=[(world.product, 1), (usd, 1)])
    assert error.reason == "CURRENCY_MISMATCH"
    assert error.metadata == {"product_id": usd, "product_currency_code": "USD"}
    assert world.uow.orders.orders == {}


async def test_user_service_unreachable_before_the_order_exists(world):
    world.users.fail_next("get_customer", unavailable("user"))
    error = await world.fail(Unavailable)
    assert error.reason == "DEPENDENCY_UNAVAILABLE" and error.metadata["service"] == "user"
    assert "order_id" not in error.metadata and world.uow.orders.orders == {}


# Failures after the order is stored: compensated in reverse, FAILED, and the error carries order_id.

async def test_insufficient_stock_fails_the_order_without_charging(world):
    error = await world.fail(FailedPrecondition, items=[(world.product, 11)])
    order = await world.stored()
    assert error.reason == "INSUFFICIENT_STOCK"
    assert error.metadata == {"product_id": world.product, "sku": "SKU-0", "requested": "11", "available": "10",
                              "order_id": order.id}
    assert order.status is OrderStatus.FAILED
    assert order.failure.step is StepName.RESERVE_STOCK and order.failure.metadata["available"] == "10"
    assert steps(order) == {"VALIDATE_CUSTOMER": "SUCCEEDED", "CREATE_ORDER": "COMPENSATED",
                            "RESERVE_STOCK": "FAILED", "PROCESS_PAYMENT": "PENDING", "CONFIRM_ORDER": "PENDING"}
    assert world.payments.calls == [] and world.inventory.count("release_reservation") == 0
    assert world.events() == ["OrderCreated", "OrderFailed"]
    assert world.uow.published[1][2].failure.reason == "INSUFFICIENT_STOCK"


async def test_declined_payment_releases_the_reservation(world):
    error = await world.fail(FailedPrecondition, method="pm_declined")
    order = await world.stored()
    assert error.reason == "PAYMENT_DECLINED" and error.metadata["decline_code"] == "card_declined"
    assert error.metadata["order_id"] == order.id and error.metadata["payment_id"]
    assert order.status is OrderStatus.FAILED and order.payment_id == ""
    assert steps(order)["RESERVE_STOCK"] == "COMPENSATED" and steps(order)["PROCESS_PAYMENT"] == "FAILED"
    assert world.inventory.reservations[order.reservation_id].status == "RELEASED"
    assert world.inventory.available(world.product) == 10
    # A decline is final: no repeat under the key charges, so there is nothing to void.
    assert world.payments.count("refund_payment") == 0 and world.payments.count("void_payment") == 0
    assert world.uow.published[-1][2].refunded_payment_id == ""


async def test_transient_payment_failure_is_retried_with_the_same_key(world):
    world.payments.fail_next("process_payment", err("payment", grpc.StatusCode.UNAVAILABLE, "PAYMENT_FAILED",
                                                    payment_id="p-1"))
    order = await world.place()
    assert order.status is OrderStatus.CONFIRMED
    pay = order.steps[StepName.PROCESS_PAYMENT]
    assert pay.attempts == 2 and pay.error.startswith("PAYMENT_FAILED")
    keys = [args[2] for m, args in world.payments.calls if m == "process_payment"]
    assert keys == [payment_key(order.id)] * 2
    assert len(world.payments.by_key) == 1


async def test_a_charge_still_in_progress_is_waited_for_without_using_up_attempts(world):
    in_progress = err("payment", grpc.StatusCode.ABORTED, "PAYMENT_IN_PROGRESS", payment_id="p-1")
    world.payments.fail_next("process_payment", *[in_progress] * (POLICY.step_max_attempts + 1))
    order = await world.place()
    assert order.status is OrderStatus.CONFIRMED
    # Only the first call and the one after the answer past the wait budget (compensation_max_attempts waits) are
    # attempts: the calls that waited for the charge asked for the outcome of the attempt already counted.
    assert POLICY.compensation_max_attempts == POLICY.step_max_attempts
    assert order.steps[StepName.PROCESS_PAYMENT].attempts == 2


async def test_a_charge_in_progress_for_too_long_fails_and_is_refunded_once_it_succeeds(world):
    in_progress = err("payment", grpc.StatusCode.ABORTED, "PAYMENT_IN_PROGRESS", payment_id="p-1")
    world.payments.fail_next("process_payment", *[in_progress] * 10)

    def the_charge_went_through() -> None:
        order_id = next(iter(world.uow.orders.orders))
        key = payment_key(order_id)
        world.payments.by_key[key] = FakePayment("p-1", order_id, key, 500, "SUCCEEDED")

    world.payments.fail_next("void_payment", the_charge_went_through)
    error = await world.fail(Unavailable)
    order = await world.stored()
    assert error.reason == "DEPENDENCY_UNAVAILABLE" and error.metadata["downstream_reason"] == "PAYMENT_IN_PROGRESS"
    assert world.payments.count("process_payment") == POLICY.compensation_max_attempts + POLICY.step_max_attempts
    assert world.payments.by_key[payment_key(order.id)].status == "REFUNDED"
    assert order.payment_id == "p-1" and steps(order)["PROCESS_PAYMENT"] == "COMPENSATED"


async def test_payment_failing_on_every_attempt_fails_the_order(world):
    failure = err("payment", grpc.StatusCode.UNAVAILABLE, "PAYMENT_FAILED", payment_id="p-1")
    world.payments.fail_next("process_payment", failure, failure, failure)
    error = await world.fail(Unavailable)
    order = await world.stored()
    assert error.reason == "PAYMENT_FAILED" and error.metadata == {"payment_id": "p-1", "order_id": order.id}
    assert order.steps[StepName.PROCESS_PAYMENT].attempts == POLICY.step_max_attempts
    assert world.payments.count("void_payment") == 1, "a FAILED payment is charged by a repeat unless voided"
    assert order.status is OrderStatus.FAILED and world.inventory.available(world.product) == 10


async def test_a_failed_charge_is_voided_so_that_a_runner_that_lost_its_lease_cannot_charge_it_later(world):
    # The payment is FAILED, which the next ProcessPayment with its key would charge: compensation voids it.
    charge_answering(world, *[refused("payment")] * POLICY.step_max_attempts)

    def recorded_failed() -> None:
        order_id = next(iter(world.uow.orders.orders))
        key = payment_key(order_id)
        world.payments.by_key[key] = FakePayment("p-1", order_id, key, 500, "FAILED")

    world.payments.fail_next("void_payment", recorded_failed)
    error = await world.fail(Unavailable)
    order = await world.stored()
    assert error.reason == "DEPENDENCY_UNAVAILABLE" and order.status is OrderStatus.FAILED
    assert world.payments.by_key[payment_key(order.id)].status == "VOIDED"
    assert not order.steps[StepName.PROCESS_PAYMENT].outcome_unknown
    assert steps(order)["PROCESS_PAYMENT"] == "FAILED" and world.payments.count("refund_payment") == 0


async def test_payment_timeout_refunds_a_charge_that_succeeded_after_all(world):
    world.payments.timeout_leaves = "SUCCEEDED"
    error = await world.fail(DeadlineExceeded, method="pm_timeout")
    order = await world.stored()
    assert error.reason == "PAYMENT_TIMEOUT" and error.metadata["order_id"] == order.id
    payment = world.payments.by_key[payment_key(order.id)]
    assert payment.status == "REFUNDED" and order.payment_id == payment.id
    assert world.payments.count("process_payment") == 1, "a timed-out charge is never repeated"
    assert steps(order)["PROCESS_PAYMENT"] == "COMPENSATED" and order.status is OrderStatus.FAILED
    assert world.uow.published[-1][2].refunded_payment_id == payment.id
    assert world.inventory.available(world.product) == 10


async def test_payment_timeout_without_a_charge_refunds_nothing(world):
    error = await world.fail(DeadlineExceeded, method="pm_timeout")
    order = await world.stored()
    assert error.reason == "PAYMENT_TIMEOUT"
    assert world.payments.count("void_payment") == 1 and world.payments.count("refund_payment") == 0
    assert world.payments.by_key[payment_key(order.id)].status == "VOIDED", "no later repeat may charge it"
    assert steps(order)["PROCESS_PAYMENT"] == "FAILED" and order.payment_id == ""
    assert order.status is OrderStatus.FAILED


async def test_payment_timeout_waits_for_a_pending_charge_to_settle(world):
    world.payments.timeout_leaves = "PENDING"

    def settle() -> None:
        payment = next(iter(world.payments.by_key.values()))
        payment.status = "SUCCEEDED"

    # The first void finds the charge PENDING (in progress); it succeeds before the second, which finds it took money
    # and refunds it.
    world.payments.fail_next("void_payment", lambda: None, settle)
    await world.fail(DeadlineExceeded, method="pm_timeout")
    order = await world.stored()
    assert world.payments.count("void_payment") == 2
    assert next(iter(world.payments.by_key.values())).status == "REFUNDED"
    assert order.steps[StepName.PROCESS_PAYMENT].compensation_attempts == 2
    assert order.status is OrderStatus.FAILED


async def test_reservation_expired_before_confirmation_refunds_the_payment(world):
    world.inventory.fail_next("commit_reservation",
                              lambda: world.inventory.expire(next(iter(world.inventory.reservations))))
    error = await world.fail(FailedPrecondition)
    order = await world.stored()
    assert error.reason == "RESERVATION_EXPIRED" and error.metadata["reservation_id"] == order.reservation_id
    assert error.metadata["reservation_status"] == "RESERVATION_STATUS_EXPIRED"
    assert world.payments.by_key[payment_key(order.id)].status == "REFUNDED"
    assert steps(order) == {"VALIDATE_CUSTOMER": "SUCCEEDED", "CREATE_ORDER": "COMPENSATED",
                            "RESERVE_STOCK": "COMPENSATED", "PROCESS_PAYMENT": "COMPENSATED",
                            "CONFIRM_ORDER": "FAILED"}
    assert world.inventory.available(world.product) == 10 and world.inventory.on_hand[world.product] == 10


async def test_reservation_call_of_unknown_outcome_is_found_and_released(world):
    # The reservation is made but every answer is lost: compensation looks it up by order id and releases it.
    reserve_answering(world, *[unavailable("inventory")] * POLICY.step_max_attempts)
    error = await world.fail(Unavailable)
    order = await world.stored()
    assert error.reason == "DEPENDENCY_UNAVAILABLE" and error.metadata["service"] == "inventory"
    reservation = world.inventory.by_order(order.id)
    assert reservation.status == "RELEASED" and order.reservation_id == reservation.id
    assert steps(order)["RESERVE_STOCK"] == "COMPENSATED" and world.payments.calls == []
    assert world.inventory.available(world.product) == 10


async def test_a_charge_whose_answer_was_lost_is_refunded_though_the_later_attempts_were_refused(world):
    # The first attempt charges the customer but its answer is lost; the payment service refuses the others. The
    # last answer says nothing of the first attempt: compensation looks the charge up and refunds it.
    charge_answering(world, unavailable("payment"), *[refused("payment")] * (POLICY.step_max_attempts - 1))
    error = await world.fail(Unavailable)
    order = await world.stored()
    assert error.reason == "DEPENDENCY_UNAVAILABLE" and error.metadata["service"] == "payment"
    payment = world.payments.by_key[payment_key(order.id)]
    assert payment.status == "REFUNDED" and order.payment_id == payment.id
    assert steps(order)["PROCESS_PAYMENT"] == "COMPENSATED" and order.status is OrderStatus.FAILED
    assert world.uow.published[-1][2].refunded_payment_id == payment.id
    assert world.inventory.available(world.product) == 10


async def test_a_charge_refused_on_every_attempt_is_voided_so_that_no_later_repeat_charges(world):
    # The payment service answered "not now" each time (nothing was charged), so a repeat under the order's key, by
    # a runner that lost its lease without knowing, could still charge: compensation voids the key first.
    charge_answering(world, *[refused("payment")] * POLICY.step_max_attempts)
    await world.fail(Unavailable)
    order = await world.stored()
    assert world.payments.count("void_payment") == 1 and world.payments.count("refund_payment") == 0
    assert world.payments.by_key[payment_key(order.id)].status == "VOIDED"
    assert steps(order)["PROCESS_PAYMENT"] == "FAILED" and order.payment_id == ""
    assert not order.steps[StepName.PROCESS_PAYMENT].outcome_unknown
    assert order.status is OrderStatus.FAILED


async def test_a_reservation_whose_answer_was_lost_is_released_though_the_later_attempts_were_refused(world):
    # The first attempt reserves the stock but its answer is lost, the inventory refuses the others; compensation
    # looks the reservation up and releases it.
    reserve_answering(world, err("inventory", grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED", answered=False),
                      *[refused("inventory")] * (POLICY.step_max_attempts - 1))
    error = await world.fail(Unavailable)
    order = await world.stored()
    assert error.reason == "DEPENDENCY_UNAVAILABLE" and error.metadata["service"] == "inventory"
    reservation = world.inventory.by_order(order.id)
    assert reservation.status == "RELEASED" and order.reservation_id == reservation.id
    assert steps(order)["RESERVE_STOCK"] == "COMPENSATED" and order.status is OrderStatus.FAILED
    assert world.inventory.available(world.product) == 10 and world.payments.calls == []


async def test_compensation_that_keeps_failing_leaves_the_order_compensation_failed(world):
    before = REGISTRY.get_sample_value("tessera_saga_compensation_failures_total",
                                       {"step": "PROCESS_PAYMENT"}) or 0.0
    world.inventory.fail_next("commit_reservation",
                              lambda: world.inventory.expire(next(iter(world.inventory.reservations))))
    world.payments.fail_next("refund_payment", *[unavailable("payment")] * POLICY.compensation_max_attempts)
    error = await world.fail(FailedPrecondition)
    order = await world.stored()
    assert error.reason == "RESERVATION_EXPIRED", "the call reports the original failure"
    assert order.status is OrderStatus.COMPENSATION_FAILED
    pay = order.steps[StepName.PROCESS_PAYMENT]
    assert pay.status is StepStatus.COMPENSATION_FAILED and pay.shown_attempts == POLICY.compensation_max_attempts
    assert pay.error.startswith("UNAVAILABLE")
    # The other compensations still ran: the stock is not held.
    assert steps(order)["RESERVE_STOCK"] == "COMPENSATED" and steps(order)["CREATE_ORDER"] == "SUCCEEDED"
    assert world.events() == ["OrderCreated", "OrderCompensationFailed"]
    event = world.uow.published[-1][2]
    assert event.failure.reason == "RESERVATION_EXPIRED" and event.payment_id == order.payment_id
    after = REGISTRY.get_sample_value("tessera_saga_compensation_failures_total", {"step": "PROCESS_PAYMENT"})
    assert after == before + 1
    with pytest.raises(FailedPrecondition) as again:  # a repeat returns the same error
        await world.place(request_id=order.request_id)
    assert again.value.reason == "RESERVATION_EXPIRED"


# Idempotency.

async def test_same_request_id_places_one_order_and_charges_once(world):
    first = await world.place(request_id="req-1")
    again = await world.place(request_id="req-1")
    assert again.id == first.id and again.status is OrderStatus.CONFIRMED
    assert len(world.uow.orders.orders) == 1 and world.payments.count("process_payment") == 1
    assert world.events() == ["OrderCreated", "OrderConfirmed"]


async def test_same_request_id_with_another_body_is_refused(world):
    first = await world.place(request_id="req-1")
    with pytest.raises(AlreadyExists) as caught:
        await world.place(request_id="req-1", items=[(world.product, 3)])
    assert caught.value.reason == "REQUEST_ID_REUSED" and caught.value.metadata == {"order_id": first.id}


async def test_repeat_of_a_failed_order_returns_the_same_error(world):
    first = await world.fail(FailedPrecondition, method="pm_declined", request_id="req-1")
    again = await world.fail(FailedPrecondition, method="pm_declined", request_id="req-1")
    assert (again.reason, again.metadata) == (first.reason, first.metadata)
    assert world.payments.count("process_payment") == 1 and len(world.uow.orders.orders) == 1


async def test_repeat_while_the_saga_runs_is_aborted(world):
    started, gate = asyncio.Event(), asyncio.Event()

    async def slow_payment(**kw):
        started.set()
        await gate.wait()
        return await FakePayments.process_payment(world.payments, **kw)

    world.payments.process_payment = slow_payment
    first = asyncio.create_task(world.place(request_id="req-1"))
    await started.wait()
    error = await world.fail(Aborted, request_id="req-1")
    assert error.reason == "ORDER_IN_PROGRESS"
    assert error.metadata == {"order_id": next(iter(world.uow.orders.orders))}
    gate.set()
    assert (await first).status is OrderStatus.CONFIRMED


# Deadlines: the saga outlives the caller.

async def test_caller_deadline_answers_in_progress_and_the_saga_finishes_in_background(world):
    gate = asyncio.Event()

    async def slow_payment(**kw):
        await gate.wait()
        return await FakePayments.process_payment(world.payments, **kw)

    world.payments.process_payment = slow_payment
    token = callctx.deadline_var.set(time.monotonic() + 0.3)
    try:
        error = await world.fail(Aborted)
    finally:
        callctx.deadline_var.reset(token)
    assert error.reason == "ORDER_IN_PROGRESS"
    gate.set()
    execution = world.sagas.running(error.metadata["order_id"])
    await execution.task
    assert (await world.stored()).status is OrderStatus.CONFIRMED


# Leases and recovery.

def crashed_order(world: World, *, done: tuple[StepName, ...] = (), method: str = "pm_ok") -> Order:
    """An order as a crashed process left it, with the given steps done (and done in the fakes too)."""
    order = Order.place(customer_id=world.customer, items=(OrderItem(world.product, "Product 0", "SKU-0", 2, 250),),
                        currency_code=EUR, payment_method=method, request_id=uuid.uuid4().hex, request_hash="h",
                        now=world.clock())
    for step in done:
        if step is StepName.RESERVE_STOCK:
            reservation = world.inventory._reserve(order.id, [(world.product, 2)])
            order.complete_step(step, world.clock(), reservation_id=reservation.id)
        elif step is StepName.PROCESS_PAYMENT:
            key = payment_key(order.id)
            world.payments.by_key[key] = FakePayment(str(uuid.uuid4()), order.id, key, 500, "SUCCEEDED")
            order.complete_step(step, world.clock(), payment_id=world.payments.by_key[key].id)
    return order


async def store_crashed(world: World, order: Order, *, owner: str = "dead-runner", lease_left: float = -1.0,
                        caller: SagaCaller = SagaCaller()) -> None:
    await world.uow.orders.add(order, Lease(owner, world.clock.now + dt.timedelta(seconds=lease_left)), caller)


async def test_recovery_completes_a_saga_interrupted_after_reserving_stock(world):
    order = crashed_order(world, done=(StepName.RESERVE_STOCK,))
    await store_crashed(world, order, caller=SagaCaller(subject=world.customer, scopes=("orders",),
                                                         correlation_id="corr-1"))
    assert await world.sagas.recover_once() == 1
    await world.sagas.running(order.id).task
    done = await world.stored(order.id)
    assert done.status is OrderStatus.CONFIRMED
    assert world.inventory.count("reserve_stock") == 0, "a completed step is not run again"
    assert world.payments.count("process_payment") == 1
    # The resumed saga calls the other services as the customer who placed the order.
    assert {p.subject for p in world.payments.principals + world.inventory.principals} == {world.customer}


def record_trace_and_ids(script: Script, method: str) -> list[tuple[str, str | None]]:
    """Wraps one fake call to note, at each call, the trace id of the current span and the correlation id."""
    seen: list[tuple[str, str | None]] = []
    real = getattr(script, method)

    async def call(*args, **kw):
        seen.append((format(trace.get_current_span().get_span_context().trace_id, "032x"),
                     callctx.current_correlation_id()))
        return await real(*args, **kw)

    setattr(script, method, call)
    return seen


def in_span(trace_id: str, span_id: str, state: str = "") -> trace.Span:
    """A current span as the gRPC server interceptor would make one for a caller's traceparent."""
    return trace.NonRecordingSpan(trace.SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=False, trace_flags=trace.TraceFlags(1),
        trace_state=trace.TraceState.from_header([state]) if state else None))


async def test_create_order_stores_the_trace_context_a_resumed_saga_continues(world):
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with trace.use_span(in_span(trace_id, span_id, "tessera=1")):
        order = await world.place()
    stored = await world.uow.orders.caller(order.id)
    assert (stored.traceparent, stored.tracestate) == (f"00-{trace_id}-{span_id}-01", "tessera=1")


async def test_a_resumed_saga_continues_the_trace_and_correlation_id_of_the_call_that_started_it(world):
    trace_id, span_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    order = crashed_order(world, done=(StepName.RESERVE_STOCK,))
    await store_crashed(world, order, caller=SagaCaller(subject=world.customer, scopes=("orders",),
                                                         correlation_id="corr-7",
                                                         traceparent=f"00-{trace_id}-{span_id}-01"))
    charges = record_trace_and_ids(world.payments, "process_payment")
    commits = record_trace_and_ids(world.inventory, "commit_reservation")
    with trace.use_span(in_span(uuid.uuid4().hex, uuid.uuid4().hex[:16])):  # the recovery pass's own trace
        assert await world.sagas.recover_once() == 1
    await world.sagas.running(order.id).task
    assert (await world.stored(order.id)).status is OrderStatus.CONFIRMED
    assert charges + commits == [(trace_id, "corr-7")] * 2


async def test_a_saga_stored_without_a_trace_context_resumes_in_a_trace_of_its_own(world):
    order = crashed_order(world, done=(StepName.RESERVE_STOCK,))
    await store_crashed(world, order, caller=SagaCaller(correlation_id="corr-8"))
    charges = record_trace_and_ids(world.payments, "process_payment")
    recovery_trace = uuid.uuid4().hex
    with trace.use_span(in_span(recovery_trace, uuid.uuid4().hex[:16])):
        assert await world.sagas.recover_once() == 1
    await world.sagas.running(order.id).task
    assert (await world.stored(order.id)).status is OrderStatus.CONFIRMED
    [(charged_in, correlation_id)] = charges
    assert charged_in != recovery_trace and correlation_id == "corr-8"


async def test_recovery_compensates_a_saga_interrupted_while_compensating(world):
    order = crashed_order(world, done=(StepName.RESERVE_STOCK, StepName.PROCESS_PAYMENT))
    order.start_step(StepName.CONFIRM_ORDER, world.clock())
    world.inventory.expire(order.reservation_id)
    order.fail(StepName.CONFIRM_ORDER, Failure("RESERVATION_EXPIRED", "expired", StepName.CONFIRM_ORDER),
               world.clock())
    await store_crashed(world, order)
    await world.sagas.recover_once()
    await world.sagas.running(order.id).task
    done = await world.stored(order.id)
    assert done.status is OrderStatus.FAILED
    assert world.payments.by_key[payment_key(order.id)].status == "REFUNDED"
    assert world.events() == ["OrderFailed"]


async def test_a_charge_whose_answer_was_lost_before_a_crash_is_refunded_by_the_runner_that_resumes(world):
    async def crash(_delay: float) -> None:
        raise RuntimeError("the process dies before retrying the charge")

    charge_answering(world, unavailable("payment"), *[refused("payment")] * (POLICY.step_max_attempts - 1))
    first = world.coordinator()
    first.sleep = crash
    with pytest.raises(Aborted):
        await handlers.create_order(world.create(), world.uow.factory, first)
    order = await world.stored()
    pay = order.steps[StepName.PROCESS_PAYMENT]
    assert order.status is OrderStatus.PENDING and pay.attempts == 1 and pay.outcome_unknown
    # Another runner resumes: its attempts are refused, and it still knows the first one may have charged.
    assert await world.sagas.recover_once() == 1
    await world.sagas.running(order.id).task
    done = await world.stored(order.id)
    payment = world.payments.by_key[payment_key(order.id)]
    assert payment.status == "REFUNDED" and done.payment_id == payment.id
    assert steps(done)["PROCESS_PAYMENT"] == "COMPENSATED" and done.status is OrderStatus.FAILED


async def test_a_saga_leased_by_a_live_runner_is_left_alone(world):
    order = crashed_order(world, done=(StepName.RESERVE_STOCK,))
    await store_crashed(world, order, owner="live-runner", lease_left=30)
    assert await world.sagas.recover_once() == 0
    assert not await world.sagas.acquire(order.id)
    world.clock.now += dt.timedelta(seconds=31)  # the live runner stopped renewing: its lease expires
    assert await world.sagas.recover_once() == 1
    await world.sagas.running(order.id).task
    assert (await world.stored(order.id)).status is OrderStatus.CONFIRMED


async def test_a_runner_whose_lease_was_taken_over_cannot_write(world):
    order = crashed_order(world, done=(StepName.RESERVE_STOCK,))
    await store_crashed(world, order, owner="slow-runner", lease_left=-1)
    taken = await world.uow.orders.acquire_lease(order.id, Lease("new-runner", world.clock.now +
                                                                 dt.timedelta(seconds=30)), world.clock.now)
    assert taken
    stale = await world.uow.orders.get(order.id)
    stale.start_step(StepName.PROCESS_PAYMENT, world.clock())
    with pytest.raises(LeaseLost):
        await world.uow.orders.save(stale, Lease("slow-runner", world.clock.now + dt.timedelta(seconds=30)))
    fresh = await world.uow.orders.get(order.id)
    await world.uow.orders.save(fresh, Lease("new-runner", world.clock.now + dt.timedelta(seconds=30)))
    with pytest.raises(LeaseLost):  # the same owner with an outdated version is refused too
        await world.uow.orders.save(stale, Lease("new-runner", world.clock.now + dt.timedelta(seconds=30)))


async def test_stop_frees_the_leases_of_running_sagas(world):
    started = asyncio.Event()

    async def stuck_payment(**kw):
        started.set()
        await asyncio.Event().wait()

    world.payments.process_payment = stuck_payment
    task = asyncio.create_task(world.place())
    await started.wait()
    assert world.sagas.running(next(iter(world.uow.orders.orders))) is not None
    await world.sagas.stop()
    task.cancel()
    order_id = next(iter(world.uow.orders.orders))
    assert world.uow.orders.sagas[order_id].lease_owner is None
    assert await world.coordinator().acquire(order_id)


# Reads and authorization.

async def test_get_and_list_newest_first_with_stable_pages(world):
    world.inventory.on_hand[world.product] = 100
    placed = [await world.place() for _ in range(5)]
    await world.fail(FailedPrecondition, method="pm_declined")
    got = await handlers.get_order(commands.GetOrder(placed[0].id.upper()), world.uow.factory)
    assert got.id == placed[0].id
    page, token = await handlers.list_orders(commands.ListOrders(2, "", world.customer, OrderStatus.CONFIRMED),
                                             world.uow.factory)
    assert [o.id for o in page] == [placed[4].id, placed[3].id] and token
    await world.place()  # created while paging: never shows up on later pages
    rest, last = [], token
    while last:
        more, last = await handlers.list_orders(
            commands.ListOrders(2, last, world.customer, OrderStatus.CONFIRMED), world.uow.factory)
        rest += more
    assert [o.id for o in rest] == [placed[2].id, placed[1].id, placed[0].id]
    with pytest.raises(InvalidArgument) as caught:  # a token is bound to its filters
        await handlers.list_orders(commands.ListOrders(2, token, world.customer, None), world.uow.factory)
    assert caught.value.violations[0].field == "page_token"
    with pytest.raises(NotFound) as missing:
        await handlers.get_order(commands.GetOrder(str(uuid.uuid4())), world.uow.factory)
    assert missing.value.reason == "ORDER_NOT_FOUND"


async def test_customers_see_and_act_on_their_own_orders_only(world):
    mine = await world.place()
    stranger = callctx.Principal(subject=str(uuid.uuid4()), scopes=frozenset())
    owner = callctx.Principal(subject=world.customer, scopes=frozenset())
    admin = callctx.Principal(subject="ops", scopes=frozenset({callctx.ADMIN_SCOPE}))
    token = callctx.principal_var.set(stranger)
    try:
        with pytest.raises(PermissionDenied):
            await handlers.get_order(commands.GetOrder(mine.id), world.uow.factory)
        with pytest.raises(PermissionDenied):
            await handlers.cancel_order(commands.CancelOrder(mine.id, ""), world.uow.factory, world.sagas)
        with pytest.raises(PermissionDenied):
            await world.place()
        with pytest.raises(PermissionDenied):
            await handlers.list_orders(commands.ListOrders(0, "", world.customer, None), world.uow.factory)
        own, _ = await handlers.list_orders(commands.ListOrders(0, "", "", None), world.uow.factory)
        assert own == []
        callctx.principal_var.set(owner)
        own, _ = await handlers.list_orders(commands.ListOrders(0, "", "", None), world.uow.factory)
        assert [o.id for o in own] == [mine.id]
        callctx.principal_var.set(admin)
        assert (await handlers.get_order(commands.GetOrder(mine.id), world.uow.factory)).id == mine.id
    finally:
        callctx.principal_var.reset(token)
    assert world.uow.orders.orders[mine.id].status is OrderStatus.CONFIRMED


# Cancellation.

async def test_cancel_refunds_and_returns_the_stock(world):
    order = await world.place()
    cancelled = await handlers.cancel_order(commands.CancelOrder(order.id, "Changed my mind"), world.uow.factory,
                                            world.sagas)
    assert cancelled.status is OrderStatus.CANCELLED and cancelled.cancel_reason == "Changed my mind"
    assert cancelled.failure is None and cancelled.cancel_time is not None
    assert steps(cancelled) == {"VALIDATE_CUSTOMER": "SUCCEEDED", "CREATE_ORDER": "COMPENSATED",
                                "RESERVE_STOCK": "COMPENSATED", "PROCESS_PAYMENT": "COMPENSATED",
                                "CONFIRM_ORDER": "COMPENSATED"}
    assert world.payments.by_key[payment_key(order.id)].status == "REFUNDED"
    assert world.inventory.on_hand[world.product] == 10
    assert world.inventory.count("release_reservation") == 1
    assert world.events()[-1] == "OrderCancelled"
    assert world.uow.published[-1][2].refunded_amount.amount_minor == 500
    again = await handlers.cancel_order(commands.CancelOrder(order.id, "other"), world.uow.factory, world.sagas)
    assert again.version == cancelled.version and again.cancel_reason == "Changed my mind"


async def test_cancel_is_refused_where_it_makes_no_sense(world):
    await world.fail(FailedPrecondition, method="pm_declined")
    failed = await world.stored()
    with pytest.raises(FailedPrecondition) as caught:
        await handlers.cancel_order(commands.CancelOrder(failed.id, ""), world.uow.factory, world.sagas)
    assert caught.value.reason == "ORDER_NOT_CANCELLABLE"
    assert caught.value.metadata == {"order_id": failed.id, "status": "ORDER_STATUS_FAILED"}
    with pytest.raises(InvalidArgument) as bad:
        await handlers.cancel_order(commands.CancelOrder(failed.id, "x" * 501), world.uow.factory, world.sagas)
    assert bad.value.violations[0].field == "reason"


async def test_cancel_with_payment_down_answers_unavailable_and_finishes_in_background(world):
    sagas = world.coordinator()
    sagas.policy = dataclasses.replace(POLICY, initial_backoff_seconds=0.02, max_backoff_seconds=0.02)
    order = await handlers.create_order(world.create(), world.uow.factory, sagas)
    world.payments.fail_next("refund_payment", unavailable("payment"), unavailable("payment"))
    with pytest.raises(Unavailable) as caught:
        await handlers.cancel_order(commands.CancelOrder(order.id, "r"), world.uow.factory, sagas)
    assert caught.value.reason == "DEPENDENCY_UNAVAILABLE"
    assert caught.value.metadata == {"order_id": order.id, "service": "payment"}
    # Repeats of the call follow the cancellation the service keeps retrying, until it is done.
    for _ in range(3):
        try:
            cancelled = await handlers.cancel_order(commands.CancelOrder(order.id, "ignored"), world.uow.factory,
                                                    sagas)
            break
        except Unavailable:
            continue
    assert cancelled.status is OrderStatus.CANCELLED and cancelled.cancel_reason == "r"
    assert cancelled.steps[StepName.PROCESS_PAYMENT].compensation_attempts == 3


async def test_two_identical_cancels_at_once_in_one_process_both_answer_the_cancelled_order(world):
    order = await world.place()
    real_get = world.uow.orders.get

    async def get(order_id):
        found = await real_get(order_id)
        await asyncio.sleep(0)  # the read's answer arrives a little later, as from a database: the calls interleave
        return found

    world.uow.orders.get = get
    cancel = commands.CancelOrder(order.id, "double click")
    first, second = await asyncio.gather(handlers.cancel_order(cancel, world.uow.factory, world.sagas),
                                         handlers.cancel_order(cancel, world.uow.factory, world.sagas))
    assert first.status is second.status is OrderStatus.CANCELLED and first.version == second.version
    assert world.payments.by_key[payment_key(order.id)].status == "REFUNDED"
    assert world.payments.count("refund_payment") == 1 and world.inventory.count("release_reservation") == 1
    assert world.events().count("OrderCancelled") == 1


async def test_a_cancel_read_while_the_placement_ends_cancels_the_order(world):
    real_save = world.sagas._save
    cancelling: list[asyncio.Task] = []

    async def save(order, *events, ending=None):
        await real_save(order, *events, ending=ending)
        if ending is not None and order.status is OrderStatus.CONFIRMED:
            # The call reads the order right after the commit that confirmed it, while the placement still ends.
            cancelling.append(asyncio.create_task(handlers.cancel_order(
                commands.CancelOrder(order.id, "changed my mind"), world.uow.factory, world.sagas)))

    world.sagas._save = save
    order = await world.place()
    cancelled = await cancelling[0]
    assert cancelled.status is OrderStatus.CANCELLED and cancelled.cancel_reason == "changed my mind"
    assert (await world.stored(order.id)).status is OrderStatus.CANCELLED
    assert world.payments.by_key[payment_key(order.id)].status == "REFUNDED"
    assert world.inventory.on_hand[world.product] == 10


def _rpc_error(code: grpc.StatusCode, status) -> grpc.aio.AioRpcError:
    from grpc_status import rpc_status

    trailing = grpc.aio.Metadata(*rpc_status.to_status(status).trailing_metadata)
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, status.message)


def test_a_participant_whose_database_failed_under_the_call_may_have_acted():
    from tessera_order.adapters.downstream import translate
    from tessera_runtime.errors import DATABASE_UNAVAILABLE, Unavailable

    failed = translate("inventory", _rpc_error(grpc.StatusCode.UNAVAILABLE, Unavailable(
        "the database is unavailable; retry later", reason=DATABASE_UNAVAILABLE, domain="inventory.tessera.dev",
    ).to_status()))
    # Retried like any UNAVAILABLE, but never taken as "nothing was done": its COMMIT may have gone through.
    assert failed.transient and failed.outcome_unknown and failed.reason == DATABASE_UNAVAILABLE
    refused = translate("inventory", _rpc_error(grpc.StatusCode.UNAVAILABLE, Unavailable(
        "the payment processor is down", reason="PROCESSOR_UNAVAILABLE", domain="payment.tessera.dev").to_status()))
    assert refused.transient and not refused.outcome_unknown


def test_a_call_no_service_answered_is_described_without_grpcs_own_text(caplog):
    from tessera_order.adapters.downstream import translate
    from tessera_runtime.errors import Unavailable

    bare = grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                "Deadline Exceeded at ipv4:10.0.0.7:50052")
    with caplog.at_level("WARNING", logger="tessera.order.downstream"):
        late = translate("inventory", bare)
    assert late.describe() == "DEADLINE_EXCEEDED: the inventory service did not answer in time"
    assert late.outcome_unknown
    assert any(getattr(r, "detail", "") == "Deadline Exceeded at ipv4:10.0.0.7:50052" for r in caplog.records)
    # This process's own circuit breaker refused the call: no answer from the service either.
    opened = translate("payment", _rpc_error(grpc.StatusCode.UNAVAILABLE, Unavailable(
        "circuit open for 127.0.0.1:50053", reason="CIRCUIT_OPEN", domain="tessera.dev").to_status()))
    assert opened.describe() == "UNAVAILABLE: the payment service could not be reached" and opened.transient
