"""Tessera's Grafana dashboards (k8s/monitoring/dashboards/*.json): reading them, their panels' queries, and the
shape problems `make k8s-validate` and the tests report.

The k8s base ships each file in the ConfigMap `tessera-dashboards`, labelled `grafana_dashboard: "1"` so that
Grafana's dashboard sidecar loads it. Every query reads the Prometheus chosen by the `datasource` variable.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tessera_deploy import K8S_DIR
from tessera_deploy.alerts import metric_names

DASHBOARDS_DIR = K8S_DIR / "monitoring" / "dashboards"
OVERVIEW_FILE = DASHBOARDS_DIR / "tessera-overview.json"
CONFIG_MAP_NAME = "tessera-dashboards"
# The label Grafana's dashboard sidecar (kiwigrid k8s-sidecar, as the Grafana Helm chart configures it) watches.
SIDECAR_LABEL = ("grafana_dashboard", "1")
DATASOURCE = "${datasource}"
GRID_COLUMNS = 24
# Oldest dashboard schemaVersion accepted: Grafana migrates an older dashboard as it loads it, changing its panels.
MIN_SCHEMA_VERSION = 39
# Grafana's built-in variables and a concrete value each stands for when a query is run outside Grafana.
BUILTIN_VALUES = {"__rate_interval": "1m", "__interval": "30s", "__range": "1h", "__range_s": "3600",
                  "__interval_ms": "30000"}
_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


class DashboardError(Exception):
    """A dashboard file cannot be read as a Grafana dashboard; the message names the file."""


def files() -> list[Path]:
    return sorted(DASHBOARDS_DIR.glob("*.json"))


def load(path: Path = OVERVIEW_FILE) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DashboardError(f"{path}: {exc}") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("panels"), list):
        raise DashboardError(f"{path}: panels: a Grafana dashboard (an object with a list of panels) is required")
    return doc


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, those inside collapsed rows included, rows themselves included."""
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []) if panel.get("type") == "row" else [])
    return found


def query_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return [p for p in panels(dashboard) if p.get("type") != "row"]


def variables(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    return dashboard.get("templating", {}).get("list", [])


def exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) of every panel target, and ($name, series selector) of every query variable's
    `label_values(selector, label)` (another variable query is given whole, and Prometheus refuses it)."""
    found = [(p.get("title", ""), t.get("expr", "")) for p in query_panels(dashboard) for t in p.get("targets", [])]
    for var in variables(dashboard):
        if var.get("type") == "query":
            query = var.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query)
            try:
                text = label_values_selector(text)
            except DashboardError:
                pass
            found.append((f"${var.get('name')}", text))
    return found


def variable_names(text: str) -> set[str]:
    return {next(g for g in m.groups() if g) for m in _VARIABLE.finditer(text)}


def substitute(expr: str, dashboard: dict[str, Any]) -> str:
    """The expression as Prometheus receives it when every template variable is `All` (its allValue, a regex
    matching every value) and Grafana's interval variables have the concrete values of BUILTIN_VALUES."""
    values = dict(BUILTIN_VALUES)
    values.update({v["name"]: v.get("allValue") or ".*" for v in variables(dashboard) if v.get("type") == "query"})

    def value(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise DashboardError(f"${name} is neither a template variable of the dashboard nor a Grafana interval")
        return values[name]

    return _VARIABLE.sub(value, expr)


def label_values_selector(query: str) -> str:
    """The series selector of a `label_values(selector, label)` variable query."""
    match = re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query, re.S)
    if match is None:
        raise DashboardError(f"{query!r}: a label_values(selector, label) query is expected")
    return match.group(1)


def referenced_metrics(dashboard: dict[str, Any]) -> set[str]:
    """Every metric (and recorded series) name the dashboard's queries read."""
    return set().union(*(metric_names(substitute(expr, dashboard)) for _, expr in exprs(dashboard)))


def _overlap(a: dict[str, int], b: dict[str, int]) -> bool:
    return (a["x"] < b["x"] + b["w"] and b["x"] < a["x"] + a["w"]
            and a["y"] < b["y"] + b["h"] and b["y"] < a["y"] + a["h"])


def problems(dashboard: dict[str, Any]) -> list[str]:
    """What makes `dashboard` not a Tessera dashboard Grafana shows as written, each naming the field."""
    found: list[str] = []
    if not isinstance(dashboard.get("schemaVersion"), int) or dashboard["schemaVersion"] < MIN_SCHEMA_VERSION:
        found.append(f"schemaVersion: {dashboard.get('schemaVersion')!r}; {MIN_SCHEMA_VERSION} or later is expected")
    for key in ("uid", "title"):
        if not dashboard.get(key):
            found.append(f"{key}: required")
    names = {v.get("name"): v for v in variables(dashboard)}
    source = names.get("datasource")
    if source is None or source.get("type") != "datasource" or source.get("query") != "prometheus":
        found.append("templating.list: a variable `datasource` of type datasource choosing a prometheus is required")
    for var in variables(dashboard):
        if var.get("type") == "query" and (var.get("datasource") or {}).get("uid") != DATASOURCE:
            found.append(f"templating.list[{var.get('name')}].datasource: must be {DATASOURCE}")
    ids: set[Any] = set()
    placed: list[tuple[str, dict[str, int]]] = []
    for i, panel in enumerate(panels(dashboard)):
        where = f"panels[{i}] ({panel.get('title', '')!r})"
        if panel.get("id") in ids or not isinstance(panel.get("id"), int):
            found.append(f"{where}.id: {panel.get('id')!r} is not a unique integer")
        ids.add(panel.get("id"))
        grid = panel.get("gridPos") or {}
        if not all(isinstance(grid.get(k), int) for k in ("x", "y", "w", "h")) or grid["w"] < 1 or grid["h"] < 1:
            found.append(f"{where}.gridPos: x, y, w and h must be integers (w and h positive)")
        elif grid["x"] < 0 or grid["x"] + grid["w"] > GRID_COLUMNS:
            found.append(f"{where}.gridPos: x {grid['x']} + w {grid['w']} is outside the {GRID_COLUMNS} columns")
        else:
            found.extend(f"{where}.gridPos overlaps {other}" for other, g in placed if _overlap(grid, g))
            placed.append((where, grid))
        if panel.get("type") == "row":
            continue
        if (panel.get("datasource") or {}).get("uid") != DATASOURCE:
            found.append(f"{where}.datasource: must be {DATASOURCE}")
        targets = panel.get("targets") or []
        if not targets:
            found.append(f"{where}.targets: at least one query is required")
        for j, target in enumerate(targets):
            if not str(target.get("expr", "")).strip():
                found.append(f"{where}.targets[{j}].expr: required")
            if (target.get("datasource") or {}).get("uid", DATASOURCE) != DATASOURCE:
                found.append(f"{where}.targets[{j}].datasource: must be {DATASOURCE}")
        if len({t.get("refId") for t in targets}) != len(targets):
            found.append(f"{where}.targets: refIds must be unique")
    for title, expr in exprs(dashboard):
        try:
            substitute(expr, dashboard)
        except DashboardError as exc:
            found.append(f"{title!r}: {exc}")
    return found
