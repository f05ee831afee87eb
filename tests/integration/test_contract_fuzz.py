"""Property-based contract fuzzing of every RPC of every Tessera service, over real channels to real servers on
SQLite: whatever a caller sends, the answer is never a server error, an INVALID_ARGUMENT names fields the request has,
and a refused request changes nothing.

The requests are generated from the contracts' descriptors (tests/support/proto_strategies.py): arbitrary messages
with edge values in every field, and, since those mostly fail on their first field, valid requests the existing tests
make with one field changed. Runs are derandomized so CI sees the same examples each time; set TESSERA_FUZZ_SEED
(and TESSERA_FUZZ_EXAMPLES) to look further locally."""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2, message_factory, text_format
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, event, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from tessera.analytics.v1 import analytics_service_pb2 as analytics_api
from tessera.common.v1 import money_pb2
from tessera.inventory.v1 import inventory_service_pb2 as inventory_api
from tessera.inventory.v1 import product_pb2
from tessera.notification.v1 import notification_service_pb2 as notification_api
from tessera.order.v1 import order_service_pb2 as order_api
from tessera.payment.v1 import payment_service_pb2 as payment_api
from tessera.user.v1 import user_pb2
from tessera.user.v1 import user_service_pb2 as user_api

from tessera_notification.domain.model import Notification, NotificationKind
from tessera_notification.service_layer.unit_of_work import NotificationUnitOfWork
from tessera_runtime import app
from tessera_runtime.clients import error_details
from tessera_runtime.db import Database, utcnow
from tessera_runtime.server import TesseraServer, create_server
from tests.support import postgres, rabbitmq
from tests.support.order_stack import ORDER_TEST_ENV, PAYMENT_TEST_ENV
from tests.support.proto_strategies import corruptions, messages, mutations, names_request_field

EXAMPLES = int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "30"))
SEED = os.environ.get("TESSERA_FUZZ_SEED")
BACKEND = os.environ.get("TESSERA_FUZZ_BACKEND", "sqlite")

# Codes that say the server failed rather than the request: never the answer to anything a caller can send.
SERVER_ERRORS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.DATA_LOSS}

# Refusals that leave a trace by design, by RPC, and why that is the contract.
REFUSALS_THAT_WRITE: dict[str, Callable[[error_details_pb2.ErrorInfo], bool]] = {
    # The processor was asked and said no: the payment is kept as FAILED with the decline (and PaymentFailed in the
    # outbox), so that a retry with the same idempotency_key gets the same answer without charging.
    "ProcessPayment": lambda info: info.reason == "PAYMENT_DECLINED",
    # A saga that failed after its order was stored (out of stock, payment declined): the order is kept as FAILED
    # with its compensated steps, and the error names it in metadata order_id (a refusal before that names none).
    "CreateOrder": lambda info: "order_id" in info.metadata,
}


# Fields whose checks involve one another, by RPC: a change of one may be refused naming the other. A page token holds
# the query it continues (AIP-158): with a filter changed, the token is what is refused.
_LIST_FILTERS = {
    "ListUsers": {"status"}, "ListProducts": {"sku", "in_stock_only"},
    "ListPayments": {"order_id", "customer_id", "status"}, "ListOrders": {"customer_id", "status"},
    "ListNotifications": {"user_id", "kind", "order_id", "status"}, "ListDailyMetrics": {"start_date", "end_date"},
}
CHECKED_TOGETHER: dict[str, tuple[set[str], ...]] = {
    **{rpc: ({"page_token", *filters},) for rpc, filters in _LIST_FILTERS.items()},
    # A range is checked as a whole: end_date before start_date, or longer than the longest range.
    "GetMetricsSummary": ({"start_date", "end_date"},),
}
CHECKED_TOGETHER["ListDailyMetrics"] += ({"start_date", "end_date"},)

# Background work that would change a database between the two looks of a check is slowed out of the module's way.
QUIET = {"TESSERA_OUTBOX_RELAY": "false", "TESSERA_GRACE_SECONDS": "1"}
SLOW_BACKGROUND = {
    "user": {"TESSERA_CREATE_REQUEST_SWEEP_SECONDS": "3600"},
    "inventory": {"TESSERA_RESERVATION_SWEEP_SECONDS": "3600"},
    "payment": {**PAYMENT_TEST_ENV, "TESSERA_PAYMENT_RECOVERY_SECONDS": "3600"},
    "order": {**ORDER_TEST_ENV, "TESSERA_ORDER_RECOVERY_INTERVAL_SECONDS": "3600",
              "TESSERA_ORDER_PAYMENT_DEADLINE_SECONDS": "10"},
}
# What an order's saga changes besides the order service's own database.
NEIGHBOURS = {"order": ("order", "user", "inventory", "payment")}

SERVICES: dict[str, ServiceDescriptor] = {
    "user": user_api.DESCRIPTOR.services_by_name["UserService"],
    "inventory": inventory_api.DESCRIPTOR.services_by_name["InventoryService"],
    "payment": payment_api.DESCRIPTOR.services_by_name["PaymentService"],
    "order": order_api.DESCRIPTOR.services_by_name["OrderService"],
    "notification": notification_api.DESCRIPTOR.services_by_name["NotificationService"],
    "analytics": analytics_api.DESCRIPTOR.services_by_name["AnalyticsService"],
}
SERVICE_OF = {service.full_name: name for name, service in SERVICES.items()}
RPCS = [(name, method) for name, service in SERVICES.items() for method in service.methods]
METHODS = {method.name: (name, method) for name, method in RPCS}
SCOPES = "admin user:read user:write order:write orders analytics:read"


@dataclass
class Stack:
    """The six services on SQLite files in one folder, a channel to each, and what the near-valid requests use."""

    folder: Path
    servers: dict[str, tuple[TesseraServer, int, grpc.aio.Channel]]
    urls: dict[str, str]
    customer: str = ""
    product: str = ""
    stock: str = ""  # a product only the seeding reserves and orders: no fuzzed request runs its stock out
    payment: str = ""
    order: str = ""
    notification: str = ""

    def channel(self, service: str) -> grpc.aio.Channel:
        return self.servers[service][2]

    async def call(self, method: MethodDescriptor, request: Message | bytes,
                   metadata: tuple[tuple[str, str], ...] = ()) -> tuple[grpc.StatusCode, Any]:
        service = method.containing_service
        rpc = self.channel(SERVICE_OF[service.full_name]).unary_unary(
            f"/{service.full_name}/{method.name}", request_serializer=_serialize,
            response_deserializer=lambda b: b)
        try:
            await rpc(request, metadata=metadata, timeout=30)
        except grpc.aio.AioRpcError as err:
            return err.code(), err
        return grpc.StatusCode.OK, None

    async def snapshot(self, services: tuple[str, ...]) -> dict[str, str]:
        """A digest of every row of every table of these services' databases."""
        return {s: await _digest(self.urls[s]) for s in services}


def _serialize(request: Message | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


async def _digest(url: str) -> str:
    h = hashlib.sha256()
    for table, rows in await _tables(url):
        h.update(f"{table}:{len(rows)}:".encode())
        for row in sorted(rows):
            h.update(row.encode())
    return h.hexdigest()


async def _tables(url: str) -> list[tuple[str, list[str]]]:
    """Every table of a database with its rows as text."""
    if url.startswith("sqlite"):
        conn = sqlite3.connect(f"file:{url.split(':///', 1)[1]}?mode=ro", uri=True)
        try:
            names = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table' ORDER BY name")]
            return [(n, [repr(r) for r in conn.execute(f'SELECT * FROM "{n}"')]) for n in names]
        finally:
            conn.close()
    pg = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        names = [r[0] for r in await pg.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY tablename")]
        return [(n, [repr(tuple(r)) for r in await pg.fetch(f'SELECT * FROM "{n}"')]) for n in names]
    finally:
        await pg.close()


async def _start(service: str, env: dict[str, str]) -> tuple[TesseraServer, int, grpc.aio.Channel]:
    root = app.composition_root(service)
    module = await root.build(app.load_settings(root, {"TESSERA_GRPC_PORT": "0", **QUIET, **env}))
    server, port = await create_server(module, readiness_interval=0.2, grace_seconds=1.0)
    return server, port, grpc.aio.insecure_channel(f"127.0.0.1:{port}")


@pytest.fixture(scope="module")
async def stack(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz")
    vhost = rabbitmq.create_vhost()
    s = Stack(folder, {}, {})
    databases: list[str] = []
    try:
        for service in SERVICES:
            if BACKEND == "postgres":
                name, s.urls[service] = await postgres.create_database()
                databases.append(name)
            else:
                s.urls[service] = f"sqlite+aiosqlite:///{folder / (service + '.db')}"

        def env(service: str) -> dict[str, str]:
            return {"TESSERA_DATABASE_URL": s.urls[service], **SLOW_BACKGROUND.get(service, {})}

        for service in ("user", "inventory", "payment"):
            s.servers[service] = await _start(service, env(service))
        addresses = {f"TESSERA_{n.upper()}_SERVICE_ADDR": f"127.0.0.1:{s.servers[n][1]}"
                     for n in ("user", "inventory", "payment")}
        s.servers["order"] = await _start("order", {**env("order"), **addresses})
        for service in ("notification", "analytics"):
            s.servers[service] = await _start(service, {**env(service), "TESSERA_AMQP_URL": rabbitmq.amqp_url(vhost)})
        await _seed(s)
        yield s
    finally:
        for server, _, channel in reversed(s.servers.values()):
            await channel.close()
            await server.stop()
        rabbitmq.delete_vhost(vhost)
        for name in databases:
            await postgres.drop_database(name)


async def _ok(stack: Stack, method: str, request: Message) -> Any:
    """The answer of a call that must succeed (the seeding of a valid request)."""
    service, rpc = METHODS[method]
    call = stack.channel(service).unary_unary(
        f"/{rpc.containing_service.full_name}/{method}", request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=message_factory.GetMessageClass(rpc.output_type).FromString)
    return await call(request, timeout=30)


async def _seed(s: Stack) -> None:
    s.customer = (await _ok(s, "CreateUser", _create_user(s))).user.id
    s.product = (await _ok(s, "CreateProduct", _create_product(s))).product.id
    s.stock = (await _ok(s, "CreateProduct", _create_product(s))).product.id
    s.payment = (await _ok(s, "ProcessPayment", _process_payment(s))).payment.id
    s.order = (await _ok(s, "CreateOrder", _create_order(s, s.stock))).order.id
    n = Notification.create(kind=NotificationKind.ORDER_RECEIPT, user_id=s.customer, recipient="c@example.com",
                            subject="Your order", event_id=str(uuid.uuid4()),
                            event_type="tessera.order.v1.OrderConfirmed", order_id=s.order, now=utcnow())
    db = Database(s.urls["notification"])
    try:
        async with NotificationUnitOfWork(db) as uow:
            await uow.notifications.add(n)
            await uow.commit()
    finally:
        await db.dispose()
    s.notification = n.id


# Valid requests, as the existing tests make them. Those that consume what they name (a delete, a refund) get a fresh
# one each time, so that their near-valid variants reach past the lookup.

def _create_user(s: Stack) -> Message:
    return user_api.CreateUserRequest(
        user=user_pb2.User(email=f"f-{uuid.uuid4().hex[:10]}@example.com", display_name="Fuzz",
                           profile=user_pb2.Profile(given_name="Ada", family_name="L", locale="en",
                                                    time_zone="Europe/Paris", phone_number="+33123456789"),
                           preferences=user_pb2.Preferences(preferred_currency_code="EUR")),
        request_id=uuid.uuid4().hex)


def _create_product(s: Stack) -> Message:
    sku = f"SKU-{uuid.uuid4().hex[:12]}"
    return inventory_api.CreateProductRequest(
        product=product_pb2.Product(sku=sku, name=f"Product {sku}", description="A thing", stock_on_hand=1_000_000,
                                    price=money_pb2.Money(currency_code="EUR", amount_minor=1250)),
        request_id=uuid.uuid4().hex)


def _process_payment(s: Stack) -> Message:
    return payment_api.ProcessPaymentRequest(
        order_id=str(uuid.uuid4()), customer_id=s.customer or str(uuid.uuid4()),
        amount=money_pb2.Money(currency_code="EUR", amount_minor=4200), payment_method="pm_sandbox_ok",
        idempotency_key=uuid.uuid4().hex)


def _create_order(s: Stack, product: str | None = None) -> Message:
    return order_api.CreateOrderRequest(
        customer_id=s.customer, payment_method="pm_sandbox_ok", currency_code="EUR", request_id=uuid.uuid4().hex,
        items=[order_api.CreateOrderRequest.Item(product_id=product or s.product, quantity=2)])


async def _fresh_user(s: Stack) -> str:
    return (await _ok(s, "CreateUser", _create_user(s))).user.id


async def _fresh_product(s: Stack) -> str:
    return (await _ok(s, "CreateProduct", _create_product(s))).product.id


async def _fresh_reservation(s: Stack) -> str:
    return (await _ok(s, "ReserveStock", _reserve(s, s.stock))).reservation.id


def _reserve(s: Stack, product: str | None = None) -> Message:
    return inventory_api.ReserveStockRequest(
        order_id=str(uuid.uuid4()), items=[product_pb2.ReservationItem(product_id=product or s.product, quantity=1)],
        ttl=Duration(seconds=900))


async def _fresh_payment(s: Stack) -> str:
    return (await _ok(s, "ProcessPayment", _process_payment(s))).payment.id


async def _fresh_order(s: Stack) -> str:
    return (await _ok(s, "CreateOrder", _create_order(s, s.stock))).order.id


Valid = Callable[[Stack], Awaitable[Message]]


async def _static(message: Message) -> Message:
    return message


def _v(build: Callable[[Stack], Message]) -> Valid:
    return lambda s: _static(build(s))


VALID: dict[str, Valid] = {
    "CreateUser": _v(_create_user),
    "GetUser": _v(lambda s: user_api.GetUserRequest(id=s.customer)),
    "ListUsers": lambda s: _next_page(s, "ListUsers", user_api.ListUsersRequest(
        page_size=1, status=user_pb2.USER_STATUS_ACTIVE)),
    "UpdateUser": lambda s: _update_user(s),
    "DeleteUser": lambda s: _with(_fresh_user(s), lambda i: user_api.DeleteUserRequest(id=i)),
    "DeactivateUser": lambda s: _with(_fresh_user(s), lambda i: user_api.DeactivateUserRequest(id=i, reason="test")),
    "ActivateUser": _v(lambda s: user_api.ActivateUserRequest(id=s.customer)),
    "CreateProduct": _v(_create_product),
    "GetProduct": _v(lambda s: inventory_api.GetProductRequest(id=s.product)),
    "BatchGetProducts": _v(lambda s: inventory_api.BatchGetProductsRequest(ids=[s.product, str(uuid.uuid4())])),
    "ListProducts": lambda s: _next_page(s, "ListProducts", inventory_api.ListProductsRequest(
        page_size=1, sku="SKU-", in_stock_only=True)),
    "UpdateProduct": lambda s: _with(_fresh_product(s), lambda i: inventory_api.UpdateProductRequest(
        product=product_pb2.Product(id=i, name="Lamp", description="Bright",
                                    price=money_pb2.Money(currency_code="EUR", amount_minor=990)),
        update_mask=field_mask_pb2.FieldMask(paths=["name", "description", "price"]))),
    "DeleteProduct": lambda s: _with(_fresh_product(s), lambda i: inventory_api.DeleteProductRequest(id=i)),
    "AdjustStock": _v(lambda s: inventory_api.AdjustStockRequest(product_id=s.product, delta=5, reason="restock",
                                                                 request_id=uuid.uuid4().hex)),
    "ReserveStock": _v(_reserve),
    "GetReservation": lambda s: _with(_fresh_reservation(s), lambda i: inventory_api.GetReservationRequest(id=i)),
    "ReleaseReservation": lambda s: _with(_fresh_reservation(s),
                                          lambda i: inventory_api.ReleaseReservationRequest(id=i, reason="test")),
    "CommitReservation": lambda s: _with(_fresh_reservation(s),
                                         lambda i: inventory_api.CommitReservationRequest(id=i)),
    "ProcessPayment": _v(_process_payment),
    "GetPayment": _v(lambda s: payment_api.GetPaymentRequest(id=s.payment)),
    "ListPayments": lambda s: _next_page(s, "ListPayments", payment_api.ListPaymentsRequest(
        page_size=1, customer_id=s.customer)),
    "RefundPayment": lambda s: _with(_fresh_payment(s), lambda i: payment_api.RefundPaymentRequest(
        payment_id=i, idempotency_key=uuid.uuid4().hex, reason="returned")),
    "VoidPayment": _v(_process_payment),
    "CreateOrder": _v(_create_order),
    "GetOrder": _v(lambda s: order_api.GetOrderRequest(id=s.order)),
    "ListOrders": lambda s: _next_page(s, "ListOrders", order_api.ListOrdersRequest(
        page_size=1, customer_id=s.customer)),
    "CancelOrder": lambda s: _with(_fresh_order(s), lambda i: order_api.CancelOrderRequest(id=i, reason="test")),
    "GetNotification": _v(lambda s: notification_api.GetNotificationRequest(id=s.notification)),
    "ListNotifications": lambda s: _next_page(s, "ListNotifications", notification_api.ListNotificationsRequest(
        page_size=1, user_id=s.customer)),
    "GetDailyMetrics": _v(lambda s: analytics_api.GetDailyMetricsRequest(date="2026-03-01")),
    "ListDailyMetrics": lambda s: _next_page(s, "ListDailyMetrics", analytics_api.ListDailyMetricsRequest(
        start_date="2026-03-01", end_date="2026-03-31", page_size=1)),
    "GetMetricsSummary": _v(lambda s: analytics_api.GetMetricsSummaryRequest(start_date="2026-03-01",
                                                                             end_date="2026-03-31")),
}


async def _next_page(s: Stack, method: str, first: Message) -> Message:
    """A List request for the second page, with the page token the first page gave (when there is one)."""
    token = (await _ok(s, method, first)).next_page_token
    second = first.__class__()
    second.CopyFrom(first)
    second.page_token = token
    return second


async def _with(ident: Awaitable[str], build: Callable[[str], Message]) -> Message:
    return build(await ident)


async def _update_user(s: Stack) -> Message:
    user_id = await _fresh_user(s)
    return user_api.UpdateUserRequest(
        user=user_pb2.User(id=user_id, display_name="Renamed", profile=user_pb2.Profile(given_name="Grace"),
                           preferences=user_pb2.Preferences(marketing_emails=True)),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "profile.given_name",
                                                    "preferences.marketing_emails"]))


def _plain(path: str) -> str:
    return re.sub(r"\[\d+\]", "", path)


def _related(rpc: str, changed: str, named: str) -> bool:
    """Whether a violation naming `named` can be about a change of `changed`: the same field, one inside the other,
    or fields checked together."""
    a, b = _plain(changed), _plain(named)
    if a == b or a.startswith(b + ".") or b.startswith(a + "."):
        return True
    return any({a.split(".")[0], b.split(".")[0]} <= group for group in CHECKED_TOGETHER.get(rpc, ()))


def _identity(s: Stack) -> st.SearchStrategy[tuple[tuple[str, str], ...]]:
    """Who calls: a trusted internal caller (no identity), an administrator, the seeded customer (also spelt in upper
    case), a stranger, or a caller with no scopes or odd ones."""
    scopes = SCOPES.removeprefix("admin ")
    return st.sampled_from([
        (), (("x-user-id", "ops"), ("x-user-scopes", "admin")),
        (("x-user-id", s.customer), ("x-user-scopes", scopes)),
        (("x-user-id", s.customer.upper()), ("x-user-scopes", scopes)),
        (("x-user-id", s.customer),),
        (("x-user-id", str(uuid.uuid4())), ("x-user-scopes", scopes)),
        (("x-user-id", "not a uuid"), ("x-user-scopes", "admin,user:read ADMIN")),
        (("x-user-scopes", "admin"),),
    ])


def _fuzz_settings(test):
    test = settings(max_examples=EXAMPLES, deadline=None, derandomize=SEED is None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])(test)
    return hypothesis_seed(int(SEED))(test) if SEED is not None else test


@pytest.mark.parametrize(("service", "method"), RPCS, ids=[f"{s}.{m.name}" for s, m in RPCS])
@_fuzz_settings
@given(data=st.data())
async def test_no_request_makes_a_server_error_or_a_change_it_refuses(stack, service, method, data):
    request_type = method.input_type
    kind = data.draw(st.integers(0, 9), label="kind")
    changed = None  # the one field a near-valid request changed
    sent: Message | bytes | None = None  # bytes that are sent instead of the request's
    if kind == 9:
        corrupt = data.draw(corruptions(), label="bytes changed")
        sent = corrupt((await VALID[method.name](stack)).SerializeToString())
        try:
            request = message_factory.GetMessageClass(request_type).FromString(sent)
        except DecodeError:
            request = None
    elif kind < 2:
        request = data.draw(messages(request_type), label="arbitrary request")
    elif kind == 2:
        request = await VALID[method.name](stack)  # as it is, for callers who may not make it
    elif kind == 3:
        first, second = (data.draw(mutations(request_type), label="two fields changed") for _ in range(2))
        request = second.apply(first.apply(await VALID[method.name](stack)))
    else:
        mutation = data.draw(mutations(request_type), label="one field changed")
        request = mutation.apply(await VALID[method.name](stack))
        changed = mutation.describe()
    metadata = data.draw(_identity(stack), label="identity")
    watched = NEIGHBOURS.get(service, (service,))
    before = await stack.snapshot(watched)
    code, err = await stack.call(method, sent if sent is not None else request, metadata)
    event(code.name)  # shown by --hypothesis-show-statistics
    shown = (repr(sent[:2000]) if request is None else text_format.MessageToString(request, as_utf8=True)[:2000])
    assert code not in SERVER_ERRORS, f"{method.full_name} answered {code.name} to:\n{shown}\n{err}"
    if code is grpc.StatusCode.OK:
        assert request is not None, f"{method.full_name} answered OK to bytes that are no request:\n{shown}"
        return
    if request is None:
        # Bytes that are no message of the request's type name no field (the parser does not say which it could
        # not read): INVALID_ARGUMENT with reason MALFORMED_REQUEST and no field violations is the answer.
        info, _ = error_details(err)
        assert code is grpc.StatusCode.INVALID_ARGUMENT and info is not None and info.reason == "MALFORMED_REQUEST", (
            f"{method.full_name} answered {code.name} to bytes that are no request:\n{shown}\n{err}")
    elif code is grpc.StatusCode.INVALID_ARGUMENT:
        _, bad = error_details(err)
        assert bad is not None and bad.field_violations, (
            f"{method.full_name}: INVALID_ARGUMENT without field violations to:\n{shown}\n{err}")
        for violation in bad.field_violations:
            assert names_request_field(request_type, request, violation.field), (
                f"{method.full_name}: violation names {violation.field!r}, no field of the request:\n{shown}\n"
                f"{violation.description}")
        if changed is not None:
            fields = [v.field for v in bad.field_violations]
            assert any(_related(method.name, changed, f) for f in fields), (
                f"{method.full_name}: {changed} was changed but the violations name {fields}:\n{shown}")
    info, _ = error_details(err)
    if info is None or not REFUSALS_THAT_WRITE.get(method.name, lambda _: False)(info):
        after = await stack.snapshot(watched)
        assert after == before, f"{method.full_name} refused ({code.name}) but changed:\n{shown}"
