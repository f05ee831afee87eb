"""Messaging settings: the events exchange, the outbox relay and consumers, read once from TESSERA_* variables."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any, TypeVar

from tessera_runtime.config import ConfigError, Env, ServiceSettings
from tessera_runtime.messaging.topology import CLASSIC, QUEUE_TYPE_VARIABLE, QUEUE_TYPES

DEFAULT_EXCHANGE = "tessera.events"
DEFAULT_RETRY_DELAYS = (1.0, 5.0, 30.0, 120.0)
# A retry waits in its queue as a per-message TTL in milliseconds. RabbitMQ takes at most ten years of them and
# closes the channel of a publish asking for more, so a longer delay would send the failed message straight back,
# again and again.
MAX_RETRY_DELAY_SECONDS = 315_360_000  # 3650 days


def _delays(env: Env, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
    raw = env.optional_str(name)
    if raw is None:
        return default
    try:
        values = tuple(float(part) for part in raw.split(","))
    except ValueError:
        raise ConfigError(f"{name} must be comma-separated seconds such as 1,5,30, got {raw!r}") from None
    if not values or any(not 0 < v < math.inf for v in values):  # nan fails the comparison too
        raise ConfigError(f"{name} must list positive seconds, got {raw!r}")
    if max(values) > MAX_RETRY_DELAY_SECONDS:
        raise ConfigError(f"{name} must list at most {MAX_RETRY_DELAY_SECONDS} seconds (ten years) per delay, "
                          f"got {raw!r}")
    return values


def _exchange(env: Env, name: str) -> str:
    value = env.str(name, DEFAULT_EXCHANGE)
    # 200 bytes leave room for the ".dead-letter" of its dead-letter exchange in AMQP's 255-byte names.
    if len(value.encode()) > 200 or not value.isprintable() or " " in value:
        raise ConfigError(f"{name} must be an exchange name without spaces, at most 200 bytes, got {value!r}")
    if value.startswith("amq."):  # RabbitMQ refuses to declare those (403)
        raise ConfigError(f"{name} must not start with amq., which the broker reserves, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class MessagingSettings:
    """How a service publishes its outbox and consumes events. Defaults suit `make run`."""

    events_exchange: str = DEFAULT_EXCHANGE
    outbox_relay: bool = True
    outbox_batch_size: int = 500
    outbox_poll_seconds: float = 1.0
    # After a commit wakes the relay, it waits this long before its pass, so that the commits of a busy service
    # share one pass (one read, one confirm wait, one mark) instead of paying for one each.
    outbox_gather_seconds: float = 0.005
    outbox_confirm_timeout_seconds: float = 30.0
    # Published rows are deleted after this long; 0 keeps them forever.
    outbox_retention_hours: float = 168.0
    # The relay's log of what it published: "each" event on a line of its own, or one line per confirmed "batch"
    # listing the event ids (a backlog drains faster: a line costs about as much CPU as publishing its event).
    outbox_published_log: str = "each"
    consumer_prefetch: int = 32
    consumer_concurrency: int = 4
    consumer_max_attempts: int = 5
    consumer_retry_delays: tuple[float, ...] = DEFAULT_RETRY_DELAYS
    # Processed event ids are forgotten after this long (0 keeps them): longer than any redelivery takes.
    processed_events_retention_hours: float = 720.0
    reconnect_max_seconds: float = 30.0
    # The type of the consumer, retry and dead-letter queues every publisher and consumer of the exchange declares:
    # "classic", or "quorum" (at-least-once dead-lettering; existing classic queues need `tessera queues migrate`).
    queue_type: str = CLASSIC

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | Env | None = None) -> MessagingSettings:
        env = environ if isinstance(environ, Env) else Env(environ)
        settings = cls(
            events_exchange=_exchange(env, "TESSERA_EVENTS_EXCHANGE"),
            outbox_relay=env.bool("TESSERA_OUTBOX_RELAY", True),
            outbox_batch_size=env.int("TESSERA_OUTBOX_BATCH_SIZE", 500, minimum=1, maximum=10_000),
            outbox_poll_seconds=env.float("TESSERA_OUTBOX_POLL_SECONDS", 1.0, minimum=0.01),
            outbox_gather_seconds=env.float("TESSERA_OUTBOX_GATHER_MS", 5.0, minimum=0.0) / 1000,
            outbox_confirm_timeout_seconds=env.float("TESSERA_OUTBOX_CONFIRM_TIMEOUT_SECONDS", 30.0, minimum=0.1),
            outbox_retention_hours=env.float("TESSERA_OUTBOX_RETENTION_HOURS", 168.0, minimum=0.0),
            outbox_published_log=env.choice("TESSERA_OUTBOX_PUBLISHED_LOG", "each", ("each", "batch")),
            consumer_prefetch=env.int("TESSERA_CONSUMER_PREFETCH", 32, minimum=1, maximum=10_000),
            consumer_concurrency=env.int("TESSERA_CONSUMER_CONCURRENCY", 4, minimum=1, maximum=256),
            consumer_max_attempts=env.int("TESSERA_CONSUMER_MAX_ATTEMPTS", 5, minimum=1, maximum=100),
            consumer_retry_delays=_delays(env, "TESSERA_CONSUMER_RETRY_DELAYS", DEFAULT_RETRY_DELAYS),
            processed_events_retention_hours=env.float("TESSERA_PROCESSED_EVENTS_RETENTION_HOURS", 720.0,
                                                       minimum=0.0),
            reconnect_max_seconds=env.float("TESSERA_AMQP_RECONNECT_MAX_SECONDS", 30.0, minimum=0.1),
            queue_type=env.choice(QUEUE_TYPE_VARIABLE, CLASSIC, QUEUE_TYPES),
        )
        if settings.consumer_concurrency > settings.consumer_prefetch:
            raise ConfigError("TESSERA_CONSUMER_CONCURRENCY must not exceed TESSERA_CONSUMER_PREFETCH, got "
                              f"{settings.consumer_concurrency} > {settings.consumer_prefetch}")
        return settings

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait before attempt + 1 after attempt failed (attempts count from 1)."""
        return self.consumer_retry_delays[min(attempt, len(self.consumer_retry_delays)) - 1]


S = TypeVar("S", bound="MessagingServiceSettings")


@dataclasses.dataclass(frozen=True)
class MessagingServiceSettings(ServiceSettings):
    """ServiceSettings plus `messaging`: the settings class of services that publish or consume events."""

    messaging: MessagingSettings

    @classmethod
    def extra_from_env(cls, env: Env) -> dict[str, Any]:
        return {"messaging": MessagingSettings.from_env(env)}

    @classmethod
    def of(cls: type[S], settings: ServiceSettings) -> S:
        """`settings` as this class: as they are when they already are, else their common values with the
        messaging settings they carry (or the environment's) and this class's defaults for the rest."""
        if isinstance(settings, cls):
            return settings
        common = {f.name: getattr(settings, f.name) for f in dataclasses.fields(ServiceSettings)}
        return cls(**common, messaging=messaging_settings(settings))


def messaging_settings(settings: object) -> MessagingSettings:
    """The messaging part of a service's settings; read from the environment when its class has none."""
    found = getattr(settings, "messaging", None)
    if isinstance(found, MessagingSettings):
        return found
    return MessagingSettings.from_env(os.environ)
