"""Kubernetes and Istio deployment of Tessera: the service catalog, mesh policies, rendering and validation."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "k8s"
ISTIO_DIR = ROOT / "istio"
