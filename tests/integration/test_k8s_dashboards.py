"""The Grafana dashboards' ConfigMap of the k8s base: in every overlay, holding each dashboard file as it is, labelled
for Grafana's dashboard sidecar; `make k8s-validate` reports each way it can go wrong."""

from __future__ import annotations

import json

import pytest

from tessera_deploy import dashboards
from tessera_deploy.catalog import NAMESPACE
from tests.support.k8s import OVERLAYS, copy_tree, describe, find, validate_copy


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_ships_the_dashboards_in_a_config_map_grafanas_sidecar_loads(overlay):
    config_map = find(overlay, "ConfigMap", dashboards.CONFIG_MAP_NAME)
    assert config_map["metadata"]["namespace"] == NAMESPACE
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tessera"
    assert config_map["data"] == {path.name: path.read_text() for path in dashboards.files()}
    assert "tessera-overview.json" in config_map["data"]


def test_a_config_map_without_the_sidecar_label_and_a_broken_dashboard_are_reported(tmp_path):
    tree = copy_tree(tmp_path)
    kustomization = tree / "k8s" / "monitoring" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace('grafana_dashboard: "1"', 'grafana_dashboard: "yes"'))
    copied = tree / "k8s" / "monitoring" / "dashboards" / "tessera-overview.json"
    dashboard = json.loads(copied.read_text())
    dashboard["panels"][1]["id"] = dashboard["panels"][0]["id"]
    copied.write_text(json.dumps(dashboard))
    problems = validate_copy(tree, "prod")
    assert {(p.ref, p.field) for p in problems} == {
        ("ConfigMap/tessera-dashboards", "metadata.labels.grafana_dashboard"),
        ("ConfigMap/tessera-dashboards", "data.tessera-overview.json")}, describe(problems)
    messages = [p.message for p in problems]
    assert any("Grafana's dashboard sidecar loads only ConfigMaps labelled so" in m for m in messages)
    assert any("differs from k8s/monitoring/dashboards/tessera-overview.json" in m for m in messages)
    assert any("is not a unique integer" in m for m in messages), describe(problems)


def test_an_overlay_without_the_dashboards_is_reported(tmp_path):
    tree = copy_tree(tmp_path)
    kustomization = tree / "k8s" / "base" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("  - ../monitoring\n", ""))
    problems = validate_copy(tree, "prod")
    assert [(p.ref, p.field) for p in problems] == [
        ("ConfigMap/tessera-dashboards", "(resources)")], describe(problems)
    assert "k8s/base must include ../monitoring" in problems[0].message
