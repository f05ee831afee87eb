"""The metric names a rule's PromQL reads, as the rules' tests find them in the real scrapes."""

from __future__ import annotations

import pytest

from tessera_deploy import alerts


@pytest.mark.parametrize(("expr", "names"), [
    ('up{job="order-service"} == 0', {"up"}),
    ('sum by (job, grpc_code) (rate(grpc_server_handled_total{grpc_code=~"INTERNAL|UNKNOWN"}[5m]))',
     {"grpc_server_handled_total"}),
    ("histogram_quantile(0.99, sum without (instance) (rate(a_bucket[5m]))) > 2.5 and on (job) group_left (x) b",
     {"a_bucket", "b"}),
    ("max by (job) (x) unless x offset 15m or count(y) > bool 2", {"x", "y"}),
    ('label_replace(vector(1), "job", "graphql", "", "") unless on (job) up', {"up"}),
    ("ns:recorded:rate5m / ignoring (code) other:rate5m > 0.05", {"ns:recorded:rate5m", "other:rate5m"}),
    ("time() - process_start_time_seconds > 1200", {"process_start_time_seconds"}),
])
def test_metric_names_are_the_selectors_not_functions_keywords_labels_or_durations(expr, names):
    assert alerts.metric_names(expr) == names


def test_the_shipped_rules_read_tesseras_metrics_and_not_their_own_recordings():
    groups = alerts.load_groups()
    referenced = alerts.referenced_metrics(groups)
    assert not referenced & alerts.recorded_names(groups)
    assert {"tessera_circuit_state", "tessera_outbox_oldest_unpublished_seconds",
            "tessera_consumer_dead_lettered_total", "tessera_saga_compensation_failures_total",
            "tessera_batch_job_items_passed_over_total", "tessera_outbox_parked",
            "grpc_server_handling_seconds_bucket", "tessera_discovery_instances", "up"} <= referenced


def test_a_rules_file_without_groups_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "empty.rules.yaml"
    path.write_text("groups: []\n")
    with pytest.raises(alerts.RulesError, match=r"empty.rules.yaml: groups: a non-empty list"):
        alerts.load_groups(path)
    path.write_text("groups: [\n")
    with pytest.raises(alerts.RulesError, match=r"empty\.rules\.yaml"):
        alerts.load_groups(path)
