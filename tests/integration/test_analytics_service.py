"""AnalyticsService over a real broker, on SQLite and PostgreSQL: events published to the exchange are counted once
on the day they happened, whatever their order or repeats; undecodable and uncountable events are dead-lettered;
the API pages days, refuses bad input naming the field, and asks for the analytics:read scope."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid

import grpc
import pika
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY
from tessera.analytics.v1 import analytics_pb2
from tessera.analytics.v1 import analytics_service_pb2 as apb
from tessera.analytics.v1 import analytics_service_pb2_grpc as apb_grpc
from tessera.common.v1 import money_pb2
from tessera.order.v1 import order_events_pb2, order_pb2
from tessera.payment.v1 import payment_events_pb2
from tessera.user.v1 import user_events_pb2, user_pb2

from tessera_runtime.clients import error_details
from tests.support import rabbitmq
from tests.support.messaging_stack import environment, running

QUEUE = "analytics.metrics"
DOMAIN = "analytics.tessera.dev"
D1, D2, D3 = "2026-03-01", "2026-03-02", "2026-03-03"


@pytest.fixture(scope="module")
def amqp_url():
    vhost = rabbitmq.create_vhost()
    yield rabbitmq.amqp_url(vhost)
    rabbitmq.delete_vhost(vhost)


async def _serve(db_url: str, amqp_url: str):
    async with running("analytics", environment("analytics", database_url=db_url, amqp_url=amqp_url)) as (_, ch):
        await rabbitmq.wait_for_consumer(amqp_url, QUEUE)
        yield apb_grpc.AnalyticsServiceStub(ch)


@pytest.fixture
async def analytics(db_url, amqp_url):
    """The service on each backend."""
    async for stub in _serve(db_url, amqp_url):
        yield stub


@pytest.fixture
async def on_sqlite(tmp_path, amqp_url):
    """The service on SQLite, for what does not depend on the backend."""
    async for stub in _serve(f"sqlite+aiosqlite:///{tmp_path / 'analytics.db'}", amqp_url):
        yield stub


def _at(day: str, hour: int = 12, minute: int = 0) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(dt.datetime.fromisoformat(day).replace(hour=hour, minute=minute, tzinfo=dt.UTC))
    return ts


def _money(code: str, minor: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=code, amount_minor=minor)


def _publish(url: str, messages: list[tuple[object, str, bytes | None, int | None]]) -> None:
    """Publishes (event, message id, raw body or None, AMQP timestamp or None) as a Tessera relay does."""
    with rabbitmq.blocking_connection(url) as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        for event, message_id, body, timestamp in messages:
            name = event.DESCRIPTOR.full_name
            channel.basic_publish("tessera.events", name, body if body is not None else event.SerializeToString(),
                                  pika.BasicProperties(content_type="application/x-protobuf", type=name,
                                                       message_id=message_id, delivery_mode=2, timestamp=timestamp))


def _consumer_total(kind: str) -> float:
    """Messages of the analytics queue the consumer has `kind` (processed, duplicates, dead_lettered) so far."""
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name == f"tessera_consumer_{kind}":
            total += sum(s.value for s in metric.samples
                         if s.name.endswith("_total") and s.labels.get("consumer") == QUEUE)
    return total


async def _until(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def _handled() -> float:
    return sum(_consumer_total(k) for k in ("processed", "duplicates", "dead_lettered"))


async def test_each_event_counts_once_on_the_day_it_happened_whatever_the_order_or_repeats(analytics, amqp_url):
    order_id = str(uuid.uuid4())
    welcome = user_events_pb2.UserCreated(user=user_pb2.User(id=str(uuid.uuid4())), occur_time=_at(D1, 23, 59))
    welcome_id = str(uuid.uuid4())
    messages = [
        # The cancellation arrives before the confirmation it undoes: both facts count, each on its own day.
        (order_events_pb2.OrderCancelled(order_id=order_id, refunded_amount=_money("EUR", 1250),
                                         occur_time=_at(D2, 9)), str(uuid.uuid4()), None, None),
        (order_events_pb2.OrderConfirmed(order_id=order_id, total=_money("EUR", 1250), occur_time=_at(D1, 8)),
         str(uuid.uuid4()), None, None),
        (order_events_pb2.OrderConfirmed(order_id=str(uuid.uuid4()), total=_money("USD", 999),
                                         occur_time=_at(D1, 9)), str(uuid.uuid4()), None, None),
        (order_events_pb2.OrderConfirmed(order_id=str(uuid.uuid4()), total=_money("EUR", 500),
                                         occur_time=_at(D2, 10)), str(uuid.uuid4()), None, None),
        (payment_events_pb2.PaymentRefunded(order_id=order_id, amount=_money("EUR", 1250), occur_time=_at(D2, 9)),
         str(uuid.uuid4()), None, None),
        # Registered late on D1 (UTC): counted on D1 whenever it is consumed. Delivered twice, counted once.
        (welcome, welcome_id, None, None),
        (welcome, welcome_id, None, None),
        (user_events_pb2.UserCreated(user=user_pb2.User(id=str(uuid.uuid4())), occur_time=_at(D1, 0, 1)),
         str(uuid.uuid4()), None, None),
        # No occur_time: the time its producer published it stands in.
        (user_events_pb2.UserCreated(user=user_pb2.User(id=str(uuid.uuid4()))), str(uuid.uuid4()), None,
         int(_at(D2, 15).ToDatetime(tzinfo=dt.UTC).timestamp())),
        *[(order_events_pb2.OrderFailed(order_id=str(uuid.uuid4()), total=_money("EUR", 100), occur_time=_at(D1),
                                        failure=order_pb2.OrderFailure(reason=reason)), str(uuid.uuid4()), None, None)
          for reason in ("PAYMENT_DECLINED", "INSUFFICIENT_STOCK", "PAYMENT_DECLINED", "")],
    ]
    handled, duplicates = _handled(), _consumer_total("duplicates")
    await asyncio.to_thread(_publish, amqp_url, messages)
    await _until(lambda: _handled() >= handled + len(messages), "every delivery to be handled")
    assert _consumer_total("duplicates") == duplicates + 1

    listed = await analytics.ListDailyMetrics(apb.ListDailyMetricsRequest(start_date=D1, end_date=D3))
    assert listed.next_page_token == ""
    day1, day2, day3 = listed.daily_metrics
    assert day1 == analytics_pb2.DailyMetrics(
        date=D1, users_registered=2, orders_confirmed=2, orders_failed=4, orders_cancelled=0,
        revenue=[_money("EUR", 1250), _money("USD", 999)], payments_refunded=0,
        failure_reasons=[analytics_pb2.FailureReasonCount(reason="INSUFFICIENT_STOCK", count=1),
                         analytics_pb2.FailureReasonCount(reason="PAYMENT_DECLINED", count=2),
                         analytics_pb2.FailureReasonCount(reason="UNKNOWN", count=1)])
    assert day2 == analytics_pb2.DailyMetrics(
        date=D2, users_registered=1, orders_confirmed=1, orders_cancelled=1, revenue=[_money("EUR", 500)],
        payments_refunded=1, refunded=[_money("EUR", 1250)])
    assert day3 == analytics_pb2.DailyMetrics(date=D3)
    got = await analytics.GetDailyMetrics(apb.GetDailyMetricsRequest(date=D2))
    assert got.metrics == day2

    summary = (await analytics.GetMetricsSummary(apb.GetMetricsSummaryRequest(start_date=D1, end_date=D3))).summary
    assert (summary.start_date, summary.end_date) == (D1, D3)
    assert summary.totals == analytics_pb2.DailyMetrics(
        users_registered=3, orders_confirmed=3, orders_failed=4, orders_cancelled=1,
        revenue=[_money("EUR", 1750), _money("USD", 999)], payments_refunded=1, refunded=[_money("EUR", 1250)],
        failure_reasons=day1.failure_reasons)


async def test_undecodable_and_uncountable_events_are_dead_lettered_and_count_nothing(on_sqlite, amqp_url):
    confirmed = order_events_pb2.OrderConfirmed(order_id=str(uuid.uuid4()), occur_time=_at(D1))
    messages = [
        (confirmed, str(uuid.uuid4()), b"\xff\xff not protobuf", None),  # undecodable
        (confirmed, str(uuid.uuid4()), None, None),  # no total, so no currency to count revenue in
        (payment_events_pb2.PaymentRefunded(amount=_money("EUR", -5), occur_time=_at(D1)), str(uuid.uuid4()), None,
         None),  # a negative refund
        # No occur_time and no AMQP timestamp: nothing says which day it belongs to.
        (user_events_pb2.UserCreated(user=user_pb2.User(id=str(uuid.uuid4()))), str(uuid.uuid4()), None, None),
    ]
    dlq = f"{QUEUE}.dlq"
    before = await asyncio.to_thread(rabbitmq.queue_depth, amqp_url, dlq)
    await asyncio.to_thread(_publish, amqp_url, messages)

    async def depth() -> int:
        return await asyncio.to_thread(rabbitmq.queue_depth, amqp_url, dlq)

    deadline = time.monotonic() + 30
    while await depth() < before + len(messages):
        assert time.monotonic() < deadline, "the bad messages did not all reach the dead-letter queue"
        await asyncio.sleep(0.05)
    # Dead-lettered at once (PermanentFailure), never retried, and nothing counted.
    with rabbitmq.blocking_connection(amqp_url) as connection:
        channel = connection.channel()
        reasons = []
        for _ in range(len(messages)):
            _, props, _ = channel.basic_get(dlq, auto_ack=True)
            reasons.append((props.headers or {}).get("x-tessera-last-error", ""))
    assert any("is not a valid tessera.order.v1.OrderConfirmed" in r for r in reasons), reasons
    assert any("no ISO 4217 currency code" in r for r in reasons) and any("is negative" in r for r in reasons)
    assert any("no occur_time" in r for r in reasons), reasons
    summary = (await on_sqlite.GetMetricsSummary(apb.GetMetricsSummaryRequest(start_date=D1, end_date=D1))).summary
    assert summary.totals == analytics_pb2.DailyMetrics()


async def _refused(call, code: grpc.StatusCode):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == code, caught.value.details()
    return error_details(caught.value)


async def test_bad_requests_are_refused_naming_the_field(on_sqlite):
    other_range = (await on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(
        start_date=D1, end_date=D3, page_size=1))).next_page_token
    cases = [
        (on_sqlite.GetDailyMetrics(apb.GetDailyMetricsRequest()), "date", "is required"),
        (on_sqlite.GetDailyMetrics(apb.GetDailyMetricsRequest(date="2026-02-30")), "date", "not a calendar date"),
        (on_sqlite.GetDailyMetrics(apb.GetDailyMetricsRequest(date="01/03/2026")), "date", "YYYY-MM-DD"),
        (on_sqlite.GetDailyMetrics(apb.GetDailyMetricsRequest(date="20260301")), "date", "YYYY-MM-DD"),
        (on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(end_date=D1)), "start_date", "is required"),
        (on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(start_date=D2, end_date=D1)), "end_date",
         "must not be before start_date"),
        (on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(start_date="2024-01-01", end_date="2025-01-01")),
         "end_date", "the range holds 367 days; at most 366"),
        (on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(start_date=D1, end_date=D1, page_size=-1)),
         "page_size", "must not be negative"),
        (on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(start_date=D1, end_date=D1, page_token="bogus")),
         "page_token", "is not a page token"),
        (on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(start_date=D1, end_date=D2,
                                                                page_token=other_range)),
         "page_token", "another method or other filters"),
        (on_sqlite.GetMetricsSummary(apb.GetMetricsSummaryRequest(start_date=D1, end_date="2026-13-01")),
         "end_date", "not a calendar date"),
        (on_sqlite.GetMetricsSummary(apb.GetMetricsSummaryRequest(start_date=D3, end_date=D1)),
         "end_date", "must not be before start_date"),
    ]
    for call, field, text in cases:
        info, bad = await _refused(call, grpc.StatusCode.INVALID_ARGUMENT)
        assert (info.reason, info.domain) == ("INVALID_ARGUMENT", DOMAIN), field
        assert [v.field for v in bad.field_violations] == [field]
        assert text in bad.field_violations[0].description, (field, bad.field_violations[0].description)
    # A leap year's 366 days are one range.
    leap = await on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(start_date="2024-01-01",
                                                                        end_date="2024-12-31", page_size=500))
    assert len(leap.daily_metrics) == 200 and leap.next_page_token  # page_size above 200 is coerced to 200


async def test_reading_needs_the_analytics_read_or_admin_scope(on_sqlite):
    def caller(scopes: str):
        return (("x-user-id", str(uuid.uuid4())), ("x-user-scopes", scopes))

    calls = [
        lambda md: on_sqlite.GetDailyMetrics(apb.GetDailyMetricsRequest(date=D1), metadata=md),
        lambda md: on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(start_date=D1, end_date=D2), metadata=md),
        lambda md: on_sqlite.GetMetricsSummary(apb.GetMetricsSummaryRequest(start_date=D1, end_date=D2), metadata=md),
    ]
    for call in calls:
        for scopes in ("", "order:read user:read", "analytics:readonly", "analytics"):
            info, _ = await _refused(call(caller(scopes)), grpc.StatusCode.PERMISSION_DENIED)
            assert (info.reason, info.domain) == ("PERMISSION_DENIED", DOMAIN)
        for scopes in ("analytics:read", "order:read admin"):
            await call(caller(scopes))
    # Refused before the input is looked at: a caller without the scope learns nothing from errors.
    await _refused(on_sqlite.GetDailyMetrics(apb.GetDailyMetricsRequest(date="bad"), metadata=caller("x")),
                   grpc.StatusCode.PERMISSION_DENIED)


async def test_days_are_listed_oldest_first_in_pages_that_cover_the_range(on_sqlite):
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        reply = await on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(
            start_date="2026-02-26", end_date=D2, page_size=2, page_token=token))
        seen += [m.date for m in reply.daily_metrics]
        pages += 1
        token = reply.next_page_token
        if not token:
            break
    assert pages == 3
    assert seen == ["2026-02-26", "2026-02-27", "2026-02-28", D1, D2]
    default = await on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(start_date="2026-01-01", end_date=D1))
    assert len(default.daily_metrics) == 50 and default.daily_metrics[-1].date == "2026-02-19"
    rest = await on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(
        start_date="2026-01-01", end_date=D1, page_token=default.next_page_token))
    assert (rest.daily_metrics[0].date, rest.daily_metrics[-1].date) == ("2026-02-20", D1)
    assert rest.next_page_token == ""
    # The last days the contract accepts: a page that would reach past 9999-12-31 ends with the range.
    last = await on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(start_date="9999-12-20", end_date="9999-12-31"))
    assert [m.date for m in last.daily_metrics] == [f"9999-12-{d}" for d in range(20, 32)]
    assert last.next_page_token == ""
    paged = await on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(
        start_date="9999-12-30", end_date="9999-12-31", page_size=1))
    final = await on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(
        start_date="9999-12-30", end_date="9999-12-31", page_size=1, page_token=paged.next_page_token))
    assert [m.date for m in (*paged.daily_metrics, *final.daily_metrics)] == ["9999-12-30", "9999-12-31"]
    assert final.next_page_token == ""


def before_eur(totals: analytics_pb2.DailyMetrics) -> int:
    return sum(m.amount_minor for m in totals.revenue if m.currency_code == "EUR")


async def test_a_customer_registered_and_orders_placed_through_the_real_services_show_in_the_metrics(
        tmp_path, amqp_url, on_sqlite):
    from tessera.order.v1 import order_service_pb2 as osvc
    from tessera.user.v1 import user_service_pb2, user_service_pb2_grpc

    from tests.support.order_stack import InProcessOrder, Neighbours

    today = dt.datetime.now(dt.UTC).date()
    window = apb.GetMetricsSummaryRequest(start_date=(today - dt.timedelta(days=1)).isoformat(),
                                          end_date=(today + dt.timedelta(days=1)).isoformat())
    before = (await on_sqlite.GetMetricsSummary(window)).summary.totals
    neighbours = await Neighbours(tmp_path / "neighbours").start()
    user_env = environment("user", database_url=f"sqlite+aiosqlite:///{tmp_path / 'user.db'}", amqp_url=amqp_url)
    try:
        async with running("user", user_env) as (user_server, channel):
            customer = (await user_service_pb2_grpc.UserServiceStub(channel).CreateUser(
                user_service_pb2.CreateUserRequest(user=user_pb2.User(email="mo@example.com", display_name="Mo"),
                                                   request_id=uuid.uuid4().hex))).user
            pen = await neighbours.product(10, price=1250)
            order_service = await InProcessOrder.start(neighbours.order_env(
                f"sqlite+aiosqlite:///{tmp_path / 'order.db'}", TESSERA_OUTBOX_RELAY="true",
                TESSERA_AMQP_URL=amqp_url, TESSERA_OUTBOX_POLL_SECONDS="0.2",
                TESSERA_USER_SERVICE_ADDR=f"127.0.0.1:{user_server.port}"))
            try:
                def place(method: str):
                    return order_service.stub.CreateOrder(osvc.CreateOrderRequest(
                        customer_id=customer.id, payment_method=method, currency_code="EUR",
                        request_id=uuid.uuid4().hex, items=[osvc.CreateOrderRequest.Item(product_id=pen, quantity=2)]),
                        timeout=20)

                confirmed = (await place("pm_sandbox_ok")).order
                assert confirmed.status == order_pb2.ORDER_STATUS_CONFIRMED
                declined, _ = await _refused(place("pm_sandbox_declined"), grpc.StatusCode.FAILED_PRECONDITION)

                async def counted() -> analytics_pb2.DailyMetrics:
                    deadline = time.monotonic() + 30
                    while True:
                        totals = (await on_sqlite.GetMetricsSummary(window)).summary.totals
                        if totals.orders_failed > before.orders_failed and \
                                totals.orders_confirmed > before.orders_confirmed and \
                                totals.users_registered > before.users_registered:
                            return totals
                        assert time.monotonic() < deadline, f"not counted: {totals}"
                        await asyncio.sleep(0.1)

                totals = await counted()
            finally:
                await order_service.stop()
    finally:
        await neighbours.stop()
    reason = declined.reason
    assert reason == "PAYMENT_DECLINED"
    assert totals.users_registered == before.users_registered + 1
    assert totals.orders_confirmed == before.orders_confirmed + 1
    assert totals.orders_failed == before.orders_failed + 1
    assert analytics_pb2.FailureReasonCount(reason=reason, count=1) in totals.failure_reasons
    assert confirmed.total == _money("EUR", 2500)
    assert list(totals.revenue) == [_money("EUR", before_eur(before) + 2500)]
    # Listed per day too: the day the events say, today (UTC) unless the orders straddled midnight.
    days = (await on_sqlite.ListDailyMetrics(apb.ListDailyMetricsRequest(
        start_date=window.start_date, end_date=window.end_date))).daily_metrics
    assert sum(d.orders_confirmed for d in days) == totals.orders_confirmed


INT64_MAX = 2**63 - 1


async def _dead_lettered_reasons(amqp_url: str, count: int, before: int) -> list[str]:
    """The last-error headers of `count` messages that reach the dead-letter queue (which held `before`)."""
    dlq = f"{QUEUE}.dlq"
    deadline = time.monotonic() + 30
    while await asyncio.to_thread(rabbitmq.queue_depth, amqp_url, dlq) < before + count:
        assert time.monotonic() < deadline, "the messages did not all reach the dead-letter queue"
        await asyncio.sleep(0.05)
    with rabbitmq.blocking_connection(amqp_url) as connection:
        channel = connection.channel()
        reasons = []
        for _ in range(before + count):
            _, props, _ = channel.basic_get(dlq, auto_ack=True)
            reasons.append((props.headers or {}).get("x-tessera-last-error", ""))
    return reasons[before:]


async def test_an_amount_that_would_take_a_days_counter_past_int64_is_dead_lettered_and_the_day_still_reads(
        analytics, amqp_url):
    day = "2026-04-01"
    dlq = f"{QUEUE}.dlq"
    before = await asyncio.to_thread(rabbitmq.queue_depth, amqp_url, dlq)
    big = INT64_MAX - 10
    messages = [
        (order_events_pb2.OrderConfirmed(order_id=str(uuid.uuid4()), total=_money("VND", big),
                                         occur_time=_at(day, 8)), str(uuid.uuid4()), None, None),
        (order_events_pb2.OrderConfirmed(order_id=str(uuid.uuid4()), total=_money("VND", 11),
                                         occur_time=_at(day, 9)), str(uuid.uuid4()), None, None),
        (order_events_pb2.OrderConfirmed(order_id=str(uuid.uuid4()), total=_money("VND", 10),
                                         occur_time=_at(day, 10)), str(uuid.uuid4()), None, None),
    ]
    for message in messages:  # one after the other: the one that overflows is the second
        handled = _handled()
        await asyncio.to_thread(_publish, amqp_url, [message])
        await _until(lambda handled=handled: _handled() >= handled + 1, "the delivery to be handled")
    reasons = await _dead_lettered_reasons(amqp_url, 1, before)
    assert "revenue_minor" in reasons[0] and "VND" in reasons[0] and str(INT64_MAX) in reasons[0], reasons
    got = (await analytics.GetDailyMetrics(apb.GetDailyMetricsRequest(date=day))).metrics
    # The overflowing event counted nothing (neither its order nor its revenue); the others all did.
    assert (got.orders_confirmed, list(got.revenue)) == (2, [_money("VND", INT64_MAX)])


async def test_a_summary_whose_sum_passes_int64_is_refused_naming_the_range_not_internal(on_sqlite, amqp_url):
    days_ = ("2026-05-01", "2026-05-02")
    messages = [(payment_events_pb2.PaymentRefunded(order_id=str(uuid.uuid4()), amount=_money("IDR", INT64_MAX),
                                                    occur_time=_at(day)), str(uuid.uuid4()), None, None)
                for day in days_]
    handled = _handled()
    await asyncio.to_thread(_publish, amqp_url, messages)
    await _until(lambda: _handled() >= handled + len(messages), "every delivery to be handled")
    one = await on_sqlite.GetMetricsSummary(apb.GetMetricsSummaryRequest(start_date=days_[0], end_date=days_[0]))
    assert list(one.summary.totals.refunded) == [_money("IDR", INT64_MAX)]
    info, bad = await _refused(on_sqlite.GetMetricsSummary(apb.GetMetricsSummaryRequest(
        start_date=days_[0], end_date=days_[1])), grpc.StatusCode.INVALID_ARGUMENT)
    assert (info.reason, info.domain) == ("INVALID_ARGUMENT", DOMAIN)
    assert [v.field for v in bad.field_violations] == ["end_date"]
    assert "IDR" in bad.field_violations[0].description and "shorter range" in bad.field_violations[0].description


async def test_an_event_whose_occur_time_is_no_valid_timestamp_is_dead_lettered_at_once(on_sqlite, amqp_url):
    dlq = f"{QUEUE}.dlq"
    before = await asyncio.to_thread(rabbitmq.queue_depth, amqp_url, dlq)
    messages = [
        (user_events_pb2.UserCreated(user=user_pb2.User(id=str(uuid.uuid4())),
                                     occur_time=Timestamp(seconds=253402300800)), str(uuid.uuid4()), None, None),
        (user_events_pb2.UserCreated(user=user_pb2.User(id=str(uuid.uuid4())),
                                     occur_time=Timestamp(seconds=0, nanos=-1)), str(uuid.uuid4()), None, None),
    ]
    retried = _consumer_total("retried")
    await asyncio.to_thread(_publish, amqp_url, messages)
    reasons = await _dead_lettered_reasons(amqp_url, len(messages), before)
    assert all("occur_time" in r for r in reasons), reasons
    assert _consumer_total("retried") == retried  # never retried: it could never succeed
