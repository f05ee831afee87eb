"""Background recovery: settles PENDING payments and claimed refunds left behind by calls that crashed, from the
processor's books."""

from __future__ import annotations

from collections.abc import Callable

from tessera_payment.service_layer import handlers
from tessera_runtime.periodic import BacklogJob, BacklogKey


class PaymentRecovery(BacklogJob):
    """Settles the abandoned charges and refunds at start and then every `interval` seconds; one it fails on for a
    reason it does not expect (its row edited by hand, say) is logged and passed over until the next round (see
    BacklogJob). Several processes may run it on one database: taking a payment over is a compare-and-set on its
    version, so each is settled once."""

    name = "payment.recovery"

    def __init__(self, uow_factory: Callable[[], handlers.UnitOfWork], processing: handlers.Processing,
                 interval: float, batch: int = 100) -> None:
        super().__init__(interval, batch)
        self.uow_factory = uow_factory
        self.processing = processing

    async def due(self, after: BacklogKey | None, limit: int) -> list[BacklogKey]:
        return await handlers.abandoned_payments(self.uow_factory(), after, limit)

    async def handle(self, item_id: str) -> bool:
        return await handlers.recover_abandoned_payment(self.uow_factory(), self.processing, item_id)
