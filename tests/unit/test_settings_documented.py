"""Every TESSERA_* variable the code reads is in a settings table of a README, and every one documented is read."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tessera_runtime.config import ROOT

VARIABLE = re.compile(r"^TESSERA_[A-Z0-9_]*[A-Z0-9]$")
# The READMEs whose tables list settings: the top-level one, and the order service's for its own.
SETTINGS_READMES = (ROOT / "README.md", ROOT / "services" / "tessera_order" / "README.md")
# Read by the code but not settings of a service, each documented where it belongs.
NOT_SETTINGS = {
    # Set by the TESSERA_WORKERS supervisor for the workers it starts, never by a person.
    "TESSERA_SUPERVISOR_PID": None,
    # Read by `make k8s-validate`, not by a service.
    "TESSERA_ISTIO_CRDS": ROOT / "k8s" / "README.md",
}


def _strings(tree: ast.AST) -> set[str]:
    """String constants, and f-strings whose parts are constants or names bound to one (f"{prefix}GRPC_PORT")."""
    bound: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
            bound.setdefault(node.targets[0].id, set()).add(node.value.value)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.add(node.value)
        elif isinstance(node, ast.JoinedStr):
            texts = [""]
            for part in node.values:
                if isinstance(part, ast.Constant):
                    texts = [t + str(part.value) for t in texts]
                elif isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Name) \
                        and part.value.id in bound:
                    texts = [t + value for t in texts for value in bound[part.value.id]]
                else:
                    texts = []
                    break
            found.update(texts)
    return found


def variables_in_code() -> dict[str, list[str]]:
    """TESSERA_* variable → the modules under services/ that name it."""
    names: dict[str, list[str]] = {}
    for path in sorted((ROOT / "services").rglob("*.py")):
        for text in _strings(ast.parse(path.read_text(), str(path))):
            if VARIABLE.match(text):
                names.setdefault(text, []).append(str(path.relative_to(ROOT)))
    return names


def variables_in_tables(readme: Path) -> set[str]:
    """The variables a README's tables list in their first column."""
    names: set[str] = set()
    for line in readme.read_text().splitlines():
        cells = line.split("|")
        if line.startswith("|") and len(cells) > 2:
            names.update(re.findall(r"`(TESSERA_[A-Z0-9_]+)`", cells[1]))
    return names


def test_the_scan_finds_variables_however_they_are_read():
    found = variables_in_code()
    # A literal name, a name built from a prefix (f"{prefix}..."), one of a service's own settings.
    assert {"TESSERA_NOTIFICATION_LEASE_SECONDS", "TESSERA_GRPC_PORT", "TESSERA_ORDER_STEP_MAX_ATTEMPTS",
            "TESSERA_CIRCUIT_FAILURE_THRESHOLD", "TESSERA_REQUIRE_IDENTITY"} <= set(found)
    assert "TESSERA_ORDER_" not in found  # a prefix, not a variable


def test_every_variable_the_code_reads_is_documented_in_a_settings_table():
    documented = set().union(*(variables_in_tables(r) for r in SETTINGS_READMES))
    missing = {name: where for name, where in variables_in_code().items()
               if name not in documented and name not in NOT_SETTINGS}
    assert missing == {}, "add these to a settings table of README.md (or their service's README.md)"
    for name, readme in NOT_SETTINGS.items():
        if readme is not None:
            assert f"`{name}`" in readme.read_text(), f"{name} is not explained in {readme}"


def test_every_documented_variable_is_read_by_the_code():
    read = set(variables_in_code())
    for readme in SETTINGS_READMES:
        stale = variables_in_tables(readme) - read
        assert stale == set(), f"{readme.relative_to(ROOT)} documents variables nothing reads"


def test_the_manifests_set_only_variables_the_code_reads():
    """A TESSERA_* variable a manifest sets (the shared ConfigMap, a Deployment's env) is one a process reads; the
    shared ConfigMap names every service's address, whether or not a caller of it runs yet."""
    roots = (ROOT / "services").glob("tessera_*/bootstrap.py")
    services = (path.parent.name.removeprefix("tessera_") for path in roots)
    read = (set(variables_in_code()) | set(NOT_SETTINGS)
            | {f"TESSERA_{service.upper()}_SERVICE_ADDR" for service in services})
    set_by = {}
    for path in sorted((ROOT / "k8s").rglob("*.yaml")):
        for name in re.findall(r"^\s*(?:- name: |)(TESSERA_[A-Z0-9_]+)(?::|\s*$)", path.read_text(), re.MULTILINE):
            set_by.setdefault(name, []).append(str(path.relative_to(ROOT)))
    assert "TESSERA_ENV" in set_by  # the scan finds the ConfigMap's keys
    assert {name: where for name, where in set_by.items() if name not in read} == {}
