"""`tessera traffic`: rewrites the canary weights in a checkout and prints the VirtualService to apply."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from tessera_deploy import ROOT, traffic
from tessera_deploy.render import render
from tessera_runtime import cli
from tests.support.k8s import copy_tree, describe, validate_copy

CANARY_VS = "k8s/components/canary-user-v2/virtual-service.yaml"


def tessera(*args: str) -> subprocess.CompletedProcess[str]:
    """The real command, in its own process."""
    return subprocess.run([sys.executable, "-m", "tessera_runtime.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def tessera_here(capsys, *args: str) -> subprocess.CompletedProcess[str]:
    """The same command line through the CLI's main(), in this process (no interpreter start-up per call)."""
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(list(args), code, out, err)


def _weights(vs: dict) -> dict[str, dict[str, int | None]]:
    return {r["name"]: {d["destination"]["subset"]: d.get("weight") for d in r["route"]} for r in vs["spec"]["http"]}


@pytest.fixture
def tree(tmp_path):
    return copy_tree(tmp_path)


def test_shift_rewrites_the_weights_and_prints_what_the_overlay_renders(tree):
    result = tessera("traffic", "--root", str(tree), "shift", "user-service", "--canary", "25")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["kind"] == "VirtualService" and printed["metadata"] == {"name": "user-service",
                                                                           "namespace": "tessera"}
    for name, subsets in _weights(printed).items():
        assert subsets == ({"v2": None} if name.startswith("canary-") else {"v1": 75, "v2": 25}), name
    assert "v2 10% -> 25% (v1 75%)" in result.stderr and CANARY_VS in result.stderr
    # What was printed is what the canary overlay of the checkout now renders, and it still validates.
    rendered = next(m.obj for m in render(tree / "k8s/overlays/canary", tree)
                    if m.ref == "VirtualService/user-service")
    assert rendered["spec"] == printed["spec"]
    assert validate_copy(tree, "canary") == [], describe(validate_copy(tree, "canary"))
    status = tessera("traffic", "--root", str(tree), "status", "user-service")
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip() == "user-service: v1 75%, v2 25%"


def test_promote_and_rollback(tree, capsys):
    promoted = traffic.promote("user-service", root=tree)
    assert (promoted.before, promoted.after) == (10, 100)
    assert traffic.weight("user-service", root=tree) == 100
    assert _weights(yaml.safe_load(promoted.manifest))["read"] == {"v1": 0, "v2": 100}
    rolled = tessera_here(capsys, "traffic", "--root", str(tree), "rollback", "user-service")
    assert rolled.returncode == 0, rolled.stderr
    weights = _weights(yaml.safe_load(rolled.stdout))
    assert weights["read"] == {"v1": 100, "v2": 0}
    assert weights["canary-read"] == {"v2": None}, "testers still reach v2 with the canary header"
    assert traffic.weight("user-service", root=tree) == 0
    assert validate_copy(tree, "canary") == []


def test_dry_run_prints_without_writing(tree, capsys):
    before = (tree / CANARY_VS).read_text()
    result = tessera_here(capsys, "traffic", "--root", str(tree), "shift", "user-service", "--canary", "50",
                          "--dry-run")
    assert result.returncode == 0 and "would write" in result.stderr
    assert _weights(yaml.safe_load(result.stdout))["other"] == {"v1": 50, "v2": 50}
    assert (tree / CANARY_VS).read_text() == before


@pytest.mark.parametrize(("args", "message"), [
    (["shift", "user-service", "--canary", "101"], "--canary must be between 0 and 100, got 101"),
    (["shift", "user-service", "--canary", "-1"], "--canary must be between 0 and 100, got -1"),
    (["shift", "inventory-service", "--canary", "5"], "inventory-service has no canary"),
    (["promote", "billing-service"], "unknown service 'billing-service'"),
])
def test_refused_requests_change_nothing(tree, capsys, args, message):
    before = (tree / CANARY_VS).read_text()
    result = tessera_here(capsys, "traffic", "--root", str(tree), *args)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""
    assert (tree / CANARY_VS).read_text() == before


def test_a_folder_that_is_not_a_checkout_is_refused(tmp_path, capsys):
    result = tessera_here(capsys, "traffic", "--root", str(tmp_path), "status", "user-service")
    assert result.returncode == 2 and "is " + str(tmp_path) + " a Tessera checkout?" in result.stderr
