"""BacklogJob: a row that fails is passed over for the round, the database being away ends it, nothing is dropped."""

from __future__ import annotations

import datetime as dt

import pytest
from prometheus_client import REGISTRY

from tessera_runtime.periodic import BacklogJob, BacklogKey

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class Backlog(BacklogJob):
    """Rows "a" to "e" due in that order; handle() fails as `failures` says, and removes a row it handled."""

    name = "test.backlog"

    def __init__(self, failures: dict[str, BaseException]) -> None:
        super().__init__(interval=60, batch=2)
        self.rows = {f"{c}": T0 + dt.timedelta(seconds=i) for i, c in enumerate("abcde")}
        self.failures = failures
        self.tried: list[str] = []

    async def due(self, after: BacklogKey | None, limit: int) -> list[BacklogKey]:
        keys = sorted((t, i) for i, t in self.rows.items())
        return [k for k in keys if after is None or k > after][:limit]

    async def handle(self, item_id: str) -> bool:
        self.tried.append(item_id)
        if item_id in self.failures:
            raise self.failures[item_id]
        del self.rows[item_id]
        return True


def passed_over() -> float:
    return REGISTRY.get_sample_value("tessera_batch_job_items_passed_over_total", {"job": "test.backlog"}) or 0


async def test_rows_that_fail_are_passed_over_and_tried_again_next_round():
    before = passed_over()
    job = Backlog({"a": RuntimeError("stock does not match"), "b": ValueError("bad row")})
    # The two bad rows fill the first batch; the round goes on behind them instead of stopping there.
    assert [await job.run_once() for _ in range(3)] == [2, 2, 1]
    assert job.tried == ["a", "b", "c", "d", "e"] and sorted(job.rows) == ["a", "b"]
    assert passed_over() == before + 2
    # The next round starts at the front again: once repaired, the rows are handled.
    job.failures.clear()
    assert await job.run_once() == 2 and not job.rows


async def test_the_database_being_away_ends_the_round_and_the_row_is_tried_again():
    job = Backlog({"a": ConnectionRefusedError("connection refused")})
    with pytest.raises(ConnectionRefusedError):
        await job.run_once()
    job.failures.clear()
    assert await job.run_once() == 2 and job.tried == ["a", "a", "b"]
