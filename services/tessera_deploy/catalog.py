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
# The GraphQL API (services/tessera_graphql): HTTP/1.1 on its own port, behind the gateway's /graphql route. Its
# name is its Service, Deployment, ServiceAccount and app label alike (the gateway's prod profile routes /graphql
# to graphql.tessera.svc.cluster.local:8090; tests/integration/test_k8s_manifests.py holds the two equal).
GRAPHQL = "graphql"
GRAPHQL_PORT = 8090


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
    health: bool = True  # whether it may also ask /grpc.health.v1.Health/* (it checks what it calls)


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


@dataclasses.dataclass(frozen=True)
class HttpOperation:
    """HTTP requests a caller may send to an HTTP workload: these methods on this exact path."""

    path: str
    methods: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class HttpWorkload:
    """A Tessera workload that serves HTTP rather than gRPC (the GraphQL API): its port, callers and operations."""

    name: str  # Kubernetes name of its Service, Deployment and ServiceAccount, and its app label
    port: int
    callers: tuple[str, ...]  # ServiceAccounts (mesh identities) allowed to call it
    operations: tuple[HttpOperation, ...]
    health_path: str

    @property
    def k8s_name(self) -> str:
        return self.name

    @property
    def host(self) -> str:
        return f"{self.name}.{NAMESPACE}.svc.cluster.local"


# The gateway alone calls the GraphQL API: POST (and GET) /graphql for its callers, GET /health for its active
# health checks. Kubelet probes never pass the policy (the sidecar rewrites them and calls the app on localhost),
# nor does Prometheus (the sidecar agent merges the app's /metrics into its own on :15020).
GRAPHQL_API = HttpWorkload(
    name=GRAPHQL,
    port=GRAPHQL_PORT,
    callers=(GATEWAY,),
    operations=(HttpOperation("/graphql", ("GET", "POST")), HttpOperation("/health", ("GET",))),
    health_path="/health",
)

# Who calls whom, method by method. The gateway fronts the public API of every service (REST and gRPC), so it may
# call any method of their contract services; a caller of a service may call exactly the methods it uses. The
# order saga calls user, inventory and payment, the GraphQL API (for its callers) user, inventory, order and
# analytics;
# notification only consumes events. The list is what the code calls: tests/integration/test_k8s_authorization.py
# holds it equal to the stub methods each caller's code calls (for graphql, those services/tessera_graphql calls).
SERVICE_CALLS: dict[str, tuple[str, ...]] = {
    "order-service": (
        "/tessera.user.v1.UserService/GetUser",
        "/tessera.inventory.v1.InventoryService/BatchGetProducts",
        "/tessera.inventory.v1.InventoryService/ReserveStock",
        "/tessera.inventory.v1.InventoryService/CommitReservation",
        "/tessera.inventory.v1.InventoryService/ReleaseReservation",
        "/tessera.payment.v1.PaymentService/ProcessPayment",
        "/tessera.payment.v1.PaymentService/RefundPayment",
        "/tessera.payment.v1.PaymentService/VoidPayment",
    ),
    GRAPHQL: (
        "/tessera.user.v1.UserService/GetUser",
        "/tessera.user.v1.UserService/ListUsers",
        "/tessera.user.v1.UserService/UpdateUser",
        "/tessera.inventory.v1.InventoryService/GetProduct",
        "/tessera.inventory.v1.InventoryService/ListProducts",
        "/tessera.inventory.v1.InventoryService/BatchGetProducts",
        "/tessera.order.v1.OrderService/GetOrder",
        "/tessera.order.v1.OrderService/ListOrders",
        "/tessera.order.v1.OrderService/CreateOrder",
        "/tessera.order.v1.OrderService/CancelOrder",
        "/tessera.analytics.v1.AnalyticsService/GetDailyMetrics",
        "/tessera.analytics.v1.AnalyticsService/ListDailyMetrics",
        "/tessera.analytics.v1.AnalyticsService/GetMetricsSummary",
    ),
}
# Callers that ask the health service of what they call (order-service's readiness checks its downstreams); the
# gateway's active health checks always may. The GraphQL API checks nothing: it gets no Health grant.
HEALTH_CHECKERS: tuple[str, ...] = ("order-service",)
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
                grants.append(Grant(caller, mine, health=caller in HEALTH_CHECKERS))
        result.append(Workload(name=name, grpc_port=port, grants=tuple(grants), grpc_services=grpc_services,
                               methods=tuple(methods[package])))
    return tuple(result)


def workload(name: str) -> Workload:
    for w in workloads():
        if name in (w.name, w.k8s_name):
            return w
    known = ", ".join(w.k8s_name for w in workloads())
    raise LookupError(f"unknown service {name!r}; known: {known}")
