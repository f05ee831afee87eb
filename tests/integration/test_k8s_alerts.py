"""The PrometheusRule and the AlertmanagerConfig of the k8s base: in every overlay, each rendered from its one source
(the rules file, alertmanager.yml), labelled as the ServiceMonitors are; the rule alerts on exactly the monitored
jobs, the config names only alerts the rules have and receivers it defines; `make k8s-validate` reports each way
they can go wrong."""

from __future__ import annotations

import pytest
import yaml

from tessera_deploy import alertmanager, alerts
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


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_ships_the_alertmanager_config_rendered_from_alertmanager_yml(overlay):
    config = find(overlay, "AlertmanagerConfig", alertmanager.ALERTMANAGER_CONFIG_NAME)
    assert config["apiVersion"] == "monitoring.coreos.com/v1alpha1"
    assert config["metadata"]["namespace"] == NAMESPACE
    assert config["metadata"]["labels"]["app.kubernetes.io/part-of"] == "tessera"
    assert config["spec"] == alertmanager.alertmanager_config(alertmanager.load())["spec"]


def test_the_alertmanager_config_routes_inhibits_and_reads_its_webhooks_from_the_receivers_secret():
    spec = find("prod", "AlertmanagerConfig", alertmanager.ALERTMANAGER_CONFIG_NAME)["spec"]
    assert spec["route"]["groupBy"] == ["namespace", "alertname", "job"]
    assert [(r["receiver"], r["matchers"]) for r in spec["route"]["routes"]] == [
        ("tessera-page", [{"name": "severity", "value": "critical"}]),
        ("tessera-ticket", [{"name": "severity", "value": "warning"}])]
    assert {r["name"]: r["webhookConfigs"] for r in spec["receivers"]} == {
        name: [{"urlSecret": {"name": "tessera-alertmanager-receivers", "key": key}, "sendResolved": True}]
        for name, key in (("tessera-page", "page-url"), ("tessera-ticket", "ticket-url"))}
    [service_down] = [r for r in spec["inhibitRules"]
                      if r["targetMatch"][0]["value"] == "TesseraCircuitOpen|TesseraNoServingInstance|"
                                                         "TesseraHealthCheckFailing"]
    assert service_down == {
        "sourceMatch": [{"name": "alertname", "value": "TesseraServiceDown|TesseraNoReadyInstance", "matchType": "=~"}],
        "targetMatch": [{"name": "alertname", "matchType": "=~",
                         "value": "TesseraCircuitOpen|TesseraNoServingInstance|TesseraHealthCheckFailing"}],
        "equal": ["namespace", "failing_service"]}
    # No URL is committed: the Secret is the deployment's.
    assert [m.ref for m in manifests("prod") if m.kind == "Secret"] == []


def test_an_alertmanager_config_edited_by_hand_is_reported(tmp_path):
    tree = copy_tree(tmp_path)
    path = tree / "k8s" / "base" / "monitoring" / "alertmanager-config.yaml"
    edit_yaml(path, "AlertmanagerConfig", "tessera", lambda doc: doc["spec"]["route"].update(groupWait="5m"))
    problems = validate_copy(tree, "prod")
    assert [(p.ref, p.field) for p in problems] == [("AlertmanagerConfig/tessera", "spec")], describe(problems)
    assert "differs from k8s/monitoring/alertmanager.yml" in problems[0].message


def test_an_alertmanager_config_naming_an_alert_or_receiver_that_does_not_exist_is_reported(tmp_path):
    tree = copy_tree(tmp_path)
    path = tree / "k8s" / "base" / "monitoring" / "alertmanager-config.yaml"

    def misspell(doc):
        doc["spec"]["inhibitRules"][0]["sourceMatch"][0]["value"] = "TesseraServiceDwn"
        doc["spec"]["route"]["routes"][0]["receiver"] = "tessera-pager"

    edit_yaml(path, "AlertmanagerConfig", "tessera", misspell)
    problems = [p for p in validate_copy(tree, "prod") if p.field != "spec"]
    assert sorted((p.ref, p.field) for p in problems) == [
        ("AlertmanagerConfig/tessera", "spec.inhibitRules[0].sourceMatch"),
        ("AlertmanagerConfig/tessera", "spec.route")], describe(problems)
    assert any("['TesseraServiceDwn']" in p.message for p in problems)
    assert any("'tessera-pager'" in p.message for p in problems)


def test_an_alertmanager_config_not_labelled_as_the_prometheus_rule_is_reported(tmp_path):
    tree = copy_tree(tmp_path)
    path = tree / "k8s" / "base" / "monitoring" / "alertmanager-config.yaml"
    edit_yaml(path, "AlertmanagerConfig", "tessera", lambda doc: doc["metadata"]["labels"].update(app="other"))
    problems = validate_copy(tree, "prod")
    assert [(p.ref, p.field) for p in problems] == [("AlertmanagerConfig/tessera", "metadata.labels.app")], \
        describe(problems)


def test_an_overlay_without_the_alertmanager_config_is_reported(tmp_path):
    tree = copy_tree(tmp_path)
    kustomization = tree / "k8s" / "base" / "kustomization.yaml"
    kustomization.write_text(kustomization.read_text().replace("  - monitoring/alertmanager-config.yaml\n", ""))
    problems = validate_copy(tree, "prod")
    assert [(p.ref, p.field) for p in problems] == [("AlertmanagerConfig/*", "(resources)")], describe(problems)


def test_a_source_the_renderer_cannot_render_is_named(tmp_path):
    source = tmp_path / "alertmanager.yml"
    source.write_text(yaml.safe_dump({"route": {"receiver": "tessera-page", "matchers": ["severity critical"]},
                                      "receivers": [{"name": "tessera-page"}]}))
    with pytest.raises(alertmanager.AlertmanagerConfigError, match=r"route\.matchers\[0\]: 'severity critical'"):
        alertmanager.alertmanager_config(alertmanager.load(source))
    source.write_text(yaml.safe_dump({"route": {"receiver": "tessera-page"},
                                      "receivers": [{"name": "tessera-page", "webhook_configs": [{"url": "x"}]}]}))
    with pytest.raises(alertmanager.AlertmanagerConfigError, match=r"receivers\[0\]: the source's receivers carry"):
        alertmanager.alertmanager_config(alertmanager.load(source))
    source.write_text(yaml.safe_dump({"route": {"receiver": "tessera-page", "mute_time_intervals": ["night"]}}))
    with pytest.raises(alertmanager.AlertmanagerConfigError, match=r"route\.mute_time_intervals: not rendered"):
        alertmanager.alertmanager_config(alertmanager.load(source))
    source.write_text("groups: []\n")
    with pytest.raises(alertmanager.AlertmanagerConfigError, match="route: a routing tree is required"):
        alertmanager.load(source)


def test_make_k8s_alerts_names_an_alertmanager_source_it_cannot_render(tmp_path, monkeypatch, capsys):
    broken = tmp_path / "alertmanager.yml"
    broken.write_text(yaml.safe_dump({"route": {"receiver": "tessera-page", "matchers": ["severity=critical"]},
                                      "receivers": [{"name": "tessera-page"}]}))
    monkeypatch.setattr(alertmanager, "SOURCE_FILE", broken)
    assert alerts.main(["--check"]) == 2
    assert "route.matchers[0]: 'severity=critical' is not name=\"value\"" in capsys.readouterr().err
