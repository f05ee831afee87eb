"""Service instances, the discovery settings, and the address forms that select discovery."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tessera_runtime.config import ConfigError, Env

STATIC_SCHEME = "static:///"
REGISTRY_SCHEME = "registry:///"
# The short form of REGISTRY_SCHEME in a TESSERA_<NAME>_SERVICE_ADDR: the service is the one the variable names.
REGISTRY_SHORT = "registry"
MAX_WEIGHT = 1000
# Service names and instance ids become file names in the registry directory.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
_SERVICE_ADDR = re.compile(r"^TESSERA_([A-Z0-9_]+)_SERVICE_ADDR$")
REGISTRY_VARIABLES = ("TESSERA_REGISTRY_DIR", "TESSERA_REGISTRY_URL")
_POSTGRES_SCHEMES = ("postgresql", "postgres", "postgresql+asyncpg")


def registry_url(value: str, name: str) -> str:
    """The SQLAlchemy URL (postgresql+asyncpg://) of a PostgreSQL registry given as postgresql://, postgres:// or
    postgresql+asyncpg://; a ConfigError naming the variable or option `name` otherwise."""
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(value)
        if parsed.port is not None and not 0 < parsed.port < 65536:
            raise ValueError(f"port must be 1-65535, got {parsed.port}")
    except Exception as exc:  # ArgumentError, ValueError: what the engine would fail on when it connects
        raise ConfigError(f"{name} is not a valid URL: {exc}") from None
    if parsed.drivername not in _POSTGRES_SCHEMES:
        raise ConfigError(f"{name} must be postgresql://user@host:port/database, got scheme {parsed.drivername!r}")
    if not parsed.database:
        raise ConfigError(f"{name} must name the registry's database, as postgresql://user@host:port/database")
    return parsed.set(drivername="postgresql+asyncpg").render_as_string(hide_password=False)


def valid_name(name: str) -> bool:
    return bool(_NAME.match(name))


def join_host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclasses.dataclass(frozen=True)
class ServiceInstance:
    """One running instance of a service: where it listens, its weight among the service's instances, the gRPC
    health service name its health is checked with ("" is the server's readiness) and free-form metadata
    (version, pid, ...)."""

    id: str
    service: str
    host: str
    port: int
    weight: int = 1
    health_check: str = ""
    metadata: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @property
    def address(self) -> str:
        return join_host_port(self.host, self.port)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "service": self.service, "host": self.host, "port": self.port,
                "weight": self.weight, "health_check": self.health_check, "metadata": dict(self.metadata)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServiceInstance:
        """An instance from its registration; ValueError when a field is missing or of the wrong kind."""
        try:
            instance = cls(id=str(data["id"]), service=str(data["service"]), host=str(data["host"]),
                           port=int(data["port"]), weight=int(data.get("weight", 1)),
                           health_check=str(data.get("health_check", "")),
                           metadata={str(k): str(v) for k, v in dict(data.get("metadata") or {}).items()})
        except (KeyError, TypeError, ValueError) as exc:  # a field missing, or a port or weight that is no number
            raise ValueError(f"not a service instance: {exc}") from None
        if not (0 < instance.port < 65536 and 1 <= instance.weight <= MAX_WEIGHT and instance.host):
            raise ValueError(f"not a service instance: port {instance.port}, weight {instance.weight}")
        return instance


def _host_port(text: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port'; ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("must be host:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 host goes in brackets, as [::1]:50052")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port must be 1-65535, got {port!r}")
    return host, int(port)


def parse_static(variable: str, service: str, value: str) -> tuple[ServiceInstance, ...]:
    """The instances of `static:///host:port[;weight=N],host:port...`; ConfigError naming `variable`."""
    body = value[len(STATIC_SCHEME):]
    if not body.strip():
        raise ConfigError(f"{variable} lists no instance: write {STATIC_SCHEME}host:port[;weight=N],host:port...")
    instances: list[ServiceInstance] = []
    for number, entry in enumerate(body.split(","), start=1):
        address, *options = [part.strip() for part in entry.split(";")]
        try:
            host, port = _host_port(address)
        except ValueError as exc:
            raise ConfigError(f"{variable}: instance {number} {address!r} {exc}") from None
        weight = 1
        for option in options:
            key, sep, raw = option.partition("=")
            if key != "weight" or not sep:
                raise ConfigError(f"{variable}: instance {number} {address!r} has an unknown option {option!r}; "
                                  f"the only one is weight=N")
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_WEIGHT:
                raise ConfigError(f"{variable}: instance {number} {address!r} weight must be 1-{MAX_WEIGHT}, "
                                  f"got {raw!r}")
            weight = int(raw)
        instance = ServiceInstance(id=join_host_port(host, port), service=service, host=host, port=port,
                                   weight=weight, metadata={"source": "static"})
        if any(i.address == instance.address for i in instances):
            raise ConfigError(f"{variable}: instance {number} {instance.address} is listed twice")
        instances.append(instance)
    return tuple(instances)


def is_discovery_target(address: str) -> bool:
    """Whether an address is served by discovery (a static list or the registry) rather than by gRPC's resolver."""
    return address.startswith((STATIC_SCHEME, REGISTRY_SCHEME))


@dataclasses.dataclass(frozen=True)
class DiscoverySettings:
    """Service discovery without a mesh (tessera_runtime.discovery): where the registry is, this instance's
    registration, and how the instances of the services this process calls are checked and balanced."""

    registry_dir: Path | None = None
    # A PostgreSQL database shared by the instances of several hosts (postgresql+asyncpg://...), instead of a
    # directory.
    registry_url: str | None = None
    instance_host: str | None = None
    instance_weight: int = 1
    instance_version: str = "dev"
    check_seconds: float = 1.0
    check_timeout_seconds: float = 1.0
    deregister_after_seconds: float = 30.0
    balancing: str = "weighted_round_robin"

    @classmethod
    def from_env(cls, env: Env) -> DiscoverySettings:
        registry = env.optional_str("TESSERA_REGISTRY_DIR")
        url = env.optional_str("TESSERA_REGISTRY_URL")
        if registry and url:
            raise ConfigError("TESSERA_REGISTRY_DIR and TESSERA_REGISTRY_URL are both set: the registry is one "
                              "host's directory or a PostgreSQL database, set only one of them")
        settings = cls(
            registry_dir=Path(registry) if registry else None,
            registry_url=registry_url(url, "TESSERA_REGISTRY_URL") if url else None,
            instance_host=env.optional_str("TESSERA_INSTANCE_HOST"),
            instance_weight=env.int("TESSERA_INSTANCE_WEIGHT", 1, minimum=1, maximum=MAX_WEIGHT),
            instance_version=env.str("TESSERA_INSTANCE_VERSION", "dev"),
            check_seconds=env.float("TESSERA_REGISTRY_CHECK_SECONDS", 1.0, minimum=0.05, maximum=3600.0),
            check_timeout_seconds=env.float("TESSERA_REGISTRY_CHECK_TIMEOUT_SECONDS", 1.0, minimum=0.01,
                                            maximum=60.0),
            deregister_after_seconds=env.float("TESSERA_REGISTRY_DEREGISTER_AFTER_SECONDS", 30.0, minimum=0.1),
            balancing=env.choice("TESSERA_LOAD_BALANCING", "weighted_round_robin",
                                 ("weighted_round_robin", "round_robin")),
        )
        if settings.registry_dir is not None and settings.registry_dir.exists() \
                and not settings.registry_dir.is_dir():
            raise ConfigError(f"TESSERA_REGISTRY_DIR must be a directory, got the file {registry!r}")
        if settings.registry_url is not None and settings.check_seconds * 2 > settings.deregister_after_seconds:
            # Instances heartbeat every check interval; a row not renewed for deregister-after is a crashed host's.
            raise ConfigError(
                f"TESSERA_REGISTRY_CHECK_SECONDS ({settings.check_seconds:g}) must be at most half of "
                f"TESSERA_REGISTRY_DEREGISTER_AFTER_SECONDS ({settings.deregister_after_seconds:g}) with "
                f"TESSERA_REGISTRY_URL: a live instance's heartbeat would look stale between two renewals")
        return settings

    @property
    def registry_location(self) -> str:
        """Where the registry is, for logs: the directory, or the database without user or password."""
        if self.registry_url is not None:
            from tessera_runtime.db import database_location

            return database_location(self.registry_url)
        return str(self.registry_dir)

    def advertised_host(self, grpc_host: str) -> str:
        """The host this instance registers: TESSERA_INSTANCE_HOST, else the host it listens on (a wildcard
        listener registers 127.0.0.1, which only callers on the same host reach: with a registry shared by several
        hosts, set TESSERA_INSTANCE_HOST)."""
        if self.instance_host:
            return self.instance_host
        return "127.0.0.1" if grpc_host in _WILDCARD_HOSTS else grpc_host


def service_address(env: Env, variable: str, default: str) -> str:
    """The address of another service from `variable` (TESSERA_<NAME>_SERVICE_ADDR): a gRPC target as today
    (`host:port`, `dns:///name:port`), `static:///host:port[;weight=N],...`, or `registry` /
    `registry:///<service>` to discover it in the registry (TESSERA_REGISTRY_DIR or TESSERA_REGISTRY_URL). Checked
    now, so a bad value stops the process at start with a message naming the variable; `registry` comes back as `registry:///<service>`."""
    value = env.str(variable, default).strip()
    if value.startswith(STATIC_SCHEME):
        parse_static(variable, variable, value)
        return value
    if value == REGISTRY_SHORT or value.startswith(REGISTRY_SCHEME):
        if value == REGISTRY_SHORT:
            named = _SERVICE_ADDR.match(variable)
            if named is None:
                raise ConfigError(f"{variable}=registry names no service: write {REGISTRY_SCHEME}<service>")
            service = named.group(1).lower()
        else:
            service = value[len(REGISTRY_SCHEME):]
        if not valid_name(service):
            raise ConfigError(f"{variable}: {service!r} is no service name (letters, digits, '.', '_', '-')")
        if not any(env.optional_str(name) for name in REGISTRY_VARIABLES):
            raise ConfigError(f"{variable}={value} needs a registry: TESSERA_REGISTRY_DIR (one host's directory) "
                              f"or TESSERA_REGISTRY_URL (a PostgreSQL database)")
        return f"{REGISTRY_SCHEME}{service}"
    if value.startswith(("static:", "registry:")):
        raise ConfigError(f"{variable} must be {STATIC_SCHEME}host:port[;weight=N],... or "
                          f"{REGISTRY_SCHEME}<service>, got {value!r}")
    return value


def instance_id(service: str, host: str, port: int, pid: int) -> str:
    """An id naming the process (one port may be served by several worker processes, each registered)."""
    safe_host = re.sub(r"[^A-Za-z0-9.-]", "_", host) or "host"
    return f"{service}-{safe_host}-{port}-{pid}"
