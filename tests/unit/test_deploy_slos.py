"""Tessera's SLOs (k8s/monitoring/slos.yaml) and the rules generated from them: the committed rules file holds what
`make k8s-alerts` writes, a hand-edited SLO block is reported, and each way the source can be wrong is refused
naming its field."""

from __future__ import annotations

import copy
import re

import pytest
import yaml

from tessera_deploy import alerts, slos, validate

SOURCE = yaml.safe_load(slos.SOURCE_FILE.read_text())
OBJECTIVES = slos.load()
GROUPS = alerts.load_groups()
SLO_GROUPS = [g for g in GROUPS if g["name"].startswith("tessera.slo.")]


def test_the_shipped_slos_are_edge_and_grpc_availability_and_grpc_latency_at_a_bucket_boundary():
    by_name = {s.name: s for s in OBJECTIVES.slos}
    assert set(by_name) == {"edge-availability", "grpc-availability", "grpc-latency"}
    assert (OBJECTIVES.period, OBJECTIVES.min_events) == ("30d", 100)
    assert [(a.severity, a.long, a.short, str(a.burn_rate)) for a in OBJECTIVES.burn_alerts] == [
        ("critical", "1h", "5m", "14.4"), ("critical", "6h", "30m", "6"), ("warning", "1d", "2h", "3"),
        ("warning", "3d", "6h", "1")]
    assert OBJECTIVES.windows() == ["5m", "30m", "1h", "2h", "6h", "1d", "3d"]
    # The latency threshold is a bucket boundary of the RPC histogram, written as prometheus_client writes `le`.
    from tessera_runtime.metrics import RPC_BUCKETS

    le = re.search(r'le="([^"]+)"', by_name["grpc-latency"].good or "").group(1)
    assert float(le) in RPC_BUCKETS and le == str(float(le))
    # The availability SLOs count the server-side codes the rules' recording of server errors counts.
    recorded = next(r["expr"] for g in GROUPS for r in g["rules"]
                    if r.get("record") == "namespace_job_grpc_service:grpc_server_errors:rate5m")
    codes = re.search(r'grpc_code=~"([^"]+)"', recorded).group(1)
    assert f'grpc_code=~"{codes}"' in (by_name["grpc-availability"].errors or "")


def test_the_committed_rules_file_holds_the_generated_slo_groups():
    assert alerts.rules_text() == alerts.RULES_FILE.read_text(), "run `make k8s-alerts`"
    assert SLO_GROUPS == slos.groups(OBJECTIVES)
    # Per SLO: a ratio per window, an event rate per long window, an alert per window pair; and the budgets' group.
    per_slo = len(OBJECTIVES.windows()) + len(OBJECTIVES.long_windows()) + len(OBJECTIVES.burn_alerts)
    assert [len(g["rules"]) for g in SLO_GROUPS] == [per_slo] * len(OBJECTIVES.slos) + [2 * len(OBJECTIVES.slos)]


def test_each_burn_alert_pairs_its_windows_over_its_rate_with_the_low_traffic_guard():
    [page] = [r for g in SLO_GROUPS for r in g["rules"]
              if r.get("alert") == "TesseraEdgeAvailabilityBudgetBurn" and r["labels"]["window"] == "1h"]
    assert page["expr"].splitlines() == [
        'namespace_job:slo_errors:ratio_rate1h{slo="edge-availability"} / 0.001 > 14.4',
        'and namespace_job:slo_errors:ratio_rate5m{slo="edge-availability"} / 0.001 > 14.4',
        'and namespace_job:slo_events:rate1h{slo="edge-availability"} * 3600 >= 100']
    assert page["labels"] == {"severity": "critical", "window": "1h"}
    assert page["annotations"]["runbook_url"] == "README.md#tesseraedgeavailabilitybudgetburn"
    assert "2 % of the 30d budget is gone in 1h" in page["annotations"]["description"]
    severities = {(r["alert"], r["labels"]["severity"]) for g in SLO_GROUPS for r in g["rules"] if "alert" in r}
    assert {s for _, s in severities} == {"critical", "warning"} and len(severities) == 2 * len(OBJECTIVES.slos)


def test_the_slo_ratios_read_only_what_the_services_and_the_gateway_export():
    referenced = alerts.referenced_metrics(SLO_GROUPS)
    assert referenced == {"envoy_http_downstream_rq_total", "envoy_http_downstream_rq_xx", "grpc_server_handled_total",
                          "grpc_server_handling_seconds_count", "grpc_server_handling_seconds_bucket"}


def test_a_hand_edited_slo_block_is_reported_and_make_k8s_alerts_rewrites_it(tmp_path, monkeypatch, capsys):
    edited = tmp_path / "tessera.rules.yaml"
    edited.write_text(alerts.RULES_FILE.read_text().replace("/ 0.001 > 14.4", "/ 0.001 > 20", 1))
    monkeypatch.setattr(alerts, "RULES_FILE", edited)
    assert alerts.main(["--check"]) == 1
    assert "tessera.rules.yaml differs from k8s/monitoring/slos.yaml" in capsys.readouterr().err
    assert [p.message for p in validate.generated_problems() if p.ref == "(generated)"
            and p.where.endswith("tessera.rules.yaml")] == [
        "differs from k8s/monitoring/slos.yaml: run `make k8s-alerts`"]
    monkeypatch.setattr(alerts, "PROMETHEUS_RULE_FILE", tmp_path / "prometheus-rule.yaml")
    (tmp_path / "prometheus-rule.yaml").write_text(alerts.files()[alerts.PROMETHEUS_RULE_FILE])
    assert alerts.main([]) == 0
    assert edited.read_text() == alerts.rules_text() and alerts.main(["--check"]) == 0


def test_splicing_appends_a_missing_block_and_replaces_one_in_place():
    generated = slos.block("- name: tessera.slo.x\n  rules: []\n")
    hand = "groups:\n  - name: hand\n    rules: []\n"
    once = slos.splice(hand, generated)
    assert once == hand + "\n" + generated
    assert yaml.safe_load(once)["groups"] == [{"name": "hand", "rules": []}, {"name": "tessera.slo.x", "rules": []}]
    assert slos.splice(once, generated) == once
    other = slos.block("- name: tessera.slo.y\n  rules: []\n")
    assert slos.splice(once + "  # after\n", other) == hand + "\n" + other + "  # after\n"
    with pytest.raises(slos.SloError, match="one BEGIN SLO rules line followed by one END SLO rules line"):
        slos.splice(hand + slos.BEGIN_MARKER + "\n", generated)
    with pytest.raises(slos.SloError, match="one BEGIN SLO rules line"):
        slos.splice(once + generated, generated)


def broken(edit) -> dict:
    doc = copy.deepcopy(SOURCE)
    edit(doc)
    return doc


@pytest.mark.parametrize(("edit", "message"), [
    (lambda d: d.pop("period"), r"slos\.yaml: period: a non-empty string is required"),
    (lambda d: d.update(period="30 days"), r"'30 days': a duration of whole minutes, hours or days"),
    (lambda d: d.update(burn_alerts=[]), r"burn_alerts: at least one window pair is required"),
    (lambda d: d["burn_alerts"][0].update(severity="info"), r"burn_alerts\[0\]\.severity: one of critical, warning"),
    (lambda d: d["burn_alerts"][1].update(short="6h"), r"burn_alerts\[1\]: short \(6h\) must be shorter than long"),
    (lambda d: d["burn_alerts"][3].update(long="60d"), r"and long at most the period \(30d\)"),
    (lambda d: d["burn_alerts"][0].update(short="0m"), r"'0m': a duration of whole minutes, hours or days"),
    (lambda d: d["burn_alerts"][0].update(burn_rate=10),
     r"burn_alerts\[0\]\.burn_rate: 10 spends 2 % of 30d's budget in 1h only at 14\.4"),
    (lambda d: d["burn_alerts"][2].update(budget_spent="ten"),
     r"burn_alerts\[2\]\.budget_spent: 'ten' is not a number"),
    (lambda d: d.update(min_events=-1), r"min_events: a whole number of events, 0 or more"),
    (lambda d: d.update(slos=[]), r"slos: at least one SLO is required"),
    (lambda d: d["slos"][0].update(name="Edge"), r"slos\[0\]\.name: 'Edge': lower-case words"),
    # Its group would be tessera.slo.budget, the name of the budgets' group: Prometheus refuses a file naming a
    # group twice.
    (lambda d: d["slos"][1].update(name="budget"), r"slos\[1\]\.name: 'budget' is the name of the budgets' group"),
    (lambda d: d["slos"][1].update(alert="GrpcBurn"), r"slos\[1\]\.alert: 'GrpcBurn': an alert name starting with"),
    (lambda d: d["slos"][0].update(objective=100), r"slos\[0\]\.objective: 100 is not a percentage"),
    (lambda d: d["slos"][0].update(objective=True), r"slos\[0\]\.objective: a number is required"),
    (lambda d: d["slos"][2].update(errors="x_total"), r"slos\[2\]: exactly one of errors and good is required"),
    (lambda d: d["slos"][1].update(total="rate(x[5m])"), r"slos\[1\]\.total: 'rate\(x\[5m\]\)' is not a series"),
    (lambda d: d["slos"][1].update(name="edge-availability"), r"slos: each name must be unique"),
    (lambda d: d["slos"][0].pop("what"), r"slos\[0\]\.what: a non-empty string is required"),
])
def test_each_way_the_source_can_be_wrong_is_refused_naming_its_field(edit, message):
    with pytest.raises(slos.SloError, match=message):
        slos.parse(broken(edit), "k8s/monitoring/slos.yaml")


def test_a_source_that_is_not_a_mapping_or_not_yaml_is_refused_naming_the_file(tmp_path, monkeypatch, capsys):
    with pytest.raises(slos.SloError, match=r"x\.yaml: a mapping with period"):
        slos.parse(["period"], "x.yaml")
    path = tmp_path / "slos.yaml"
    path.write_text("slos: [\n")
    with pytest.raises(slos.SloError, match=r"slos\.yaml"):
        slos.load(path)
    monkeypatch.setattr(slos, "SOURCE_FILE", path)
    assert alerts.main(["--check"]) == 2
    assert "k8s-alerts:" in capsys.readouterr().err and str(path) in str(validate.generated_problems())


def test_a_rules_file_make_k8s_alerts_cannot_read_or_splice_into_is_refused_naming_it(tmp_path, monkeypatch):
    missing = tmp_path / "missing.rules.yaml"
    monkeypatch.setattr(alerts, "RULES_FILE", missing)
    with pytest.raises(alerts.RulesError, match=r"missing\.rules\.yaml"):
        alerts.files()
    not_groups = tmp_path / "other.rules.yaml"
    not_groups.write_text("rules: []\n")
    monkeypatch.setattr(alerts, "RULES_FILE", not_groups)
    with pytest.raises(alerts.RulesError, match=r"other\.rules\.yaml"):
        alerts.files()


def test_a_window_pair_whose_long_window_is_the_period_records_the_periods_ratio_once():
    """The budgets' group records each SLO's error ratio over the period: a pair whose long window is the period
    (allowed: long at most the period) must not have it recorded a second time, or Prometheus gets two rules writing
    one series (duplicate samples, one of them dropped at each evaluation)."""
    doc = copy.deepcopy(SOURCE)
    doc["burn_alerts"].append({"severity": "warning", "long": "30d", "short": "1d", "burn_rate": 1,
                               "budget_spent": 100})
    recorded = [(rule["record"], rule["labels"]["slo"])
                for group in slos.groups(slos.parse(doc, "k8s/monitoring/slos.yaml"))
                for rule in group["rules"] if "record" in rule]
    assert len(recorded) == len(set(recorded)), sorted(r for r in recorded if recorded.count(r) > 1)
    assert ("namespace_job:slo_errors:ratio_rate30d", "edge-availability") in recorded
