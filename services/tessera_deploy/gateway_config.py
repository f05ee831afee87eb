"""The gateway's Envoy configuration in the cluster: written from the gateway generator, never kept by hand.

kustomize's configMapGenerator (k8s/base/kustomization.yaml) reads the files this module writes into the
git-ignored k8s/base/gateway/generated/; `check` proves the rendered ConfigMap holds exactly what the generator
gives for the prod profile.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from tessera_deploy import K8S_DIR, ROOT
from tessera_deploy.catalog import GATEWAY, workloads
from tessera_deploy.checks import Overlay, Problem, exported_collector
from tessera_deploy.render import Manifest, load_all
from tessera_runtime.config import ConfigError

PROFILE = "prod"
GENERATED_DIR = K8S_DIR / "base" / "gateway" / "generated"
CONFIG_KEY = "envoy.yaml"
# The cluster Envoy's OpenTelemetry tracer exports to (tessera_gateway.bootstrap.TRACING_CLUSTER; importing the
# generator here would cost a second of every check).
TRACING_CLUSTER = "otel_collector"
# etcd refuses objects over 1.5 MiB and the API server ConfigMaps over 1 MiB; stay clearly below.
MAX_CONFIG_MAP_BYTES = 900 * 1024


class GatewayConfigError(Exception):
    """The generator is missing or failed; the message carries its words."""


def expected(profile: str = PROFILE) -> dict[str, str]:
    """What the gateway generator writes for the profile: ConfigMap key → content."""
    with tempfile.TemporaryDirectory(prefix="tessera-gateway-") as tmp:
        out = Path(tmp) / CONFIG_KEY
        result = subprocess.run(
            [sys.executable, "-m", "tessera_gateway.generate", "--profile", profile, "--out", str(out)],
            capture_output=True, text=True, cwd=ROOT, timeout=120)
        if result.returncode != 0 or not out.exists():
            raise GatewayConfigError(
                f"python -m tessera_gateway.generate --profile {profile} failed ({result.returncode}):\n"
                f"{result.stderr.strip() or result.stdout.strip()}")
        return {CONFIG_KEY: out.read_text()}


def write(files: dict[str, str], directory: Path = GENERATED_DIR) -> None:
    """Writes the generated files where the configMapGenerator reads them (only when they changed)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        path = directory / name
        if not path.exists() or path.read_text() != content:
            path.write_text(content)


def gateway_config_maps(manifests: Iterable[Manifest]) -> list[Manifest]:
    """The ConfigMaps the gateway Deployment mounts."""
    manifests = list(manifests)
    names = set()
    for m in manifests:
        if m.kind == "Deployment" and m.name == GATEWAY:
            for volume in m.obj["spec"]["template"]["spec"].get("volumes") or []:
                if "configMap" in volume:
                    names.add(volume["configMap"]["name"])
    return [m for m in manifests if m.kind == "ConfigMap" and m.name in names]


def upstreams(config: str) -> list[tuple[str, str, int]]:
    """(cluster, host, port) of every static cluster endpoint of an Envoy bootstrap."""
    docs = load_all(config)
    bootstrap = docs[0] if docs and isinstance(docs[0], dict) else {}
    found = []
    for cluster in (bootstrap.get("staticResources") or {}).get("clusters") or []:
        for group in (cluster.get("loadAssignment") or {}).get("endpoints") or []:
            for endpoint in group.get("lbEndpoints") or []:
                socket = endpoint.get("endpoint", {}).get("address", {}).get("socketAddress", {})
                found.append((cluster.get("name", ""), socket.get("address", ""), socket.get("portValue", 0)))
    return found


def check(manifests: Iterable[Manifest], files: dict[str, str]) -> list[Problem]:
    """The gateway's mounted ConfigMap equals the generator's output, and its upstreams are Services."""
    manifests = list(manifests)
    maps = gateway_config_maps(manifests)
    if not maps:
        return [Problem("k8s/base", f"Deployment/{GATEWAY}", "spec.template.spec.volumes",
                        "mounts no ConfigMap with the generated Envoy configuration")]
    problems = []
    for cm in maps:
        data = cm.obj.get("data") or {}
        for key, content in files.items():
            if key not in data:
                problems.append(Problem(cm.where, cm.ref, f"data[{key}]", "is missing"))
            elif data[key] != content:
                problems.append(Problem(
                    cm.where, cm.ref, f"data[{key}]",
                    f"differs from `python -m tessera_gateway.generate --profile {PROFILE}`: run `make k8s-render`"))
        for key in sorted(set(data) - set(files)):
            problems.append(Problem(cm.where, cm.ref, f"data[{key}]", "is not produced by the gateway generator"))
        size = sum(len(v.encode()) for v in data.values())
        if size > MAX_CONFIG_MAP_BYTES:
            problems.append(Problem(cm.where, cm.ref, "data", f"holds {size} bytes; a ConfigMap must stay below "
                                                              f"{MAX_CONFIG_MAP_BYTES}"))
    overlay = Overlay(manifests)
    collectors = _service_collectors(overlay)
    for cm in maps:
        found = upstreams((cm.obj.get("data") or {}).get(CONFIG_KEY, ""))
        problems.extend(_collector_problems(cm, found, collectors))
        for cluster, host, port in found:
            if not host.endswith(".svc.cluster.local") or cluster == TRACING_CLUSTER:
                continue  # outside the cluster (the JWKS server, the trace collector) or loopback
            service = overlay.service_for_host(host, cm.namespace)
            field = f"data[{CONFIG_KEY}].staticResources.clusters[{cluster}]"
            if service is None:
                problems.append(Problem(cm.where, cm.ref, field, f"upstream {host} is not a Service in this overlay"))
            elif port not in [p.get("port") for p in service.obj["spec"].get("ports") or []]:
                problems.append(Problem(cm.where, cm.ref, field, f"Service {service.name} has no port {port}"))
    return problems


def _service_collectors(overlay: Overlay) -> set[str]:
    """HOST:PORT of every collector the services export spans to (those that export none are checks' concern)."""
    found = set()
    for w in workloads():
        service = overlay.get("Service", w.k8s_name)
        for pod in overlay.pods_of(service) if service is not None else []:
            for container in pod.obj["spec"]["template"]["spec"].get("containers") or []:
                try:
                    collector = exported_collector(overlay, pod, container)
                except ConfigError:
                    continue  # reported by checks with the container's field
                if collector is not None:
                    found.add(collector)
    return found


def _collector_problems(cm: Manifest, found: list[tuple[str, str, int]], collectors: set[str]) -> list[Problem]:
    """The gateway's spans go where the services' go, so that one trace holds the edge and the services."""
    gateway = sorted(f"{host}:{port}" for cluster, host, port in found if cluster == TRACING_CLUSTER)
    wanted = " or ".join(sorted(collectors))
    if not gateway:
        if not collectors:
            return []
        return [Problem(cm.where, cm.ref, f"data[{CONFIG_KEY}].staticResources.clusters",
                        f"the gateway exports no spans while the services export to {wanted}: set tracing."
                        f"otlp_endpoint in the {PROFILE} profile of gateway-envoy/gateway.yaml")]
    field = f"data[{CONFIG_KEY}].staticResources.clusters[{TRACING_CLUSTER}]"
    if not collectors:
        return [Problem(cm.where, cm.ref, field, f"the gateway exports spans to {gateway[0]} but the services "
                                                 "export none (OTEL_EXPORTER_OTLP_ENDPOINT is not set)")]
    if not set(gateway) <= collectors:
        return [Problem(cm.where, cm.ref, field,
                        f"the gateway exports spans to {gateway[0]}, the services to {wanted}: make "
                        f"tracing.otlp_endpoint in gateway-envoy/gateway.yaml and OTEL_EXPORTER_OTLP_ENDPOINT agree")]
    return []
