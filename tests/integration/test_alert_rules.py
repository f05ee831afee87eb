"""Tessera's Prometheus rules checked by the real promtool: the rules file is valid, every alert's unit tests
(tests/integration/prometheus/*.test.yaml) pass, and every alert carries what an on-call person needs."""

from __future__ import annotations

import re

import pytest
import yaml

from tessera_deploy import ROOT, alerts
from tests.support.prometheus import RULES_TESTS, promtool

GROUPS = alerts.load_groups()
ALERTS = alerts.alerting_rules(GROUPS)
UNIT_TESTS = sorted(RULES_TESTS.glob("*.test.yaml"))
SEVERITIES = {"critical", "warning"}


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_promtool_accepts_the_rules_file():
    result = promtool("check", "rules", alerts.RULES_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in GROUPS)} rules found" in result.stdout


def test_promtool_refuses_a_broken_rule(tmp_path):
    broken = tmp_path / "broken.rules.yaml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "x", "rules": [
        {"alert": "Broken", "expr": "rate(tessera_circuit_state[5m]", "labels": {"severity": "warning"}}]}]}))
    result = promtool("check", "rules", broken)
    assert result.returncode != 0 and "Broken" in result.stdout + result.stderr


def test_promtool_unit_tests_of_every_alert_pass():
    assert UNIT_TESTS
    result = promtool("test", "rules", *UNIT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout


def test_every_alert_is_tested_firing_with_its_labels_and_annotations_and_not_firing():
    firing: dict[str, list[dict]] = {}
    quiet: set[str] = set()
    for path in UNIT_TESTS:
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                if check.get("exp_alerts"):
                    firing.setdefault(check["alertname"], []).extend(check["exp_alerts"])
                else:
                    quiet.add(check["alertname"])
    names = {a["alert"] for a in ALERTS}
    assert names - firing.keys() == set(), "alerts with no test that makes them fire"
    assert names - quiet == set(), "alerts with no test that they stay quiet (healthy series, or before their for:)"
    assert firing.keys() - names == set(), "tests of alerts the rules do not have"
    for name, expected in firing.items():
        for alert in expected:
            assert alert.get("exp_annotations", {}).keys() == {"summary", "description", "runbook_url"}, name
            assert "severity" in alert.get("exp_labels", {}), name


@pytest.mark.parametrize("rule", ALERTS, ids=lambda r: r["alert"])
def test_every_alert_has_a_severity_a_summary_a_description_and_a_runbook_in_the_readme(rule):
    assert rule["alert"].startswith("Tessera")
    assert rule["labels"]["severity"] in SEVERITIES
    annotations = rule["annotations"]
    assert annotations.keys() == {"summary", "description", "runbook_url"}
    assert "{{ $labels." in annotations["summary"] + annotations["description"], "say which instance or dependency"
    document, _, anchor = annotations["runbook_url"].partition("#")
    assert document == "README.md" and anchor == rule["alert"].lower()
    headings = [line.lstrip("#").strip() for line in (ROOT / document).read_text().splitlines()
                if line.startswith("#")]
    assert anchor in {github_anchor(h) for h in headings}, f"README.md has no section {rule['alert']}"
    section = (ROOT / document).read_text().split(f"### {rule['alert']}\n", 1)[1].split("\n#", 1)[0]
    assert "First checks" in section, f"{rule['alert']}'s runbook says what to look at first"
    assert any(f"`{tool} " in section for tool in ("tessera", "grpcurl", "kubectl", "curl", "rabbitmq-diagnostics")), \
        f"{rule['alert']}'s runbook names a command that helps"
