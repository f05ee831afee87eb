"""`tessera registry list`: the instances registered in TESSERA_REGISTRY_DIR, each with its health and weight."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tessera_runtime.discovery.model import ServiceInstance
from tessera_runtime.discovery.registry import FileRegistry


async def health_of(instance: ServiceInstance, timeout: float) -> str:
    """SERVING, NOT_SERVING (or another status the instance gave), or UNREACHABLE (<gRPC code>)."""
    async with grpc.aio.insecure_channel(instance.address) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=instance.health_check), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            return f"UNREACHABLE ({err.code().name})"
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


async def _list(registry: FileRegistry, service: str | None, timeout: float) -> list[list[str]]:
    services = [service] if service else await registry.services()
    instances = [i for name in services for i in await registry.instances(name)]
    healths = await asyncio.gather(*(health_of(i, timeout) for i in instances))
    return [[i.service, i.address, str(i.weight), health, i.metadata.get("version", ""), i.id]
            for i, health in zip(instances, healths, strict=True)]


def _run(args: argparse.Namespace) -> int:
    directory = args.dir or os.environ.get("TESSERA_REGISTRY_DIR")
    if not directory:
        print("tessera registry: no registry: set TESSERA_REGISTRY_DIR or pass --dir", file=sys.stderr)
        return 2
    rows = asyncio.run(_list(FileRegistry(Path(directory)), args.service, args.timeout))
    if not rows:
        print(f"no instance registered in {directory}" + (f" for {args.service}" if args.service else ""))
        return 0
    table = [["SERVICE", "ADDRESS", "WEIGHT", "HEALTH", "VERSION", "INSTANCE"], *rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "registry", help="the service registry of deployments without a mesh (TESSERA_REGISTRY_DIR)",
        description="Instances that registered themselves in the registry directory as they started.")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="every registered instance with its gRPC health and weight")
    listing.add_argument("--dir", help="the registry directory (default: $TESSERA_REGISTRY_DIR)")
    listing.add_argument("--service", help="only this service's instances (e.g. inventory)")
    listing.add_argument("--timeout", type=float, default=1.0, help="seconds each health check may take")
    listing.set_defaults(func=_run)
