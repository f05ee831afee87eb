"""Use cases of the order service. Handlers raise domain errors; the runtime turns them into statuses."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable
from typing import Protocol

from tessera_order import DOMAIN, mapping
from tessera_order.adapters.repository import DuplicateRequestId, LeaseLost, OrderRepository
from tessera_order.domain import model
from tessera_order.domain.model import Order, OrderItem, OrderStatus, StepName
from tessera_order.service_layer import commands
from tessera_order.service_layer.ports import DownstreamError, Product
from tessera_order.service_layer.saga import AGGREGATE, Execution, SagaCoordinator, current_caller
from tessera_runtime import metrics, pagination
from tessera_runtime.context import current_principal, remaining_seconds
from tessera_runtime.errors import (
    Aborted,
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    NotFound,
    PermissionDenied,
    Unavailable,
    check_uuid,
)


class UnitOfWork(Protocol):
    orders: OrderRepository

    async def __aenter__(self) -> UnitOfWork: ...
    async def __aexit__(self, *exc: object) -> None: ...
    def reading(self) -> UnitOfWork: ...
    def inserting(self) -> UnitOfWork: ...
    def one_statement(self) -> UnitOfWork: ...
    def add_event(self, aggregate_type: str, aggregate_id: str, message) -> object: ...
    async def commit(self) -> None: ...


UowFactory = Callable[[], UnitOfWork]

# How long before the caller's deadline a handler stops waiting for a saga, to answer while the caller listens.
_ANSWER_MARGIN_SECONDS = 0.5


def _wait_budget() -> float | None:
    remaining = remaining_seconds()
    if remaining is None:
        return None
    return max(0.0, remaining - min(_ANSWER_MARGIN_SECONDS, remaining / 4))


def _order_not_found(order_id: str) -> NotFound:
    return NotFound(f"order {order_id} not found", reason="ORDER_NOT_FOUND", domain=DOMAIN,
                    metadata={"order_id": order_id})


def _authorize(customer_id: str, order_id: str | None = None) -> None:
    principal = current_principal()
    if principal is not None and not principal.may_act_for(customer_id):
        metadata = {"order_id": order_id} if order_id else {"customer_id": customer_id}
        raise PermissionDenied("you may only act on your own orders", reason="PERMISSION_DENIED", domain=DOMAIN,
                               metadata=metadata)


def _request_hash(cmd: commands.CreateOrder, customer_id: str, lines: list[tuple[str, int]]) -> str:
    body = json.dumps([customer_id, lines, cmd.payment_method, cmd.currency_code])
    return hashlib.sha256(body.encode()).hexdigest()


# CreateOrder.

async def create_order(cmd: commands.CreateOrder, uow: UowFactory, sagas: SagaCoordinator) -> Order:
    v = model.new_violations()
    check_uuid(cmd.customer_id, "customer_id", v)
    lines = [(line.product_id.lower(), line.quantity) for line in cmd.items]
    model.check_items([(line.product_id, line.quantity) for line in cmd.items], v)
    model.check_payment_method(cmd.payment_method, v)
    model.check_currency(cmd.currency_code, v)
    model.check_request_id(cmd.request_id, v)
    v.raise_if_any()
    customer_id = cmd.customer_id.lower()
    _authorize(customer_id)
    request_hash = _request_hash(cmd, customer_id, lines)

    async with uow().reading() as u:  # one statement, and nearly always no order has this request_id
        known = await u.orders.id_by_request_id(cmd.request_id)
    if known is not None:
        async with uow() as u:
            previous = await u.orders.get(known)
        assert previous is not None
        return _replay(previous, request_hash)

    try:
        await _validate_customer(sagas, customer_id)
        products = await _price(sagas, [product_id for product_id, _ in lines])
        items = _priced_items(lines, products, cmd.currency_code)
    except DomainError as err:
        metrics.ORDERS_FAILED.labels(err.reason).inc()  # rejected before an order was stored
        raise

    order = Order.place(customer_id=customer_id, items=items, currency_code=cmd.currency_code,
                        payment_method=cmd.payment_method, request_id=cmd.request_id, request_hash=request_hash,
                        now=sagas.clock())
    caller = current_caller()  # the identity, ids and trace a resumed saga takes up should this process die
    created = mapping.order_created(order)  # the order as placed, before its saga's first step
    # The first step's attempt is counted in the commit that stores the order: its call follows right away.
    first = order.next_step()
    assert first is not None
    order.start_step(first, sagas.clock())
    async with uow().inserting() as u:  # on PostgreSQL, the order, its saga and its event in one statement
        try:
            await u.orders.add(order, sagas.new_lease(), caller)
            u.add_event(AGGREGATE, order.id, created)
            await u.commit()
        except DuplicateRequestId:
            stored = None
        else:
            stored = order
    if stored is None:  # a concurrent call with the same request_id stored its order first
        async with uow() as u:
            previous = await u.orders.get_by_request_id(cmd.request_id)
        assert previous is not None
        return _replay(previous, request_hash)
    sagas.checkpoint(StepName.CREATE_ORDER.value)

    execution = sagas.run(order.id, leased=True, state=order, started=first)
    await sagas.wait(execution, _wait_budget())
    placed = execution.outcome()
    if placed is None:  # still running (or stopped without ending): what is committed tells
        async with uow() as u:
            placed = await u.orders.get(order.id)
    assert placed is not None
    if placed.status is OrderStatus.CONFIRMED:
        return placed
    if placed.failure is not None:
        raise model.failure_error(placed.failure, placed.id)
    raise _in_progress(placed)


def _in_progress(order: Order) -> Aborted:
    return Aborted("the order is still being placed; retry later or read it with GetOrder",
                   reason="ORDER_IN_PROGRESS", domain=DOMAIN, metadata={"order_id": order.id})


def _replay(order: Order, request_hash: str) -> Order:
    """The outcome of the order an earlier CreateOrder with the same request_id placed."""
    if order.request_hash != request_hash:
        principal = current_principal()
        # Another customer's order is not named: its id is none of the caller's business.
        visible = principal is None or principal.may_act_for(order.customer_id)
        raise AlreadyExists("request_id was already used with a different request", reason="REQUEST_ID_REUSED",
                            domain=DOMAIN, metadata={"order_id": order.id} if visible else {})
    if order.status is OrderStatus.PENDING or (order.status is OrderStatus.COMPENSATING
                                               and order.failure is not None):
        raise _in_progress(order)
    if order.failure is not None:
        raise model.failure_error(order.failure, order.id)
    return order


def _dependency_unavailable(service: str, err: DownstreamError) -> Unavailable:
    return Unavailable(f"the {service} service could not be reached", reason="DEPENDENCY_UNAVAILABLE",
                       domain=DOMAIN, metadata={"service": service, "downstream_reason": err.reason})


async def _validate_customer(sagas: SagaCoordinator, customer_id: str) -> None:
    try:
        customer = await sagas.downstream.users.get_customer(customer_id)
    except DownstreamError as err:
        if err.answered and err.reason == "USER_NOT_FOUND":
            raise NotFound(f"customer {customer_id} not found", reason="CUSTOMER_NOT_FOUND", domain=DOMAIN,
                           metadata={"customer_id": customer_id}) from None
        if err.answered and err.reason == "PERMISSION_DENIED":
            raise PermissionDenied("you may not place orders for this customer", reason="PERMISSION_DENIED",
                                   domain=DOMAIN, metadata={"customer_id": customer_id}) from None
        raise _dependency_unavailable("user", err) from None
    if not customer.active:
        raise FailedPrecondition("the customer's account is not active", reason="CUSTOMER_INACTIVE",
                                 domain=DOMAIN, metadata={"customer_id": customer_id})


async def _price(sagas: SagaCoordinator, product_ids: list[str]) -> list[Product]:
    try:
        return await sagas.downstream.inventory.batch_get_products(product_ids)
    except DownstreamError as err:
        if err.answered and err.reason == "PRODUCT_NOT_FOUND":
            product_id = err.metadata.get("product_id", "")
            raise NotFound(f"product {product_id} not found", reason="PRODUCT_NOT_FOUND", domain=DOMAIN,
                           metadata={"product_id": product_id}) from None
        raise _dependency_unavailable("inventory", err) from None


def _priced_items(lines: list[tuple[str, int]], products: list[Product], currency_code: str) -> tuple[
        OrderItem, ...]:
    items = []
    for (product_id, quantity), product in zip(lines, products, strict=True):
        if product.currency_code != currency_code:
            raise FailedPrecondition(
                f"product {product.sku} is priced in {product.currency_code}, not {currency_code}",
                reason="CURRENCY_MISMATCH", domain=DOMAIN,
                metadata={"product_id": product_id, "product_currency_code": product.currency_code})
        items.append(OrderItem(product_id=product_id, product_name=product.name, sku=product.sku,
                               quantity=quantity, unit_price_minor=product.price_minor))
    return tuple(items)


# Reads.

async def get_order(cmd: commands.GetOrder, uow: UowFactory) -> Order:
    v = model.new_violations()
    check_uuid(cmd.order_id, "id", v)
    v.raise_if_any()
    order_id = cmd.order_id.lower()
    async with uow() as u:
        order = await u.orders.get(order_id)
    if order is None:
        raise _order_not_found(order_id)
    _authorize(order.customer_id, order.id)
    return order


async def list_orders(cmd: commands.ListOrders, uow: UowFactory) -> tuple[list[Order], str]:
    v = model.new_violations()
    check_uuid(cmd.customer_id, "customer_id", v, required=False)
    if cmd.unknown_status is not None:
        v.add("status", f"{cmd.unknown_status} is not an OrderStatus")
    v.raise_if_any()
    size = pagination.page_size(cmd.page_size, DOMAIN)
    customer_id = cmd.customer_id.lower() or None
    principal = current_principal()
    if principal is not None and not principal.is_admin:
        if customer_id is not None and customer_id != principal.subject:
            raise PermissionDenied("you may only list your own orders", reason="PERMISSION_DENIED", domain=DOMAIN,
                                   metadata={"customer_id": customer_id})
        customer_id = principal.subject
    filters = {"customer_id": customer_id, "status": cmd.status.value if cmd.status else None}
    after = pagination.decode_time_key(cmd.page_token, "ListOrders", filters, DOMAIN)
    async with uow() as u:
        page = await u.orders.list(customer_id=customer_id, status=cmd.status, after=after, limit=size + 1)
    page, token = pagination.next_page(page, size, "ListOrders", filters, weight=_encoded_bytes)
    return page, token


# What an Order takes in a response besides its strings, at most: its ids, total, status, four timestamps and
# version; five saga steps with their names, statuses, attempts and times; and the tags and lengths of them all.
_ORDER_FIXED_BYTES = 600
# What an OrderItem takes besides its product's name and SKU: its product id, quantity, two prices, tags, lengths.
_ITEM_FIXED_BYTES = 120
# The tags and lengths of one entry of a failure's metadata.
_METADATA_ENTRY_BYTES = 8


def _encoded_bytes(order: Order) -> int:
    """At least the bytes an order takes in a ListOrdersResponse: 200 orders of 50 lines with the longest product
    names in characters of 4 UTF-8 bytes take more than the 4 MiB a gRPC client accepts by default."""
    size = _ORDER_FIXED_BYTES + len(order.request_id.encode()) + len(order.cancel_reason.encode())
    size += sum(len(i.product_name.encode()) + len(i.sku.encode()) + _ITEM_FIXED_BYTES for i in order.items)
    size += sum(len(s.error.encode()) for s in order.steps.values())
    if order.failure is not None:
        size += len(order.failure.reason.encode()) + len(order.failure.message.encode())
        size += sum(len(k.encode()) + len(v.encode()) + _METADATA_ENTRY_BYTES
                    for k, v in order.failure.metadata.items())
    return size


# CancelOrder.

def _not_cancellable(order: Order) -> FailedPrecondition:
    return FailedPrecondition(
        f"an order in status {order.status.value} cannot be cancelled", reason="ORDER_NOT_CANCELLABLE",
        domain=DOMAIN, metadata={"order_id": order.id, "status": mapping.status_name(order.status)})


def _check_cancellable(order: Order) -> bool:
    """True when the cancellation must (still) run; False when the order is already CANCELLED."""
    if order.status is OrderStatus.CANCELLED:
        return False
    if order.status is OrderStatus.CONFIRMED or (order.status is OrderStatus.COMPENSATING and order.cancellation):
        return True
    raise _not_cancellable(order)


async def _begin_cancel(order: Order, reason: str, uow: UowFactory, sagas: SagaCoordinator) -> Execution:
    """Starts the compensation of an order read under this process's lease, first saving a CONFIRMED order as
    being cancelled; returns the execution to wait for."""
    if order.status is OrderStatus.CONFIRMED:
        order.begin_cancel(reason, sagas.clock())
        try:
            async with uow() as u:
                await u.orders.save(order, sagas.new_lease())
                await u.commit()
        except LeaseLost:
            # The lease is the process's, not the call's: an identical call of this process read the same
            # version and saved first. Its cancellation is followed, as a repeat of the call would follow it: run()
            # returns its execution, or resumes the order from what was committed.
            return sagas.run(order.id, leased=False)
    return sagas.run(order.id, leased=True, state=order)


# How long a cancellation waits before trying again the lease of a CONFIRMED order another process holds.
_LEASE_RETRY_SECONDS = 0.2


async def _follow_other_runner(order_id: str, sagas: SagaCoordinator) -> bool:
    """Follows the saga another process holds through the database until it ends or the call's time runs out.
    True when the lease is worth trying again: the order is still CONFIRMED, so its holder has not begun cancelling
    it (it is about to, or it died first and nothing is under way)."""
    current = await sagas.poll(order_id, _wait_budget())
    if current is None or current.status is not OrderStatus.CONFIRMED:
        return False
    budget = _wait_budget()
    if budget is not None and budget <= _LEASE_RETRY_SECONDS:
        return False
    await asyncio.sleep(_LEASE_RETRY_SECONDS)
    return True


_SERVICE_OF_STEP = {
    StepName.CONFIRM_ORDER: "inventory", StepName.RESERVE_STOCK: "inventory", StepName.PROCESS_PAYMENT: "payment",
}


async def cancel_order(cmd: commands.CancelOrder, uow: UowFactory, sagas: SagaCoordinator) -> Order:
    v = model.new_violations()
    check_uuid(cmd.order_id, "id", v)
    if len(cmd.reason) > model.MAX_CANCEL_REASON:
        v.add("reason", f"must be at most {model.MAX_CANCEL_REASON} characters")
    elif not cmd.reason.isprintable():
        v.add("reason", "must not contain control characters")
    v.raise_if_any()
    order = await get_order(commands.GetOrder(cmd.order_id), uow)
    if not _check_cancellable(order):
        return order

    execution = sagas.running(order.id)
    if execution is not None and order.status is OrderStatus.CONFIRMED:
        # Read CONFIRMED while a saga of this process still runs: most likely the placement, winding down after
        # the commit that confirmed the order, which cancels nothing. Once it ended the cancellation starts here. A
        # cancellation begun since the read is followed instead, as below.
        await sagas.wait(execution, _wait_budget(), until_retry=True)
        if sagas.running(order.id) is None:
            execution = None
    while execution is None:
        if await sagas.acquire(order.id):
            async with uow() as u:
                order = await u.orders.get(order.id)
            assert order is not None
            try:
                if not _check_cancellable(order):
                    await sagas.release(order.id)
                    return order
            except DomainError:
                await sagas.release(order.id)
                raise
            execution = await _begin_cancel(order, cmd.reason, uow, sagas)
        elif not await _follow_other_runner(order.id, sagas):
            break
    if execution is not None:
        await sagas.wait(execution, _wait_budget(), until_retry=True)

    async with uow() as u:
        current = await u.orders.get(order.id)
    assert current is not None
    if current.status is OrderStatus.CANCELLED:
        return current
    if current.status is OrderStatus.COMPENSATION_FAILED:
        step = current.compensation_failures()[0]
        raise Unavailable("the cancellation could not be completed; an operator must resolve the order",
                          reason="DEPENDENCY_UNAVAILABLE", domain=DOMAIN,
                          metadata={"order_id": current.id, "service": _SERVICE_OF_STEP.get(step.name, ""),
                                    "step": step.name.value})
    if execution is not None and (execution.retrying.is_set() or execution.failing):
        # A call of this process's cancellation failed, during the wait above or before it (this call came while
        # the cancellation waited to retry it), and is retried in the background.
        service = _SERVICE_OF_STEP.get(current.current_step, "")
        raise Unavailable(f"the {service or 'downstream'} service could not be reached; the cancellation continues "
                          "in the background and a repeat of the call follows it", reason="DEPENDENCY_UNAVAILABLE",
                          domain=DOMAIN, metadata={"order_id": current.id, "service": service})
    # The saga is still under way at the deadline and no call of it is failing that this call knows of: another process
    # held the lease throughout (it began no cancellation: it died, and its lease outlasted the deadline; or it is
    # cancelling the order, or stopped doing so before its lease ran out), or this process's cancellation waits on a
    # dependency that is slow, not failing. Either way a repeat follows or continues the cancellation.
    why = ("another process is running this order's saga; retry" if execution is None
           else "the order's cancellation is still running; retry to follow it")
    raise Aborted(why, reason="ORDER_BUSY", domain=DOMAIN, metadata={"order_id": current.id})
