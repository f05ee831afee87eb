"""The deployment catalog: every workload, its ports and callers, and its gRPC methods read from the contracts."""

from __future__ import annotations

import dataclasses
import enum
from functools import cache
from pathlib import Path

from google.protobuf import descriptor_pb2

from tessera_deploy import ROOT
from tessera_runtime.devstack import PORTS

NAMESPACE = "tessera"
TRUST_DOMAIN = "cluster.local"
DESCRIPTOR_SET = ROOT / "gen" / "descriptors" / "tessera.pb"
METRICS_PORT = 9090
GATEWAY = "tessera-gateway"
GATEWAY_PORT = 8080
# The Istio ingress gateway forwards edge traffic to the Envoy gateway; its identity is Istio's, not ours.
INGRESS_PRINCIPAL = f"{TRUST_DOMAIN}/ns/istio-system/sa/istio-ingressgateway-service-account"


class Retry(enum.Enum):
    """How a method may be retried by the mesh, from its contract's idempotency_level."""

    READ = "read"  # NO_SIDE_EFFECTS
    IDEMPOTENT = "idempotent"  # IDEMPOTENT: repeating it changes nothing more
    NONE = "unsafe"  # unmarked: a repeat could act twice, so the mesh never repeats it


_LEVELS = {
    descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS: Retry.READ,
    descriptor_pb2.MethodOptions.IDEMPOTENT: Retry.IDEMPOTENT,
    descriptor_pb2.MethodOptions.IDEMPOTENCY_UNKNOWN: Retry.NONE,
}


@dataclasses.dataclass(frozen=True)
class Method:
    path: str  # /tessera.user.v1.UserService/GetUser
    retry: Retry


@dataclasses.dataclass(frozen=True)
class Grant:
    """What one caller may call on a workload: gRPC paths, each a method or a whole service (`/pkg.Service/*`)."""

    caller: str  # the caller's workload name, which is also its ServiceAccount (its mesh identity)
    paths: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Workload:
    """One Tessera service as it runs in the cluster."""

    name: str  # short name: user
    grpc_port: int
    grants: tuple[Grant, ...]  # who may call it, and what
    grpc_services: tuple[str, ...] = ()
    methods: tuple[Method, ...] = ()

    @property
    def callers(self) -> tuple[str, ...]:
        """Workload names (Kubernetes names) allowed to call it."""
        return tuple(g.caller for g in self.grants)

    @property
    def k8s_name(self) -> str:
        return f"{self.name}-service"

    @property
    def host(self) -> str:
        return f"{self.k8s_name}.{NAMESPACE}.svc.cluster.local"

    @property
    def proto_package(self) -> str:
        return f"tessera.{self.name}.v1"


def principal(service_account: str, namespace: str = NAMESPACE) -> str:
    return f"{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


# Who calls whom, method by method. The gateway fronts the public API of every service (REST and gRPC), so it may
# call any method of their contract services; a service that calls another may call exactly the methods it uses.
# Only the order saga calls other services; notification only consumes events. The list is what the code calls:
# tests/integration/test_k8s_authorization.py holds it equal to the stub methods each service's code calls.
SERVICE_CALLS: dict[str, tuple[str, ...]] = {
    "order-service": (
        "/tessera.user.v1.UserService/GetUser",
        "/tessera.inventory.v1.InventoryService/BatchGetProducts",
        "/tessera.inventory.v1.InventoryService/ReserveStock",
        "/tessera.inventory.v1.InventoryService/CommitReservation",
        "/tessera.inventory.v1.InventoryService/ReleaseReservation",
        "/tessera.payment.v1.PaymentService/ProcessPayment",
        "/tessera.payment.v1.PaymentService/RefundPayment",
        "/tessera.payment.v1.PaymentService/ListPayments",
    ),
}
# Every service can run a v2 canary beside v1: k8s/components/canary-<name>-v2 (Deployment, v2 subset, canary
# routes) and the overlay k8s/overlays/canary-<name> that adds it to prod; `tessera traffic` moves its weights.
CANARIES: tuple[str, ...] = tuple(PORTS)


def read_descriptor_set(path: Path = DESCRIPTOR_SET) -> descriptor_pb2.FileDescriptorSet:
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `make gen` first")
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(path.read_bytes())
    return fds


@cache
def workloads(descriptor_set: Path = DESCRIPTOR_SET) -> tuple[Workload, ...]:
    """Every service workload, with its gRPC services and methods as the contracts define them."""
    fds = read_descriptor_set(descriptor_set)
    services: dict[str, list[str]] = {}
    methods: dict[str, list[Method]] = {}
    for file in fds.file:
        for service in file.service:
            full = f"{file.package}.{service.name}"
            services.setdefault(file.package, []).append(full)
            for m in service.method:
                methods.setdefault(file.package, []).append(
                    Method(f"/{full}/{m.name}", _LEVELS[m.options.idempotency_level]))
    known = {m.path for ms in methods.values() for m in ms}
    for caller, paths in SERVICE_CALLS.items():
        for path in paths:
            if path not in known:
                raise LookupError(f"SERVICE_CALLS[{caller!r}] lists {path}, which no contract in {descriptor_set} "
                                  "defines")
    result = []
    # The gRPC ports are those of `make run` (tessera_runtime.devstack), so addresses read the same everywhere.
    for name, port in PORTS.items():
        package = f"tessera.{name}.v1"
        if package not in services:
            raise LookupError(f"no gRPC service in package {package} in {descriptor_set}")
        grpc_services = tuple(sorted(services[package]))
        grants = [Grant(GATEWAY, tuple(f"/{s}/*" for s in grpc_services))]
        for caller, paths in SERVICE_CALLS.items():
            mine = tuple(p for p in paths if p.split("/")[1] in grpc_services)
            if mine:
                grants.append(Grant(caller, mine))
        result.append(Workload(name=name, grpc_port=port, grants=tuple(grants), grpc_services=grpc_services,
                               methods=tuple(methods[package])))
    return tuple(result)


def workload(name: str) -> Workload:
    for w in workloads():
        if name in (w.name, w.k8s_name):
            return w
    known = ", ".join(w.k8s_name for w in workloads())
    raise LookupError(f"unknown service {name!r}; known: {known}")
