"""The committed manifests: every overlay renders, validates against its schemas and passes the mesh checks."""

from __future__ import annotations

import hashlib
import importlib
import subprocess
import sys
import urllib.parse

import pytest
import yaml
from google.protobuf import descriptor_pb2

from tessera_deploy import ROOT, gateway_config, mesh, schemas
from tessera_deploy.catalog import (
    CANARIES,
    GATEWAY,
    GRAPHQL,
    GRAPHQL_API,
    GRAPHQL_PORT,
    INGRESS_PRINCIPAL,
    NAMESPACE,
    SERVICE_CALLS,
    principal,
    workloads,
)
from tessera_deploy.render import load_all
from tessera_deploy.validate import validate_overlay
from tessera_gateway import description
from tessera_gateway.bootstrap import GRAPHQL_CLUSTER, TRACING_CLUSTER
from tests.support.k8s import (
    CANARY_OVERLAYS,
    OVERLAYS,
    SERVICES,
    canary_overlay,
    copy_tree,
    describe,
    find,
    gateway_files,
    manifests,
    report,
)

GRPC_CONDITIONS = {"unavailable", "cancelled", "deadline-exceeded", "resource-exhausted"}
# Envoy retries a try cut short by perTryTimeout (a local reset) only on these conditions; without one of them the
# per-try timeout ends the whole call instead of moving it to another pod (RetryStateImpl::wouldRetryFromReset).
PER_TRY_TIMEOUT_CONDITIONS = {"reset", "5xx", "gateway-error"}
# The Istio CRDs the repository carries (k8s/schemas/), as the issue names them: Istio 1.30.3, unmodified.
ISTIO_CRDS_SHA256 = "dcb43ff6b9af2f629b80b6a82597f5a91db259c757e66cc5353ac007da28351a"


def test_every_overlay_is_tested():
    folders = [p.name for p in (ROOT / "k8s" / "overlays").iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert sorted(OVERLAYS) == sorted(folders)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_validates_and_passes_the_mesh_checks(overlay):
    result = report(overlay)
    assert result.manifests, describe(result.problems)
    assert result.problems == [], describe(result.problems)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_everything_each_service_needs(overlay):
    kinds: dict[str, set[str]] = {}
    for m in manifests(overlay):
        kinds.setdefault(m.kind, set()).add(m.name)
    for w in workloads():
        for kind in ("ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                     "NetworkPolicy", "ServiceMonitor", "DestinationRule", "VirtualService",
                     "AuthorizationPolicy", "PeerAuthentication"):
            assert w.k8s_name in kinds.get(kind, set()), f"{overlay}: {kind}/{w.k8s_name} is missing"
    for kind in ("ServiceAccount", "Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
                 "NetworkPolicy", "ServiceMonitor", "DestinationRule", "VirtualService", "AuthorizationPolicy",
                 "PeerAuthentication"):
        assert GRAPHQL in kinds.get(kind, set()), f"{overlay}: {kind}/{GRAPHQL} is missing"
    for kind in ("ServiceAccount", "Deployment", "Service", "DestinationRule", "AuthorizationPolicy"):
        assert GATEWAY in kinds[kind], f"{overlay}: {kind}/{GATEWAY} is missing"
    assert kinds["Gateway"] == {"tessera-edge"}
    assert "default" in kinds["PeerAuthentication"] and "tessera" in kinds["Telemetry"]
    namespace = find(overlay, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"
    assert {m.namespace for m in manifests(overlay) if m.kind != "Namespace"} == {NAMESPACE}


def test_every_object_is_checked_against_a_schema():
    """No kind escapes schema validation except the one documented operator kind."""
    seen = {(m.obj["apiVersion"], m.kind) for overlay in OVERLAYS for m in manifests(overlay)}
    unchecked = set()
    for api_version, kind in seen - schemas.SEMANTIC_ONLY_KINDS:
        errors = schemas.validate({"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}})
        if any("has no schema" in e.message for e in errors):
            unchecked.add((api_version, kind))
    assert unchecked == set()
    assert schemas.validate({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "x"}}) == [
        schemas.SchemaError("kind", "example.com/v1 Widget has no schema in Kubernetes " + schemas.KUBERNETES_VERSION)]
    assert {k for _, k in seen} >= {"VirtualService", "DestinationRule", "AuthorizationPolicy", "PeerAuthentication",
                                    "Telemetry", "Gateway", "Deployment", "StatefulSet", "NetworkPolicy"}


def test_istio_crds_in_the_repository_are_the_pinned_release():
    digest = hashlib.sha256(schemas.ISTIO_CRDS.read_bytes()).hexdigest()
    assert digest == ISTIO_CRDS_SHA256
    shared = ROOT.parent / "shared" / "schemas" / schemas.ISTIO_CRDS.name
    if shared.exists():  # the workplace's copy, when this checkout sits beside it
        assert hashlib.sha256(shared.read_bytes()).hexdigest() == digest


def test_istio_crds_are_read_from_the_environment_at_run_time(tmp_path, monkeypatch):
    """TESSERA_ISTIO_CRDS replaces the bundled CRDs: a schema without `timeout` rejects the generated routes."""
    crds = [d for d in load_all(schemas.ISTIO_CRDS.read_text())
            if d and d["spec"]["names"]["kind"] == "VirtualService"]
    for version in crds[0]["spec"]["versions"]:
        http = version["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]["http"]
        del http["items"]["properties"]["timeout"]
    path = tmp_path / "crds.yaml"
    path.write_text(yaml.safe_dump_all(crds))
    vs = find("prod", "VirtualService", "user-service")
    assert schemas.validate(vs) == []
    monkeypatch.setenv(schemas.ISTIO_CRDS_ENV, str(path))
    errors = schemas.validate(vs)
    assert errors and all(e.field.startswith("spec.http[") for e in errors)
    assert "'timeout' was unexpected" in errors[0].message


def test_generated_istio_files_match_the_contracts():
    assert mesh.stale(mesh.files()) == [], "run `make k8s-mesh`"


def _levels_from_generated_modules() -> dict[str, int]:
    """Method path → idempotency level, read through the generated *_pb2 modules (not the descriptor set)."""
    levels = {}
    for w in workloads():
        module = importlib.import_module(f"tessera.{w.name}.v1.{w.name}_service_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                levels[f"/{service.full_name}/{method.name}"] = method.GetOptions().idempotency_level
    return levels


def test_retries_follow_each_methods_idempotency_level():
    levels = _levels_from_generated_modules()
    assert levels, "no methods found"
    safe = (descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS, descriptor_pb2.MethodOptions.IDEMPOTENT)
    routed = {}
    for overlay in ("prod", *CANARY_OVERLAYS):
        for w in workloads():
            for route in find(overlay, "VirtualService", w.k8s_name)["spec"]["http"]:
                for match in route.get("match", []):
                    path = match["uri"]["exact"] if "uri" in match else None
                    if path:
                        routed.setdefault(path, []).append(route)
    assert set(routed) == set(levels), "every method has a route and every routed path is a method"
    for path, routes in routed.items():
        for route in routes:
            retries = route["retries"]
            if levels[path] in safe:
                assert retries["attempts"] >= 1, path
                assert GRPC_CONDITIONS <= set(retries["retryOn"].split(",")), path
                assert retries["perTryTimeout"], path
                assert PER_TRY_TIMEOUT_CONDITIONS & set(retries["retryOn"].split(",")), (
                    f"{path}: a try that exceeds perTryTimeout {retries['perTryTimeout']} would not be retried")
            else:
                assert retries == {"attempts": 0}, f"{path} is not marked safe to repeat but is retried"
            assert route["timeout"], path


def test_every_service_has_a_canary():
    """Each service of the catalog has its canary: a v2 component, an overlay and `tessera traffic` support."""
    assert set(CANARIES) == {w.name for w in workloads()} == set(SERVICES)
    generated = mesh.files()
    for w in workloads():
        component = mesh.canary_dir(w.name)
        assert {component / f for f in ("deployment.yaml", "destination-rule.yaml", "virtual-service.yaml")} <= set(
            generated), w.name
        assert (component / "kustomization.yaml").is_file(), w.name
        assert (ROOT / "k8s" / "overlays" / canary_overlay(w.name) / "kustomization.yaml").is_file(), w.name


@pytest.mark.parametrize("service", SERVICES)
def test_canary_routes_send_the_header_to_v2_and_split_the_rest(service):
    overlay = canary_overlay(service)
    w = next(w for w in workloads() if w.name == service)
    vs = find(overlay, "VirtualService", w.k8s_name)
    weight = mesh.current_canary_weight(service)
    assert 0 <= weight <= 100
    names = [r["name"] for r in vs["spec"]["http"]]
    # A header route for every route class the service has, and the catch-all, all before the weighted split.
    split = [n for n in names if not n.startswith("canary-")]
    assert names == [f"canary-{n}" for n in split] + split and split[-1] == "other", names
    for route in vs["spec"]["http"]:
        subsets = {d["destination"]["subset"]: d.get("weight") for d in route["route"]}
        assert {d["destination"]["host"] for d in route["route"]} == {w.host}
        if route["name"].startswith("canary-"):
            assert route["match"] and all(m["headers"]["canary"] == {"exact": "true"} for m in route["match"])
            assert subsets == {"v2": None}
        else:
            assert all("headers" not in m for m in route.get("match", []))
            assert subsets == {"v1": 100 - weight, "v2": weight}
    # Header routes carry the same timeouts and retries as the split route of their methods.
    by_name = {r["name"]: r for r in vs["spec"]["http"]}
    for name in split:
        canary, plain = by_name[f"canary-{name}"], by_name[name]
        assert (canary["timeout"], canary["retries"]) == (plain["timeout"], plain["retries"]), name
        if name != "other":
            assert [m["uri"] for m in canary["match"]] == [m["uri"] for m in plain["match"]], name
    prod = find("prod", "VirtualService", w.k8s_name)
    assert {d["destination"]["subset"] for r in prod["spec"]["http"] for d in r["route"]} == {"v1"}
    # Only this service is in canary in its overlay: the others route as in prod.
    for other in workloads():
        if other.name != service:
            assert find(overlay, "VirtualService", other.k8s_name) == find("prod", "VirtualService", other.k8s_name)
            assert not any(m.name == f"{other.k8s_name}-v2" for m in manifests(overlay))


@pytest.mark.parametrize("service", SERVICES)
def test_canary_v2_is_the_v1_pod_with_its_own_version_and_image(service):
    overlay = canary_overlay(service)
    name = f"{service}-service"
    v1 = find(overlay, "Deployment", name)
    v2 = find(overlay, "Deployment", f"{name}-v2")
    assert v2["spec"]["selector"]["matchLabels"] == {"app": name, "version": "v2"}
    assert v2["spec"]["template"]["metadata"]["labels"] == {**v2["spec"]["selector"]["matchLabels"],
                                                            "app.kubernetes.io/part-of": "tessera"}
    assert v2["metadata"]["labels"] == {**v1["metadata"]["labels"], "version": "v2"}
    assert v2["spec"]["replicas"] == 1
    v1_image = v1["spec"]["template"]["spec"]["containers"][0]["image"]
    v2_image = v2["spec"]["template"]["spec"]["containers"][0]["image"]
    assert v1_image.rsplit(":", 1)[0] == v2_image.rsplit(":", 1)[0] and v1_image != v2_image

    def pod(deployment: dict) -> dict:
        spec = dict(deployment["spec"]["template"]["spec"])
        spec["containers"] = [{k: v for k, v in c.items() if k != "image"} for c in spec["containers"]]
        return spec

    # The same pod otherwise: arguments, ports, variables, probes, resources, security, grace period.
    assert pod(v2) == pod(v1)
    assert v2["spec"]["template"]["metadata"]["annotations"] == v1["spec"]["template"]["metadata"]["annotations"]
    # No autoscaler takes the canary; the PDB, NetworkPolicy and AuthorizationPolicy of the service cover it.
    assert [h["spec"]["scaleTargetRef"]["name"] for h in (m.obj for m in manifests(overlay))
            if h["kind"] == "HorizontalPodAutoscaler" and h["metadata"]["name"] == name] == [name]


@pytest.mark.parametrize("service", SERVICES)
def test_canary_destination_rule_adds_v2_and_keeps_the_traffic_policy(service):
    overlay = canary_overlay(service)
    name = f"{service}-service"
    rule = find(overlay, "DestinationRule", name)["spec"]
    assert rule["subsets"] == [{"name": "v1", "labels": {"version": "v1"}},
                               {"name": "v2", "labels": {"version": "v2"}}]
    assert rule["trafficPolicy"] == find("prod", "DestinationRule", name)["spec"]["trafficPolicy"]
    assert find("prod", "DestinationRule", name)["spec"]["subsets"] == [{"name": "v1", "labels": {"version": "v1"}}]


def test_every_canary_at_once_renders_and_validates(tmp_path):
    """The components compose: an overlay that canaries every service together is valid too."""
    tree = copy_tree(tmp_path)
    overlay = tree / "k8s" / "overlays" / "canary-every"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nresources:\n  - ../prod\ncomponents:\n"
        + "".join(f"  - ../../components/canary-{s}-v2\n" for s in SERVICES))
    result = validate_overlay(overlay, root=tree, gateway_files=dict(gateway_files()))
    assert result.manifests and result.problems == [], describe(result.problems)
    refs = {m.ref for m in result.manifests}
    assert {f"Deployment/{s}-service-v2" for s in SERVICES} <= refs
    for w in workloads():
        vs = next(m.obj for m in result.manifests if m.ref == f"VirtualService/{w.k8s_name}")
        assert {d["destination"]["subset"] for r in vs["spec"]["http"] for d in r["route"]} == {"v1", "v2"}


def test_destination_rules_balance_bound_and_eject():
    for w in workloads():
        policy = find("prod", "DestinationRule", w.k8s_name)["spec"]["trafficPolicy"]
        assert policy["loadBalancer"]["simple"] == "LEAST_REQUEST"
        assert policy["connectionPool"]["tcp"]["maxConnections"] > 0
        assert policy["outlierDetection"]["consecutiveGatewayErrors"] > 0


def test_authorization_allows_exactly_the_callers_on_their_grpc_paths():
    health = "/grpc.health.v1.Health/*"
    for w in workloads():
        spec = find("prod", "AuthorizationPolicy", w.k8s_name)["spec"]
        assert spec["selector"]["matchLabels"] == {"app": w.k8s_name}
        *grpc_rules, metrics_rule = spec["rules"]
        by_caller = {}
        for rule in grpc_rules:
            [source] = rule["from"]
            [caller] = source["source"]["principals"]
            [target] = rule["to"]
            assert target["operation"]["ports"] == [str(w.grpc_port)]
            by_caller[caller] = target["operation"]["paths"]
        assert set(by_caller) == {principal(c) for c in w.callers}
        # The gateway fronts every public service whole, and nothing else (no reflection).
        assert by_caller[principal(GATEWAY)] == [f"/{s}/*" for s in w.grpc_services] + [health]
        # order-service gets the methods the catalog grants it on this service, one by one, and health checks.
        granted = [p for p in SERVICE_CALLS["order-service"] if p.split("/")[1] in w.grpc_services]
        if w.name in ("user", "inventory", "payment"):
            assert granted and by_caller[principal("order-service")] == [*granted, health]
            assert all(not p.endswith("*") for p in granted)
        else:
            assert principal("order-service") not in by_caller and granted == []
        # The GraphQL API gets the methods its schema calls on user, inventory, order and analytics, one by one, and
        # no health.
        granted = [p for p in SERVICE_CALLS[GRAPHQL] if p.split("/")[1] in w.grpc_services]
        if w.name in ("user", "inventory", "order", "analytics"):
            assert granted and by_caller[principal(GRAPHQL)] == granted
            assert all(not p.endswith("*") for p in granted)
        else:
            assert principal(GRAPHQL) not in by_caller and granted == []
        assert metrics_rule == {"to": [{"operation": {"ports": ["9090"], "methods": ["GET"], "paths": ["/metrics"]}}]}
    gateway_rule = find("prod", "AuthorizationPolicy", GATEWAY)["spec"]["rules"][0]
    assert gateway_rule["from"][0]["source"]["principals"] == [INGRESS_PRINCIPAL]
    assert find("prod", "AuthorizationPolicy", "allow-nothing")["spec"] == {}
    assert find("prod", "PeerAuthentication", "default")["spec"] == {"mtls": {"mode": "STRICT"}}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_and_gateway_export_spans_to_the_shared_collector(overlay):
    config = find(overlay, "ConfigMap", "tessera-config")["data"]
    endpoint = urllib.parse.urlsplit(config["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert endpoint.scheme == "http" and endpoint.hostname.endswith(".svc.cluster.local")
    for w in workloads():
        container = find(overlay, "Deployment", w.k8s_name)["spec"]["template"]["spec"]["containers"][0]
        assert {"configMapRef": {"name": "tessera-config"}} in container["envFrom"]
        assert "OTEL_EXPORTER_OTLP_ENDPOINT" not in {e["name"] for e in container.get("env", [])}
    envoy = load_all(dict(gateway_files())[gateway_config.CONFIG_KEY])[0]
    [collector] = [c for c in envoy["staticResources"]["clusters"] if c["name"] == TRACING_CLUSTER]
    # A cluster host name: resolved by DNS, never a fixed address.
    assert collector["type"] in ("STRICT_DNS", "LOGICAL_DNS")
    assert gateway_config.upstreams(dict(gateway_files())[gateway_config.CONFIG_KEY]).count(
        (TRACING_CLUSTER, endpoint.hostname, endpoint.port)) == 1
    manager = envoy["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]
    assert manager["tracing"]["provider"]["typedConfig"]["grpcService"]["envoyGrpc"]["clusterName"] == TRACING_CLUSTER
    assert gateway_config.TRACING_CLUSTER == TRACING_CLUSTER


def test_deployments_probe_the_health_service_and_shut_down_within_the_grace_period():
    config = find("prod", "ConfigMap", "tessera-config")["data"]
    drain, grace = float(config["TESSERA_DRAIN_SECONDS"]), float(config["TESSERA_GRACE_SECONDS"])
    assert config["TESSERA_ENV"] == "production" and config["TESSERA_GRPC_HOST"] == "0.0.0.0"
    for w in workloads():
        pod = find("prod", "Deployment", w.k8s_name)["spec"]["template"]["spec"]
        container = pod["containers"][0]
        assert container["args"] == ["serve", w.name]
        assert container["startupProbe"]["grpc"] == {"port": w.grpc_port, "service": "liveness"}
        assert container["livenessProbe"]["grpc"] == {"port": w.grpc_port, "service": "liveness"}
        assert container["readinessProbe"]["grpc"] == {"port": w.grpc_port, "service": w.grpc_services[0]}
        assert pod["terminationGracePeriodSeconds"] > drain + grace
        env = {e["name"]: e for e in container["env"]}
        for variable, key in (("TESSERA_DATABASE_URL", "database-url"), ("TESSERA_AMQP_URL", "amqp-url")):
            assert env[variable]["valueFrom"]["secretKeyRef"] == {"name": f"tessera-{w.name}", "key": key}
        for other in workloads():
            assert config[f"TESSERA_{other.name.upper()}_SERVICE_ADDR"] == f"{other.host}:{other.grpc_port}"


def test_no_secret_values_are_committed():
    for overlay in OVERLAYS:
        assert [m.ref for m in manifests(overlay) if m.kind == "Secret"] == []
    for m in manifests("prod"):
        if m.kind == "ConfigMap":
            text = yaml.safe_dump(m.obj).lower()
            assert "password" not in text and "postgresql+asyncpg://" not in text, m.ref


def test_gateway_config_map_is_the_generator_output():
    expected = dict(gateway_files())
    for overlay in OVERLAYS:
        deployment = find(overlay, "Deployment", GATEWAY)
        names = [v["configMap"]["name"] for v in deployment["spec"]["template"]["spec"]["volumes"] if "configMap" in v]
        assert len(names) == 1
        assert find(overlay, "ConfigMap", names[0])["data"] == expected
    hosts = {(host, port) for _, host, port in gateway_config.upstreams(expected[gateway_config.CONFIG_KEY])}
    assert {(w.host, w.grpc_port) for w in workloads()} <= hosts
    assert (GRAPHQL_CLUSTER, GRAPHQL_API.host, GRAPHQL_PORT) in gateway_config.upstreams(
        expected[gateway_config.CONFIG_KEY])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_keeps_serving_until_it_is_out_of_rotation(overlay):
    """Envoy exits at once on SIGTERM (it drains only when told through its admin API, which is loopback-only and
    has no client in the distroless image): without a preStop pause, every rollout or scale-in of the gateway resets
    its in-flight calls and refuses new ones until the ingress gateway learns the pod is gone (the edge route does
    not retry). The pause must end before the grace period and before the sidecar in front of it stops."""
    deployment = find(overlay, "Deployment", GATEWAY)
    pod = deployment["spec"]["template"]
    [envoy] = [c for c in pod["spec"]["containers"] if c["image"].startswith("envoyproxy/envoy")]
    pause = envoy.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
    assert pause >= 10, f"{overlay}: the gateway's Envoy gets SIGTERM with no pause before it (preStop sleep {pause}s)"
    assert pause < pod["spec"]["terminationGracePeriodSeconds"]
    proxy = yaml.safe_load(pod["metadata"]["annotations"]["proxy.istio.io/config"])
    assert pause < float(proxy["terminationDrainDuration"].removesuffix("s"))


# --- the GraphQL API ---------------------------------------------------------------------------------------------


def _ports(rule: dict) -> set:
    return {p["port"] for p in rule.get("ports", [])}


def _apps(peers: list[dict]) -> set[str]:
    return {p["podSelector"]["matchLabels"]["app"] for p in peers
            if "podSelector" in p and "namespaceSelector" not in p}


def test_the_gateways_graphql_upstream_is_the_graphql_service():
    """The prod profile's /graphql upstream is the catalog's Service: its name, namespace and HTTP port."""
    route = description.load("prod").graphql
    assert route is not None and (route.address.host, route.address.port) == (GRAPHQL_API.host, GRAPHQL_PORT)
    from tessera_graphql.app import DEFAULT_PORT

    assert GRAPHQL_PORT == DEFAULT_PORT


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graphql_deployment_runs_the_api_as_production_needs(overlay):
    deployment = find(overlay, "Deployment", GRAPHQL)
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"]["app"] == GRAPHQL and pod["spec"]["serviceAccountName"] == GRAPHQL
    assert find(overlay, "ServiceAccount", GRAPHQL)["automountServiceAccountToken"] is False
    [container] = pod["spec"]["containers"]
    image = container["image"]
    assert image.rsplit(":", 1)[0].endswith("/graphql") and ":" in image.rsplit("/", 1)[-1], image
    assert "args" not in container and "command" not in container  # the image's entrypoint: python -m tessera_graphql
    assert container["ports"] == [{"name": "http", "containerPort": GRAPHQL_PORT, "protocol": "TCP"}]
    for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[kind]["httpGet"] == {"path": "/health", "port": GRAPHQL_PORT}, kind
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env == {"TESSERA_GRAPHQL_HOST": "0.0.0.0", "TESSERA_GRAPHQL_PORT": str(GRAPHQL_PORT)}
    assert container["envFrom"] == [{"configMapRef": {"name": "tessera-config"}}]
    config = find(overlay, "ConfigMap", "tessera-config")["data"]
    assert config["TESSERA_ENV"] == "production" and config["OTEL_EXPORTER_OTLP_ENDPOINT"]
    for w in workloads():
        if w.name in ("user", "inventory", "order"):
            assert config[f"TESSERA_{w.name.upper()}_SERVICE_ADDR"] == f"{w.host}:{w.grpc_port}"
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] != 0
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["resources"]["requests"] and container["resources"]["limits"]
    annotations = pod["metadata"]["annotations"]
    assert (annotations["prometheus.io/port"], annotations["prometheus.io/path"]) == (str(GRAPHQL_PORT), "/metrics")
    pause = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pause + 10 < pod["spec"]["terminationGracePeriodSeconds"]  # aiohttp's shutdown_timeout is 10 s
    service = find(overlay, "Service", GRAPHQL)["spec"]
    assert service["selector"] == {"app": GRAPHQL}
    assert service["ports"][0] == {"name": "http", "port": GRAPHQL_PORT, "targetPort": "http", "protocol": "TCP",
                                   "appProtocol": "http"}
    assert find(overlay, "HorizontalPodAutoscaler", GRAPHQL)["spec"]["scaleTargetRef"]["name"] == GRAPHQL
    assert find(overlay, "PodDisruptionBudget", GRAPHQL)["spec"]["selector"]["matchLabels"] == {"app": GRAPHQL}
    [endpoint] = find(overlay, "ServiceMonitor", GRAPHQL)["spec"]["endpoints"]
    assert {p["name"]: p["port"] for p in service["ports"]}[endpoint["port"]] == 15020


def test_graphql_is_reached_only_by_the_gateway_and_never_retried_by_the_mesh():
    policy = find("prod", "AuthorizationPolicy", GRAPHQL)["spec"]
    assert policy["selector"] == {"matchLabels": {"app": GRAPHQL}} and policy["action"] == "ALLOW"
    [rule] = policy["rules"]
    assert rule["from"] == [{"source": {"principals": [principal(GATEWAY)]}}]
    assert rule["to"] == [
        {"operation": {"ports": [str(GRAPHQL_PORT)], "methods": ["GET", "POST"], "paths": ["/graphql"]}},
        {"operation": {"ports": [str(GRAPHQL_PORT)], "methods": ["GET"], "paths": ["/health"]}}]
    # mTLS only: no port of the API is PERMISSIVE (its metrics leave through the sidecar agent).
    assert find("prod", "PeerAuthentication", GRAPHQL)["spec"] == {
        "selector": {"matchLabels": {"app": GRAPHQL}}, "mtls": {"mode": "STRICT"}}
    vs = find("prod", "VirtualService", GRAPHQL)["spec"]
    assert vs["hosts"] == [GRAPHQL_API.host]
    [route] = vs["http"]
    assert "match" not in route and route["retries"] == {"attempts": 0}, "a POST /graphql may be a mutation"
    assert route["route"] == [{"destination": {"host": GRAPHQL_API.host, "subset": "v1",
                                               "port": {"number": GRAPHQL_PORT}}}]
    assert route["timeout"] == f"{description.load('prod').graphql.route_class.timeout_seconds}s"
    rule = find("prod", "DestinationRule", GRAPHQL)["spec"]
    assert rule["host"] == GRAPHQL_API.host and rule["trafficPolicy"]["tls"] == {"mode": "ISTIO_MUTUAL"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_graphql_network_policies_admit_the_gateway_and_let_it_out_to_what_it_calls(overlay):
    spec = find(overlay, "NetworkPolicy", GRAPHQL)["spec"]
    assert spec["podSelector"] == {"matchLabels": {"app": GRAPHQL}} and spec["policyTypes"] == ["Ingress", "Egress"]
    ingress = {(frozenset(_apps(r["from"])), frozenset(_ports(r))) for r in spec["ingress"]}
    assert (frozenset({GATEWAY}), frozenset({GRAPHQL_PORT})) in ingress
    assert {p for r in spec["ingress"] if _apps(r["from"]) for p in _ports(r)} == {GRAPHQL_PORT}
    assert all(_ports(r) == {15020} for r in spec["ingress"] if not _apps(r["from"]))
    # Egress to exactly the services the schema calls, on their gRPC ports.
    called = {p.split("/")[1] for p in SERVICE_CALLS[GRAPHQL]}
    expected = {(w.k8s_name, w.grpc_port) for w in workloads() if set(w.grpc_services) & called}
    assert {(app, port) for r in spec["egress"] for app in _apps(r.get("to", [])) for port in _ports(r)} == expected
    assert len(expected) == 4
    # The gateway may go out to it; the services it calls let it in.
    gateway = find(overlay, "NetworkPolicy", GATEWAY)["spec"]
    assert any(_apps(r.get("to", [])) == {GRAPHQL} and _ports(r) == {GRAPHQL_PORT} for r in gateway["egress"])
    for name, port in expected:
        rules = find(overlay, "NetworkPolicy", name)["spec"]["ingress"]
        assert any(GRAPHQL in _apps(r["from"]) and port in _ports(r) for r in rules), name
    for w in workloads():
        if (w.k8s_name, w.grpc_port) not in expected:
            rules = find(overlay, "NetworkPolicy", w.k8s_name)["spec"]["ingress"]
            assert not any(GRAPHQL in _apps(r["from"]) for r in rules), w.k8s_name


def test_render_names_an_output_folder_it_cannot_write(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = subprocess.run([sys.executable, "-m", "tessera_deploy.render", "--out", str(blocker / "k8s")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith(f"k8s-render: cannot write {blocker / 'k8s'}/"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
