"""`tessera traffic`: rewrites the canary weights in a checkout and prints the VirtualService to apply."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import yaml

from tessera_deploy import ROOT, traffic
from tessera_deploy.render import render
from tessera_runtime import cli
from tests.support.k8s import SERVICES, canary_overlay, copy_tree, describe, validate_copy

CANARY_VS = "k8s/components/canary-user-v2/virtual-service.yaml"


def canary_vs(service: str) -> str:
    return f"k8s/components/canary-{service}-v2/virtual-service.yaml"


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


@pytest.mark.parametrize("service", SERVICES)
def test_shift_rewrites_the_weights_and_prints_what_the_overlay_renders(tree, capsys, service):
    name = f"{service}-service"
    result = tessera("traffic", "--root", str(tree), "shift", name, "--canary", "25")
    assert result.returncode == 0, result.stderr
    printed = yaml.safe_load(result.stdout)
    assert printed["kind"] == "VirtualService" and printed["metadata"] == {"name": name, "namespace": "tessera"}
    weights = _weights(printed)
    assert "canary-other" in weights and "other" in weights
    for route, subsets in weights.items():
        assert subsets == ({"v2": None} if route.startswith("canary-") else {"v1": 75, "v2": 25}), route
    assert "v2 10% -> 25% (v1 75%)" in result.stderr and canary_vs(service) in result.stderr
    # What was printed is what the service's canary overlay of the checkout now renders, and it still validates.
    overlay = canary_overlay(service)
    rendered = next(m.obj for m in render(tree / "k8s/overlays" / overlay, tree)
                    if m.ref == f"VirtualService/{name}")
    assert rendered["spec"] == printed["spec"]
    problems = validate_copy(tree, overlay)
    assert problems == [], describe(problems)
    status = tessera_here(capsys, "traffic", "--root", str(tree), "status", name)
    assert status.returncode == 0, status.stderr
    assert status.stdout.strip() == f"{name}: v1 75%, v2 25%"


@pytest.mark.parametrize("service", SERVICES)
def test_promote_and_rollback(tree, capsys, service):
    name = f"{service}-service"
    promoted = traffic.promote(name, root=tree)
    assert (promoted.before, promoted.after) == (10, 100)
    assert traffic.weight(name, root=tree) == 100
    assert _weights(yaml.safe_load(promoted.manifest))["other"] == {"v1": 0, "v2": 100}
    rolled = tessera_here(capsys, "traffic", "--root", str(tree), "rollback", name)
    assert rolled.returncode == 0, rolled.stderr
    weights = _weights(yaml.safe_load(rolled.stdout))
    assert weights["other"] == {"v1": 100, "v2": 0}
    assert weights["canary-other"] == {"v2": None}, "testers still reach v2 with the canary header"
    assert all(subsets == {"v1": 100, "v2": 0} for route, subsets in weights.items() if not route.startswith("canary-"))
    assert traffic.weight(name, root=tree) == 0
    status = tessera_here(capsys, "traffic", "--root", str(tree), "status", name)
    assert status.returncode == 0 and status.stdout.strip() == f"{name}: v1 100%, v2 0%"
    # Each service's weights are its own: the other canaries keep theirs.
    for other in SERVICES:
        if other != service:
            assert traffic.weight(f"{other}-service", root=tree) == 10
    assert validate_copy(tree, canary_overlay(service)) == []


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
    (["shift", "inventory-service", "--canary", "101"], "--canary must be between 0 and 100, got 101"),
    (["status", "billing-service"], "unknown service 'billing-service'"),
    (["promote", "billing-service"], "unknown service 'billing-service'"),
])
def test_refused_requests_change_nothing(tree, capsys, args, message):
    before = {s: (tree / canary_vs(s)).read_text() for s in SERVICES}
    result = tessera_here(capsys, "traffic", "--root", str(tree), *args)
    assert result.returncode == 2 and message in result.stderr and result.stdout == ""
    assert {s: (tree / canary_vs(s)).read_text() for s in SERVICES} == before


def test_a_folder_that_is_not_a_checkout_is_refused(tmp_path, capsys):
    result = tessera_here(capsys, "traffic", "--root", str(tmp_path), "status", "user-service")
    assert result.returncode == 2 and "is " + str(tmp_path) + " a Tessera checkout?" in result.stderr


@pytest.mark.parametrize(("text", "why"), [
    ("<<<<<<< HEAD\nspec: [\n=======\n>>>>>>> canary\n", "is not YAML"),
    ("", "is no VirtualService with routes"),
    ("kind: VirtualService\nmetadata: {name: user-service}\n", "is no VirtualService with routes"),
    ("kind: VirtualService\nspec: {http: [{name: read, match: [{}], route: []}]}\n", "no route without a match"),
])
@pytest.mark.parametrize("args", [["status", "user-service"], ["shift", "user-service", "--canary", "30"],
                                  ["promote", "user-service"]])
def test_a_canary_file_it_cannot_read_is_named_in_one_line(tree, capsys, text, why, args):
    """A conflicted or hand-broken canary VirtualService: the command says which file and why, and writes nothing."""
    (tree / CANARY_VS).write_text(text)
    result = tessera_here(capsys, "traffic", "--root", str(tree), *args)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith(f"tessera traffic: {tree / CANARY_VS}: ") and why in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert (tree / CANARY_VS).read_text() == text


def test_help_names_every_service_with_a_canary():
    """`tessera traffic --help` names every service the command can move, as `tessera traffic shift` accepts them."""
    result = tessera("traffic", "--help")
    assert result.returncode == 0, result.stderr
    text = re.sub(r"-\s+", "-", " ".join(result.stdout.split()))  # argparse may wrap a name at its hyphen
    for service in SERVICES:
        assert f"{service}-service" in text, (service, text)
