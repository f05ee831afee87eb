"""A background job that works through a backlog in batches: at start, then every `interval` seconds."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import datetime as dt
import logging

from tessera_runtime import metrics
from tessera_runtime.db import database_unavailable

# Where a row stands in a backlog: its deadline, then its id (unique, so that the order is total).
BacklogKey = tuple[dt.datetime, str]


async def cancel(task: asyncio.Task | None) -> None:
    """Cancels a background task and waits until it has ended (nothing when there is none)."""
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class BatchJob(abc.ABC):
    """Subclasses implement `run_once() -> handled`. A full batch means more may be due, so the next one runs at
    once; a failure (the database away for a while) is logged and the next round tries again."""

    name = "batch-job"

    def __init__(self, interval: float, batch: int) -> None:
        self.interval = interval
        self.batch = batch
        self.log = logging.getLogger(f"tessera.{self.name}")
        self._task: asyncio.Task[None] | None = None

    @abc.abstractmethod
    async def run_once(self) -> int:
        """Handles at most `batch` items; returns how many."""

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.name)

    async def stop(self) -> None:
        await cancel(self._task)
        self._task = None

    async def _run(self) -> None:
        while True:
            try:
                if await self.run_once() == self.batch:
                    continue
            except Exception:
                self.log.exception("%s round failed", self.name)
            await asyncio.sleep(self.interval)


class BacklogJob(BatchJob):
    """A BatchJob that handles the rows of its backlog one at a time, in the order of their BacklogKey.

    A round walks the backlog from its front to its end, a batch at a time. A row whose handling fails for a
    reason other than the database being unavailable (a row edited by hand that the handling cannot apply, a
    defect) is logged at ERROR with its id (`item_id`), counted in tessera_batch_job_items_passed_over_total{job},
    and passed over: the round goes on with the rows behind it, and the next round, which starts again at the
    front, tries it again. So one bad row never holds up the others and nothing is dropped: the row stays due
    until it is handled. The database being unavailable ends the round instead, as every row would fail."""

    def __init__(self, interval: float, batch: int) -> None:
        super().__init__(interval, batch)
        self._after: BacklogKey | None = None

    @abc.abstractmethod
    async def due(self, after: BacklogKey | None, limit: int) -> list[BacklogKey]:
        """The keys of at most `limit` rows due, in order, from the one after `after` (from the front if None)."""

    @abc.abstractmethod
    async def handle(self, item_id: str) -> bool:
        """Handles one due row (or finds that another process did); True if this call changed it."""

    def pass_over(self, item_id: str, why: str = "", **extra: str) -> None:
        """Logs at ERROR, with the exception being handled, and counts a row passed over until the next round. Also
        called for a row whose handling failed after handle() returned, in work handle() started in a task of its
        own: the row is just as stuck, and just as visible."""
        metrics.BATCH_JOB_ITEMS_PASSED_OVER.labels(self.name).inc()
        self.log.exception("%s passed over %s until its next round%s", self.name, item_id, f": {why}" if why else "",
                           extra={"item_id": item_id, **extra})

    async def run_once(self) -> int:
        keys = await self.due(self._after, self.batch)
        handled = 0
        for key in keys:
            try:
                handled += await self.handle(key[1])
            except Exception as exc:
                if database_unavailable(exc):
                    raise
                self.pass_over(key[1])
            self._after = key
        if len(keys) < self.batch:
            self._after = None  # the end of the backlog: the next round starts at its front
        if handled:
            self.log.info("%s handled %d rows", self.name, handled, extra={"handled": handled})
        return len(keys)
