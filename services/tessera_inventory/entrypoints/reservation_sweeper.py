"""Background sweeper: expires ACTIVE reservations past their expire_time and gives their units back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from tessera_inventory.service_layer import handlers

log = logging.getLogger("tessera.inventory.sweeper")


class ReservationSweeper:
    """Runs expire_due_reservations every `interval` seconds, sooner while a full batch keeps coming back.
    Several processes may sweep one database: each expiry is a conditional status change, so it happens once."""

    def __init__(self, uow_factory: Callable[[], handlers.UnitOfWork], interval: float, batch: int) -> None:
        self.uow_factory = uow_factory
        self.interval = interval
        self.batch = batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="reservation-sweeper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def sweep_once(self) -> int:
        expired = await handlers.expire_due_reservations(self.uow_factory(), self.batch)
        if expired:
            log.info("expired reservations", extra={"expired": expired})
        return expired

    async def _run(self) -> None:
        while True:
            try:
                if await self.sweep_once() == self.batch:
                    continue  # more may be due right now
            except Exception:  # the database may be away for a while; the next round tries again
                log.exception("reservation sweep failed")
            await asyncio.sleep(self.interval)
