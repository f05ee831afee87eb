"""A background job that works through a backlog in batches: at start, then every `interval` seconds."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging


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
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            try:
                if await self.run_once() == self.batch:
                    continue
            except Exception:
                self.log.exception("%s round failed", self.name)
            await asyncio.sleep(self.interval)
