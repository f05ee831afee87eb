"""Background sweeper: expires ACTIVE reservations past their expire_time and gives their units back."""

from __future__ import annotations

from collections.abc import Callable

from tessera_inventory.service_layer import handlers
from tessera_runtime.periodic import BacklogJob, BacklogKey


class ReservationSweeper(BacklogJob):
    """Expires the reservations due every `interval` seconds, sooner while a full batch keeps coming back; one that
    cannot be expired (its product edited by hand, say) is logged and passed over until the next round (see
    BacklogJob). Several processes may sweep one database: each expiry is a conditional status change, so it
    happens once."""

    name = "inventory.sweeper"

    def __init__(self, uow_factory: Callable[[], handlers.UnitOfWork], interval: float, batch: int) -> None:
        super().__init__(interval, batch)
        self.uow_factory = uow_factory

    async def due(self, after: BacklogKey | None, limit: int) -> list[BacklogKey]:
        return await handlers.due_reservations(self.uow_factory(), after, limit)

    async def handle(self, item_id: str) -> bool:
        return await handlers.expire_due_reservation(self.uow_factory(), item_id)
