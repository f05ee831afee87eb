"""Helpers for the manifest tests: rendered overlays cached per test run, and copies of the manifests to break."""

from __future__ import annotations

import shutil
from functools import cache
from pathlib import Path

import yaml

from tessera_deploy import ROOT, gateway_config, render
from tessera_deploy.checks import Problem
from tessera_deploy.validate import OverlayReport, validate_overlay

OVERLAYS = ("dev", "prod", "canary", "chaos")


@cache
def gateway_files() -> tuple[tuple[str, str], ...]:
    """The generator's prod output, written where kustomize reads it (once per test run)."""
    files = gateway_config.expected()
    gateway_config.write(files)
    return tuple(sorted(files.items()))


@cache
def report(overlay: str) -> OverlayReport:
    """The validation report of one committed overlay, computed once per test run."""
    return validate_overlay(ROOT / "k8s" / "overlays" / overlay, gateway_files=dict(gateway_files()))


def manifests(overlay: str) -> list[render.Manifest]:
    result = report(overlay)
    assert result.manifests, f"{overlay} did not render: {result.problems}"
    return result.manifests


def find(overlay: str, kind: str, name: str) -> dict:
    for m in manifests(overlay):
        if m.kind == kind and m.name == name:
            return m.obj
    raise AssertionError(f"{overlay} has no {kind}/{name}")


def copy_tree(tmp: Path) -> Path:
    """A copy of everything the overlays render from, for tests that break it; returns the copy's root."""
    gateway_files()
    for folder in ("k8s", "istio"):
        shutil.copytree(ROOT / folder, tmp / folder, ignore=shutil.ignore_patterns(".render-*", "__pycache__"))
    return tmp


def edit_yaml(path: Path, kind: str, name: str, change) -> None:
    """Applies change(doc) to the document kind/name of a multi-document YAML file, keeping the others."""
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    hits = [d for d in docs if d.get("kind") == kind and d.get("metadata", {}).get("name") == name]
    assert len(hits) == 1, f"{path} has {len(hits)} {kind}/{name}"
    change(hits[0])
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def validate_copy(root: Path, overlay: str) -> list[Problem]:
    return validate_overlay(root / "k8s" / "overlays" / overlay, root=root,
                            gateway_files=dict(gateway_files())).problems


def describe(problems: list[Problem]) -> str:
    return "\n".join(str(p) for p in problems) or "(no problems)"
