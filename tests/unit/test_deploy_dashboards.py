"""The Grafana dashboard Tessera ships is a dashboard of the expected shape: unique panel ids, a grid of 24 columns
without overlaps, every query on the `datasource` variable, every variable defined; and each way it can go wrong is
named."""

from __future__ import annotations

import copy

import pytest

from tessera_deploy import alerts, dashboards

DASHBOARD = dashboards.load()
ROWS = ("SLOs", "Edge", "Services", "GraphQL", "Readiness", "Dependencies", "Discovery", "Messaging", "Order saga",
        "Database")


def test_the_overview_dashboard_has_no_problems():
    assert dashboards.problems(DASHBOARD) == []
    assert dashboards.OVERVIEW_FILE in dashboards.files()


def test_the_overview_has_a_row_for_each_part_of_the_system_in_order():
    titles = [p["title"] for p in DASHBOARD["panels"] if p["type"] == "row"]
    assert [next(r for r in ROWS if t.startswith(r)) for t in titles] == list(ROWS)


def test_its_variables_are_the_datasource_and_namespace_and_job_from_label_values():
    variables = {v["name"]: v for v in dashboards.variables(DASHBOARD)}
    assert list(variables) == ["datasource", "namespace", "job"]
    assert (variables["datasource"]["type"], variables["datasource"]["query"]) == ("datasource", "prometheus")
    for name in ("namespace", "job"):
        var = variables[name]
        assert var["type"] == "query" and var["datasource"]["uid"] == "${datasource}"
        assert dashboards.label_values_selector(var["query"]["query"]).startswith("tessera_ready")
        assert var["includeAll"] and var["multi"] and var["allValue"] == ".*"
    assert 'namespace=~"$namespace"' in variables["job"]["query"]["query"]


def test_every_panel_query_filters_by_namespace_and_reads_tesseras_metrics():
    for title, expr in dashboards.exprs(DASHBOARD):
        if not title.startswith("$"):
            assert "$namespace" in expr, title
    referenced = dashboards.referenced_metrics(DASHBOARD)
    assert {"tessera_ready", "tessera_health_check_up", "tessera_circuit_state", "tessera_outbox_backlog",
            "tessera_outbox_oldest_unpublished_seconds", "tessera_consumer_dead_lettered_total",
            "tessera_saga_compensation_failures_total", "tessera_db_connections", "tessera_db_connections_max",
            "tessera_discovery_instances", "grpc_server_handling_seconds_bucket", "grpc_client_handled_total",
            "envoy_http_downstream_rq_xx", "tessera_graphql_operations_total", "tessera_graphql_errors_total",
            "up"} <= referenced
    # The RED panels read the recording rules the alerts read, not a second copy of their expressions.
    recorded = alerts.recorded_names(alerts.load_groups())
    assert {"namespace_job_grpc_service:grpc_server_handled:rate5m",
            "namespace_job_grpc_service:grpc_server_errors:rate5m"} <= referenced & recorded


def test_substitution_gives_every_variable_its_all_value_and_the_intervals_a_duration():
    expr = 'rate(x{namespace=~"$namespace", job=~"${job}"}[$__rate_interval]) + increase(y[$__range])'
    assert dashboards.substitute(expr, DASHBOARD) == 'rate(x{namespace=~".*", job=~".*"}[1m]) + increase(y[1h])'
    with pytest.raises(dashboards.DashboardError, match=r"\$service is neither a template variable"):
        dashboards.substitute('x{job=~"$service"}', DASHBOARD)


def broken(change) -> list[str]:
    dashboard = copy.deepcopy(DASHBOARD)
    change(dashboard)
    return dashboards.problems(dashboard)


def first_panel(dashboard):
    return dashboards.query_panels(dashboard)[0]


@pytest.mark.parametrize(("change", "problem"), [
    (lambda d: d["panels"][2].update(id=d["panels"][1]["id"]), "is not a unique integer"),
    (lambda d: first_panel(d)["gridPos"].update(x=22), "is outside the 24 columns"),
    (lambda d: dashboards.query_panels(d)[1]["gridPos"].update(x=first_panel(d)["gridPos"]["x"]), "overlaps"),
    (lambda d: first_panel(d).update(datasource={"type": "prometheus", "uid": "prometheus"}),
     ".datasource: must be ${datasource}"),
    (lambda d: first_panel(d)["targets"][0].update(expr=" "), ".targets[0].expr: required"),
    (lambda d: first_panel(d).update(targets=[]), ".targets: at least one query is required"),
    (lambda d: first_panel(d)["targets"][0].update(expr='up{job=~"$service"}'),
     "$service is neither a template variable"),
    (lambda d: d.update(schemaVersion=16), "schemaVersion: 16; 39 or later is expected"),
    (lambda d: d["templating"]["list"].pop(0), "a variable `datasource` of type datasource"),
])
def test_each_shape_problem_is_named(change, problem):
    found = broken(change)
    assert any(problem in p for p in found), found
