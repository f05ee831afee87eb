"""Scenario 5: the CreateOrder saga on PostgreSQL against what its slowest participant can write.

The saga of one order: GetUser (read), BatchGetProducts (read), ReserveStock and CommitReservation (two inventory
writes), ProcessPayment (one payment write), plus the order service's own writes. The baseline is the order rate
the participants allow: each participant's write throughput measured alone (ReserveStock, ProcessPayment),
divided by the writes one saga makes on it; the slowest of them bounds the saga.
"""

from __future__ import annotations

import importlib.util
import statistics
import uuid

import grpc
from google.protobuf.duration_pb2 import Duration
from tessera.common.v1 import money_pb2
from tessera.inventory.v1 import inventory_service_pb2 as inv
from tessera.inventory.v1 import inventory_service_pb2_grpc, product_pb2
from tessera.order.v1 import order_pb2
from tessera.order.v1 import order_service_pb2 as orders
from tessera.payment.v1 import payment_service_pb2 as pay

from bench.harness import Finding, RpcCounter, Run, ScenarioResult, Side, processes_of
from bench.load import Budget, LoadResult, grpcload
from bench.procs import ManagedProcess
from bench.scenarios.common import postgres_of, seed_users

RESERVE_STOCK = "/tessera.inventory.v1.InventoryService/ReserveStock"
PROCESS_PAYMENT = "/tessera.payment.v1.PaymentService/ProcessPayment"
CREATE_ORDER = "/tessera.order.v1.OrderService/CreateOrder"
PAYMENT_METHOD = "pm_sandbox_ok"  # the sandbox processor charges it
PRICE_MINOR = 1250
CURRENCY = "EUR"
PRODUCTS = 20  # orders spread over several products: one hot stock row would serialise every reservation
CUSTOMERS = 20
# Writes one saga makes on each participant.
WRITES_PER_SAGA = {"inventory": 2, "payment": 1}
CONCURRENCY = 16


def saga_available() -> bool:
    try:
        return all(importlib.util.find_spec(f"tessera_{name}.bootstrap") is not None
                   for name in ("order", "inventory", "payment"))
    except ModuleNotFoundError:
        return False


def _ids(seed: str) -> tuple[list[str], list[str]]:
    """grpcload seeds carry the seeded ids: 'tag|customer,customer,...|product,product,...'."""
    _, customers, products = seed.split("|")
    return customers.split(","), products.split(",")


def reserve_stock(seed: str, index: int) -> bytes:
    _, products = _ids(seed)
    return inv.ReserveStockRequest(
        order_id=str(uuid.uuid4()), ttl=Duration(seconds=900),
        items=[product_pb2.ReservationItem(product_id=products[index % len(products)], quantity=1)],
    ).SerializeToString()


def process_payment(seed: str, index: int) -> bytes:
    customers, _ = _ids(seed)
    return pay.ProcessPaymentRequest(
        order_id=str(uuid.uuid4()), customer_id=customers[index % len(customers)],
        amount=money_pb2.Money(currency_code=CURRENCY, amount_minor=PRICE_MINOR), payment_method=PAYMENT_METHOD,
        idempotency_key=uuid.uuid4().hex).SerializeToString()


def create_order(seed: str, index: int) -> bytes:
    customers, products = _ids(seed)
    return orders.CreateOrderRequest(
        customer_id=customers[index % len(customers)],
        items=[orders.CreateOrderRequest.Item(product_id=products[index % len(products)], quantity=1)],
        payment_method=PAYMENT_METHOD, currency_code=CURRENCY, request_id=uuid.uuid4().hex).SerializeToString()


def _seed_products(address: str, count: int) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        stub = inventory_service_pb2_grpc.InventoryServiceStub(channel)
        ids = []
        for i in range(count):
            sku = f"BENCH-{uuid.uuid4().hex[:10]}"
            reply = stub.CreateProduct(inv.CreateProductRequest(product=product_pb2.Product(
                sku=sku, name=f"Bench product {i}", stock_on_hand=10_000_000,
                price=money_pb2.Money(currency_code=CURRENCY, amount_minor=PRICE_MINOR)),
                request_id=uuid.uuid4().hex), timeout=30)
            ids.append(reply.product.id)
        return ids


def _check_order(address: str, seed: str) -> None:
    from tessera.order.v1 import order_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        reply = order_service_pb2_grpc.OrderServiceStub(channel).CreateOrder(
            orders.CreateOrderRequest.FromString(create_order(seed, 0)), timeout=60)
    if reply.order.status != order_pb2.ORDER_STATUS_CONFIRMED:
        raise RuntimeError(f"the first order ended {order_pb2.OrderStatus.Name(reply.order.status)}, not CONFIRMED")


def _side(role: str, name: str, process: ManagedProcess, method: str, factory: str, seed: str,
          metered: dict[str, ManagedProcess], *, rate: float = 0.0) -> Side:
    def load(budget: Budget, tag: str) -> LoadResult:
        return grpcload(process.address, method, factory, budget=budget, seed=f"{tag}|{seed}",
                        concurrency=CONCURRENCY, rate=rate)

    def processes() -> dict:
        found: dict = {}
        for label, proc in metered.items():
            found.update(processes_of(label, proc))
            for group, backends in postgres_of(proc).items():
                found.setdefault(group, [])
                found[group] = [*found[group], *backends]
        return found

    return Side(role, name, load, processes, RpcCounter(process.metrics_urls, method))


def saga_vs_participants(run: Run) -> ScenarioResult:
    result = ScenarioResult("5", "CreateOrder saga on PostgreSQL vs the order rate its slowest participant allows",
                            baseline="slowest participant's write throughput ÷ its writes per saga",
                            subject="CreateOrder, CONFIRMED orders (4 services, each on its own database)",
                            unit="orders/s", target_ratio=0.8, target_text="≥ 0.8× the slowest participant's write "
                                                                           "throughput ÷ writes per saga")
    if not saga_available():
        result.skipped = "the order, inventory and payment services are not all in this checkout"
        return result
    user = run.tessera("user", run.dbs.create("saga_user"), label="user-saga")
    inventory = run.tessera("inventory", run.dbs.create("saga_inventory"))
    payment = run.tessera("payment", run.dbs.create("saga_payment"))
    order = run.tessera("order", run.dbs.create("saga_order"), env={
        "TESSERA_USER_SERVICE_ADDR": user.address, "TESSERA_INVENTORY_SERVICE_ADDR": inventory.address,
        "TESSERA_PAYMENT_SERVICE_ADDR": payment.address})
    customers = seed_users(user.address, CUSTOMERS)
    products = _seed_products(inventory.address, PRODUCTS)
    seed = f"{','.join(customers)}|{','.join(products)}"
    _check_order(order.address, f"check|{seed}")
    everyone = {"order": order, "inventory": inventory, "payment": payment, "user": user}

    sides = [
        _side("baseline", "inventory ReserveStock", inventory, RESERVE_STOCK, "bench.scenarios.saga:reserve_stock",
              seed, {"inventory": inventory}),
        _side("baseline", "payment ProcessPayment", payment, PROCESS_PAYMENT,
              "bench.scenarios.saga:process_payment", seed, {"payment": payment}),
        _side("subject", "CreateOrder", order, CREATE_ORDER, "bench.scenarios.saga:create_order", seed, everyone),
    ]
    run.warm(sides)
    result.segments = run.alternate(sides)
    capacity = {}
    for participant, writes in WRITES_PER_SAGA.items():
        chosen = [s for s in result.segments if s.name.startswith(participant)]
        seconds = sum(s.load.seconds for s in chosen)
        rate = sum(s.load.requests for s in chosen) / seconds if seconds else float("nan")
        capacity[participant] = rate / writes
        result.findings.append(Finding(f"{participant}: write throughput ÷ {writes} write(s) per saga",
                                       f"{rate:,.0f}/s ÷ {writes} = {rate / writes:,.0f} orders/s", "—", None))
    result.baseline_value = min(capacity.values())
    result.subject_value = result.side_rate("subject")

    half_rate = result.subject_value / 2
    if half_rate > 0:
        half = run.alternate([_side("subject", "CreateOrder, half load", order, CREATE_ORDER,
                                    "bench.scenarios.saga:create_order", seed, everyone, rate=half_rate)], rounds=1)
        result.segments += half
        p99 = statistics.fmean(s.load.p99_ms for s in half)
        result.findings.append(Finding(f"CreateOrder p99 at half load ({half_rate:,.0f} orders/s)",
                                       f"{p99:,.1f} ms (p50 {half[0].load.p50_ms:,.1f} ms)", "—", None))
    for label in everyone:
        peak = max((s.rss_mb.get(label, 0.0) for s in result.segments if s.role == "subject"), default=0.0)
        run.note_memory(label if label != "user" else "user (saga)", load_mb=peak, context="CreateOrder saga (5)")
    result.notes.append(
        f"bench.grpcload, {CONCURRENCY} calls in flight, unique ids per call; {CUSTOMERS} customers and {PRODUCTS} "
        "products (10,000,000 units each), one unit per order, payment method pm_sandbox_ok (the sandbox "
        "processor charges it). Only CONFIRMED orders count (the gRPC outcomes column shows every answer). The "
        "half-load row paces CreateOrder at half the rate reached.")
    if result.met is False:
        run.profile(result, order.processes()[0], sides[2].load, "order service under CreateOrder")
    for process in (order, payment, inventory, user):
        run.stop(process)
    return result
