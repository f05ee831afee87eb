"""Canary traffic shifting: rewrites the weights of a service's canary VirtualService and gives the YAML to apply."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from tessera_deploy import ROOT, mesh
from tessera_deploy.catalog import CANARIES, workload


class TrafficError(Exception):
    """The request cannot be carried out; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class Shift:
    service: str  # Kubernetes name: user-service
    path: Path  # the file that was (or would be) written
    before: int  # v2 weight before
    after: int  # v2 weight after
    manifest: str  # the VirtualService as YAML, ready for kubectl apply -f -


def _canary(service: str) -> str:
    try:
        w = workload(service)
    except LookupError as exc:
        raise TrafficError(str(exc)) from None
    if w.name not in CANARIES:
        raise TrafficError(f"{w.k8s_name} has no canary; the services with a v2 component under k8s/components/ "
                           f"are: {', '.join(f'{c}-service' for c in CANARIES)}")
    return w.name


def _file(name: str, root: Path) -> Path:
    path = mesh.canary_dir(name, root) / "virtual-service.yaml"
    if not path.exists():
        raise TrafficError(f"{path} does not exist: is {root} a Tessera checkout?")
    return path


def _current(name: str, root: Path) -> int:
    """The canary weight the committed file holds; a file it cannot be read from is the caller's to repair."""
    try:
        return mesh.current_canary_weight(name, root)
    except ValueError as exc:
        raise TrafficError(f"{exc}; restore it from git") from None


def weight(service: str, root: Path = ROOT) -> int:
    """The share of traffic (percent) the canary v2 of a service gets now."""
    name = _canary(service)
    _file(name, root)
    return _current(name, root)


def shift(service: str, canary_percent: int, *, write: bool = True, root: Path = ROOT) -> Shift:
    """Sends canary_percent of the service's traffic to v2 and the rest to v1."""
    if not 0 <= canary_percent <= 100:
        raise TrafficError(f"--canary must be between 0 and 100, got {canary_percent}")
    name = _canary(service)
    w = workload(name)
    path = _file(name, root)
    before = _current(name, root)
    doc = mesh.virtual_service(w, canary_percent)
    if write:
        path.write_text(mesh.dump([doc]))
    return Shift(service=w.k8s_name, path=path, before=before, after=canary_percent, manifest=mesh.to_yaml(doc))


def promote(service: str, *, write: bool = True, root: Path = ROOT) -> Shift:
    """All traffic to v2."""
    return shift(service, 100, write=write, root=root)


def rollback(service: str, *, write: bool = True, root: Path = ROOT) -> Shift:
    """All traffic back to v1; requests with the canary header still reach v2."""
    return shift(service, 0, write=write, root=root)
