"""Daily metrics: what each domain event adds to its UTC day's counters, and the day as read back. No I/O.

Every metric is a counter that an event only adds to (a count, or an amount in one currency's minor units), so the
order in which events are applied never changes the result, and an event applied once per id is counted exactly
once. A day is a UTC calendar day; an event counts on the day its fact happened (the event's occur_time).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import re
from collections.abc import Iterable

from tessera_runtime.money import is_iso_currency

# The longest range ListDailyMetrics and GetMetricsSummary accept: a leap year.
MAX_RANGE_DAYS = 366
# Longest failure reason kept as its own counter key (the contract's limit).
MAX_REASON_LENGTH = 100
# The largest value a counter holds: an int64, as the database's BIGINT and the contract's Money.amount_minor.
MAX_COUNTER = 2**63 - 1
UNKNOWN_REASON = "UNKNOWN"

_DATE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


class Metric(enum.Enum):
    """A counter of a day; those keyed by currency or failure reason have one counter per key."""

    USERS_REGISTERED = "users_registered"
    ORDERS_CONFIRMED = "orders_confirmed"
    ORDERS_FAILED = "orders_failed"  # keyed by failure reason
    ORDERS_CANCELLED = "orders_cancelled"
    REVENUE_MINOR = "revenue_minor"  # keyed by currency
    PAYMENTS_REFUNDED = "payments_refunded"
    REFUNDED_MINOR = "refunded_minor"  # keyed by currency


class InvalidEvent(ValueError):
    """An event whose content cannot be counted (no time, a negative amount, no currency, an amount that would take
    its day's counter past MAX_COUNTER): it can never succeed."""


def overflow(day: dt.date, metric: Metric, key: str) -> InvalidEvent:
    """The event would take the day's counter past what it holds: counting it would corrupt the day's figures."""
    what = f"{metric.value} in {key}" if key else metric.value
    return InvalidEvent(f"counting it would take the {what} of {day.isoformat()} past {MAX_COUNTER}, the largest "
                        f"value a counter holds")


@dataclasses.dataclass(frozen=True)
class Increment:
    metric: Metric
    key: str
    amount: int


@dataclasses.dataclass(frozen=True)
class Tally:
    """What one event adds: increments to the counters of one day."""

    day: dt.date
    increments: tuple[Increment, ...]


@dataclasses.dataclass(frozen=True)
class Money:
    currency_code: str
    amount_minor: int


def day_of(at: dt.datetime | None) -> dt.date:
    if at is None:
        raise InvalidEvent("the event says nothing of when it happened (no occur_time)")
    return at.astimezone(dt.UTC).date()


def _amount(money: Money | None, what: str) -> Money:
    if money is None or not is_iso_currency(money.currency_code):
        raise InvalidEvent(f"{what} has no ISO 4217 currency code")
    if money.amount_minor < 0:
        raise InvalidEvent(f"{what} is negative")
    return money


def user_registered(at: dt.datetime | None) -> Tally:
    return Tally(day_of(at), (Increment(Metric.USERS_REGISTERED, "", 1),))


def order_confirmed(at: dt.datetime | None, total: Money | None) -> Tally:
    total = _amount(total, "the order's total")
    return Tally(day_of(at), (Increment(Metric.ORDERS_CONFIRMED, "", 1),
                              Increment(Metric.REVENUE_MINOR, total.currency_code, total.amount_minor)))


def order_failed(at: dt.datetime | None, reason: str) -> Tally:
    reason = reason.strip()[:MAX_REASON_LENGTH] or UNKNOWN_REASON
    return Tally(day_of(at), (Increment(Metric.ORDERS_FAILED, reason, 1),))


def order_cancelled(at: dt.datetime | None) -> Tally:
    return Tally(day_of(at), (Increment(Metric.ORDERS_CANCELLED, "", 1),))


def payment_refunded(at: dt.datetime | None, amount: Money | None) -> Tally:
    amount = _amount(amount, "the refunded amount")
    return Tally(day_of(at), (Increment(Metric.PAYMENTS_REFUNDED, "", 1),
                              Increment(Metric.REFUNDED_MINOR, amount.currency_code, amount.amount_minor)))


@dataclasses.dataclass(frozen=True)
class Counter:
    """One stored counter: a day's metric (for one key) and its value."""

    day: dt.date
    metric: Metric
    key: str
    value: int


@dataclasses.dataclass(frozen=True)
class DailyMetrics:
    """The metrics of one day (or, with day None, summed over a range)."""

    day: dt.date | None
    users_registered: int = 0
    orders_confirmed: int = 0
    orders_cancelled: int = 0
    payments_refunded: int = 0
    revenue: tuple[Money, ...] = ()  # by currency code
    refunded: tuple[Money, ...] = ()  # by currency code
    failure_reasons: tuple[tuple[str, int], ...] = ()  # by reason

    @property
    def orders_failed(self) -> int:
        return sum(count for _, count in self.failure_reasons)

    @classmethod
    def of(cls, day: dt.date | None, counters: Iterable[Counter]) -> DailyMetrics:
        """The sums of the counters given (all of one day, or of a range for a summary)."""
        plain: dict[Metric, int] = {}
        keyed: dict[Metric, dict[str, int]] = {}
        for c in counters:
            if c.key:
                keyed.setdefault(c.metric, {})
                keyed[c.metric][c.key] = keyed[c.metric].get(c.key, 0) + c.value
            else:
                plain[c.metric] = plain.get(c.metric, 0) + c.value

        def money(metric: Metric) -> tuple[Money, ...]:
            return tuple(Money(code, amount) for code, amount in sorted(keyed.get(metric, {}).items()))

        return cls(
            day=day,
            users_registered=plain.get(Metric.USERS_REGISTERED, 0),
            orders_confirmed=plain.get(Metric.ORDERS_CONFIRMED, 0),
            orders_cancelled=plain.get(Metric.ORDERS_CANCELLED, 0),
            payments_refunded=plain.get(Metric.PAYMENTS_REFUNDED, 0),
            revenue=money(Metric.REVENUE_MINOR),
            refunded=money(Metric.REFUNDED_MINOR),
            failure_reasons=tuple(sorted(keyed.get(Metric.ORDERS_FAILED, {}).items())),
        )


def parse_date(text: str) -> dt.date:
    """A "YYYY-MM-DD" calendar date; ValueError saying what is wrong otherwise."""
    if not _DATE.fullmatch(text):
        raise ValueError("must be a date as YYYY-MM-DD, such as 2026-12-04")
    try:
        return dt.date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a calendar date") from None


def days(start: dt.date, end: dt.date) -> list[dt.date]:
    return [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
