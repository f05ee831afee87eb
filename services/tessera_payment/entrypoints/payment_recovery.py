"""Background recovery: settles PENDING payments and claimed refunds left behind by calls that crashed, from the
processor's books."""

from __future__ import annotations

from collections.abc import Callable

from tessera_payment.service_layer import handlers
from tessera_runtime.periodic import BatchJob


class PaymentRecovery(BatchJob):
    """Runs recover_abandoned_payments and recover_abandoned_refunds at start and then every `interval` seconds.
    Several processes may run it on one database: taking a payment over is a compare-and-set on its version, so each
    is settled once."""

    name = "payment.recovery"

    def __init__(self, uow_factory: Callable[[], handlers.UnitOfWork], processing: handlers.Processing,
                 interval: float, batch: int = 100) -> None:
        super().__init__(interval, batch)
        self.uow_factory = uow_factory
        self.processing = processing

    async def run_once(self) -> int:
        charges = await handlers.recover_abandoned_payments(self.uow_factory(), self.processing, self.batch)
        return charges + await handlers.recover_abandoned_refunds(self.uow_factory(), self.processing, self.batch)
