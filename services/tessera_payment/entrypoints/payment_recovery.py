"""Background recovery: settles PENDING payments left behind by calls that crashed, from the processor's books."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from tessera_payment.service_layer import handlers

log = logging.getLogger("tessera.payment.recovery")


class PaymentRecovery:
    """Runs recover_abandoned_payments at start and then every `interval` seconds. Several processes may run it
    on one database: taking a payment over is a compare-and-set on its version, so each is settled once."""

    def __init__(self, uow_factory: Callable[[], handlers.UnitOfWork], processing: handlers.Processing,
                 interval: float, batch: int = 100) -> None:
        self.uow_factory = uow_factory
        self.processing = processing
        self.interval = interval
        self.batch = batch
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="payment-recovery")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def recover_once(self) -> int:
        return await handlers.recover_abandoned_payments(self.uow_factory(), self.processing, self.batch)

    async def _run(self) -> None:
        while True:
            try:
                if await self.recover_once() == self.batch:
                    continue
            except Exception:  # the database may be away for a while; the next round tries again
                log.exception("payment recovery failed")
            await asyncio.sleep(self.interval)
