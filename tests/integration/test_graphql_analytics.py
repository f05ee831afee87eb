"""The GraphQL API's analytics fields on a real HTTP server (port 0) over the real analytics service, which counts
events published on a private vhost of the machine's broker: the same figures as over gRPC, the analytics:read
scope asked before anything is sent, bad input named by field, and the service down."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator

import pika
import pytest
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY
from tessera.analytics.v1 import analytics_service_pb2 as apb
from tessera.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from tessera.common.v1 import money_pb2
from tessera.order.v1 import order_events_pb2, order_pb2
from tessera.payment.v1 import payment_events_pb2
from tessera.user.v1 import user_events_pb2, user_pb2

from tessera_graphql.app import GraphQLSettings
from tests.support import rabbitmq
from tests.support.graphql import GraphQL, serving
from tests.support.messaging_stack import environment, running

ANALYST = "analytics:read"
D1, D2, D3 = "2026-05-01", "2026-05-02", "2026-05-03"
METRICS = "date usersRegistered ordersConfirmed ordersFailed ordersCancelled paymentsRefunded " \
          "revenue { currencyCode amountMinor } refunded { currencyCode amountMinor } failureReasons { reason count }"
DAY = f"query($d: String!) {{ dailyMetrics(date: $d) {{ {METRICS} }} }}"
RANGE = (f"query($s: String!, $e: String!, $n: Int, $t: String) {{ dailyMetricsRange(startDate: $s, endDate: $e, "
         f"pageSize: $n, pageToken: $t) {{ dailyMetrics {{ {METRICS} }} nextPageToken }} }}")
SUMMARY = f"query($s: String!, $e: String!) {{ metricsSummary(startDate: $s, endDate: $e) {{ startDate endDate " \
          f"totals {{ {METRICS} }} }} }}"


def _at(day: str, hour: int = 12) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt.datetime.fromisoformat(day).replace(hour=hour, tzinfo=dt.UTC))
    return ts


def _money(code: str, minor: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=code, amount_minor=minor)


EVENTS = [
    user_events_pb2.UserCreated(user=user_pb2.User(id=str(uuid.uuid4())), occur_time=_at(D1)),
    user_events_pb2.UserCreated(user=user_pb2.User(id=str(uuid.uuid4())), occur_time=_at(D2)),
    order_events_pb2.OrderConfirmed(order_id=str(uuid.uuid4()), total=_money("EUR", 1250), occur_time=_at(D1)),
    order_events_pb2.OrderConfirmed(order_id=str(uuid.uuid4()), total=_money("USD", 999), occur_time=_at(D1)),
    order_events_pb2.OrderFailed(order_id=str(uuid.uuid4()), total=_money("EUR", 100), occur_time=_at(D2),
                                 failure=order_pb2.OrderFailure(reason="PAYMENT_DECLINED")),
    order_events_pb2.OrderCancelled(order_id=str(uuid.uuid4()), occur_time=_at(D3)),
    payment_events_pb2.PaymentRefunded(order_id=str(uuid.uuid4()), amount=_money("EUR", 1250), occur_time=_at(D3)),
]


def _publish(url: str) -> None:
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for event in EVENTS:
            name = event.DESCRIPTOR.full_name
            channel.basic_publish("tessera.events", name, event.SerializeToString(), pika.BasicProperties(
                content_type="application/x-protobuf", type=name, message_id=str(uuid.uuid4()), delivery_mode=2))


def handled(method: str) -> float:
    """Calls of `method` the analytics service (in this process) handled: its own RED metrics."""
    return sum(sample.value for metric in REGISTRY.collect() for sample in metric.samples
               if sample.name == "grpc_server_handled_total" and sample.labels.get("grpc_method") == method)


def as_graphql(message) -> dict:
    """A message as the GraphQL fields mirror it: the proto3 JSON mapping (camelCase, int64 as strings), every
    field printed."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True)


@pytest.fixture(scope="module")
async def analytics(tmp_path_factory) -> AsyncIterator[tuple[str, apb_grpc.AnalyticsServiceStub]]:
    """The analytics service, on SQLite, having counted EVENTS: its address and a stub that calls it directly."""
    vhost = rabbitmq.create_vhost("tessera-graphql-analytics")
    url = rabbitmq.amqp_url(vhost)
    db = tmp_path_factory.mktemp("graphql-analytics") / "analytics.db"
    try:
        async with running("analytics", environment("analytics", database_url=f"sqlite+aiosqlite:///{db}",
                                                    amqp_url=url)) as (server, channel):
            await rabbitmq.wait_for_consumer(url, "analytics.metrics")
            stub = apb_grpc.AnalyticsServiceStub(channel)
            await asyncio.to_thread(_publish, url)
            request = apb.GetMetricsSummaryRequest(start_date=D1, end_date=D3)
            for _ in range(600):
                totals = (await stub.GetMetricsSummary(request)).summary.totals
                if totals.users_registered + totals.orders_confirmed + totals.orders_failed + \
                        totals.orders_cancelled + totals.payments_refunded == len(EVENTS):
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the events were not all counted")
            yield f"127.0.0.1:{server.port}", stub
    finally:
        rabbitmq.delete_vhost(vhost)


def _settings(analytics_address: str, **env: str) -> GraphQLSettings:
    return GraphQLSettings.from_env({"TESSERA_GRAPHQL_PORT": "0", "TESSERA_ANALYTICS_SERVICE_ADDR": analytics_address,
                                     **env})


@pytest.fixture(scope="module")
async def graphql(analytics) -> AsyncIterator[GraphQL]:
    async with serving(_settings(analytics[0])) as client:
        yield client


async def test_a_day_reads_what_grpc_returns(graphql, analytics):
    stub = analytics[1]
    for day in (D1, D2, D3, "2026-06-30"):
        status, body, _ = await graphql.post(DAY, {"d": day}, subject="analyst", scopes=ANALYST)
        assert status == 200 and "errors" not in body, body
        expected = (await stub.GetDailyMetrics(apb.GetDailyMetricsRequest(date=day))).metrics
        assert body["data"]["dailyMetrics"] == as_graphql(expected)
    # The figures themselves: what the events said, on their days.
    _, body, _ = await graphql.post(DAY, {"d": D1}, subject="analyst", scopes=ANALYST)
    assert body["data"]["dailyMetrics"]["usersRegistered"] == "1"
    assert body["data"]["dailyMetrics"]["revenue"] == [{"currencyCode": "EUR", "amountMinor": "1250"},
                                                       {"currencyCode": "USD", "amountMinor": "999"}]


async def test_a_range_pages_what_grpc_returns_with_the_contracts_limits(graphql, analytics):
    stub = analytics[1]
    pages, token = [], ""
    while True:
        status, body, _ = await graphql.post(RANGE, {"s": D1, "e": D3, "n": 2, "t": token}, subject="analyst",
                                             scopes=ANALYST)
        assert status == 200 and "errors" not in body, body
        page = body["data"]["dailyMetricsRange"]
        expected = await stub.ListDailyMetrics(apb.ListDailyMetricsRequest(start_date=D1, end_date=D3, page_size=2,
                                                                           page_token=token))
        assert page == {"dailyMetrics": [as_graphql(d) for d in expected.daily_metrics],
                        "nextPageToken": expected.next_page_token}
        pages.append([d["date"] for d in page["dailyMetrics"]])
        token = page["nextPageToken"]
        if not token:
            break
    assert pages == [[D1, D2], [D3]]
    # The contract's page sizes: 50 days unless asked, at most 200 however many are asked for.
    year = {"s": "2025-01-01", "e": "2025-12-31"}
    _, body, _ = await graphql.post(RANGE, year, subject="analyst", scopes=ANALYST)
    assert len(body["data"]["dailyMetricsRange"]["dailyMetrics"]) == 50
    _, body, _ = await graphql.post(RANGE, {**year, "n": 1000}, subject="analyst", scopes=ANALYST)
    assert len(body["data"]["dailyMetricsRange"]["dailyMetrics"]) == 200


async def test_the_summary_is_what_grpc_returns(graphql, analytics):
    status, body, _ = await graphql.post(SUMMARY, {"s": D1, "e": D3}, subject="analyst", scopes=ANALYST)
    assert status == 200 and "errors" not in body, body
    expected = (await analytics[1].GetMetricsSummary(apb.GetMetricsSummaryRequest(start_date=D1, end_date=D3)))
    assert body["data"]["metricsSummary"] == as_graphql(expected.summary)
    assert body["data"]["metricsSummary"]["totals"]["date"] == ""
    assert body["data"]["metricsSummary"]["totals"]["ordersConfirmed"] == "2"


async def test_admin_reads_the_metrics_too(graphql):
    _, body, _ = await graphql.post(SUMMARY, {"s": D1, "e": D3}, subject="ops", scopes="admin")
    assert "errors" not in body and body["data"]["metricsSummary"]["totals"]["usersRegistered"] == "2"


@pytest.mark.parametrize(("query", "variables", "method"), [
    (DAY, {"d": D1}, "GetDailyMetrics"),
    (DAY, {"d": "not a date"}, "GetDailyMetrics"),
    (RANGE, {"s": D1, "e": D3}, "ListDailyMetrics"),
    (SUMMARY, {"s": D3, "e": D1}, "GetMetricsSummary"),
])
async def test_a_token_without_analytics_read_is_refused_before_anything_is_sent(graphql, query, variables, method):
    """Refused MISSING_SCOPE by the API itself, whatever the input (a bad date too): the service is never called."""
    before = handled(method)
    status, body, _ = await graphql.post(query, variables, subject="shopper",
                                         scopes="user:read order:read order:write inventory:read")
    assert status == 200 and list(body["data"].values()) == [None], body
    [error] = body["errors"]
    assert (error["extensions"]["code"], error["extensions"]["reason"]) == ("PERMISSION_DENIED", "MISSING_SCOPE")
    assert error["extensions"]["metadata"] == {"scopes": ANALYST,
                                               "method": f"/tessera.analytics.v1.AnalyticsService/{method}"}
    assert handled(method) == before


CONTRACT_FIELDS = {"date": "date", "startDate": "start_date", "endDate": "end_date", "pageSize": "page_size",
                   "pageToken": "page_token"}


@pytest.mark.parametrize(("query", "variables", "field"), [
    (DAY, {"d": "2026-13-01"}, "date"),
    (DAY, {"d": ""}, "date"),
    (RANGE, {"s": "May 1st", "e": D3}, "startDate"),
    (RANGE, {"s": D3, "e": D1}, "endDate"),
    (RANGE, {"s": "2025-01-01", "e": "2026-01-02"}, "endDate"),  # 367 days
    (RANGE, {"s": D1, "e": D3, "n": -1}, "pageSize"),
    (RANGE, {"s": D1, "e": D3, "t": "forged"}, "pageToken"),
    (SUMMARY, {"s": D1, "e": "2026-05-32"}, "endDate"),
    (SUMMARY, {"s": "", "e": D1}, "startDate"),
])
async def test_bad_input_is_refused_naming_the_field(graphql, query, variables, field):
    status, body, _ = await graphql.post(query, variables, subject="analyst", scopes=ANALYST)
    assert status == 200 and list(body["data"].values()) == [None], body
    [error] = body["errors"]
    ext = error["extensions"]
    assert (ext["code"], ext["reason"], ext["domain"]) == ("INVALID_ARGUMENT", "INVALID_ARGUMENT",
                                                          "analytics.tessera.dev")
    assert [v["field"] for v in ext["fieldViolations"]] == [field], "the argument the caller sent"
    assert [v["contractField"] for v in ext["fieldViolations"]] == [CONTRACT_FIELDS[field]]
    assert error["message"].startswith(f"invalid request: {field}: ")


@pytest.mark.parametrize("query", [RANGE, SUMMARY])
async def test_a_description_naming_a_field_names_the_argument_the_caller_sent(graphql, query):
    """The analytics service says an end_date before the start_date "must not be before start_date (...)", in the
    contract's words; the GraphQL answer names the arguments the caller sent, in the violation and in the message."""
    _, body, _ = await graphql.post(query, {"s": D3, "e": D1}, subject="analyst", scopes=ANALYST)
    [error] = body["errors"]
    assert error["extensions"]["fieldViolations"] == [{
        "field": "endDate", "contractField": "end_date", "description": f"must not be before startDate ({D3})"}]
    assert error["message"] == f"invalid request: endDate: must not be before startDate ({D3})"


async def test_the_analytics_service_down_is_unavailable_without_naming_its_address(unused_tcp_port):
    # Nothing listens at the analytics service's address: each call fails until this process's circuit breaker for
    # it opens, and then fails at once.
    async with serving(_settings(f"127.0.0.1:{unused_tcp_port}", TESSERA_DEFAULT_DEADLINE_SECONDS="2",
                                 TESSERA_CIRCUIT_FAILURE_THRESHOLD="2")) as client:
        reasons = []
        for query, variables in ((DAY, {"d": D1}), (RANGE, {"s": D1, "e": D3}), (SUMMARY, {"s": D1, "e": D3})):
            status, body, _ = await client.post(query, variables, subject="analyst", scopes=ANALYST)
            assert status == 200 and list(body["data"].values()) == [None], body
            [error] = body["errors"]
            assert error["extensions"]["code"] == "UNAVAILABLE"
            assert str(unused_tcp_port) not in repr(error), error
            reasons.append(error["extensions"].get("reason"))
        assert reasons == [None, None, "CIRCUIT_OPEN"]
        # The scope is still asked first while the service is away.
        _, body, _ = await client.post(DAY, {"d": D1}, subject="shopper", scopes="user:read")
        assert body["errors"][0]["extensions"]["reason"] == "MISSING_SCOPE"
