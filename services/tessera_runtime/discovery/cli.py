"""`tessera registry list`: the instances registered in the registry (TESSERA_REGISTRY_DIR or TESSERA_REGISTRY_URL),
each with its health and weight."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera_runtime.config import ConfigError, Env
from tessera_runtime.discovery import open_registry
from tessera_runtime.discovery.model import DiscoverySettings, ServiceInstance, registry_url
from tessera_runtime.discovery.registry import RegistryUnavailable, ServiceRegistry


async def health_of(instance: ServiceInstance, timeout: float) -> str:
    """SERVING, NOT_SERVING (or another status the instance gave), or UNREACHABLE (<gRPC code>)."""
    async with grpc.aio.insecure_channel(instance.address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=instance.health_check), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            return f"UNREACHABLE ({err.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def _list(registry: ServiceRegistry, service: str | None, timeout: float) -> list[list[str]]:
    try:
        services = [service] if service else await registry.services()
        instances = [i for name in services for i in await registry.instances(name)]
    finally:
        await registry.close()
    healths = await asyncio.gather(*(health_of(i, timeout) for i in instances))
    return [[i.service, i.address, str(i.weight), health, i.metadata.get("version", ""), i.id]
            for i, health in zip(instances, healths, strict=True)]


def _settings(args: argparse.Namespace) -> DiscoverySettings:
    """The registry of --dir or --url, else of the environment; ConfigError naming the option or variable."""
    if args.dir and args.url:
        raise ConfigError("--dir and --url both name a registry: pass only one of them")
    if args.url:
        return DiscoverySettings(registry_url=registry_url(args.url, "--url"))
    if args.dir:
        return DiscoverySettings(registry_dir=Path(args.dir))
    settings = DiscoverySettings.from_env(Env())
    if settings.registry_dir is None and settings.registry_url is None:
        raise ConfigError("no registry: set TESSERA_REGISTRY_DIR or TESSERA_REGISTRY_URL, or pass --dir or --url")
    return settings


def _run(args: argparse.Namespace) -> int:
    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"tessera registry: {exc}", file=sys.stderr)
        return 2
    # Read only: whether a row is stale depends on the services' TESSERA_REGISTRY_DEREGISTER_AFTER_SECONDS, which
    # this command does not know; a row it deleted early would be a live instance its callers drop.
    registry = open_registry(settings, read_only=True)
    assert registry is not None
    # What it has to say (files skipped, the registry unreachable) it prints below, not as bare log messages.
    logger = logging.getLogger("tessera.discovery")
    if not any(isinstance(handler, logging.NullHandler) for handler in logger.handlers):
        logger.addHandler(logging.NullHandler())
    try:
        rows = asyncio.run(_list(registry, args.service, args.timeout))
    except RegistryUnavailable as exc:
        print(f"tessera registry: {exc}", file=sys.stderr)
        return 1
    # Files of a directory registry that are no registration (edited by hand): no caller uses them either.
    for path, why in sorted(getattr(registry, "skipped", {}).items()):
        print(f"tessera registry: {path} skipped: {why}", file=sys.stderr)
    if not rows:
        print(f"no instance registered in {settings.registry_location}"
              + (f" for {args.service}" if args.service else ""))
        return 0
    table = [["SERVICE", "ADDRESS", "WEIGHT", "HEALTH", "VERSION", "INSTANCE"], *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _seconds(text: str) -> float:
    """A health check's deadline: a number of seconds more than 0 (0 or less would show every instance
    UNREACHABLE (DEADLINE_EXCEEDED) without asking it)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds more than 0, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number of seconds more than 0, got {text!r}")
    return value


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "registry", help="the service registry of deployments without a mesh (TESSERA_REGISTRY_DIR or _URL)",
        description="Instances that registered themselves in the registry (a directory, or a PostgreSQL database) "
                    "as they started.")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every registered instance with its gRPC health and weight")
    listing.add_argument("--dir", help="the registry directory (default: $TESSERA_REGISTRY_DIR)")
    listing.add_argument("--url", help="the registry database, postgresql://user@host:port/database "
                                       "(default: $TESSERA_REGISTRY_URL)")
    listing.add_argument("--service", help="only this service's instances (e.g. inventory)")
    listing.add_argument("--timeout", type=_seconds, default=1.0, help="seconds each health check may take")
    listing.set_defaults(func=_run)
