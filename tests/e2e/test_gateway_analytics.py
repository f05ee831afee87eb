"""The analytics service through the gateway: its REST and native gRPC routes and the analytics:read scope.

Metrics are made only by consuming events, so this module runs the user and analytics services on a private vhost
of the machine's broker, behind an Envoy of their own: accounts created over REST are counted, and the day's
metrics are read back over REST and gRPC.
"""

from __future__ import annotations

import datetime as dt
import json

import grpc
import pytest
from tessera.analytics.v1 import analytics_service_pb2 as analytics_api

from tessera_client import RpcFailure, aio_connect, connect
from tests.support import rabbitmq
from tests.support.gateway import SERVICES, Gateway, ServiceStack, unique, wait_for

GET = "tessera.analytics.v1.AnalyticsService/GetDailyMetrics"
# grpcurl exits with 64 + the gRPC status code.
OK, INVALID_ARGUMENT, PERMISSION_DENIED = 0, 64 + 3, 64 + 7


@pytest.fixture(scope="module")
def counting(tmp_path_factory, dead_port):
    """A gateway in front of user and analytics services that publish and consume through a private vhost."""
    workdir = tmp_path_factory.mktemp("gateway-analytics")
    vhost = rabbitmq.create_vhost("tessera-gateway-analytics")
    stack = ServiceStack(workdir, amqp_url=rabbitmq.amqp_url(vhost))
    gw = None
    try:
        stack.start(["user", "analytics"])
        addresses = {name: f"127.0.0.1:{dead_port}" for name in SERVICES}
        addresses.update(stack.addresses())
        gw = Gateway(workdir, "analytics", addresses).start(["user", "analytics"])
        yield gw
    finally:
        if gw is not None:
            gw.stop()
        stack.stop()
        rabbitmq.delete_vhost(vhost)


@pytest.fixture(scope="module")
def registered(counting):
    """Two accounts created over REST, counted by the analytics service: the UTC day they were counted on."""
    gw = counting
    admin = gw.mint(unique("ops"), "admin")
    for name in ("ada", "lin"):
        created = gw.call("POST", f"/v1/users?requestId={unique(name)}", token=admin,
                          body={"email": f"{unique(name)}@example.com", "displayName": name.title()})
        assert created.status == 200, created.body
    today = dt.datetime.now(dt.UTC).date()
    window = f"startDate={(today - dt.timedelta(days=1)).isoformat()}&endDate={today.isoformat()}"

    def counted() -> str | None:
        listed = gw.call("GET", f"/v1/analytics/dailyMetrics?{window}", token=admin)
        assert listed.status == 200, listed.body
        days = [d for d in listed.json()["dailyMetrics"] if d["usersRegistered"] != "0"]
        return days[0]["date"] if days and sum(int(d["usersRegistered"]) for d in days) == 2 else None

    return wait_for(counted, timeout=60, what="the two registrations to be counted")


def test_an_analyst_reads_the_days_metrics_over_rest(counting, registered):
    gw = counting
    token = gw.mint(unique("analyst"), "analytics:read")
    day = gw.call("GET", f"/v1/analytics/dailyMetrics/{registered}", token=token)
    assert day.status == 200, day.body
    # The proto3 JSON mapping, every field printed: int64 counts as strings, empty amounts as [].
    assert day.json()["metrics"] == {
        "date": registered, "usersRegistered": "2", "ordersConfirmed": "0", "ordersFailed": "0",
        "ordersCancelled": "0", "revenue": [], "paymentsRefunded": "0", "refunded": [], "failureReasons": []}
    summary = gw.call("GET", f"/v1/analytics/summary?startDate={registered}&endDate={registered}", token=token)
    assert summary.status == 200, summary.body
    assert summary.json()["summary"]["totals"]["usersRegistered"] == "2"

    bad = gw.call("GET", f"/v1/analytics/dailyMetrics?startDate={registered}&endDate=2000-01-01", token=token)
    assert bad.status == 400, bad.body
    details = {d["@type"].rsplit("/", 1)[-1]: d for d in bad.json()["details"]}
    assert details["google.rpc.ErrorInfo"]["domain"] == "analytics.tessera.dev"
    assert [v["field"] for v in details["google.rpc.BadRequest"]["fieldViolations"]] == ["end_date"]


@pytest.mark.parametrize("scopes", ["user:read order:read", "analytics:readonly", "analytics", ""])
def test_a_token_without_analytics_read_is_refused(counting, registered, scopes):
    gw = counting
    token = gw.mint(unique("someone"), scopes)
    for path in (f"/v1/analytics/dailyMetrics/{registered}", "/v1/analytics/summary",
                 f"/v1/analytics/dailyMetrics?startDate={registered}&endDate={registered}"):
        refused = gw.call("GET", path, token=token)
        assert refused.status == 403, (path, refused.body)
        assert refused.json()["details"][0]["reason"] == "MISSING_SCOPE"
    assert gw.call("GET", f"/v1/analytics/dailyMetrics/{registered}").status == 401


def test_native_grpc_routes_follow_the_same_rules(counting, registered):
    gw = counting
    read = gw.grpcurl(GET, {"date": registered}, token=gw.mint(unique("analyst"), "analytics:read"))
    assert read.returncode == OK, read.stderr
    assert json.loads(read.stdout)["metrics"]["usersRegistered"] == "2"
    assert gw.grpcurl(GET, {"date": "2026-02-30"}, token=gw.mint(unique("a"), "admin")).returncode == INVALID_ARGUMENT
    assert gw.grpcurl(GET, {"date": registered}, token=gw.mint(unique("b"), "user:read")).returncode == \
        PERMISSION_DENIED


def test_the_python_client_reads_the_counted_day_with_an_analytics_read_token(counting, registered):
    gw = counting
    with connect(gw.address, token=gw.mint(unique("analyst"), "analytics:read")) as analyst:
        day = analyst.analytics.GetDailyMetrics(analytics_api.GetDailyMetricsRequest(date=registered)).metrics
        assert (day.date, day.users_registered, day.orders_confirmed) == (registered, 2, 0)
        with pytest.raises(grpc.RpcError) as invalid:
            analyst.analytics.GetMetricsSummary(analytics_api.GetMetricsSummaryRequest(
                start_date=registered, end_date="2000-01-01"))
        failure = RpcFailure.of(invalid.value)
        assert failure.code == grpc.StatusCode.INVALID_ARGUMENT and list(failure.field_violations) == ["end_date"]
    with connect(gw.address, token=gw.mint(unique("clerk"), "user:read order:read")) as clerk, \
            pytest.raises(grpc.RpcError) as forbidden:
        clerk.analytics.GetDailyMetrics(analytics_api.GetDailyMetricsRequest(date=registered))
    assert RpcFailure.of(forbidden.value).code == grpc.StatusCode.PERMISSION_DENIED


async def test_the_asyncio_python_client_lists_days_through_the_gateway(counting, registered):
    gw = counting
    async with aio_connect(gw.address, token=gw.mint(unique("ops"), "admin")) as admin:
        listed = await admin.analytics.ListDailyMetrics(analytics_api.ListDailyMetricsRequest(
            start_date=registered, end_date=registered))
    assert [(d.date, d.users_registered) for d in listed.daily_metrics] == [(registered, 2)]
    async with aio_connect(gw.address) as anonymous:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await anonymous.analytics.ListDailyMetrics(analytics_api.ListDailyMetricsRequest(
                start_date=registered, end_date=registered))
    assert RpcFailure.of(refused.value).code == grpc.StatusCode.UNAUTHENTICATED
