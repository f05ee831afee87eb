"""Composition root of the payment service: the one place that wires database, unit of work, processor,
servicer and the recovery loop."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from tessera.payment.v1 import payment_service_pb2, payment_service_pb2_grpc

from tessera_payment import DOMAIN
from tessera_payment.adapters.orm import outbox
from tessera_payment.adapters.sandbox_processor import SandboxProcessor
from tessera_payment.entrypoints.grpc_servicer import PaymentServicer
from tessera_payment.entrypoints.payment_recovery import PaymentRecovery
from tessera_payment.service_layer.handlers import ChargePolicy, InFlight, Processing
from tessera_payment.service_layer.unit_of_work import PaymentUnitOfWork
from tessera_runtime.config import Env, ServiceSettings
from tessera_runtime.db import Database
from tessera_runtime.messaging import MessagingServiceSettings, attach_outbox_relay
from tessera_runtime.migrations import upgrade_async
from tessera_runtime.server import ServiceModule

SERVICE = "payment"
DEFAULT_PORT = 50053
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SERVICE_NAME = payment_service_pb2.DESCRIPTOR.services_by_name["PaymentService"].full_name


@dataclasses.dataclass(frozen=True)
class PaymentSettings(MessagingServiceSettings):
    """MessagingServiceSettings plus how the service uses its payment processor."""

    # Longest a charge or refund may take at the processor; a caller's shorter deadline cuts it shorter.
    payment_processor_timeout_seconds: float = 10.0
    # Attempts per ProcessPayment call when the processor fails transiently.
    payment_processor_max_attempts: int = 3
    # Pause before the second attempt; doubled before each further one.
    payment_processor_retry_backoff_seconds: float = 0.2
    # Extra time a PENDING payment stays leased to its call before others may take it over.
    payment_lease_grace_seconds: float = 5.0
    # How often PENDING payments left by crashed calls are looked for.
    payment_recovery_seconds: float = 5.0

    @classmethod
    def extra_from_env(cls, env: Env) -> dict[str, Any]:
        values = super().extra_from_env(env)
        return values | dict(
            payment_processor_timeout_seconds=env.float("TESSERA_PAYMENT_PROCESSOR_TIMEOUT_SECONDS", 10.0,
                                                        minimum=0.01),
            payment_processor_max_attempts=env.int("TESSERA_PAYMENT_PROCESSOR_MAX_ATTEMPTS", 3, minimum=1,
                                                   maximum=10),
            payment_processor_retry_backoff_seconds=env.float("TESSERA_PAYMENT_PROCESSOR_RETRY_BACKOFF_SECONDS",
                                                              0.2, minimum=0.0),
            payment_lease_grace_seconds=env.float("TESSERA_PAYMENT_LEASE_GRACE_SECONDS", 5.0, minimum=0.0),
            payment_recovery_seconds=env.float("TESSERA_PAYMENT_RECOVERY_SECONDS", 5.0, minimum=0.05),
        )

    def charge_policy(self) -> ChargePolicy:
        return ChargePolicy(
            timeout_seconds=self.payment_processor_timeout_seconds,
            max_attempts=self.payment_processor_max_attempts,
            retry_backoff_seconds=self.payment_processor_retry_backoff_seconds,
            lease_grace_seconds=self.payment_lease_grace_seconds,
        )


SETTINGS = PaymentSettings


async def build(settings: ServiceSettings, *, migrate: bool = True) -> ServiceModule:
    settings = PaymentSettings.of(settings)  # plain ServiceSettings: the payment defaults apply
    db = Database(settings.database_url, pool_size=settings.database_pool_size)

    def unit_of_work() -> PaymentUnitOfWork:
        return PaymentUnitOfWork(db)

    policy = settings.charge_policy()
    processing = Processing(processor=SandboxProcessor(db), policy=policy, inflight=InFlight())
    recovery = PaymentRecovery(unit_of_work, processing, settings.payment_recovery_seconds)

    async def start() -> None:
        if migrate:
            await upgrade_async(MIGRATIONS, settings.database_url)
        recovery.start()

    async def finish_in_flight() -> None:
        # Charges whose callers went away still complete and are recorded before the database closes.
        await processing.inflight.drain(policy.timeout_seconds + policy.lookup_timeout_seconds)

    servicer = PaymentServicer(unit_of_work, processing)
    module = ServiceModule(
        service_names=(SERVICE_NAME,),
        register=lambda server: payment_service_pb2_grpc.add_PaymentServiceServicer_to_server(servicer, server),
        domain=DOMAIN,
        readiness_checks=(db.ping,),
        on_start=(start,),
        on_stop=(db.dispose, recovery.stop, finish_in_flight),  # run in reverse order
    )
    attach_outbox_relay(module, db, outbox, settings)
    return module
