"""Commands of the analytics service: the reads its API serves (events are counted as domain Tallies)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class GetDailyMetrics:
    date: str


@dataclasses.dataclass(frozen=True)
class ListDailyMetrics:
    start_date: str
    end_date: str
    page_size: int = 0
    page_token: str = ""


@dataclasses.dataclass(frozen=True)
class GetMetricsSummary:
    start_date: str
    end_date: str
