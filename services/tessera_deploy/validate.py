"""`make k8s-validate`: renders every overlay and checks it against the schemas and the mesh's semantics, offline.

Exit status 0 when every overlay renders, every object validates against its schema (Kubernetes objects against
the pinned Kubernetes version, Istio objects against Istio's CRDs), every semantic check passes and the generated
files (Istio policies, gateway configuration, the PrometheusRule, the AlertmanagerConfig) match their sources, and
the Grafana dashboards' ConfigMap holds each dashboard file, labelled for Grafana's sidecar. Each problem is printed as
`file: Kind/name field: what is wrong`.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from tessera_deploy import ROOT, alertmanager, alerts, checks, gateway_config, mesh, render, schemas
from tessera_deploy.catalog import NAMESPACE, workloads
from tessera_deploy.checks import Problem


@dataclasses.dataclass
class OverlayReport:
    overlay: str
    manifests: list[render.Manifest]
    problems: list[Problem]


def validate_overlay(overlay: Path, root: Path = ROOT,
                     gateway_files: dict[str, str] | None = None) -> OverlayReport:
    """Schema and semantic problems of one overlay (a render failure is one problem)."""
    name = str(overlay.relative_to(root)) if overlay.is_relative_to(root) else str(overlay)
    try:
        manifests = render.render(overlay, root)
    except render.RenderError as exc:
        return OverlayReport(name, [], [Problem(name, "kustomization", "(render)", str(exc))])
    problems = []
    for m in manifests:
        problems.extend(Problem(m.where, m.ref, e.field, e.message) for e in schemas.validate(m.obj))
    problems.extend(checks.check(manifests, workloads(), NAMESPACE))
    if gateway_files is not None:
        problems.extend(gateway_config.check(manifests, gateway_files))
    return OverlayReport(name, manifests, problems)


def generated_problems() -> list[Problem]:
    """Generated files that differ from their sources."""
    problems = [Problem(str(p.relative_to(ROOT)), "(generated)", "(file)",
                        "differs from what the contracts give: run `make k8s-mesh`")
                for p in mesh.stale(mesh.files())]
    try:
        problems.extend(Problem(str(alerts.shown(p)), "(generated)", "(file)",
                                f"differs from {alerts.shown(alerts.source_of(p))}: run `make k8s-alerts`")
                        for p in alerts.stale(alerts.files()))
    except alerts.RulesError as exc:
        problems.append(Problem(str(alerts.RULES_FILE.relative_to(ROOT)), "(rules)", "groups", str(exc)))
    except alertmanager.AlertmanagerConfigError as exc:
        problems.append(Problem(str(alertmanager.SOURCE_FILE.relative_to(ROOT)), "(alertmanager)", "(file)", str(exc)))
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overlays", nargs="*", type=Path, help="overlay folders (default: every k8s/overlays/*)")
    args = parser.parse_args(argv)
    chosen = [p.resolve() for p in args.overlays] or render.overlays()
    try:
        expected = gateway_config.expected()
    except gateway_config.GatewayConfigError as exc:
        print(f"k8s-validate: the gateway configuration cannot be generated: {exc}", file=sys.stderr)
        return 1
    gateway_config.write(expected)
    problems = generated_problems()
    total = 0
    for overlay in chosen:
        report = validate_overlay(overlay, gateway_files=expected)
        total += len(report.manifests)
        problems.extend(report.problems)
        status = "ok" if not report.problems else f"{len(report.problems)} problem(s)"
        print(f"{report.overlay}: {len(report.manifests)} objects, {status}")
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    if problems:
        print(f"k8s-validate: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    print(f"k8s-validate: {len(chosen)} overlays, {total} objects valid for Kubernetes "
          f"{schemas.KUBERNETES_VERSION} and Istio ({schemas.istio_crds_path().name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
