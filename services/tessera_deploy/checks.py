"""Semantic checks of a rendered overlay: do the objects fit together as the mesh needs them to?

Schemas say each object is well formed; these say the whole makes sense: routes name subsets that exist and
select running pods, hosts are Services, weights add up, ports are named for Istio, probes reach a real port,
policies name real service accounts, and every service has what production requires.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from tessera_deploy import ROOT, alertmanager, alerts, dashboards
from tessera_deploy.catalog import (
    GATEWAY,
    GRAPHQL_API,
    INGRESS_PRINCIPAL,
    SERVICE_CALLS,
    TRUST_DOMAIN,
    HttpWorkload,
    Workload,
)
from tessera_deploy.render import Manifest
from tessera_runtime.config import ConfigError, ServiceSettings
from tessera_runtime.db import max_connections
from tessera_runtime.telemetry import otlp_collector_address

POD_TEMPLATE_KINDS = ("Deployment", "StatefulSet")
# Port name prefixes and appProtocol values by which Istio knows a port's protocol (it sniffs otherwise).
ISTIO_PROTOCOLS = ("grpc", "grpc-web", "http", "http2", "https", "tcp", "tls", "mongo", "mysql", "redis", "udp")
# Ports the Istio sidecar adds to every injected pod: a Service may target them though no container declares them.
SIDECAR_PORTS = (15020, 15090)
# PostgreSQL's own max_connections when none is given, and the connections it keeps for superusers out of it.
POSTGRES_DEFAULT_MAX_CONNECTIONS = 100
POSTGRES_RESERVED_CONNECTIONS = 3
# Where a service sends its spans (tessera_runtime.telemetry reads the standard OTEL_* variables).
OTLP_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"
_PRINCIPAL = re.compile(rf"^{re.escape(TRUST_DOMAIN)}/ns/(?P<ns>[^/]+)/sa/(?P<sa>[^/]+)$")


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing wrong with an overlay: the file to fix, the object, the field and what is wrong."""

    where: str
    ref: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.ref} {self.field}: {self.message}"


def selects(selector: dict[str, str] | None, labels: dict[str, str] | None) -> bool:
    """A label selector (matchLabels form) selects labels; an empty selector selects nothing here."""
    if not selector:
        return False
    labels = labels or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _get(obj: Any, *keys: Any, default: Any = None) -> Any:
    for key in keys:
        if isinstance(obj, dict):
            obj = obj.get(key)
        elif isinstance(obj, list) and isinstance(key, int) and key < len(obj):
            obj = obj[key]
        else:
            return default
        if obj is None:
            return default
    return obj


def _match_labels(selector: Any) -> dict[str, str]:
    if not isinstance(selector, dict):
        return {}
    return dict(selector.get("matchLabels") or {})


class Overlay:
    """A rendered overlay indexed for lookups."""

    def __init__(self, manifests: Iterable[Manifest]) -> None:
        self.manifests = list(manifests)

    def of(self, kind: str) -> list[Manifest]:
        return [m for m in self.manifests if m.kind == kind]

    def get(self, kind: str, name: str, namespace: str | None = None) -> Manifest | None:
        for m in self.of(kind):
            if m.name == name and (namespace is None or m.namespace == namespace):
                return m
        return None

    def pod_templates(self) -> list[Manifest]:
        return [m for m in self.manifests if m.kind in POD_TEMPLATE_KINDS]

    def service_for_host(self, host: str, namespace: str) -> Manifest | None:
        """The Service a mesh host names: short name, name.namespace, or the cluster FQDN."""
        parts = host.split(".")
        if len(parts) == 1:
            name, ns = host, namespace
        elif len(parts) == 2 or host.endswith(".svc.cluster.local") or host.endswith(".svc"):
            name, ns = parts[0], parts[1]
        else:
            return None
        return self.get("Service", name, ns)

    def pods_of(self, service: Manifest) -> list[Manifest]:
        selector = _get(service.obj, "spec", "selector", default={})
        return [m for m in self.pod_templates() if m.namespace == service.namespace
                and selects(selector, _get(m.obj, "spec", "template", "metadata", "labels"))]


def _problem(m: Manifest, field: str, message: str) -> Problem:
    return Problem(m.where, m.ref, field, message)


# --- routing -------------------------------------------------------------------------------------------------


def _destination_rules_for(overlay: Overlay, service: Manifest) -> list[Manifest]:
    return [dr for dr in overlay.of("DestinationRule")
            if overlay.service_for_host(str(_get(dr.obj, "spec", "host", default="")), dr.namespace) is service]


def check_virtual_services(overlay: Overlay) -> Iterator[Problem]:
    gateways = {(g.namespace, g.name) for g in overlay.of("Gateway")}
    for vs in overlay.of("VirtualService"):
        spec = vs.obj.get("spec", {})
        bound = spec.get("gateways") or []
        for i, gw in enumerate(bound):
            ns, _, name = gw.rpartition("/")
            if gw != "mesh" and (ns or vs.namespace, name) not in gateways:
                yield _problem(vs, f"spec.gateways[{i}]", f"names Gateway {gw!r}, which this overlay does not have")
        if not bound:  # mesh routes: every host must be a Service of the mesh
            for i, host in enumerate(spec.get("hosts") or []):
                if overlay.service_for_host(host, vs.namespace) is None:
                    yield _problem(vs, f"spec.hosts[{i}]", f"host {host!r} is not a Service in this overlay")
        for r, route in enumerate(spec.get("http") or []):
            destinations = route.get("route") or []
            base = f"spec.http[{r}]"
            weights = [d.get("weight") for d in destinations]
            if len(destinations) > 1 or any(w is not None for w in weights):
                total = sum(w or 0 for w in weights)
                if total != 100:
                    yield _problem(vs, f"{base}.route[*].weight",
                                   f"weights of route {route.get('name', r)!r} sum to {total}, not 100")
            for d, dest in enumerate(destinations):
                yield from _check_destination(overlay, vs, f"{base}.route[{d}].destination", dest.get("destination"))


def _check_destination(overlay: Overlay, vs: Manifest, field: str, dest: dict[str, Any] | None) -> Iterator[Problem]:
    if not dest:
        yield _problem(vs, field, "is missing")
        return
    host = str(dest.get("host", ""))
    service = overlay.service_for_host(host, vs.namespace)
    if service is None:
        yield _problem(vs, f"{field}.host", f"host {host!r} is not a Service in this overlay")
        return
    port = _get(dest, "port", "number")
    ports = [p.get("port") for p in _get(service.obj, "spec", "ports", default=[])]
    if port is not None and port not in ports:
        yield _problem(vs, f"{field}.port.number", f"Service {service.name} has no port {port} (it has {ports})")
    subset = dest.get("subset")
    if subset is None:
        return
    rules = _destination_rules_for(overlay, service)
    names = [s.get("name") for dr in rules for s in _get(dr.obj, "spec", "subsets", default=[])]
    if subset not in names:
        yield _problem(vs, f"{field}.subset", f"subset {subset!r} of {host} is not defined in any DestinationRule "
                                              f"(defined: {names or 'none'})")


def check_destination_rules(overlay: Overlay) -> Iterator[Problem]:
    for dr in overlay.of("DestinationRule"):
        host = str(_get(dr.obj, "spec", "host", default=""))
        service = overlay.service_for_host(host, dr.namespace)
        if service is None:
            yield _problem(dr, "spec.host", f"host {host!r} is not a Service in this overlay")
            continue
        pods = overlay.pods_of(service)
        for i, subset in enumerate(_get(dr.obj, "spec", "subsets", default=[])):
            labels = subset.get("labels") or {}
            if not any(selects(labels, _get(p.obj, "spec", "template", "metadata", "labels")) for p in pods):
                yield _problem(dr, f"spec.subsets[{i}].labels",
                               f"subset {subset.get('name')!r} ({labels}) selects no pod template behind Service "
                               f"{service.name} (pods: {', '.join(p.ref for p in pods) or 'none'})")


# --- services and workloads ------------------------------------------------------------------------------------


def _protocol_known(port: dict[str, Any]) -> bool:
    app_protocol = str(port.get("appProtocol", "")).lower()
    name = str(port.get("name", "")).lower()
    return app_protocol in ISTIO_PROTOCOLS or name.split("-")[0] in ISTIO_PROTOCOLS


def check_services(overlay: Overlay, workloads: Iterable[Workload]) -> Iterator[Problem]:
    by_name = {w.k8s_name: w for w in workloads}
    for svc in overlay.of("Service"):
        ports = _get(svc.obj, "spec", "ports", default=[])
        for i, port in enumerate(ports):
            if not _protocol_known(port):
                yield _problem(svc, f"spec.ports[{i}].name",
                               f"port {port.get('name')!r} gives Istio no protocol: name it grpc/http/tcp-... "
                               "or set appProtocol")
        pods = overlay.pods_of(svc)
        if _get(svc.obj, "spec", "selector") and not pods:
            yield _problem(svc, "spec.selector", "selects no pod template in this overlay")
        for i, port in enumerate(ports):
            target = port.get("targetPort", port.get("port"))
            if target in SIDECAR_PORTS:
                continue
            for pod in pods:
                if not _container_port_exists(pod, target):
                    yield _problem(svc, f"spec.ports[{i}].targetPort",
                                   f"{target!r} is not a container port of {pod.ref}")
        if svc.name == GRAPHQL_API.k8s_name:
            yield from _http_service_problems(svc, ports, GRAPHQL_API)
        workload = by_name.get(svc.name)
        if workload is None:
            continue
        grpc = [p for p in ports if p.get("name") == "grpc"]
        if not grpc:
            yield _problem(svc, "spec.ports", "has no port named 'grpc'")
            continue
        if grpc[0].get("appProtocol") != "grpc":
            yield _problem(svc, f"spec.ports[{ports.index(grpc[0])}].appProtocol",
                           "must be 'grpc': Istio balances gRPC per request only when it knows the port is HTTP/2")
        if grpc[0].get("port") != workload.grpc_port:
            yield _problem(svc, f"spec.ports[{ports.index(grpc[0])}].port",
                           f"is {grpc[0].get('port')}, but {workload.k8s_name} serves gRPC on {workload.grpc_port}")


def _http_service_problems(svc: Manifest, ports: list[dict[str, Any]], h: HttpWorkload) -> Iterator[Problem]:
    http = [p for p in ports if p.get("name") == "http"]
    if not http:
        yield _problem(svc, "spec.ports", "has no port named 'http'")
        return
    i = ports.index(http[0])
    if http[0].get("appProtocol") != "http":
        yield _problem(svc, f"spec.ports[{i}].appProtocol",
                       "must be 'http': Istio authorises and routes the API by path only when it knows it is HTTP")
    if http[0].get("port") != h.port:
        yield _problem(svc, f"spec.ports[{i}].port", f"is {http[0].get('port')}, but {h.k8s_name} serves on {h.port}")


def _containers(pod: Manifest) -> list[dict[str, Any]]:
    return list(_get(pod.obj, "spec", "template", "spec", "containers", default=[]))


def _container_port_exists(pod: Manifest, port: Any, container: dict[str, Any] | None = None) -> bool:
    containers = [container] if container is not None else _containers(pod)
    for c in containers:
        for p in c.get("ports") or []:
            if port in (p.get("containerPort"), p.get("name")):
                return True
    return False


def _image_problem(image: str) -> str | None:
    if "@sha256:" in image:
        return None
    last = image.rsplit("/", 1)[-1]
    if ":" not in last:
        return f"image {image!r} has no tag (it would run :latest)"
    if last.rsplit(":", 1)[1] == "latest":
        return f"image {image!r} uses the tag latest"
    return None


def _env_value(overlay: Overlay, pod: Manifest, container: dict[str, Any], name: str) -> str | None:
    for env in container.get("env") or []:
        if env.get("name") == name and "value" in env:
            return str(env["value"])
    for source in container.get("envFrom") or []:
        ref = _get(source, "configMapRef", "name")
        cm = overlay.get("ConfigMap", ref, pod.namespace) if ref else None
        if cm is not None and name in (cm.obj.get("data") or {}):
            return str(cm.obj["data"][name])
    return None


def _container_env(overlay: Overlay, pod: Manifest, container: dict[str, Any]) -> dict[str, str]:
    """The variables a container gets from its ConfigMaps and literal values (env wins, as in Kubernetes)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        ref = _get(source, "configMapRef", "name")
        cm = overlay.get("ConfigMap", ref, pod.namespace) if ref else None
        if cm is not None:
            env.update({str(k): str(v) for k, v in (cm.obj.get("data") or {}).items()})
    for item in container.get("env") or []:
        if "value" in item:
            env[str(item.get("name"))] = str(item["value"])
    return env


def exported_collector(overlay: Overlay, pod: Manifest, container: dict[str, Any]) -> str | None:
    """HOST:PORT of the OTLP collector a service container sends its spans to, read from its OTEL_* variables
    as tessera_runtime reads them (None when it exports none); ConfigError when they are malformed."""
    return otlp_collector_address(_container_env(overlay, pod, container))


def _probe_problems(overlay: Overlay, pod: Manifest, ci: int, c: dict[str, Any],
                    workload: Workload | None) -> Iterator[Problem]:
    base = f"spec.template.spec.containers[{ci}]"
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        probe = c.get(kind)
        if not probe:
            yield _problem(pod, f"{base}.{kind}", f"container {c.get('name')!r} has no {kind}")
            continue
        for action in ("grpc", "httpGet", "tcpSocket"):
            if action in probe:
                port = probe[action].get("port")
                if not _container_port_exists(pod, port, c):
                    yield _problem(pod, f"{base}.{kind}.{action}.port",
                                   f"port {port!r} is not a port of container {c.get('name')!r}")
        if workload is None:
            continue
        service = _get(probe, "grpc", "service", default="")
        if "grpc" not in probe:
            yield _problem(pod, f"{base}.{kind}", "must be a native gRPC probe on the health service")
        elif kind == "readinessProbe" and service not in ("", *workload.grpc_services):
            yield _problem(pod, f"{base}.{kind}.grpc.service",
                           f"{service!r} is not readiness: use '' or one of {list(workload.grpc_services)}")
        elif kind != "readinessProbe" and service != "liveness":
            yield _problem(pod, f"{base}.{kind}.grpc.service",
                           f"is {service!r}; liveness must never check dependencies: use 'liveness'")


def _security_problems(pod: Manifest, ci: int, c: dict[str, Any]) -> Iterator[Problem]:
    base = f"spec.template.spec.containers[{ci}].securityContext"
    pod_sc = _get(pod.obj, "spec", "template", "spec", "securityContext", default={})
    sc = c.get("securityContext") or {}
    if not (sc.get("runAsNonRoot") or pod_sc.get("runAsNonRoot")):
        yield _problem(pod, f"{base}.runAsNonRoot", "must be true (here or in the pod securityContext)")
    if sc.get("readOnlyRootFilesystem") is not True:
        yield _problem(pod, f"{base}.readOnlyRootFilesystem", "must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        yield _problem(pod, f"{base}.allowPrivilegeEscalation", "must be false")
    if "ALL" not in (_get(sc, "capabilities", "drop", default=[]) or []):
        yield _problem(pod, f"{base}.capabilities.drop", "must drop ALL capabilities")
    seccomp = _get(sc, "seccompProfile", "type") or _get(pod_sc, "seccompProfile", "type")
    if seccomp != "RuntimeDefault":
        yield _problem(pod, f"{base}.seccompProfile.type", "must be RuntimeDefault (here or in the pod)")


def check_pod_templates(overlay: Overlay, workloads: Iterable[Workload]) -> Iterator[Problem]:
    """Every pod template behind a Service of the catalog (and the gateway) meets the production bar."""
    workloads = list(workloads)
    by_name = {w.k8s_name: w for w in workloads}
    for svc in overlay.of("Service"):
        if svc.name not in by_name and svc.name not in (GATEWAY, GRAPHQL_API.k8s_name):
            continue
        workload = by_name.get(svc.name)
        for pod in overlay.pods_of(svc):
            yield from _check_pod(overlay, pod, workload)
            if svc.name == GRAPHQL_API.k8s_name:
                yield from _check_http_pod(overlay, pod, GRAPHQL_API)
            yield from _address_problems(overlay, pod, workloads)


def _check_http_pod(overlay: Overlay, pod: Manifest, h: HttpWorkload) -> Iterator[Problem]:
    """The GraphQL API's pod: listens on all interfaces on its port, probes its health path there, exports spans."""
    for ci, c in enumerate(_containers(pod)):
        base = f"spec.template.spec.containers[{ci}]"
        port_env = _env_value(overlay, pod, c, "TESSERA_GRAPHQL_PORT")
        if port_env != str(h.port) or not _container_port_exists(pod, h.port, c):
            yield _problem(pod, f"{base}.env[TESSERA_GRAPHQL_PORT]",
                           f"is {port_env!r}; the API listens on {h.port}, its container port")
        if _env_value(overlay, pod, c, "TESSERA_GRAPHQL_HOST") != "0.0.0.0":
            yield _problem(pod, f"{base}.env[TESSERA_GRAPHQL_HOST]",
                           "must be 0.0.0.0 so the sidecar and probes reach it")
        if _env_value(overlay, pod, c, "TESSERA_ENV") != "production":
            yield _problem(pod, f"{base}.env[TESSERA_ENV]",
                           "must be production: the API then asks each RPC for the scope the gateway's prod profile "
                           "gives it")
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = c.get(kind) or {}
            get = probe.get("httpGet") or {}
            if probe and (get.get("path") != h.health_path or get.get("port") not in (h.port, "http")):
                yield _problem(pod, f"{base}.{kind}",
                               f"must be an HTTP GET of {h.health_path} on port {h.port}")
        yield from _collector_problems(overlay, pod, c, base, "the API")


def _collector_problems(overlay: Overlay, pod: Manifest, c: dict[str, Any], base: str,
                        who: str) -> Iterator[Problem]:
    """The container exports its spans to the cluster's collector: OTEL_EXPORTER_OTLP_ENDPOINT is set and valid."""
    try:
        if exported_collector(overlay, pod, c) is None:
            yield _problem(pod, f"{base}.env[{OTLP_ENDPOINT}]",
                           f"is not set: {who} would export no spans (set it in the shared ConfigMap)")
    except ConfigError as exc:
        yield _problem(pod, f"{base}.env[{OTLP_ENDPOINT}]", str(exc))


def _address_problems(overlay: Overlay, pod: Manifest, workloads: list[Workload]) -> Iterator[Problem]:
    """A caller of other services (SERVICE_CALLS) finds each at its Service: TESSERA_<NAME>_SERVICE_ADDR is the
    service's cluster host and gRPC port."""
    app = _get(pod.obj, "spec", "template", "metadata", "labels", "app")
    calls = SERVICE_CALLS.get(str(app), ())
    called = [w for w in workloads if any(p.split("/")[1] in w.grpc_services for p in calls)]
    for ci, c in enumerate(_containers(pod)):
        for w in called:
            variable = f"TESSERA_{w.name.upper()}_SERVICE_ADDR"
            value = _env_value(overlay, pod, c, variable)
            if value != f"{w.host}:{w.grpc_port}":
                yield _problem(pod, f"spec.template.spec.containers[{ci}].env[{variable}]",
                               f"is {value!r}; {app} calls {w.k8s_name} at {w.host}:{w.grpc_port}")


def _check_pod(overlay: Overlay, pod: Manifest, workload: Workload | None) -> Iterator[Problem]:
    spec = _get(pod.obj, "spec", "template", "spec", default={})
    sa = spec.get("serviceAccountName")
    if not sa or overlay.get("ServiceAccount", sa, pod.namespace) is None:
        yield _problem(pod, "spec.template.spec.serviceAccountName",
                       f"{sa!r} is not a ServiceAccount of this overlay (Istio identity comes from it)")
    if not spec.get("topologySpreadConstraints"):
        yield _problem(pod, "spec.template.spec.topologySpreadConstraints", "is missing: replicas may share a node")
    annotations = _get(pod.obj, "spec", "template", "metadata", "annotations", default={})
    if annotations.get("prometheus.io/scrape") != "true":
        yield _problem(pod, "spec.template.metadata.annotations", "prometheus.io/scrape is not 'true'")
    else:
        port = annotations.get("prometheus.io/port", "")
        if not port.isdigit() or not _container_port_exists(pod, int(port)):
            yield _problem(pod, "spec.template.metadata.annotations[prometheus.io/port]",
                           f"{port!r} is not a container port")
    for ci, c in enumerate(spec.get("containers") or []):
        base = f"spec.template.spec.containers[{ci}]"
        for bound in ("requests", "limits"):
            for resource in ("cpu", "memory"):
                if not _get(c, "resources", bound, resource):
                    yield _problem(pod, f"{base}.resources.{bound}.{resource}", "is missing")
        yield from _probe_problems(overlay, pod, ci, c, workload)
        yield from _security_problems(pod, ci, c)
        if workload is None:
            continue
        port_env = _env_value(overlay, pod, c, "TESSERA_GRPC_PORT")
        if port_env != str(workload.grpc_port) or not _container_port_exists(pod, workload.grpc_port, c):
            yield _problem(pod, f"{base}.env[TESSERA_GRPC_PORT]",
                           f"is {port_env!r}; the service listens on {workload.grpc_port}, its container port")
        if _env_value(overlay, pod, c, "TESSERA_GRPC_HOST") != "0.0.0.0":
            yield _problem(pod, f"{base}.env[TESSERA_GRPC_HOST]", "must be 0.0.0.0 so the sidecar and probes reach it")
        yield from _collector_problems(overlay, pod, c, base, "the service")
        try:
            drain = float(_env_value(overlay, pod, c, "TESSERA_DRAIN_SECONDS") or 2)
            grace = float(_env_value(overlay, pod, c, "TESSERA_GRACE_SECONDS") or 10)
        except ValueError:
            yield _problem(pod, f"{base}.env", "TESSERA_DRAIN_SECONDS / TESSERA_GRACE_SECONDS are not numbers")
            continue
        period = spec.get("terminationGracePeriodSeconds", 30)
        if period <= drain + grace:
            yield _problem(pod, "spec.template.spec.terminationGracePeriodSeconds",
                           f"{period}s does not exceed drain + grace ({drain:g}s + {grace:g}s): "
                           "shutdown would be killed mid-drain")


def check_images(overlay: Overlay) -> Iterator[Problem]:
    for pod in overlay.pod_templates():
        spec = _get(pod.obj, "spec", "template", "spec", default={})
        for group in ("initContainers", "containers"):
            for ci, c in enumerate(spec.get(group) or []):
                problem = _image_problem(str(c.get("image", "")))
                if problem:
                    yield _problem(pod, f"spec.template.spec.{group}[{ci}].image", problem)


def check_companions(overlay: Overlay, workloads: Iterable[Workload]) -> Iterator[Problem]:
    """Each service has a ServiceAccount, HPA, PDB, NetworkPolicy, ServiceMonitor and AuthorizationPolicy."""
    for name in [w.k8s_name for w in workloads] + [GRAPHQL_API.k8s_name, GATEWAY]:
        svc = overlay.get("Service", name)
        if svc is None:
            yield Problem("k8s/", f"Service/{name}", "metadata.name", "the service has no Service in this overlay")
            continue
        pods = overlay.pods_of(svc)
        pod_labels = [_get(p.obj, "spec", "template", "metadata", "labels", default={}) for p in pods]
        names = {p.name for p in pods}
        if not any(_get(h.obj, "spec", "scaleTargetRef", "name") in names
                   and {"cpu", "memory"} <= {_get(m, "resource", "name") for m in _get(h.obj, "spec", "metrics",
                                                                                           default=[])}
                   for h in overlay.of("HorizontalPodAutoscaler")):
            yield _problem(svc, "(companions)", f"no HorizontalPodAutoscaler on CPU and memory scales {name}")
        for kind, selector_path in (("PodDisruptionBudget", ("spec", "selector")),
                                    ("NetworkPolicy", ("spec", "podSelector")),
                                    ("AuthorizationPolicy", ("spec", "selector"))):
            if not any(any(selects(_match_labels(_get(o.obj, *selector_path)), labels) for labels in pod_labels)
                       for o in overlay.of(kind)):
                yield _problem(svc, "(companions)", f"no {kind} selects the pods of {name}")
        monitors = [m for m in overlay.of("ServiceMonitor")
                    if selects(_match_labels(_get(m.obj, "spec", "selector")), _get(svc.obj, "metadata", "labels"))]
        if not monitors:
            yield _problem(svc, "(companions)", f"no ServiceMonitor selects Service {name}")
        port_names = {p.get("name") for p in _get(svc.obj, "spec", "ports", default=[])}
        for monitor in monitors:
            for i, endpoint in enumerate(_get(monitor.obj, "spec", "endpoints", default=[])):
                if endpoint.get("port") not in port_names:
                    yield _problem(monitor, f"spec.endpoints[{i}].port",
                                   f"{endpoint.get('port')!r} is not a port name of Service {name}")
    for hpa in overlay.of("HorizontalPodAutoscaler"):
        target = _get(hpa.obj, "spec", "scaleTargetRef", default={})
        if overlay.get(str(target.get("kind")), str(target.get("name")), hpa.namespace) is None:
            yield _problem(hpa, "spec.scaleTargetRef", f"{target.get('kind')}/{target.get('name')} does not exist")


def _jobs_named(expr: str) -> set[str]:
    """The scrape jobs an expression names: `job="x"` and the alternatives of `job=~"x|y"` matchers, and the
    job labels `label_replace(..., "job", "x", ...)` gives."""
    named = set()
    for value in re.findall(r'\bjob\s*=~?\s*"([^"]*)"', expr):
        named.update(value.split("|"))
    named.update(re.findall(r'label_replace\([^,]+,\s*"job",\s*"([^"]*)"', expr))
    return named


def check_prometheus_rules(overlay: Overlay) -> Iterator[Problem]:
    """One PrometheusRule holding exactly the groups of the rules file, labelled as every ServiceMonitor is (so the
    Prometheus that selects the monitors loads it), whose alerts on scrape jobs name exactly the Services the
    monitors select (a Service's monitored job is its name)."""
    rules = overlay.of("PrometheusRule")
    if len(rules) != 1:
        yield Problem("k8s/base/kustomization.yaml", "PrometheusRule/*", "(resources)",
                      f"{len(rules)} PrometheusRule objects; one is expected ({alerts.PROMETHEUS_RULE_FILE.name})")
        return
    [rule] = rules
    try:
        groups = alerts.load_groups()
    except alerts.RulesError as exc:
        yield _problem(rule, "spec.groups", str(exc))
        return
    if _get(rule.obj, "spec", "groups") != groups:
        yield _problem(rule, "spec.groups",
                       f"differs from {alerts.RULES_FILE.relative_to(ROOT)} (run `make k8s-alerts`; patch the "
                       "source, not the rendered rule)")
    monitors = overlay.of("ServiceMonitor")
    if monitors:
        first = _get(monitors[0].obj, "metadata", "labels", default={})
        common = {k: v for k, v in first.items()
                  if all(_get(m.obj, "metadata", "labels", default={}).get(k) == v for m in monitors)}
        labels = _get(rule.obj, "metadata", "labels", default={})
        for key, value in sorted(common.items()):
            if labels.get(key) != value:
                yield _problem(rule, f"metadata.labels.{key}",
                               f"every ServiceMonitor has {key}: {value}; the PrometheusRule must too, or the "
                               "Prometheus that selects the monitors does not load it")
    monitored = {svc.name for svc in overlay.of("Service")
                 if any(selects(_match_labels(_get(m.obj, "spec", "selector")), _get(svc.obj, "metadata", "labels"))
                        for m in monitors)}
    for gi, group in enumerate(_get(rule.obj, "spec", "groups", default=[]) or []):
        for ri, item in enumerate(group.get("rules", []) if isinstance(group, dict) else []):
            named = _jobs_named(str(item.get("expr", "")))
            if named and named != monitored:
                missing, unknown = sorted(monitored - named), sorted(named - monitored)
                yield _problem(rule, f"spec.groups[{gi}].rules[{ri}].expr",
                               f"{item.get('alert') or item.get('record')} names the jobs {sorted(named)}: "
                               + "; ".join([*([f"no monitored Service is {unknown}"] if unknown else []),
                                            *([f"leaves out the monitored {missing}"] if missing else [])]))


def check_alertmanager_config(overlay: Overlay) -> Iterator[Problem]:
    """One AlertmanagerConfig equal to what k8s/monitoring/alertmanager.yml renders, labelled as the PrometheusRule
    (so the Alertmanager that takes Tessera's alerts selects it by the same label), whose routes send to receivers
    it defines, and whose route and inhibit rules name only alerts the rules file has (a misspelt name would
    route or inhibit nothing, silently)."""
    configs = overlay.of("AlertmanagerConfig")
    if len(configs) != 1:
        yield Problem("k8s/base/kustomization.yaml", "AlertmanagerConfig/*", "(resources)",
                      f"{len(configs)} AlertmanagerConfig objects; one is expected "
                      f"({alertmanager.ALERTMANAGER_CONFIG_FILE.name})")
        return
    [config] = configs
    source = alertmanager.SOURCE_FILE.relative_to(ROOT)
    try:
        expected = alertmanager.alertmanager_config(alertmanager.load())
    except alertmanager.AlertmanagerConfigError as exc:
        yield _problem(config, "spec", str(exc))
        return
    if config.obj.get("spec") != expected["spec"]:
        yield _problem(config, "spec", f"differs from {source} (run `make k8s-alerts`; edit the source, not the "
                                       "rendered AlertmanagerConfig)")
    for rule in overlay.of("PrometheusRule"):
        labels = _get(config.obj, "metadata", "labels", default={})
        for key, value in sorted(_get(rule.obj, "metadata", "labels", default={}).items()):
            if labels.get(key) != value:
                yield _problem(config, f"metadata.labels.{key}",
                               f"the PrometheusRule has {key}: {value}; the AlertmanagerConfig must too, so that "
                               "one label selects Tessera's rules and its routing")
    spec = config.obj.get("spec") or {}
    route = spec.get("route") or {}
    defined = {r.get("name") for r in spec.get("receivers", [])}
    for name in sorted(alertmanager.route_receivers(route) - defined):
        yield _problem(config, "spec.route", f"routes to the receiver {name!r}, which spec.receivers does not define")
    try:
        known = {rule["alert"] for rule in alerts.alerting_rules(alerts.load_groups())}
    except alerts.RulesError:
        return  # check_prometheus_rules reports the rules file
    named = {"spec.route": alertmanager.alertnames_matched(alertmanager.route_matchers(route))}
    for i, inhibit in enumerate(spec.get("inhibitRules", [])):
        for side in ("sourceMatch", "targetMatch"):
            named[f"spec.inhibitRules[{i}].{side}"] = alertmanager.alertnames_matched(inhibit.get(side, []))
    for field, names in named.items():
        if names - known:
            yield _problem(config, field, f"names alerts {sorted(names - known)} that "
                                          f"{alerts.RULES_FILE.relative_to(ROOT)} does not have")


def check_dashboards(overlay: Overlay) -> Iterator[Problem]:
    """The ConfigMap of Grafana dashboards: labelled for Grafana's dashboard sidecar and as every Tessera object,
    holding each file of k8s/monitoring/dashboards as it is, each a dashboard without shape problems."""
    where = "k8s/monitoring/kustomization.yaml"
    config_map = overlay.get("ConfigMap", dashboards.CONFIG_MAP_NAME)
    if config_map is None:
        yield Problem(where, f"ConfigMap/{dashboards.CONFIG_MAP_NAME}", "(resources)",
                      "missing: Grafana gets no Tessera dashboard (k8s/base must include ../monitoring)")
        return
    labels = _get(config_map.obj, "metadata", "labels", default={}) or {}
    key, value = dashboards.SIDECAR_LABEL
    if labels.get(key) != value:
        yield _problem(config_map, f"metadata.labels.{key}",
                       f"must be {value!r}: Grafana's dashboard sidecar loads only ConfigMaps labelled so")
    if labels.get("app.kubernetes.io/part-of") != "tessera":
        yield _problem(config_map, "metadata.labels.app.kubernetes.io/part-of", "must be tessera, as every object")
    data = _get(config_map.obj, "data", default={}) or {}
    expected = {path.name: path for path in dashboards.files()}
    for name in sorted(set(data) - set(expected)):
        yield _problem(config_map, f"data.{name}", f"is not a file of {dashboards.DASHBOARDS_DIR.relative_to(ROOT)}")
    for name, path in sorted(expected.items()):
        if name not in data:
            yield _problem(config_map, f"data.{name}", f"missing: {path.relative_to(ROOT)} is not shipped")
            continue
        if data[name] != path.read_text():
            yield _problem(config_map, f"data.{name}", f"differs from {path.relative_to(ROOT)} (patch the file)")
        try:
            dashboard = json.loads(data[name])
        except ValueError as exc:
            yield _problem(config_map, f"data.{name}", f"is not JSON: {exc}")
            continue
        for problem in dashboards.problems(dashboard) if isinstance(dashboard, dict) else ["not a JSON object"]:
            yield _problem(config_map, f"data.{name}", problem)


# --- security policies -----------------------------------------------------------------------------------------


def _health_methods() -> set[str]:
    from grpc_health.v1 import health_pb2

    service = health_pb2.DESCRIPTOR.services_by_name["Health"]
    return {f"/{service.full_name}/{m.name}" for m in service.methods}


def _grpc_path_problem(path: str, methods: set[str]) -> str | None:
    """Why an AuthorizationPolicy path names no gRPC method that exists (None when it names some).

    Istio matches a path exactly, or by prefix when it ends in `*`: `/pkg.Service/*` is a whole service,
    `/pkg.Service/Get*` the methods it starts."""
    service = path.strip("/").split("/")[0]
    services = {m.split("/")[1] for m in methods}
    if service not in services:
        return f"{path!r} names no gRPC service of the contracts"
    if path.endswith("*"):
        if not any(m.startswith(path[:-1]) for m in methods):
            return f"{path!r} matches no method of {service}"
        return None
    if path not in methods:
        known = sorted(m.rsplit("/", 1)[1] for m in methods if m.split("/")[1] == service)
        return f"{path!r} names no method of the contracts ({service} has {', '.join(known)})"
    return None


def check_authorization(overlay: Overlay, workloads: Iterable[Workload]) -> Iterator[Problem]:
    methods = {m.path for w in workloads for m in w.methods} | _health_methods()
    for ap in overlay.of("AuthorizationPolicy"):
        spec = ap.obj.get("spec") or {}
        selector = _match_labels(spec.get("selector"))
        if selector and not any(selects(selector, _get(p.obj, "spec", "template", "metadata", "labels"))
                                for p in overlay.pod_templates() if p.namespace == ap.namespace):
            yield _problem(ap, "spec.selector.matchLabels", f"{selector} selects no pod template")
        for r, rule in enumerate(spec.get("rules") or []):
            for f, source in enumerate(rule.get("from") or []):
                for p, principal in enumerate(_get(source, "source", "principals", default=[])):
                    field = f"spec.rules[{r}].from[{f}].source.principals[{p}]"
                    if principal == INGRESS_PRINCIPAL:
                        continue
                    match = _PRINCIPAL.match(principal)
                    if match is None:
                        yield _problem(ap, field, f"{principal!r} is not {TRUST_DOMAIN}/ns/<namespace>/sa/<name>")
                    elif overlay.get("ServiceAccount", match["sa"], match["ns"]) is None:
                        yield _problem(ap, field, f"{principal!r} names no ServiceAccount of this overlay")
            for t, target in enumerate(rule.get("to") or []):
                for p, path in enumerate(_get(target, "operation", "paths", default=[])):
                    # gRPC paths are /<package>.<Service>/<Method>; others (/metrics) are plain HTTP.
                    if not path.startswith("/") or "." not in path.strip("/").split("/")[0]:
                        continue
                    problem = _grpc_path_problem(path, methods)
                    if problem:
                        yield _problem(ap, f"spec.rules[{r}].to[{t}].operation.paths[{p}]", problem)


def _principal_pods(overlay: Overlay, principal: str) -> list[Manifest]:
    """The pod templates that run as the ServiceAccount a principal names."""
    match = _PRINCIPAL.match(principal)
    if match is None:
        return []
    return [pod for pod in overlay.pod_templates() if pod.namespace == match["ns"]
            and _get(pod.obj, "spec", "template", "spec", "serviceAccountName") == match["sa"]]


def _authorised_callers(overlay: Overlay, name: str) -> set[str]:
    """App labels of the pods whose identity the AuthorizationPolicy `name` admits."""
    callers = set()
    ap = overlay.get("AuthorizationPolicy", name)
    for rule in _get(ap.obj, "spec", "rules", default=[]) if ap else []:
        for source in rule.get("from") or []:
            for principal in _get(source, "source", "principals", default=[]):
                for pod in _principal_pods(overlay, principal):
                    callers.add(_get(pod.obj, "spec", "template", "metadata", "labels", "app"))
    return {c for c in callers if c}


def check_network_policies(overlay: Overlay, workloads: Iterable[Workload]) -> Iterator[Problem]:
    """The pods a NetworkPolicy lets reach a service's gRPC port (the GraphQL API's HTTP port) are exactly its
    authorised callers, and each caller's NetworkPolicy lets it out to exactly what it is authorised to call."""
    targets = [(w.k8s_name, w.grpc_port, "grpc") for w in workloads]
    targets.append((GRAPHQL_API.k8s_name, GRAPHQL_API.port, "http"))
    for name, port, port_name in targets:
        policy = overlay.get("NetworkPolicy", name)
        if policy is None:
            continue  # reported by check_companions
        allowed: set[str] = set()
        for rule in _get(policy.obj, "spec", "ingress", default=[]):
            ports = {p.get("port") for p in rule.get("ports") or []}
            if port in ports or port_name in ports:
                for peer in rule.get("from") or []:
                    app = _get(peer, "podSelector", "matchLabels", "app")
                    if app:
                        allowed.add(app)
        callers = _authorised_callers(overlay, name)
        if allowed != callers:
            yield _problem(policy, "spec.ingress[*].from",
                           f"lets {sorted(allowed)} reach port {port}, but the AuthorizationPolicy "
                           f"authorises {sorted(callers)}")
    yield from _egress_problems(overlay, targets)


def _egress_reach(policy: Manifest, labels: dict[str, str], port: int, port_name: str) -> tuple[bool, bool]:
    """Whether a NetworkPolicy's egress lets its pods reach pods with these labels on the port at all, and whether
    it names them (a podSelector of this namespace) for that port."""
    allows = named = False
    for rule in _get(policy.obj, "spec", "egress", default=[]):
        ports = [p.get("port") for p in rule.get("ports") or []]
        if ports and port not in ports and port_name not in ports:
            continue
        peers = rule.get("to") or []
        if not peers:
            allows = True
        for peer in peers:
            if "namespaceSelector" in peer or "ipBlock" in peer:
                continue  # other namespaces or addresses: not a pod of this one
            if selects(_match_labels(peer.get("podSelector")), labels):
                allows = named = True
    return allows, named


def _egress_policies(overlay: Overlay, pod: Manifest) -> list[Manifest]:
    labels = _get(pod.obj, "spec", "template", "metadata", "labels", default={})
    return [np for np in overlay.of("NetworkPolicy") if np.namespace == pod.namespace
            and "Egress" in (_get(np.obj, "spec", "policyTypes", default=[]) or [])
            and selects(_match_labels(_get(np.obj, "spec", "podSelector")), labels)]


def _egress_problems(overlay: Overlay, targets: list[tuple[str, int, str]]) -> Iterator[Problem]:
    for name, port, port_name in targets:
        service = overlay.get("Service", name)
        if service is None:
            continue
        callees = overlay.pods_of(service)
        labels = _get(callees[0].obj, "spec", "template", "metadata", "labels", default={}) if callees else {}
        callers = _authorised_callers(overlay, name)
        for pod in overlay.pod_templates():
            app = _get(pod.obj, "spec", "template", "metadata", "labels", "app")
            if not app or app == name or pod.namespace != service.namespace:
                continue
            policies = _egress_policies(overlay, pod)
            if not policies:
                continue  # its egress is not restricted
            reach = [_egress_reach(np, labels, port, port_name) for np in policies]
            if app in callers and not any(allows for allows, _ in reach):
                yield _problem(policies[0], "spec.egress[*].to",
                               f"does not let {app} reach {name} on port {port}, which the AuthorizationPolicy "
                               "authorises it to call")
            elif app not in callers and any(named for _, named in reach):
                yield _problem(policies[0], "spec.egress[*].to",
                               f"lets {app} reach {name} on port {port}, but the AuthorizationPolicy does not "
                               "authorise it")


def check_mtls(overlay: Overlay, namespace: str) -> Iterator[Problem]:
    default = [p for p in overlay.of("PeerAuthentication")
               if p.namespace == namespace and not _get(p.obj, "spec", "selector")]
    if not any(_get(p.obj, "spec", "mtls", "mode") == "STRICT" for p in default):
        yield Problem("istio/", f"PeerAuthentication/{namespace}", "spec.mtls.mode",
                      "the namespace has no STRICT PeerAuthentication")
    for p in overlay.of("PeerAuthentication"):
        if _get(p.obj, "spec", "mtls", "mode") not in (None, "STRICT"):
            yield _problem(p, "spec.mtls.mode", "must be STRICT (only a metrics port may be PERMISSIVE)")


# --- database connections ------------------------------------------------------------------------------------


def _most_pods(overlay: Overlay, pod: Manifest) -> int:
    """The most replicas a pod template may have: its HorizontalPodAutoscaler's maxReplicas, or its replicas."""
    for hpa in overlay.of("HorizontalPodAutoscaler"):
        target = _get(hpa.obj, "spec", "scaleTargetRef", default={})
        if hpa.namespace == pod.namespace and target.get("kind") == pod.kind and target.get("name") == pod.name:
            return int(_get(hpa.obj, "spec", "maxReplicas", default=1))
    return int(_get(pod.obj, "spec", "replicas", default=1))


def _max_connections_setting(container: dict[str, Any]) -> int:
    """max_connections as the container's arguments set it (`-c max_connections=N`), else PostgreSQL's default."""
    args = [str(a) for a in (*(container.get("command") or ()), *(container.get("args") or ()))]
    for i, arg in enumerate(args):
        setting = args[i + 1] if arg == "-c" and i + 1 < len(args) else arg.removeprefix("-c")
        name, _, value = setting.partition("=")
        if name.strip() == "max_connections" and value.strip().isdigit():
            return int(value)
    return POSTGRES_DEFAULT_MAX_CONNECTIONS


def check_database_connections(overlay: Overlay, workloads: Iterable[Workload]) -> Iterator[Problem]:
    """A PostgreSQL of the overlay (the dev overlay's) accepts every connection the services may open at once:
    tessera_runtime.db.max_connections() per process (of its TESSERA_DATABASE_POOL_SIZE), TESSERA_WORKERS
    processes per pod, at the most pods each may have. A server outside the cluster is sized by its operator
    (k8s/README.md)."""
    servers = [(pod, ci, c) for pod in overlay.pod_templates() for ci, c in enumerate(_containers(pod))
               if str(c.get("image", "")).rsplit("/", 1)[-1].split(":", 1)[0] == "postgres"]
    if not servers:
        return
    by_name = {w.k8s_name: w for w in workloads}
    needed: dict[str, int] = {}
    per_process: dict[str, int] = {}
    for svc in overlay.of("Service"):
        if svc.name not in by_name:
            continue
        for pod in overlay.pods_of(svc):
            for ci, c in enumerate(_containers(pod)):
                try:  # the pool size and workers as the service reads them
                    settings = ServiceSettings.from_env(by_name[svc.name].name, 0, _container_env(overlay, pod, c))
                except ConfigError as exc:
                    yield _problem(pod, f"spec.template.spec.containers[{ci}].env", str(exc))
                    continue
                per_process[pod.name] = max_connections(settings.database_pool_size)
                needed[pod.name] = _most_pods(overlay, pod) * settings.workers * per_process[pod.name]
    total = sum(needed.values())
    for pod, ci, c in servers:
        allowed = _max_connections_setting(c) - POSTGRES_RESERVED_CONNECTIONS
        if total > allowed:
            detail = ", ".join(f"{name} {n} ({per_process[name]} per process)" for name, n in sorted(needed.items()))
            yield _problem(pod, f"spec.template.spec.containers[{ci}].args",
                           f"max_connections leaves {allowed} connections for clients, but the services may open "
                           f"{total} at once, at the most pods each may have: {detail}; raise it to at least "
                           f"{total + POSTGRES_RESERVED_CONNECTIONS} or lower TESSERA_DATABASE_POOL_SIZE")


def check(manifests: Iterable[Manifest], workloads: Iterable[Workload], namespace: str) -> list[Problem]:
    """Every semantic problem of one rendered overlay."""
    overlay = Overlay(manifests)
    workloads = list(workloads)
    problems: list[Problem] = []
    for checker in (check_virtual_services, check_destination_rules, check_images):
        problems.extend(checker(overlay))
    for checker in (check_services, check_pod_templates, check_companions, check_authorization,
                    check_network_policies, check_database_connections):
        problems.extend(checker(overlay, workloads))
    problems.extend(check_mtls(overlay, namespace))
    problems.extend(check_prometheus_rules(overlay))
    problems.extend(check_alertmanager_config(overlay))
    problems.extend(check_dashboards(overlay))
    return problems
