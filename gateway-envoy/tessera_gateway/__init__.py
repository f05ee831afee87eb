"""Tessera's edge gateway: Envoy configuration, OpenAPI document and dev tokens, generated from the contracts."""

from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
ROOT = PACKAGE_DIR.parents[1]
DESCRIPTION = PACKAGE_DIR.parent / "gateway.yaml"
DESCRIPTOR_SET = ROOT / "gen" / "descriptors" / "tessera.pb"
BUILD_DIR = ROOT / "build" / "gateway"
