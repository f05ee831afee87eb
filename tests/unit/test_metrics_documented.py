"""Every metric Tessera exports is in metrics.py's table, and every metric the READMEs name is exported."""

from __future__ import annotations

import re

from prometheus_client.metrics import MetricWrapperBase

from tessera_graphql import metrics as graphql_metrics
from tessera_runtime import metrics
from tessera_runtime.config import ROOT

READMES = (ROOT / "README.md", ROOT / "services" / "README.md", *sorted((ROOT / "services").glob("*/README.md")),
           ROOT / "gateway-envoy" / "README.md", ROOT / "k8s" / "README.md")
# A name in backticks that may be a metric (`grpc_server_handled_total`, `tessera_circuit_state{dependency}`).
NAMED = re.compile(r"`((?:grpc_server|grpc_client|tessera)_[a-z0-9_]+)")
# Names of that shape that are no metric: the packages (services/tessera_*, gateway-envoy/tessera_gateway) and these.
NOT_METRICS = {"tessera_service_instances"}  # the PostgreSQL registry's table
HISTOGRAM_SERIES = re.compile(r"_(?:bucket|count|sum)$")
# A metric defined in the code: a prometheus_client metric, or a family a custom collector yields (the pools').
DEFINED = re.compile(
    r"\b(?:Counter|Gauge|Histogram|Summary|GaugeMetricFamily|CounterMetricFamily)\(\s*\"([a-z0-9_]+)\"")


def _table(module) -> set[str]:
    return {line.split("|")[1].strip() for line in module.__doc__.splitlines() if line.startswith("| ")}


def _defined(module) -> set[str]:
    return {value._name + ("_total" if value._type == "counter" else "")
            for value in vars(module).values() if isinstance(value, MetricWrapperBase)}


def test_every_runtime_metric_is_in_the_table_of_metrics_py():
    assert _defined(metrics) - _table(metrics) == set()


def test_every_graphql_api_metric_is_in_its_table_and_in_the_readme():
    defined = _defined(graphql_metrics)
    assert {"tessera_graphql_operations_total", "tessera_graphql_errors_total"} <= defined
    assert defined - _table(graphql_metrics) == set()
    assert defined - set(NAMED.findall((ROOT / "README.md").read_text())) == set()


def test_every_metric_a_readme_names_is_exported():
    exported = {name for path in (ROOT / "services").rglob("*.py") for name in DEFINED.findall(path.read_text())}
    assert {"tessera_circuit_state", "tessera_db_connections", "tessera_graphql_requests_total"} <= exported
    packages = {path.name for folder in ("services", "gateway-envoy") for path in (ROOT / folder).glob("tessera_*")}
    for readme in READMES:
        named = set(NAMED.findall(readme.read_text())) - packages - NOT_METRICS
        # A histogram's series (`grpc_server_handling_seconds_bucket`) are its own name with a suffix.
        named = {name if name in exported else HISTOGRAM_SERIES.sub("", name) for name in named}
        assert named - exported == set(), readme.relative_to(ROOT)
