"""Use cases of the analytics service: count an event once, and read the days back (for callers allowed to)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Protocol

from tessera_analytics import DOMAIN
from tessera_analytics.adapters.repository import CounterRepository
from tessera_analytics.domain.model import MAX_COUNTER, MAX_RANGE_DAYS, DailyMetrics, Tally, days, parse_date
from tessera_analytics.service_layer import commands
from tessera_runtime import pagination
from tessera_runtime.context import current_principal
from tessera_runtime.errors import FieldViolation, InvalidArgument, PermissionDenied, Violations
from tessera_runtime.messaging import DUPLICATE, EventMeta, HandlerResult

# The scope that lets a caller read the metrics (besides admin); the gateway asks it of every analytics route.
READ_SCOPE = "analytics:read"
_LIST_METHOD = "ListDailyMetrics"


class UnitOfWork(Protocol):
    counters: CounterRepository

    async def __aenter__(self) -> UnitOfWork: ...
    async def __aexit__(self, *exc: object) -> None: ...
    def reading(self) -> UnitOfWork: ...
    async def claim(self, meta: EventMeta) -> bool: ...
    async def commit(self) -> None: ...


async def count(tally: Tally, meta: EventMeta, uow_factory: Callable[[], UnitOfWork]) -> HandlerResult:
    """Adds the event's tally and records its id in one transaction: a redelivered event counts nothing more."""
    async with uow_factory() as uow:
        if not await uow.claim(meta):
            return DUPLICATE
        await uow.counters.add(tally)
        await uow.commit()
    return None


def _require_reader() -> None:
    """Business figures are for staff: a caller named by the gateway needs analytics:read or admin. Calls without
    an identity come from inside the mesh (TESSERA_REQUIRE_IDENTITY refuses them where that is not trusted)."""
    principal = current_principal()
    if principal is not None and not (principal.is_admin or READ_SCOPE in principal.scopes):
        raise PermissionDenied(f"reading analytics needs the {READ_SCOPE} or the admin scope",
                               reason="PERMISSION_DENIED", domain=DOMAIN)


def _date(text: str, field: str, v: Violations) -> dt.date | None:
    if not text:
        v.add(field, "is required")
        return None
    try:
        return parse_date(text)
    except ValueError as exc:
        v.add(field, str(exc))
        return None


def _range(start_text: str, end_text: str, v: Violations) -> tuple[dt.date, dt.date] | None:
    start, end = _date(start_text, "start_date", v), _date(end_text, "end_date", v)
    if start is None or end is None:
        return None
    if end < start:
        v.add("end_date", f"must not be before start_date ({start.isoformat()})")
        return None
    if (end - start).days + 1 > MAX_RANGE_DAYS:
        v.add("end_date", f"the range holds {(end - start).days + 1} days; at most {MAX_RANGE_DAYS} are allowed")
        return None
    return start, end


async def get_daily_metrics(cmd: commands.GetDailyMetrics, uow: UnitOfWork) -> DailyMetrics:
    _require_reader()
    v = Violations(DOMAIN)
    day = _date(cmd.date, "date", v)
    v.raise_if_any()
    assert day is not None
    async with uow.reading():
        counters = await uow.counters.between(day, day)
    return DailyMetrics.of(day, counters)


async def list_daily_metrics(cmd: commands.ListDailyMetrics, uow: UnitOfWork) -> tuple[list[DailyMetrics], str]:
    start, end = _read_range(cmd)
    size = pagination.page_size(cmd.page_size, DOMAIN)
    filters = {"start_date": start.isoformat(), "end_date": end.isoformat()}
    first = _resume_day(cmd.page_token, filters, start, end)
    # Compared as a count of days: first + size could pass the last date there is (9999-12-31).
    last = end if (end - first).days < size else first + dt.timedelta(days=size - 1)
    async with uow.reading():
        counters = await uow.counters.between(first, last)
    by_day: dict[dt.date, list] = {}
    for c in counters:
        by_day.setdefault(c.day, []).append(c)
    page = [DailyMetrics.of(day, by_day.get(day, ())) for day in days(first, last)]
    token = "" if last == end else pagination.encode(_LIST_METHOD, filters,
                                                     [(last + dt.timedelta(days=1)).isoformat()])
    return page, token


def _resume_day(token: str, filters: dict[str, str], start: dt.date, end: dt.date) -> dt.date:
    key = pagination.decode(token, _LIST_METHOD, filters, DOMAIN)
    if key is None:
        return start
    # Only a token made by hand gets past decode's checks and fails these.
    try:
        day = dt.date.fromisoformat(key[0]) if len(key) == 1 and isinstance(key[0], str) else None
    except ValueError:
        day = None
    if day is None or not start <= day <= end:
        raise InvalidArgument([FieldViolation("page_token", "is malformed")], reason="INVALID_ARGUMENT",
                              domain=DOMAIN)
    return day


async def get_metrics_summary(cmd: commands.GetMetricsSummary, uow: UnitOfWork) -> tuple[dt.date, dt.date,
                                                                                          DailyMetrics]:
    start, end = _read_range(cmd)
    async with uow.reading():
        counters = await uow.counters.between(start, end)
    totals = DailyMetrics.of(None, counters)
    # Each day's counters fit an int64, but their sum over a range may not, and the contract's fields are int64.
    for what, amounts in (("revenue", totals.revenue), ("refunded", totals.refunded)):
        for money in amounts:
            if money.amount_minor > MAX_COUNTER:
                raise InvalidArgument([FieldViolation(
                    "end_date", f"{what} in {money.currency_code} summed over the range passes int64: ask for a "
                                f"shorter range")], reason="INVALID_ARGUMENT",
                    domain=DOMAIN)
    return start, end, totals


def _read_range(cmd: commands.ListDailyMetrics | commands.GetMetricsSummary) -> tuple[dt.date, dt.date]:
    """The caller may read, and the request's start_date and end_date are a valid range: the range's days."""
    _require_reader()
    v = Violations(DOMAIN)
    bounds = _range(cmd.start_date, cmd.end_date, v)
    v.raise_if_any()
    assert bounds is not None
    return bounds
