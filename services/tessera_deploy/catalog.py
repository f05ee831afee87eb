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
class Workload:
    """One Tessera service as it runs in the cluster."""

    name: str  # short name: user
    grpc_port: int
    callers: tuple[str, ...]  # workload names (Kubernetes names) allowed to call it
    grpc_services: tuple[str, ...] = ()
    methods: tuple[Method, ...] = ()

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


# Who calls whom: the gateway reaches every service; order orchestrates user, inventory and payment;
# notification only consumes events, so nothing but the gateway (for its read API) calls it.
_CALLERS = {
    "user": (GATEWAY, "order-service"),
    "inventory": (GATEWAY, "order-service"),
    "payment": (GATEWAY, "order-service"),
    "order": (GATEWAY,),
    "notification": (GATEWAY,),
}
CANARIES = ("user",)  # services with a v2 canary component under k8s/components/


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
    result = []
    # The gRPC ports are those of `make run` (tessera_runtime.devstack), so addresses read the same everywhere.
    for name, port in PORTS.items():
        package = f"tessera.{name}.v1"
        if package not in services:
            raise LookupError(f"no gRPC service in package {package} in {descriptor_set}")
        result.append(Workload(name=name, grpc_port=port, callers=_CALLERS[name],
                               grpc_services=tuple(sorted(services[package])),
                               methods=tuple(methods[package])))
    return tuple(result)


def workload(name: str) -> Workload:
    for w in workloads():
        if name in (w.name, w.k8s_name):
            return w
    known = ", ".join(w.k8s_name for w in workloads())
    raise LookupError(f"unknown service {name!r}; known: {known}")
