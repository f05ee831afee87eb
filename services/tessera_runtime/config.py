"""Configuration read once from the environment into frozen settings; a bad value stops the service at start."""

from __future__ import annotations

import dataclasses
import math
import os
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pika

if TYPE_CHECKING:
    from tessera_runtime.discovery.model import DiscoverySettings

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DATA_DIR = ROOT / "data"

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration variable is missing or malformed; the message names it."""


DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def check_amqp_url(url: str, name: str) -> str:
    """url when it is a broker URL (amqp:// or amqps:// with a host and a valid port); else a ConfigError naming
    the variable or option it came from."""
    try:
        parsed = urllib.parse.urlsplit(url)
        parsed.port  # noqa: B018  # raises ValueError for a port that is no number or out of range
    except ValueError as exc:
        raise ConfigError(f"{name} is not a valid URL: {exc}") from None
    if parsed.scheme not in ("amqp", "amqps") or not parsed.hostname:
        raise ConfigError(f"{name} must be amqp://user:password@host:port/vhost (or amqps://), "
                          f"got scheme {parsed.scheme!r}")
    try:
        pika.URLParameters(url)  # its query options (heartbeat=, socket_timeout=...), as the relay reads them
    except Exception as exc:  # ValueError, mostly: what the relay and consumers would fail on when they start
        raise ConfigError(f"{name} has an option the broker client refuses: {exc}") from None
    return url


class Env:
    """Typed access to one environment mapping; every error names the variable."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self._environ = os.environ if environ is None else environ

    def str(self, name: str, default: str | None = None) -> str:
        value = self._environ.get(name)
        if value is None or value == "":
            if default is None:
                raise ConfigError(f"{name} is required but not set")
            return default
        return value

    def optional_str(self, name: str) -> str | None:
        value = self._environ.get(name)
        return value or None

    def int(self, name: str, default: int, *, minimum: int | None = None, maximum: int | None = None) -> int:
        raw = self._environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name} must be <= {maximum}, got {value}")
        return value

    def float(self, name: str, default: float, *, minimum: float | None = None,
              maximum: float | None = None) -> float:
        raw = self._environ.get(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not math.isfinite(value):  # "nan", "inf", "1e999": no amount of seconds, of anything
            raise ConfigError(f"{name} must be a finite number, got {raw!r}")
        if minimum is not None and value < minimum:
            raise ConfigError(f"{name} must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ConfigError(f"{name} must be <= {maximum}, got {value}")
        return value

    def bool(self, name: str, default: bool) -> bool:
        raw = self._environ.get(name)
        if raw is None or raw == "":
            return default
        lowered = raw.strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def choice(self, name: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.str(name, default)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        return value


# On PostgreSQL, the connections of a service's engine pool (TESSERA_DATABASE_POOL_SIZE; tessera_runtime.db).
POOL_SIZE = 10
# The circuit breaker of each channel to another service (tessera_runtime.resilience, tessera_runtime.clients):
# consecutive UNAVAILABLE / DEADLINE_EXCEEDED calls that open it, and how long it stays open before a trial call;
# the share of failed calls (percent) over a rolling window that opens it too, once the window holds enough calls.
CIRCUIT_FAILURE_THRESHOLD = 5
CIRCUIT_OPEN_SECONDS = 10.0
CIRCUIT_ERROR_PERCENT = 50
CIRCUIT_WINDOW_SECONDS = 10.0
# Fewer calls than this in the window say too little for a percentage: 2 failures of 3 would be 67 %. Twenty in
# ten seconds (two calls a second) is Hystrix's default volume; a dependency called less than that which is down
# altogether still opens its circuit after CIRCUIT_FAILURE_THRESHOLD consecutive failures.
CIRCUIT_MIN_CALLS = 20


@dataclasses.dataclass(frozen=True)
class CircuitSettings:
    """The circuit breaker of every channel a process opens to another service (tessera_runtime.resilience).
    Read from the same TESSERA_CIRCUIT_* variables by every service and by the GraphQL API."""

    failure_threshold: int = CIRCUIT_FAILURE_THRESHOLD
    open_seconds: float = CIRCUIT_OPEN_SECONDS
    error_percent: int = CIRCUIT_ERROR_PERCENT
    window_seconds: float = CIRCUIT_WINDOW_SECONDS
    min_calls: int = CIRCUIT_MIN_CALLS

    @classmethod
    def from_env(cls, env: Env) -> CircuitSettings:
        # A breaker that opens after no failure, stays open for no time (or for ever), or judges a rate over no
        # time or no calls is no breaker.
        return cls(
            failure_threshold=env.int("TESSERA_CIRCUIT_FAILURE_THRESHOLD", CIRCUIT_FAILURE_THRESHOLD,
                                      minimum=1, maximum=1000),
            open_seconds=env.float("TESSERA_CIRCUIT_OPEN_SECONDS", CIRCUIT_OPEN_SECONDS, minimum=0.01),
            error_percent=env.int("TESSERA_CIRCUIT_ERROR_PERCENT", CIRCUIT_ERROR_PERCENT, minimum=1, maximum=100),
            window_seconds=env.float("TESSERA_CIRCUIT_WINDOW_SECONDS", CIRCUIT_WINDOW_SECONDS,
                                     minimum=1.0, maximum=3600.0),
            min_calls=env.int("TESSERA_CIRCUIT_MIN_CALLS", CIRCUIT_MIN_CALLS, minimum=1, maximum=100_000),
        )


@dataclasses.dataclass(frozen=True)
class ServiceSettings:
    """Settings every Tessera service reads. Service-specific settings extend this class."""

    service: str
    environment: str
    grpc_host: str
    grpc_port: int
    metrics_port: int
    database_url: str
    amqp_url: str
    drain_seconds: float
    grace_seconds: float
    readiness_interval_seconds: float
    log_level: str
    require_identity: bool
    default_deadline_seconds: float
    circuit: CircuitSettings
    workers: int
    database_pool_size: int
    # Service discovery without a mesh (TESSERA_REGISTRY_DIR, TESSERA_INSTANCE_WEIGHT, ...): where this instance
    # registers, and how the instances of the services it calls through the registry are checked and balanced.
    discovery: DiscoverySettings

    @property
    def production(self) -> bool:
        return self.environment == "production"

    @classmethod
    def common_from_env(cls, service: str, default_port: int, env: Env) -> dict[str, Any]:
        prefix = "TESSERA_"
        environment = env.choice(f"{prefix}ENV", "dev", ("dev", "test", "production"))
        data_dir = Path(env.str(f"{prefix}DATA_DIR", str(DEFAULT_DATA_DIR)))
        default_db = f"sqlite+aiosqlite:///{data_dir / (service + '.db')}"
        database_url = env.str(f"{prefix}DATABASE_URL", default_db)
        if not database_url.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ConfigError(
                f"{prefix}DATABASE_URL must start with sqlite+aiosqlite:// or postgresql+asyncpg://, "
                f"got {database_url.split('://')[0]!r}"
            )
        try:
            from sqlalchemy.engine import make_url

            parsed_db = make_url(database_url)
            parsed_db.port  # noqa: B018  # parses the port
        except Exception as exc:  # ArgumentError, ValueError: what the engine would fail on at start
            raise ConfigError(f"{prefix}DATABASE_URL is not a valid URL: {exc}") from None
        if parsed_db.port is not None and not 0 < parsed_db.port < 65536:  # asyncpg would fail with a traceback
            raise ConfigError(f"{prefix}DATABASE_URL has port {parsed_db.port}: a port is 1 to 65535")
        if parsed_db.get_backend_name() == "sqlite" and (parsed_db.host or parsed_db.port):
            raise ConfigError(f"{prefix}DATABASE_URL must name a file as sqlite+aiosqlite:///path/to/file.db, "
                              f"got a host {parsed_db.host!r}")
        amqp_url = check_amqp_url(env.str(f"{prefix}AMQP_URL", DEFAULT_AMQP_URL), f"{prefix}AMQP_URL")
        from tessera_runtime.discovery.model import DiscoverySettings  # the discovery package imports this module

        return dict(
            service=service,
            environment=environment,
            grpc_host=env.str(f"{prefix}GRPC_HOST", "127.0.0.1"),
            grpc_port=env.int(f"{prefix}GRPC_PORT", default_port, minimum=0, maximum=65535),
            metrics_port=env.int(f"{prefix}METRICS_PORT", 0, minimum=0, maximum=65535),
            database_url=database_url,
            amqp_url=amqp_url,
            drain_seconds=env.float(f"{prefix}DRAIN_SECONDS", 2.0, minimum=0.0),
            grace_seconds=env.float(f"{prefix}GRACE_SECONDS", 10.0, minimum=0.0),
            readiness_interval_seconds=env.float(f"{prefix}READINESS_INTERVAL_SECONDS", 1.0, minimum=0.05),
            log_level=env.choice(f"{prefix}LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
            require_identity=env.bool(f"{prefix}REQUIRE_IDENTITY", environment == "production"),
            default_deadline_seconds=env.float(f"{prefix}DEFAULT_DEADLINE_SECONDS", 5.0, minimum=0.01),
            circuit=CircuitSettings.from_env(env),
            workers=env.int(f"{prefix}WORKERS", 1, minimum=1, maximum=64),
            database_pool_size=env.int(f"{prefix}DATABASE_POOL_SIZE", POOL_SIZE, minimum=1, maximum=100),
            discovery=DiscoverySettings.from_env(env),
        )

    @classmethod
    def from_env(cls: type[T], service: str, default_port: int, environ: Mapping[str, str] | None = None) -> T:
        env = Env(environ)
        values = ServiceSettings.common_from_env(service, default_port, env)
        extra = getattr(cls, "extra_from_env", None)
        if extra is not None:
            values.update(extra(env))
        return cls(**values)
