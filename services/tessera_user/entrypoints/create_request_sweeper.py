"""Background sweeper: forgets the CreateUser calls answered longer ago than the retention period."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

from tessera_runtime.periodic import BatchJob
from tessera_user.service_layer import handlers


class CreateRequestSweeper(BatchJob):
    """Runs purge_create_requests every `interval` seconds, sooner while a full batch keeps coming back. Several
    processes may sweep one database: each round deletes what is due, and a row deleted twice is deleted once."""

    name = "user.create-request-sweeper"

    def __init__(self, uow_factory: Callable[[], handlers.UnitOfWork], retention: dt.timedelta, interval: float,
                 batch: int) -> None:
        super().__init__(interval, batch)
        self.uow_factory = uow_factory
        self.retention = retention

    async def run_once(self) -> int:
        purged = await handlers.purge_create_requests(self.uow_factory(), self.retention, self.batch)
        if purged:
            self.log.info("forgot answered CreateUser calls", extra={"purged": purged})
        return purged
