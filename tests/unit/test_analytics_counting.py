"""Counting events into daily metrics, through the handlers with the in-memory unit of work: each event counts once,
on its UTC day, in any order; a failed transaction counts nothing."""

from __future__ import annotations

import datetime as dt

import pytest

from tessera_analytics.domain import model
from tessera_analytics.domain.model import DailyMetrics, InvalidEvent, Money
from tessera_analytics.service_layer import handlers
from tessera_analytics.service_layer.unit_of_work import FakeAnalyticsUnitOfWork
from tessera_runtime.messaging import DUPLICATE, EventMeta

DAY = dt.date(2026, 3, 1)


def meta(event_id: str) -> EventMeta:
    return EventMeta(event_id=event_id, event_type="t", consumer="analytics.metrics", attempt=1, max_attempts=3,
                     retry_delay=1.0)


def at(hour: int, day: dt.date = DAY, tz: dt.tzinfo = dt.UTC) -> dt.datetime:
    return dt.datetime.combine(day, dt.time(hour), tz)


async def day_of(uow: FakeAnalyticsUnitOfWork, day: dt.date) -> DailyMetrics:
    return DailyMetrics.of(day, await uow.counters.between(day, day))


async def test_events_count_once_in_any_order_on_their_utc_day():
    tallies = [
        ("c", model.order_cancelled(at(9, DAY + dt.timedelta(days=1)))),
        ("a", model.order_confirmed(at(8), Money("EUR", 1250))),
        ("b", model.order_confirmed(at(9), Money("EUR", 750))),
        ("r", model.payment_refunded(at(10), Money("JPY", 300))),
        ("f", model.order_failed(at(11), "  PAYMENT_DECLINED ")),
        ("g", model.order_failed(at(11), "")),
        # 23:30 at UTC-2 is 01:30 the next UTC day.
        ("u", model.user_registered(at(23, DAY, dt.timezone(dt.timedelta(hours=-2))))),
    ]
    forward, backward = FakeAnalyticsUnitOfWork(), FakeAnalyticsUnitOfWork()
    for event_id, tally in tallies:
        assert await handlers.count(tally, meta(event_id), forward.factory) is None
    for event_id, tally in reversed(tallies):
        await handlers.count(tally, meta(event_id), backward.factory)
        assert await handlers.count(tally, meta(event_id), backward.factory) == DUPLICATE
    for uow in (forward, backward):
        first = await day_of(uow, DAY)
        assert first == DailyMetrics(day=DAY, orders_confirmed=2, revenue=(Money("EUR", 2000),), payments_refunded=1,
                                     refunded=(Money("JPY", 300),),
                                     failure_reasons=(("PAYMENT_DECLINED", 1), ("UNKNOWN", 1)))
        assert first.orders_failed == 2
        second = await day_of(uow, DAY + dt.timedelta(days=1))
        assert (second.orders_cancelled, second.users_registered) == (1, 1)


@pytest.mark.parametrize(("make", "text"), [
    (lambda: model.user_registered(None), "no occur_time"),
    (lambda: model.order_confirmed(at(1), None), "no ISO 4217 currency code"),
    (lambda: model.order_confirmed(at(1), Money("eur", 1)), "no ISO 4217 currency code"),
    (lambda: model.payment_refunded(at(1), Money("EUR", -1)), "is negative"),
])
def test_events_that_cannot_be_counted_are_refused(make, text):
    with pytest.raises(InvalidEvent, match=text):
        make()


def test_long_failure_reasons_are_cut_to_the_contracts_limit():
    [inc] = model.order_failed(at(1), "X" * 300).increments
    assert inc.key == "X" * model.MAX_REASON_LENGTH


@pytest.mark.parametrize(("text", "error"), [
    ("2026-02-29", "not a calendar date"), ("2026-3-1", "YYYY-MM-DD"), ("2026-03-01T00:00", "YYYY-MM-DD"),
    ("+2026-03-01", "YYYY-MM-DD"), ("２０２６-03-01", "YYYY-MM-DD"),
])
def test_dates_must_be_calendar_dates_written_yyyy_mm_dd(text, error):
    with pytest.raises(ValueError, match=error):
        model.parse_date(text)
