"""Every metric Tessera exports is in metrics.py's table, and every metric the READMEs name is exported."""

from __future__ import annotations

import re

from prometheus_client.metrics import MetricWrapperBase

from tessera_runtime import metrics
from tessera_runtime.config import ROOT

READMES = (ROOT / "README.md", ROOT / "services" / "README.md", *sorted((ROOT / "services").glob("*/README.md")),
           ROOT / "gateway-envoy" / "README.md", ROOT / "k8s" / "README.md")
# A name in backticks that may be a metric (`grpc_server_handled_total`, `tessera_circuit_state{dependency}`).
NAMED = re.compile(r"`((?:grpc_server|grpc_client|tessera)_[a-z0-9_]+)")
# Names of that shape that are no metric: the packages (services/tessera_*, gateway-envoy/tessera_gateway) and these.
NOT_METRICS = {"tessera_service_instances"}  # the PostgreSQL registry's table
# A metric defined in the code: a prometheus_client metric, or a family a custom collector yields (the pools').
DEFINED = re.compile(
    r"\b(?:Counter|Gauge|Histogram|Summary|GaugeMetricFamily|CounterMetricFamily)\(\s*\"([a-z0-9_]+)\"")


def test_every_runtime_metric_is_in_the_table_of_metrics_py():
    table = {line.split("|")[1].strip() for line in metrics.__doc__.splitlines() if line.startswith("| ")}
    defined = {value._name + ("_total" if value._type == "counter" else "")
               for value in vars(metrics).values() if isinstance(value, MetricWrapperBase)}
    assert defined - table == set()


def test_every_metric_a_readme_names_is_exported():
    exported = {name for path in (ROOT / "services").rglob("*.py") for name in DEFINED.findall(path.read_text())}
    assert {"tessera_circuit_state", "tessera_db_connections", "tessera_graphql_requests_total"} <= exported
    packages = {path.name for folder in ("services", "gateway-envoy") for path in (ROOT / folder).glob("tessera_*")}
    for readme in READMES:
        named = set(NAMED.findall(readme.read_text())) - packages - NOT_METRICS
        assert named - exported == set(), readme.relative_to(ROOT)
