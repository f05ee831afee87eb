"""Renders kustomize overlays offline with `kubectl kustomize`, remembering which file each object came from."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

from tessera_deploy import ROOT

ORIGIN = "config.kubernetes.io/origin"
KUSTOMIZATION = "kustomization.yaml"


# libyaml's loader when PyYAML has it: rendered overlays and CRD files are large.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_all(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=_LOADER))


class RenderError(Exception):
    """An overlay does not render; the message carries kustomize's own words."""


@dataclasses.dataclass(frozen=True)
class Manifest:
    """One rendered object and where it is written down."""

    obj: dict[str, Any]
    source: str  # the file that defines it, relative to the repository root
    patches: tuple[str, ...] = ()  # files that patch it, relative to the repository root

    @property
    def kind(self) -> str:
        return str(self.obj.get("kind", ""))

    @property
    def name(self) -> str:
        return str(self.obj.get("metadata", {}).get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.obj.get("metadata", {}).get("namespace", ""))

    @property
    def where(self) -> str:
        """The file(s) to look at for this object, for messages."""
        if not self.patches:
            return self.source
        return f"{self.source} (patched by {', '.join(self.patches)})"

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise RenderError("kubectl is not on PATH; it renders the overlays (`kubectl kustomize`)")
    return path


def overlays(root: Path = ROOT) -> list[Path]:
    base = root / "k8s" / "overlays"
    return sorted(p for p in base.iterdir() if not p.name.startswith(".") and (p / KUSTOMIZATION).is_file())


def _relative(path: Path, root: Path) -> str:
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return str(path)


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in load_all(path.read_text()) if isinstance(d, dict)]


def patch_files(kustomization_dir: Path, seen: set[Path] | None = None) -> dict[tuple[str, str], list[Path]]:
    """(kind, name) → the patch files that target it, across the overlay and everything it includes."""
    seen = set() if seen is None else seen
    directory = kustomization_dir.resolve()
    if directory in seen or not (directory / KUSTOMIZATION).is_file():
        return {}
    seen.add(directory)
    spec = yaml.safe_load((directory / KUSTOMIZATION).read_text()) or {}
    found: dict[tuple[str, str], list[Path]] = {}
    for entry in [*spec.get("resources", []), *spec.get("components", [])]:
        candidate = directory / entry
        if candidate.is_dir():
            for key, paths in patch_files(candidate, seen).items():
                found.setdefault(key, []).extend(paths)
    for patch in spec.get("patches", []):
        if "path" not in patch:
            continue
        path = directory / patch["path"]
        target = patch.get("target")
        keys = ([(target.get("kind", ""), target.get("name", ""))] if target
                else [(d.get("kind", ""), d.get("metadata", {}).get("name", "")) for d in _docs(path)])
        for key in keys:
            found.setdefault(key, []).append(path)
    return found


def render_text(overlay: Path) -> str:
    """The overlay exactly as `kubectl kustomize` prints it."""
    result = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise RenderError(f"{overlay}: kubectl kustomize failed:\n{result.stderr.strip()}")
    return result.stdout


def render(overlay: Path, root: Path = ROOT) -> list[Manifest]:
    """Every object of an overlay, each with the file that defines it and the files that patch it."""
    overlay = overlay.resolve()
    # kustomize records origins only when the build asks for it; a throwaway kustomization beside the overlay
    # asks, so the overlay itself stays as people apply it.
    probe = Path(tempfile.mkdtemp(prefix=".render-", dir=overlay.parent))
    try:
        (probe / KUSTOMIZATION).write_text(
            f"resources:\n  - ../{overlay.name}\nbuildMetadata: [originAnnotations]\n")
        text = render_text(probe)
    except RenderError as exc:
        raise RenderError(str(exc).replace(str(probe), str(overlay))) from None
    finally:
        shutil.rmtree(probe, ignore_errors=True)
    patches = patch_files(overlay)
    manifests = []
    for obj in load_all(text):
        if not isinstance(obj, dict):
            continue
        annotations = obj.get("metadata", {}).get("annotations", {})
        origin = yaml.safe_load(annotations.pop(ORIGIN, "")) or {}
        if not annotations:
            obj["metadata"].pop("annotations", None)
        source = _relative(probe / origin["path"], root) if "path" in origin else _relative(overlay, root)
        if "configuredIn" in origin:  # made by a generator (configMapGenerator, ...)
            source = _relative(probe / origin["configuredIn"], root)
        key = (str(obj.get("kind", "")), str(obj.get("metadata", {}).get("name", "")))
        manifests.append(Manifest(obj=obj, source=source,
                                  patches=tuple(_relative(p, root) for p in patches.get(key, []))))
    return manifests


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from tessera_deploy import gateway_config

    parser = argparse.ArgumentParser(description="Render every overlay into build/k8s/<overlay>.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "k8s")
    args = parser.parse_args(argv)
    try:
        gateway_config.write(gateway_config.expected())
    except gateway_config.GatewayConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"k8s-render: cannot write {args.out}/: {exc.strerror or exc}", file=sys.stderr)
        return 1
    for overlay in overlays():
        try:
            text = render_text(overlay)
        except RenderError as exc:
            print(exc, file=sys.stderr)
            return 1
        target = args.out / f"{overlay.name}.yaml"
        try:
            target.write_text(text)
        except OSError as exc:
            print(f"k8s-render: cannot write {target}: {exc.strerror or exc}", file=sys.stderr)
            return 1
        count = sum(1 for doc in load_all(text) if doc)
        print(f"{overlay.relative_to(ROOT)} -> {_relative(target, ROOT)} ({count} objects)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
