"""Broken copies of the manifests: each mistake is reported with the file and the field to fix."""

from __future__ import annotations

import pytest
import yaml

from tessera_deploy.checks import Problem
from tests.support.k8s import SERVICES, canary_overlay, copy_tree, describe, edit_yaml, validate_copy

CANARY_VS = "k8s/components/canary-user-v2/virtual-service.yaml"
PATCHED_VS = f"istio/virtual-services.yaml (patched by {CANARY_VS})"


@pytest.fixture
def tree(tmp_path):
    return copy_tree(tmp_path)


def _one(problems: list[Problem], where: str, field: str, text: str) -> Problem:
    hits = [p for p in problems if p.where == where and p.field == field and text in p.message]
    assert hits, f"expected {where} {field} '{text}' among:\n{describe(problems)}"
    return hits[0]


def _canary_routes(tree, change) -> None:
    edit_yaml(tree / CANARY_VS, "VirtualService", "user-service", lambda d: change(d["spec"]["http"]))


def test_the_unbroken_copy_passes(tree):
    assert validate_copy(tree, "canary-user") == []


def test_wrong_subset_is_reported(tree):
    def change(routes):
        routes[0]["route"][0]["destination"]["subset"] = "v3"

    _canary_routes(tree, change)
    problems = validate_copy(tree, "canary-user")
    problem = _one(problems, PATCHED_VS, "spec.http[0].route[0].destination.subset", "subset 'v3'")
    assert "is not defined in any DestinationRule" in problem.message and "'v1', 'v2'" in problem.message


def test_weights_that_do_not_sum_to_100_are_reported(tree):
    def change(routes):
        split = next(r for r in routes if r["name"] == "read")
        split["route"][0]["weight"], split["route"][1]["weight"] = 90, 20

    _canary_routes(tree, change)
    problems = validate_copy(tree, "canary-user")
    index = next(i for i, r in enumerate(yaml.safe_load((tree / CANARY_VS).read_text())["spec"]["http"])
                 if r["name"] == "read")
    _one(problems, PATCHED_VS, f"spec.http[{index}].route[*].weight", "sum to 110, not 100")
    assert len(problems) == 1, describe(problems)


def test_missing_probe_is_reported(tree):
    def change(doc):
        del doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]

    edit_yaml(tree / "k8s/base/services/inventory.yaml", "Deployment", "inventory-service", change)
    problems = validate_copy(tree, "prod")
    _one(problems, "k8s/base/services/inventory.yaml", "spec.template.spec.containers[0].readinessProbe",
         "has no readinessProbe")


def test_bad_field_type_is_reported_by_the_kubernetes_schema(tree):
    def change(doc):
        doc["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "fifty"

    edit_yaml(tree / "k8s/base/services/payment.yaml", "Deployment", "payment-service", change)
    problems = validate_copy(tree, "prod")
    _one(problems, "k8s/base/services/payment.yaml", "spec.template.spec.containers[0].ports[0].containerPort",
         "'fifty' is not of type 'integer'")


def test_bad_field_type_is_reported_by_the_istio_schema(tree):
    def change(doc):
        doc["spec"]["trafficPolicy"]["outlierDetection"]["consecutiveGatewayErrors"] = "five"

    edit_yaml(tree / "istio/destination-rules.yaml", "DestinationRule", "order-service", change)
    problems = validate_copy(tree, "prod")
    _one(problems, "istio/destination-rules.yaml", "spec.trafficPolicy.outlierDetection.consecutiveGatewayErrors",
         "'five' is not of type 'integer'")


def test_misspelt_field_is_reported(tree):
    def change(doc):
        doc["spec"]["http"][0]["retries"]["attemps"] = doc["spec"]["http"][0]["retries"].pop("attempts")

    edit_yaml(tree / "istio/virtual-services.yaml", "VirtualService", "order-service", change)
    problems = validate_copy(tree, "prod")
    _one(problems, "istio/virtual-services.yaml", "spec.http[0].retries", "'attemps' was unexpected")


@pytest.mark.parametrize("service", SERVICES)
def test_subset_selecting_no_pods_is_reported(tree, service):
    # A canary's v2 subset without the v2 Deployment: routes to pods that do not exist.
    component = f"k8s/components/canary-{service}-v2"
    kustomization = tree / component / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("resources:\n  - deployment.yaml\n", ""))
    problems = validate_copy(tree, canary_overlay(service))
    where = f"istio/destination-rules.yaml (patched by {component}/destination-rule.yaml)"
    _one(problems, where, "spec.subsets[1].labels", "subset 'v2' ({'version': 'v2'}) selects no pod template")


def test_host_that_is_not_a_service_is_reported(tree):
    def change(doc):
        doc["spec"]["hosts"] = ["users.tessera.svc.cluster.local"]

    edit_yaml(tree / "istio/virtual-services.yaml", "VirtualService", "user-service", change)
    _one(validate_copy(tree, "prod"), "istio/virtual-services.yaml", "spec.hosts[0]",
         "'users.tessera.svc.cluster.local' is not a Service")


def test_port_without_a_protocol_istio_knows_is_reported(tree):
    def change(doc):
        doc["spec"]["ports"][0]["name"] = "api"
        del doc["spec"]["ports"][0]["appProtocol"]

    edit_yaml(tree / "k8s/base/services/order.yaml", "Service", "order-service", change)
    problems = validate_copy(tree, "prod")
    _one(problems, "k8s/base/services/order.yaml", "spec.ports[0].name", "gives Istio no protocol")
    _one(problems, "k8s/base/services/order.yaml", "spec.ports", "has no port named 'grpc'")


def test_probe_on_a_port_the_container_lacks_is_reported(tree):
    def change(doc):
        doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["port"] = 50099

    edit_yaml(tree / "k8s/base/services/user.yaml", "Deployment", "user-service", change)
    _one(validate_copy(tree, "prod"), "k8s/base/services/user.yaml",
         "spec.template.spec.containers[0].livenessProbe.grpc.port", "port 50099 is not a port of container")


def test_liveness_that_checks_dependencies_is_reported(tree):
    def change(doc):
        doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["grpc"]["service"] = ""

    edit_yaml(tree / "k8s/base/services/user.yaml", "Deployment", "user-service", change)
    _one(validate_copy(tree, "prod"), "k8s/base/services/user.yaml",
         "spec.template.spec.containers[0].livenessProbe.grpc.service", "liveness must never check dependencies")


def test_principal_that_is_not_a_service_account_is_reported(tree):
    def change(doc):
        doc["spec"]["rules"][0]["from"][0]["source"]["principals"].append("cluster.local/ns/tessera/sa/billing")

    edit_yaml(tree / "istio/authorization-policies.yaml", "AuthorizationPolicy", "payment-service", change)
    problems = validate_copy(tree, "prod")
    _one(problems, "istio/authorization-policies.yaml", "spec.rules[0].from[0].source.principals[1]",
         "names no ServiceAccount of this overlay")


@pytest.mark.parametrize(("policy", "rule", "path", "text"), [
    # order-service's rule (rules[1]) granting a method the payment contract does not have.
    ("payment-service", 1, "/tessera.payment.v1.PaymentService/ChargeCard",
     "names no method of the contracts (tessera.payment.v1.PaymentService has GetPayment, ListPayments, "
     "ProcessPayment, RefundPayment, VoidPayment)"),
    # A prefix that matches no method.
    ("user-service", 1, "/tessera.user.v1.UserService/Frob*", "matches no method of tessera.user.v1.UserService"),
    # Reflection is no public API: the gateway's rule (rules[0]) must not reach it.
    ("inventory-service", 0, "/grpc.reflection.v1alpha.ServerReflection/*", "names no gRPC service of the contracts"),
    ("order-service", 0, "/tessera.orders.v1.OrderService/*", "names no gRPC service of the contracts"),
])
def test_policy_path_naming_no_method_of_the_contracts_is_reported(tree, policy, rule, path, text):
    def change(doc):
        doc["spec"]["rules"][rule]["to"][0]["operation"]["paths"].insert(0, path)

    edit_yaml(tree / "istio/authorization-policies.yaml", "AuthorizationPolicy", policy, change)
    problems = validate_copy(tree, "prod")
    _one(problems, "istio/authorization-policies.yaml", f"spec.rules[{rule}].to[0].operation.paths[0]", text)
    assert len(problems) == 1, describe(problems)


def test_services_exporting_no_spans_are_reported(tree):
    def change(doc):
        del doc["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"]

    edit_yaml(tree / "k8s/base/config.yaml", "ConfigMap", "tessera-config", change)
    problems = validate_copy(tree, "prod")
    for service in ("user", "inventory", "payment", "order", "notification", "analytics"):
        _one(problems, f"k8s/base/services/{service}.yaml", "spec.template.spec.containers[0].env["
             "OTEL_EXPORTER_OTLP_ENDPOINT]", "is not set: the service would export no spans")
    _one(problems, "k8s/base/services/graphql.yaml", "spec.template.spec.containers[0].env["
         "OTEL_EXPORTER_OTLP_ENDPOINT]", "is not set: the API would export no spans")
    _one(problems, "k8s/base/kustomization.yaml", "data[envoy.yaml].staticResources.clusters[otel_collector]",
         "the gateway exports spans to opentelemetry-collector.observability.svc.cluster.local:4317 but the "
         "services export none")
    assert len(problems) == 8, describe(problems)


def test_gateway_and_services_exporting_to_different_collectors_are_reported(tree):
    def change(doc):
        doc["data"]["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://otel.tracing.svc.cluster.local:4317"

    edit_yaml(tree / "k8s/base/config.yaml", "ConfigMap", "tessera-config", change)
    problems = validate_copy(tree, "prod")
    _one(problems, "k8s/base/kustomization.yaml", "data[envoy.yaml].staticResources.clusters[otel_collector]",
         "the gateway exports spans to opentelemetry-collector.observability.svc.cluster.local:4317, the services "
         "to otel.tracing.svc.cluster.local:4317")
    assert len(problems) == 1, describe(problems)


def test_malformed_collector_endpoint_is_reported(tree):
    def change(doc):
        doc["spec"]["template"]["spec"]["containers"][0]["env"].append(
            {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://:4317"})

    edit_yaml(tree / "k8s/base/services/payment.yaml", "Deployment", "payment-service", change)
    problems = validate_copy(tree, "prod")
    _one(problems, "k8s/base/services/payment.yaml", "spec.template.spec.containers[0].env["
         "OTEL_EXPORTER_OTLP_ENDPOINT]", "must be a URL such as http://host:4317")
    assert len(problems) == 1, describe(problems)


def test_network_policy_admitting_a_caller_the_mesh_refuses_is_reported(tree):
    def change(doc):
        doc["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {"app": "payment-service"}}})

    edit_yaml(tree / "k8s/base/services/user.yaml", "NetworkPolicy", "user-service", change)
    _one(validate_copy(tree, "prod"), "k8s/base/services/user.yaml", "spec.ingress[*].from",
         "lets ['graphql', 'order-service', 'payment-service', 'tessera-gateway'] reach port 50051")


def test_latest_and_untagged_images_are_reported(tree):
    prod = tree / "k8s/overlays/prod/kustomization.yaml"
    prod.write_text(prod.read_text().replace("newTag: 0.1.0\n  - name: inventory-service", "newTag: latest\n"
                                             "  - name: inventory-service", 1))
    dev = tree / "k8s/overlays/dev/postgres.yaml"
    dev.write_text(dev.read_text().replace("image: postgres:17.6-bookworm", "image: postgres"))
    _one(validate_copy(tree, "prod"), "k8s/base/services/user.yaml", "spec.template.spec.containers[0].image",
         "uses the tag latest")
    _one(validate_copy(tree, "dev"), "k8s/overlays/dev/postgres.yaml", "spec.template.spec.containers[0].image",
         "has no tag")


def test_missing_pod_disruption_budget_and_limits_are_reported(tree):
    path = tree / "k8s/base/services/notification.yaml"
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d["kind"] != "PodDisruptionBudget"]
    del docs[1]["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    problems = validate_copy(tree, "prod")
    _one(problems, "k8s/base/services/notification.yaml", "(companions)", "no PodDisruptionBudget selects")
    _one(problems, "k8s/base/services/notification.yaml", "spec.template.spec.containers[0].resources.limits.memory",
         "is missing")


def test_grace_period_shorter_than_drain_and_grace_is_reported(tree):
    def change(doc):
        doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 20

    edit_yaml(tree / "k8s/base/services/order.yaml", "Deployment", "order-service", change)
    _one(validate_copy(tree, "prod"), "k8s/base/services/order.yaml",
         "spec.template.spec.terminationGracePeriodSeconds", "20s does not exceed drain + grace (5s + 20s)")


def test_hand_edited_gateway_config_is_reported(tree):
    generated = tree / "k8s/base/gateway/generated/envoy.yaml"
    generated.write_text(generated.read_text() + "# tuned by hand\n")
    problems = validate_copy(tree, "prod")
    hit = [p for p in problems if p.field == "data[envoy.yaml]"]
    assert len(hit) == 1 and "differs from `python -m tessera_gateway.generate --profile prod`" in hit[0].message
    assert hit[0].where == "k8s/base/kustomization.yaml"


def test_chaos_patch_on_a_renamed_route_fails_to_render(tree):
    def change(doc):
        doc["spec"]["http"][2]["name"] = "writes"

    edit_yaml(tree / "istio/virtual-services.yaml", "VirtualService", "payment-service", change)
    problems = validate_copy(tree, "chaos")
    assert len(problems) == 1 and problems[0].field == "(render)", describe(problems)
    assert "test failed" in problems[0].message and problems[0].where == "k8s/overlays/chaos"


def test_gateway_upstream_that_no_service_serves_is_reported(tree):
    def change(doc):
        doc["spec"]["ports"][0]["port"] = 50061

    edit_yaml(tree / "k8s/base/services/user.yaml", "Service", "user-service", change)
    problems = validate_copy(tree, "prod")
    _one(problems, "k8s/base/kustomization.yaml", "data[envoy.yaml].staticResources.clusters[user]",
         "Service user-service has no port 50051")
    _one(problems, "istio/virtual-services.yaml", "spec.http[0].route[0].destination.port.number",
         "Service user-service has no port 50051")
    _one(problems, "k8s/base/services/user.yaml", "spec.ports[0].port",
         "is 50061, but user-service serves gRPC on 50051")


def test_malformed_duration_is_reported(tree):
    def change(doc):
        doc["spec"]["http"][1]["timeout"] = "12"

    edit_yaml(tree / "istio/virtual-services.yaml", "VirtualService", "inventory-service", change)
    _one(validate_copy(tree, "prod"), "istio/virtual-services.yaml", "spec.http[1].timeout",
         "'12' is not a duration of at least 1ms")


DEV_POSTGRES = "k8s/overlays/dev/postgres.yaml"
POSTGRES_ARGS = "spec.template.spec.containers[0].args"


def test_a_dev_postgresql_too_small_for_the_services_connections_is_reported(tree):
    def change(doc):
        del doc["spec"]["template"]["spec"]["containers"][0]["args"]  # PostgreSQL's default: 100

    edit_yaml(tree / DEV_POSTGRES, "StatefulSet", "postgres", change)
    problem = _one(validate_copy(tree, "dev"), DEV_POSTGRES, POSTGRES_ARGS, "leaves 97 connections for clients")
    # Six services, at most 2 pods each in the dev overlay, 26 connections per process.
    assert "may open 312 at once" in problem.message and "user-service 52" in problem.message
    assert "analytics-service 52" in problem.message and "raise it to at least 315" in problem.message


def test_more_pods_or_workers_than_the_dev_postgresql_can_take_are_reported(tree):
    kustomization = tree / "k8s/overlays/dev/kustomization.yaml"
    text = kustomization.read_text()
    assert text.count("path: /spec/maxReplicas\n        value: 2") == 1
    kustomization.write_text(text.replace("path: /spec/maxReplicas\n        value: 2",
                                          "path: /spec/maxReplicas\n        value: 3"))
    problem = _one(validate_copy(tree, "dev"), DEV_POSTGRES, POSTGRES_ARGS, "leaves 357 connections")
    assert "may open 468 at once" in problem.message and "(26 per process)" in problem.message
    # Smaller pools make room for the third pod: 6 services × 3 pods × (2 × 4 + 2 + 1) connections.
    edit_yaml(tree / "k8s/overlays/dev/config.yaml", "ConfigMap", "tessera-config",
              lambda doc: doc["data"].update(TESSERA_DATABASE_POOL_SIZE="4"))
    assert validate_copy(tree, "dev") == []

    kustomization.write_text(text)
    edit_yaml(tree / "k8s/overlays/dev/config.yaml", "ConfigMap", "tessera-config",
              lambda doc: doc["data"].pop("TESSERA_DATABASE_POOL_SIZE"))
    edit_yaml(tree / "k8s/overlays/dev/config.yaml", "ConfigMap", "tessera-config",
              lambda doc: doc["data"].update(TESSERA_WORKERS="2"))
    problem = _one(validate_copy(tree, "dev"), DEV_POSTGRES, POSTGRES_ARGS, "leaves 357 connections")
    assert "may open 624 at once" in problem.message and "order-service 104" in problem.message


# --- the GraphQL API ---------------------------------------------------------------------------------------------

GRAPHQL_YAML = "k8s/base/services/graphql.yaml"
GATEWAY_YAML = "k8s/base/gateway/gateway.yaml"


def _drop_egress_to(app: str):
    def change(doc):
        rules = doc["spec"]["egress"]
        doc["spec"]["egress"] = [r for r in rules if not any(
            p.get("podSelector", {}).get("matchLabels", {}).get("app") == app for p in r.get("to", []))]
        assert len(doc["spec"]["egress"]) == len(rules) - 1

    return change


def test_graphql_without_its_egress_to_a_service_it_calls_is_reported(tree):
    edit_yaml(tree / GRAPHQL_YAML, "NetworkPolicy", "graphql", _drop_egress_to("order-service"))
    problems = validate_copy(tree, "prod")
    _one(problems, GRAPHQL_YAML, "spec.egress[*].to", "does not let graphql reach order-service on port 50054, which "
         "the AuthorizationPolicy authorises it to call")
    assert len(problems) == 1, describe(problems)


def test_gateway_without_its_egress_to_graphql_is_reported(tree):
    edit_yaml(tree / GATEWAY_YAML, "NetworkPolicy", "tessera-gateway", _drop_egress_to("graphql"))
    problems = validate_copy(tree, "prod")
    _one(problems, GATEWAY_YAML, "spec.egress[*].to", "does not let tessera-gateway reach graphql on port 8090")
    assert len(problems) == 1, describe(problems)


def test_graphql_egress_to_a_service_it_is_not_granted_is_reported(tree):
    def change(doc):
        doc["spec"]["egress"].append({"to": [{"podSelector": {"matchLabels": {"app": "payment-service"}}}],
                                      "ports": [{"port": 50053, "protocol": "TCP"}]})

    edit_yaml(tree / GRAPHQL_YAML, "NetworkPolicy", "graphql", change)
    problems = validate_copy(tree, "prod")
    _one(problems, GRAPHQL_YAML, "spec.egress[*].to", "lets graphql reach payment-service on port 50053, but the "
         "AuthorizationPolicy does not authorise it")
    assert len(problems) == 1, describe(problems)


def test_graphql_admitting_a_caller_other_than_the_gateway_is_reported(tree):
    def change(doc):
        doc["spec"]["ingress"][0]["from"].append({"podSelector": {"matchLabels": {"app": "order-service"}}})

    edit_yaml(tree / GRAPHQL_YAML, "NetworkPolicy", "graphql", change)
    _one(validate_copy(tree, "prod"), GRAPHQL_YAML, "spec.ingress[*].from",
         "lets ['order-service', 'tessera-gateway'] reach port 8090, but the AuthorizationPolicy authorises "
         "['tessera-gateway']")


def test_a_service_admitting_graphql_without_its_grant_is_reported(tree):
    def change(doc):
        rules = doc["spec"]["rules"]
        doc["spec"]["rules"] = [r for r in rules if r.get("from", [{}])[0].get("source", {}).get("principals") != [
            "cluster.local/ns/tessera/sa/graphql"]]
        assert len(doc["spec"]["rules"]) == len(rules) - 1

    edit_yaml(tree / "istio/authorization-policies.yaml", "AuthorizationPolicy", "inventory-service", change)
    problems = validate_copy(tree, "prod")
    _one(problems, "k8s/base/services/inventory.yaml", "spec.ingress[*].from",
         "lets ['graphql', 'order-service', 'tessera-gateway'] reach port 50052, but the AuthorizationPolicy "
         "authorises ['order-service', 'tessera-gateway']")
    _one(problems, GRAPHQL_YAML, "spec.egress[*].to", "lets graphql reach inventory-service on port 50052, but the "
         "AuthorizationPolicy does not authorise it")


def test_graphql_service_missing_is_reported(tree):
    path = tree / GRAPHQL_YAML
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d["kind"] != "Service"]
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    problems = validate_copy(tree, "prod")
    _one(problems, "k8s/base/kustomization.yaml", "data[envoy.yaml].staticResources.clusters[graphql]",
         "upstream graphql.tessera.svc.cluster.local is not a Service in this overlay")
    _one(problems, "k8s/", "metadata.name", "the service has no Service in this overlay")
    _one(problems, "istio/virtual-services.yaml", "spec.hosts[0]", "is not a Service in this overlay")


@pytest.mark.parametrize(("change", "field", "text"), [
    (lambda c: c["env"].__setitem__(0, {"name": "TESSERA_GRAPHQL_HOST", "value": "127.0.0.1"}),
     "env[TESSERA_GRAPHQL_HOST]", "must be 0.0.0.0"),
    (lambda c: c["env"].__setitem__(1, {"name": "TESSERA_GRAPHQL_PORT", "value": "8091"}),
     "env[TESSERA_GRAPHQL_PORT]", "the API listens on 8090"),
    (lambda c: c["readinessProbe"]["httpGet"].__setitem__("path", "/graphql"),
     "readinessProbe", "must be an HTTP GET of /health on port 8090"),
    (lambda c: c["env"].append({"name": "TESSERA_ENV", "value": "dev"}), "env[TESSERA_ENV]", "must be production"),
    (lambda c: c["env"].append({"name": "TESSERA_ORDER_SERVICE_ADDR", "value": "order:50054"}),
     "env[TESSERA_ORDER_SERVICE_ADDR]", "graphql calls order-service at order-service.tessera.svc.cluster.local:50054"),
])
def test_graphql_container_mistakes_are_reported(tree, change, field, text):
    edit_yaml(tree / GRAPHQL_YAML, "Deployment", "graphql",
              lambda doc: change(doc["spec"]["template"]["spec"]["containers"][0]))
    problems = validate_copy(tree, "prod")
    _one(problems, GRAPHQL_YAML, f"spec.template.spec.containers[0].{field}", text)
    assert len(problems) == 1, describe(problems)


def test_graphql_service_port_that_istio_would_not_treat_as_http_is_reported(tree):
    def change(doc):
        doc["spec"]["ports"][0]["appProtocol"] = "tcp"

    edit_yaml(tree / GRAPHQL_YAML, "Service", "graphql", change)
    _one(validate_copy(tree, "prod"), GRAPHQL_YAML, "spec.ports[0].appProtocol", "must be 'http'")
