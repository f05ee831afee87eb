"""Background sweeper: expires ACTIVE reservations past their expire_time and gives their units back."""

from __future__ import annotations

from collections.abc import Callable

from tessera_inventory.service_layer import handlers
from tessera_runtime.periodic import BatchJob


class ReservationSweeper(BatchJob):
    """Runs expire_due_reservations every `interval` seconds, sooner while a full batch keeps coming back.
    Several processes may sweep one database: each expiry is a conditional status change, so it happens once."""

    name = "inventory.sweeper"

    def __init__(self, uow_factory: Callable[[], handlers.UnitOfWork], interval: float, batch: int) -> None:
        super().__init__(interval, batch)
        self.uow_factory = uow_factory

    async def run_once(self) -> int:
        expired = await handlers.expire_due_reservations(self.uow_factory(), self.batch)
        if expired:
            self.log.info("expired reservations", extra={"expired": expired})
        return expired
