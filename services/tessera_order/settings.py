"""Settings of the order service: the other services' addresses, the saga's retries, leases and recovery."""

from __future__ import annotations

import dataclasses
from typing import Any

from tessera_order.domain.model import StepName
from tessera_runtime.config import ConfigError, Env
from tessera_runtime.discovery.model import service_address
from tessera_runtime.messaging import MessagingServiceSettings

# Points at which TESSERA_ORDER_CRASH_AFTER_STEP may stop the process: after a step's outcome (success or
# failure) is committed, or after a compensation's outcome is committed ("<STEP>_COMPENSATED").
CRASH_POINTS = (
    StepName.CREATE_ORDER.value,
    *(s.value for s in (StepName.RESERVE_STOCK, StepName.PROCESS_PAYMENT, StepName.CONFIRM_ORDER)),
    *(f"{s.value}_COMPENSATED" for s in (StepName.RESERVE_STOCK, StepName.PROCESS_PAYMENT, StepName.CONFIRM_ORDER)),
)


@dataclasses.dataclass(frozen=True)
class OrderSettings(MessagingServiceSettings):
    """The common and messaging settings plus the order service's own (TESSERA_ORDER_* and the addresses)."""

    user_service_addr: str
    inventory_service_addr: str
    payment_service_addr: str
    payment_deadline_seconds: float
    reservation_ttl_seconds: int
    step_max_attempts: int
    compensation_max_attempts: int
    retry_initial_backoff_seconds: float
    retry_max_backoff_seconds: float
    saga_lease_seconds: float
    recovery_enabled: bool
    recovery_interval_seconds: float
    recovery_batch_size: int
    recovery_concurrency: int
    # Fault injection for crash-recovery tests: the process exits at once (as if killed) right after the named
    # saga point is committed. Unset in normal operation; refused in production.
    crash_after_step: str | None

    @classmethod
    def extra_from_env(cls, env: Env) -> dict[str, Any]:
        p = "TESSERA_ORDER_"
        values: dict[str, Any] = super().extra_from_env(env)
        values.update(
            user_service_addr=service_address(env, "TESSERA_USER_SERVICE_ADDR", "127.0.0.1:50051"),
            inventory_service_addr=service_address(env, "TESSERA_INVENTORY_SERVICE_ADDR", "127.0.0.1:50052"),
            payment_service_addr=service_address(env, "TESSERA_PAYMENT_SERVICE_ADDR", "127.0.0.1:50053"),
            payment_deadline_seconds=env.float(f"{p}PAYMENT_DEADLINE_SECONDS", 10.0, minimum=0.1),
            reservation_ttl_seconds=env.int(f"{p}RESERVATION_TTL_SECONDS", 900, minimum=60, maximum=86400),
            step_max_attempts=env.int(f"{p}STEP_MAX_ATTEMPTS", 4, minimum=1, maximum=100),
            compensation_max_attempts=env.int(f"{p}COMPENSATION_MAX_ATTEMPTS", 12, minimum=1, maximum=1000),
            retry_initial_backoff_seconds=env.float(f"{p}RETRY_INITIAL_BACKOFF_SECONDS", 0.2, minimum=0.0),
            retry_max_backoff_seconds=env.float(f"{p}RETRY_MAX_BACKOFF_SECONDS", 10.0, minimum=0.0),
            saga_lease_seconds=env.float(f"{p}SAGA_LEASE_SECONDS", 30.0, minimum=0.5),
            recovery_enabled=env.bool(f"{p}RECOVERY_ENABLED", True),
            recovery_interval_seconds=env.float(f"{p}RECOVERY_INTERVAL_SECONDS", 10.0, minimum=0.05),
            recovery_batch_size=env.int(f"{p}RECOVERY_BATCH_SIZE", 50, minimum=1, maximum=10000),
            recovery_concurrency=env.int(f"{p}RECOVERY_CONCURRENCY", 4, minimum=1, maximum=256),
            crash_after_step=env.optional_str(f"{p}CRASH_AFTER_STEP"),
        )
        if values["retry_max_backoff_seconds"] < values["retry_initial_backoff_seconds"]:
            raise ConfigError(f"{p}RETRY_MAX_BACKOFF_SECONDS must be >= {p}RETRY_INITIAL_BACKOFF_SECONDS")
        crash = values["crash_after_step"]
        if crash is not None:
            if crash not in CRASH_POINTS:
                raise ConfigError(f"{p}CRASH_AFTER_STEP must be one of {', '.join(CRASH_POINTS)}, got {crash!r}")
            if env.choice("TESSERA_ENV", "dev", ("dev", "test", "production")) == "production":
                raise ConfigError(f"{p}CRASH_AFTER_STEP is a test-only fault injection and is refused in production")
        return values
