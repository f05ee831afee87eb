"""Service discovery without a mesh: instances registered in a static list, a shared directory or a PostgreSQL
database, discovered while
their gRPC health answers SERVING, and each call balanced over them (round robin or smooth weighted round robin).

Opt-in, per dependency, through its address (TESSERA_<NAME>_SERVICE_ADDR):

| address | instances |
|---|---|
| `host:port`, `dns:///name:port` (the default) | what gRPC's resolver finds; no discovery, as before |
| `static:///h1:p1;weight=3,h2:p2` | the listed ones, weight 1 unless given (1-1000) |
| `registry` or `registry:///<service>` | those registered in TESSERA_REGISTRY_DIR or TESSERA_REGISTRY_URL |

A server registers itself in the registry (TESSERA_REGISTRY_DIR, one host's directory, or TESSERA_REGISTRY_URL, a
PostgreSQL database several hosts share) once it serves, with TESSERA_INSTANCE_WEIGHT and its version, renews its
registration every check interval, and deregisters first thing on a graceful stop. In Kubernetes none of this is
used: DNS and Istio route and weigh the traffic (`tessera traffic`)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import grpc

from tessera_runtime.discovery.balancing import RoundRobinLoadBalancer, WeightedRoundRobinLoadBalancer
from tessera_runtime.discovery.channel import BalancedChannel, HealthFilteredDiscovery, no_healthy_instance
from tessera_runtime.discovery.model import (
    REGISTRY_SCHEME,
    STATIC_SCHEME,
    DiscoverySettings,
    ServiceInstance,
    instance_id,
    is_discovery_target,
    parse_static,
    service_address,
)
from tessera_runtime.discovery.registry import (
    FileRegistry,
    InMemoryRegistry,
    Registration,
    RegistryUnavailable,
    ServiceRegistry,
)

__all__ = [
    "BalancedChannel", "DiscoverySettings", "FileRegistry", "HealthFilteredDiscovery", "InMemoryRegistry",
    "Registration", "RegistryUnavailable", "RoundRobinLoadBalancer", "ServiceInstance", "ServiceRegistry",
    "WeightedRoundRobinLoadBalancer", "balanced_channel", "is_discovery_target", "no_healthy_instance",
    "open_registry", "registration", "service_address",
]


def open_registry(settings: DiscoverySettings, *, read_only: bool = False) -> ServiceRegistry | None:
    """The registry the settings name (a directory, or a PostgreSQL database), or None when there is none. Nothing
    connects until it is used; its owner closes it. A `read_only` one deletes no stale row as it lists them."""
    if settings.registry_url is not None:
        from tessera_runtime.discovery.postgres import PostgresRegistry  # SQLAlchemy only where it is used

        return PostgresRegistry(settings.registry_url, stale_after=settings.deregister_after_seconds,
                                read_only=read_only)
    if settings.registry_dir is not None:
        return FileRegistry(settings.registry_dir)
    return None


def balanced_channel(address: str, settings: DiscoverySettings, interceptors: Sequence[grpc.aio.ClientInterceptor],
                     channel_options: Sequence[tuple[str, Any]] = ()) -> BalancedChannel:
    """The channel of a discovery address (see the module's table); `name` in metrics, logs and errors is the
    address, as a fixed address's is."""
    if address.startswith(STATIC_SCHEME):
        service = address
        registry: ServiceRegistry = InMemoryRegistry(parse_static(address, service, address))
    elif address.startswith(REGISTRY_SCHEME):
        opened = open_registry(settings)
        if opened is None:
            raise ValueError(f"{address} needs a registry: TESSERA_REGISTRY_DIR or TESSERA_REGISTRY_URL")
        service = address[len(REGISTRY_SCHEME):]
        registry = opened
    else:
        raise ValueError(f"{address!r} is no discovery address")
    discovery = HealthFilteredDiscovery(address, service, registry, settings, channel_options)
    return BalancedChannel(address, discovery, interceptors)


def registration(settings: DiscoverySettings, service: str, grpc_host: str, port: int, *,
                 ready: Any, metadata: dict[str, str] | None = None) -> Registration | None:
    """The registration of a server of `service` bound to `port`, when a registry is configured."""
    registry = open_registry(settings)
    if registry is None:
        return None
    host = settings.advertised_host(grpc_host)
    pid = os.getpid()
    instance = ServiceInstance(
        id=instance_id(service, host, port, pid), service=service, host=host, port=port,
        weight=settings.instance_weight,
        metadata={"version": settings.instance_version, "pid": str(pid), **(metadata or {})})
    return Registration(registry, [instance], ready=ready, interval=settings.check_seconds,
                        location=settings.registry_location)
