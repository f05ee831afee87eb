"""The GraphQL schema: accounts, the catalogue, orders and the business metrics in one graph, each field resolved by
the gRPC service that owns it (user, inventory, order, analytics), the way the reference gateway federates its
services' graphs.

Types mirror the contracts (tessera.*.v1): names in camelCase, enums without their prefix, int64 as strings (as
the contracts' JSON mapping has them), timestamps as ISO 8601. An order's items resolve their products in one
BatchGetProducts per request, and each customer once, however many orders name them. A service's field violations
name the argument (or input field) the caller sent, as well as the contract's field.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re
import uuid
from collections.abc import Mapping
from typing import Any

import grpc
import strawberry
from google.protobuf import field_mask_pb2
from graphql import (
    FieldNode,
    FragmentSpreadNode,
    GraphQLError,
    InlineFragmentNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    ValidationRule,
)
from strawberry.dataloader import DataLoader
from strawberry.extensions import (
    AddValidationRules,
    MaskErrors,
    MaxAliasesLimiter,
    MaxTokensLimiter,
    QueryDepthLimiter,
)
from strawberry.types import Info
from strawberry.utils.str_converters import to_camel_case
from tessera.analytics.v1 import analytics_pb2
from tessera.analytics.v1 import analytics_service_pb2 as analytics_api
from tessera.common.v1 import money_pb2
from tessera.inventory.v1 import inventory_service_pb2 as inventory_api
from tessera.inventory.v1 import product_pb2
from tessera.order.v1 import order_pb2
from tessera.order.v1 import order_service_pb2 as order_api
from tessera.user.v1 import user_pb2
from tessera.user.v1 import user_service_pb2 as user_api

from tessera_graphql.metrics import OperationMetrics
from tessera_graphql.upstream import Upstream, UpstreamError

MAX_BATCH = 100  # BatchGetProducts takes at most 100 ids
# The calls one request may make to the services. Depth and alias limits bound a query's shape, not its fan-out: a
# list nested in a list (orders → customer → orders ...) makes a call per item of the list above it.
MAX_CALLS = 200


def _enum(name: str, proto_enum: Any, prefix: str, description: str) -> Any:
    members = {n.removeprefix(prefix): v for n, v in proto_enum.items() if not n.endswith("_UNSPECIFIED")}
    return strawberry.enum(enum.Enum(name, members), description=description)  # type: ignore[misc]


UserStatus = _enum("UserStatus", user_pb2.UserStatus, "USER_STATUS_", "Whether an account may place orders.")
OrderStatus = _enum("OrderStatus", order_pb2.OrderStatus, "ORDER_STATUS_", "Where an order's saga stands.")
SagaStepName = _enum("SagaStepName", order_pb2.SagaStepName, "SAGA_STEP_NAME_", "A step of the order saga.")
SagaStepStatus = _enum("SagaStepStatus", order_pb2.SagaStepStatus, "SAGA_STEP_STATUS_", "How a saga step ended.")


def _time(ts: Any, present: bool = True) -> dt.datetime | None:
    return ts.ToDatetime(tzinfo=dt.UTC) if present else None


def _has(message: Any, field: str) -> bool:
    return message.HasField(field)


@strawberry.type(description="An amount in a currency's minor unit (cents for EUR).")
class Money:
    currency_code: str
    amount_minor: str = strawberry.field(description="int64, as a string.")

    @staticmethod
    def of(m: money_pb2.Money) -> Money:
        return Money(currency_code=m.currency_code, amount_minor=str(m.amount_minor))


@strawberry.type(description="A customer account (tessera.user.v1.User).")
class User:
    id: strawberry.ID
    email: str
    display_name: str
    status: UserStatus  # type: ignore[valid-type]
    given_name: str
    family_name: str
    locale: str
    time_zone: str
    create_time: dt.datetime
    update_time: dt.datetime
    version: str

    @staticmethod
    def of(u: user_pb2.User) -> User:
        return User(id=strawberry.ID(u.id), email=u.email, display_name=u.display_name,
                    status=UserStatus[user_pb2.UserStatus.Name(u.status).removeprefix("USER_STATUS_")],
                    given_name=u.profile.given_name, family_name=u.profile.family_name, locale=u.profile.locale,
                    time_zone=u.profile.time_zone, create_time=_time(u.create_time),
                    update_time=_time(u.update_time), version=str(u.version))

    @strawberry.field(description="The customer's orders, newest first (ListOrders; order:read).")
    async def orders(self, info: Info, page_size: int = 20, page_token: str = "",
                     status: OrderStatus | None = None) -> OrderPage | None:  # type: ignore[valid-type]
        return await _list_orders(info, page_size, page_token, str(self.id), status)


@strawberry.type(description="A catalogue product (tessera.inventory.v1.Product).")
class Product:
    id: strawberry.ID
    sku: str
    name: str
    description: str
    price: Money
    stock_on_hand: str
    stock_reserved: str
    stock_available: str
    create_time: dt.datetime
    update_time: dt.datetime
    version: str

    @staticmethod
    def of(p: product_pb2.Product) -> Product:
        return Product(id=strawberry.ID(p.id), sku=p.sku, name=p.name, description=p.description,
                       price=Money.of(p.price), stock_on_hand=str(p.stock_on_hand),
                       stock_reserved=str(p.stock_reserved), stock_available=str(p.stock_available),
                       create_time=_time(p.create_time), update_time=_time(p.update_time), version=str(p.version))


@strawberry.type(description="A line of an order, priced when the order was placed.")
class OrderItem:
    product_id: strawberry.ID
    product_name: str
    sku: str
    quantity: int
    unit_price: Money
    line_total: Money

    @strawberry.field(description="The product as the catalogue has it now, or null once it is deleted "
                                  "(BatchGetProducts; inventory:read).")
    async def product(self, info: Info) -> Product | None:
        return await _context(info).products.load(str(self.product_id))


@strawberry.type(description="Why an order failed: the saga step and the ErrorInfo reason it failed with.")
class OrderFailure:
    reason: str
    message: str
    step: SagaStepName | None  # type: ignore[valid-type]


@strawberry.type(description="A step of the order's saga.")
class SagaStep:
    name: SagaStepName  # type: ignore[valid-type]
    status: SagaStepStatus  # type: ignore[valid-type]
    error: str
    update_time: dt.datetime | None


@strawberry.type(description="An order (tessera.order.v1.Order).")
class Order:
    id: strawberry.ID
    customer_id: strawberry.ID
    items: list[OrderItem]
    total: Money
    status: OrderStatus  # type: ignore[valid-type]
    failure: OrderFailure | None
    saga: list[SagaStep]
    cancel_reason: str
    create_time: dt.datetime
    update_time: dt.datetime
    confirm_time: dt.datetime | None
    cancel_time: dt.datetime | None
    version: str

    @staticmethod
    def of(o: order_pb2.Order) -> Order:
        step_name = order_pb2.SagaStepName.Name
        return Order(
            id=strawberry.ID(o.id), customer_id=strawberry.ID(o.customer_id),
            items=[OrderItem(product_id=strawberry.ID(i.product_id), product_name=i.product_name, sku=i.sku,
                             quantity=i.quantity, unit_price=Money.of(i.unit_price), line_total=Money.of(i.line_total))
                   for i in o.items],
            total=Money.of(o.total),
            status=OrderStatus[order_pb2.OrderStatus.Name(o.status).removeprefix("ORDER_STATUS_")],
            failure=OrderFailure(reason=o.failure.reason, message=o.failure.message,
                                 step=SagaStepName[step_name(o.failure.step).removeprefix("SAGA_STEP_NAME_")]
                                 if o.failure.step else None) if _has(o, "failure") else None,
            saga=[SagaStep(name=SagaStepName[step_name(s.name).removeprefix("SAGA_STEP_NAME_")],
                           status=SagaStepStatus[order_pb2.SagaStepStatus.Name(s.status)
                                                 .removeprefix("SAGA_STEP_STATUS_")],
                           error=s.error, update_time=_time(s.update_time, _has(s, "update_time")))
                  for s in o.saga if s.name and s.status],
            cancel_reason=o.cancel_reason, create_time=_time(o.create_time), update_time=_time(o.update_time),
            confirm_time=_time(o.confirm_time, _has(o, "confirm_time")),
            cancel_time=_time(o.cancel_time, _has(o, "cancel_time")), version=str(o.version))

    @strawberry.field(description="The customer who placed the order (GetUser; user:read).")
    async def customer(self, info: Info) -> User | None:
        return await _context(info).users.load(str(self.customer_id))


@strawberry.type(description="A page of orders; nextPageToken is empty on the last page.")
class OrderPage:
    orders: list[Order]
    next_page_token: str


@strawberry.type(description="A page of products; nextPageToken is empty on the last page.")
class ProductPage:
    products: list[Product]
    next_page_token: str


@strawberry.type(description="A page of accounts; nextPageToken is empty on the last page.")
class UserPage:
    users: list[User]
    next_page_token: str


@strawberry.type(description="How many orders failed for one reason (tessera.analytics.v1.FailureReasonCount).")
class FailureReasonCount:
    reason: str
    count: str = strawberry.field(description="int64, as a string.")


@strawberry.type(description="What happened on one UTC day, counted from the domain events "
                             "(tessera.analytics.v1.DailyMetrics); the counts are int64, as strings.")
class DailyMetrics:
    date: str = strawberry.field(description='The UTC day, as "YYYY-MM-DD"; empty in a summary\'s totals.')
    users_registered: str
    orders_confirmed: str
    orders_failed: str
    orders_cancelled: str
    revenue: list[Money] = strawberry.field(description="The totals of the orders confirmed that day, one per "
                                                        "currency, by currency code.")
    payments_refunded: str
    refunded: list[Money] = strawberry.field(description="The amounts refunded that day, one per currency.")
    failure_reasons: list[FailureReasonCount] = strawberry.field(description="The failed orders by reason, by "
                                                                              "reason.")

    @staticmethod
    def of(m: analytics_pb2.DailyMetrics) -> DailyMetrics:
        return DailyMetrics(
            date=m.date, users_registered=str(m.users_registered), orders_confirmed=str(m.orders_confirmed),
            orders_failed=str(m.orders_failed), orders_cancelled=str(m.orders_cancelled),
            revenue=[Money.of(x) for x in m.revenue], payments_refunded=str(m.payments_refunded),
            refunded=[Money.of(x) for x in m.refunded],
            failure_reasons=[FailureReasonCount(reason=f.reason, count=str(f.count)) for f in m.failure_reasons])


@strawberry.type(description="A page of days, oldest first; nextPageToken is empty on the range's last page.")
class DailyMetricsPage:
    daily_metrics: list[DailyMetrics]
    next_page_token: str


@strawberry.type(description="DailyMetrics summed over a range of days (tessera.analytics.v1.MetricsSummary).")
class MetricsSummary:
    start_date: str
    end_date: str
    totals: DailyMetrics


@strawberry.input(description="A line of a new order.")
class OrderItemInput:
    product_id: strawberry.ID
    quantity: int


@strawberry.input(description="A new order (CreateOrder): request_id makes a repeat return the first result.")
class CreateOrderInput:
    customer_id: strawberry.ID
    items: list[OrderItemInput]
    payment_method: str
    currency_code: str
    request_id: str


@dataclasses.dataclass
class Context:
    """What every resolver of one request shares: the services, and loaders that read each product and user once."""

    upstream: Upstream
    max_calls: int = MAX_CALLS
    calls: int = dataclasses.field(default=0, init=False)
    products: DataLoader[str, Product | None] = dataclasses.field(init=False)
    users: DataLoader[str, User | None] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.products = DataLoader(load_fn=self._load_products, max_batch_size=MAX_BATCH)
        self.users = DataLoader(load_fn=self._load_users)

    async def call(self, method, request):
        """One call to a service for this request, refused once the request has made max_calls."""
        if self.calls >= self.max_calls:
            raise UpstreamError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the query needs more than {self.max_calls} calls to the services; ask for less",
                                reason="TOO_MANY_CALLS", metadata={"max_calls": str(self.max_calls)})
        self.calls += 1
        return await self.upstream.call(method, request)

    async def _load_products(self, ids: list[str]) -> list[Product | Exception | None]:
        try:
            reply = await self.call(self.upstream.inventory.BatchGetProducts,
                                    inventory_api.BatchGetProductsRequest(ids=ids))
            return [Product.of(p) for p in reply.products]
        except UpstreamError as err:
            if err.code != grpc.StatusCode.NOT_FOUND:
                return [_graphql_error(err)] * len(ids)
        # All or nothing: one product of the batch is gone (an old order's). Read them one by one; a gone one is null.
        return [await self._product(product_id) for product_id in ids]

    async def _product(self, product_id: str) -> Product | Exception | None:
        try:
            reply = await self.call(self.upstream.inventory.GetProduct,
                                    inventory_api.GetProductRequest(id=product_id))
        except UpstreamError as err:
            return None if err.code == grpc.StatusCode.NOT_FOUND else _graphql_error(err)
        return Product.of(reply.product)

    async def _load_users(self, ids: list[str]) -> list[User | Exception | None]:
        out: list[User | Exception | None] = []
        for user_id in ids:  # UserService has no batch read; the loader still reads each user once per request
            try:
                reply = await self.call(self.upstream.users.GetUser, user_api.GetUserRequest(id=user_id))
                out.append(User.of(reply.user))
            except UpstreamError as err:
                out.append(None if err.code == grpc.StatusCode.NOT_FOUND else _graphql_error(err))
        return out


def _context(info: Info) -> Context:
    return info.context["tessera"]


_INDEX = re.compile(r"\[(\d+)\]")


@dataclasses.dataclass(frozen=True)
class Arguments:
    """Where the caller sent each field of a request a resolver makes: the contract's field path (snake_case, `[]`
    for a list's index) → the path of the GraphQL argument or input field (camelCase, `[]` there too). A field the
    resolver fills itself (a parent's id, an update_mask) has none."""

    paths: Mapping[str, str]

    @classmethod
    def named(cls, *fields: str, at: str = "") -> Arguments:
        """Arguments named as the schema names them: each contract field in camelCase, under the argument `at`."""
        return cls({f: at + ".".join(to_camel_case(part) for part in f.split(".")) for f in fields})

    def __call__(self, field: str) -> str | None:
        """The GraphQL path of a violation's contract field, with its list indexes; None if the caller sent none."""
        path = self.paths.get(_INDEX.sub("[]", field))
        if path is None:
            return None
        indexes = iter(_INDEX.findall(field))
        return re.sub(r"\[\]", lambda _: f"[{next(indexes)}]", path)


FILLED_HERE = Arguments({})


def _graphql_error(err: UpstreamError, arguments: Arguments = FILLED_HERE) -> GraphQLError:
    return GraphQLError(err.shown_message(arguments), extensions=err.extensions(arguments))


_PAGE = ("page_size", "page_token")
# For each field that calls a service ("Type.field", as the schema names them), where its caller sent the fields of
# the request it makes. A request field missing here is one the resolver fills itself: `me`'s id is the token's
# subject, User.orders' customer_id the account's id, updateDisplayName's update_mask its own; the loaders (an
# order's customer, its items' products) send ids from the services' answers.
ARGUMENTS: Mapping[str, Arguments] = {
    "Query.user": Arguments.named("id"),
    "Query.users": Arguments.named(*_PAGE, "status"),
    "Query.product": Arguments.named("id"),
    "Query.products": Arguments.named(*_PAGE, "sku", "in_stock_only"),
    "Query.order": Arguments.named("id"),
    "Query.orders": Arguments.named(*_PAGE, "customer_id", "status"),
    "User.orders": Arguments.named(*_PAGE, "status"),
    "Query.dailyMetrics": Arguments.named("date"),
    "Query.dailyMetricsRange": Arguments.named("start_date", "end_date", *_PAGE),
    "Query.metricsSummary": Arguments.named("start_date", "end_date"),
    "Mutation.createOrder": Arguments.named("customer_id", "items", "items[]", "items[].product_id",
                                            "items[].quantity", "payment_method", "currency_code", "request_id",
                                            at="input."),
    "Mutation.cancelOrder": Arguments.named("id", "reason"),
    "Mutation.updateDisplayName": Arguments({"user.id": "id", "user.display_name": "displayName"}),
}


async def _call(info: Info, method_of, request):
    """Calls a service for the field `info` resolves; a refusal is a GraphQL error naming the caller's arguments."""
    arguments = ARGUMENTS[f"{info.path.typename}.{info.field_name}"]
    context = _context(info)
    try:
        return await context.call(method_of(context.upstream), request)
    except UpstreamError as err:
        raise _graphql_error(err, arguments) from None


async def _list_orders(info: Info, page_size: int, page_token: str, customer_id: str,
                       status: Any) -> OrderPage:
    reply = await _call(info, lambda u: u.orders.ListOrders, order_api.ListOrdersRequest(
        page_size=page_size, page_token=page_token, customer_id=customer_id,
        status=order_pb2.OrderStatus.Value(f"ORDER_STATUS_{status.name}") if status is not None else 0))
    return OrderPage(orders=[Order.of(o) for o in reply.orders], next_page_token=reply.next_page_token)


@strawberry.type
class Query:
    @strawberry.field(description="The caller's own account (GetUser; user:read); null for a token whose subject is "
                                  "no account (staff, services).")
    async def me(self, info: Info) -> User | None:
        subject = info.context["principal"].subject
        try:
            uuid.UUID(subject)
        except ValueError:
            return None
        return await _context(info).users.load(subject)

    @strawberry.field(description="An account by id (GetUser; user:read): a customer may read only their own.")
    async def user(self, info: Info, id: strawberry.ID) -> User | None:
        reply = await _call(info, lambda u: u.users.GetUser, user_api.GetUserRequest(id=str(id)))
        return User.of(reply.user)

    @strawberry.field(description="Accounts, oldest first (ListUsers; admin).")
    async def users(self, info: Info, page_size: int = 20, page_token: str = "",
                    status: UserStatus | None = None) -> UserPage | None:  # type: ignore[valid-type]
        reply = await _call(info, lambda u: u.users.ListUsers, user_api.ListUsersRequest(
            page_size=page_size, page_token=page_token,
            status=user_pb2.UserStatus.Value(f"USER_STATUS_{status.name}") if status is not None else 0))
        return UserPage(users=[User.of(x) for x in reply.users], next_page_token=reply.next_page_token)

    @strawberry.field(description="A product by id (GetProduct; inventory:read).")
    async def product(self, info: Info, id: strawberry.ID) -> Product | None:
        reply = await _call(info, lambda u: u.inventory.GetProduct, inventory_api.GetProductRequest(id=str(id)))
        return Product.of(reply.product)

    @strawberry.field(description="The catalogue (ListProducts; inventory:read).")
    async def products(self, info: Info, page_size: int = 20, page_token: str = "", sku: str = "",
                       in_stock_only: bool = False) -> ProductPage | None:
        reply = await _call(info, lambda u: u.inventory.ListProducts, inventory_api.ListProductsRequest(
            page_size=page_size, page_token=page_token, sku=sku, in_stock_only=in_stock_only))
        return ProductPage(products=[Product.of(p) for p in reply.products], next_page_token=reply.next_page_token)

    @strawberry.field(description="An order by id (GetOrder; order:read): a customer may read only their own.")
    async def order(self, info: Info, id: strawberry.ID) -> Order | None:
        reply = await _call(info, lambda u: u.orders.GetOrder, order_api.GetOrderRequest(id=str(id)))
        return Order.of(reply.order)

    @strawberry.field(description="Orders, newest first (ListOrders; order:read): a customer's are their own.")
    async def orders(self, info: Info, page_size: int = 20, page_token: str = "", customer_id: str = "",
                     status: OrderStatus | None = None) -> OrderPage | None:  # type: ignore[valid-type]
        return await _list_orders(info, page_size, page_token, customer_id, status)

    @strawberry.field(description='The metrics of one UTC day, "YYYY-MM-DD" (GetDailyMetrics; analytics:read): every '
                                  "count zero on a day no event fell on.")
    async def daily_metrics(self, info: Info, date: str) -> DailyMetrics | None:
        reply = await _call(info, lambda u: u.analytics.GetDailyMetrics,
                            analytics_api.GetDailyMetricsRequest(date=date))
        return DailyMetrics.of(reply.metrics)

    @strawberry.field(description="The metrics of every day from startDate to endDate, both included (at most 366 "
                                  "days), oldest first, a page at a time (ListDailyMetrics; analytics:read): 50 days "
                                  "unless pageSize says otherwise, at most 200.")
    async def daily_metrics_range(self, info: Info, start_date: str, end_date: str, page_size: int = 50,
                                  page_token: str = "") -> DailyMetricsPage | None:
        reply = await _call(info, lambda u: u.analytics.ListDailyMetrics, analytics_api.ListDailyMetricsRequest(
            start_date=start_date, end_date=end_date, page_size=page_size, page_token=page_token))
        return DailyMetricsPage(daily_metrics=[DailyMetrics.of(d) for d in reply.daily_metrics],
                                next_page_token=reply.next_page_token)

    @strawberry.field(description="The metrics summed over the days from startDate to endDate, both included (at "
                                  "most 366 days) (GetMetricsSummary; analytics:read).")
    async def metrics_summary(self, info: Info, start_date: str, end_date: str) -> MetricsSummary | None:
        reply = await _call(info, lambda u: u.analytics.GetMetricsSummary,
                            analytics_api.GetMetricsSummaryRequest(start_date=start_date, end_date=end_date))
        summary = reply.summary
        return MetricsSummary(start_date=summary.start_date, end_date=summary.end_date,
                              totals=DailyMetrics.of(summary.totals))


@strawberry.type
class Mutation:
    @strawberry.mutation(description="Places an order and runs its saga (CreateOrder; order:write).")
    async def create_order(self, info: Info, input: CreateOrderInput) -> Order:
        reply = await _call(info, lambda u: u.orders.CreateOrder, order_api.CreateOrderRequest(
            customer_id=str(input.customer_id), payment_method=input.payment_method,
            currency_code=input.currency_code, request_id=input.request_id,
            items=[order_api.CreateOrderRequest.Item(product_id=str(i.product_id), quantity=i.quantity)
                   for i in input.items]))
        return Order.of(reply.order)

    @strawberry.mutation(description="Cancels an order, compensating what its saga did (CancelOrder; order:write).")
    async def cancel_order(self, info: Info, id: strawberry.ID, reason: str = "") -> Order:
        reply = await _call(info, lambda u: u.orders.CancelOrder,
                            order_api.CancelOrderRequest(id=str(id), reason=reason))
        return Order.of(reply.order)

    @strawberry.mutation(description="Changes the caller's display name (UpdateUser; user:write).")
    async def update_display_name(self, info: Info, id: strawberry.ID, display_name: str) -> User:
        reply = await _call(info, lambda u: u.users.UpdateUser, user_api.UpdateUserRequest(
            user=user_pb2.User(id=str(id), display_name=display_name),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"])))
        return User.of(reply.user)


class _OneMutation(ValidationRule):
    """A mutation operation changes one thing: the gateway's rate limit counts HTTP requests, so aliased mutations
    in one request would run that many sagas (or writes) for one token of the caller's bucket."""

    def enter_operation_definition(self, node: OperationDefinitionNode, *_: Any) -> None:
        if node.operation is OperationType.MUTATION and self._fields(node.selection_set, set()) > 1:
            self.report_error(GraphQLError("a request may make at most one mutation; send each in a request of its "
                                           "own", [node]))

    def _fields(self, selection_set: SelectionSetNode, seen: set[str]) -> int:
        count = 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                count += 0 if selection.name.value == "__typename" else 1
            elif isinstance(selection, InlineFragmentNode):
                count += self._fields(selection.selection_set, seen)
            elif isinstance(selection, FragmentSpreadNode) and selection.name.value not in seen:
                seen.add(selection.name.value)
                fragment = self.context.get_fragment(selection.name.value)
                if fragment is not None:
                    count += self._fields(fragment.selection_set, seen)
        return count


def _unexpected(error: GraphQLError) -> bool:
    return error.original_error is not None and not isinstance(error.original_error, GraphQLError)


def build_schema(*, max_depth: int = 10, max_aliases: int = 30, max_tokens: int = 2000) -> strawberry.Schema:
    """The schema with the limits that keep one request's work bounded: nesting depth, aliases (each alias is
    another call), the document's size, and one mutation per request."""
    return strawberry.Schema(
        query=Query, mutation=Mutation,
        extensions=[OperationMetrics,
                    lambda: QueryDepthLimiter(max_depth=max_depth),
                    lambda: MaxAliasesLimiter(max_alias_count=max_aliases),
                    lambda: MaxTokensLimiter(max_token_count=max_tokens),
                    lambda: AddValidationRules([_OneMutation]),
                    # An error no resolver meant to show (a bug, an unexpected reply) answers "Unexpected error."
                    # and is logged with its traceback; the errors built from the services' answers, and GraphQL's
                    # own validation errors, are shown as they are.
                    lambda: MaskErrors(should_mask_error=_unexpected)],
    )
