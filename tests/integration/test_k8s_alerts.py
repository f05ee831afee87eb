"""The PrometheusRule of the k8s base: in every overlay, generated from the one rules file, labelled as the
ServiceMonitors are, alerting on exactly the monitored jobs; `make k8s-validate` reports each way it can go wrong."""

from __future__ import annotations

import pytest
import yaml

from tessera_deploy import alerts
from tessera_deploy.catalog import NAMESPACE
from tests.support.k8s import OVERLAYS, copy_tree, describe, edit_yaml, find, manifests, validate_copy


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_ships_the_rules_file_as_a_prometheus_rule_labelled_as_the_monitors(overlay):
    rule = find(overlay, "PrometheusRule", alerts.PROMETHEUS_RULE_NAME)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["spec"]["groups"] == alerts.load_groups()
    monitors = [m.obj for m in manifests(overlay) if m.kind == "ServiceMonitor"]
    assert len(monitors) == 8
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tessera"
    assert rule["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tessera"


def test_the_committed_prometheus_rule_is_what_make_k8s_alerts_writes():
    assert alerts.stale(alerts.files()) == [], "run `make k8s-alerts`"
    assert alerts.main(["--check"]) == 0


def test_a_prometheus_rule_edited_by_hand_is_reported(tmp_path):
    tree = copy_tree(tmp_path)
    path = tree / "k8s" / "base" / "monitoring" / "prometheus-rule.yaml"
    edit_yaml(path, "PrometheusRule", "tessera",
              lambda doc: doc["spec"]["groups"][0]["rules"][0].update({"for": "1h"}))
    problems = validate_copy(tree, "prod")
    assert [(p.ref, p.field) for p in problems] == [("PrometheusRule/tessera", "spec.groups")], describe(problems)
    assert "differs from k8s/monitoring/tessera.rules.yaml" in problems[0].message


def test_a_rule_naming_a_job_no_service_monitor_scrapes_is_reported(tmp_path):
    tree = copy_tree(tmp_path)
    path = tree / "k8s" / "base" / "monitoring" / "prometheus-rule.yaml"

    def rename(doc):
        rule = doc["spec"]["groups"][0]["rules"][0]
        rule["expr"] = rule["expr"].replace("order-service", "orders-service")

    edit_yaml(path, "PrometheusRule", "tessera", rename)
    problems = [p for p in validate_copy(tree, "prod") if p.field != "spec.groups"]
    assert [(p.ref, p.field) for p in problems] == [
        ("PrometheusRule/tessera", "spec.groups[0].rules[0].expr")], describe(problems)
    assert "no monitored Service is ['orders-service']" in problems[0].message
    assert "leaves out the monitored ['order-service']" in problems[0].message


def test_a_prometheus_rule_without_a_label_every_service_monitor_has_is_reported(tmp_path):
    tree = copy_tree(tmp_path)
    base = tree / "k8s" / "base"
    for path in [*(base / "services").glob("*.yaml"), base / "gateway" / "gateway.yaml"]:
        name = next(d["metadata"]["name"] for d in yaml.safe_load_all(path.read_text())
                    if d and d["kind"] == "ServiceMonitor")
        edit_yaml(path, "ServiceMonitor", name, lambda doc: doc["metadata"]["labels"].update(release="prometheus"))
    problems = validate_copy(tree, "prod")
    assert [(p.ref, p.field) for p in problems] == [
        ("PrometheusRule/tessera", "metadata.labels.release")], describe(problems)


def test_an_overlay_without_the_prometheus_rule_is_reported(tmp_path):
    tree = copy_tree(tmp_path)
    kustomization = tree / "k8s" / "base" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("  - monitoring/prometheus-rule.yaml\n", ""))
    problems = validate_copy(tree, "prod")
    assert [(p.ref, p.field) for p in problems] == [("PrometheusRule/*", "(resources)")], describe(problems)
