"""Tessera's rules and Grafana dashboard in a real Prometheus scraping real service processes and the real Envoy
gateway: every metric a rule or a dashboard panel reads is in their scrapes, every panel's query runs, and a real fault
(the user service dies while orders come in) takes alerts to FIRING.

The rules are loaded as committed, except that every `for:` is shortened to 2s (scraped and evaluated every
second) so that the alerts fire in a test's time; the expressions are unchanged.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import yaml
from tessera.order.v1 import order_service_pb2 as osvc
from tessera.order.v1 import order_service_pb2_grpc

from tessera_deploy import alerts, dashboards, slos
from tests.support import postgres
from tests.support.gateway import SERVICES as GATEWAY_UPSTREAMS
from tests.support.gateway import Gateway, closed_port
from tests.support.processes import ServiceProcess
from tests.support.prometheus import PrometheusServer

SHORT_FOR = "2s"
# The order service's dependencies; payment and inventory stay up, user is the one that dies.
SERVICES = ("user", "inventory", "payment", "order")
# The service on PostgreSQL (the others on SQLite): only a PostgreSQL database has connection pools to report.
ON_POSTGRES = "inventory"
# The gateway's scrape job: the Service its ServiceMonitor selects, scraping Envoy's stats in Prometheus format.
GATEWAY_JOB = "tessera-gateway"
# The GraphQL API's scrape job: its own /metrics, on its HTTP port.
GRAPHQL_JOB = "graphql"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shortened_rules(folder) -> object:
    groups = alerts.load_groups()
    for group in groups:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = SHORT_FOR
    path = folder / "tessera.rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """user, inventory, payment and order as real processes (inventory on PostgreSQL, the others on SQLite), each
    with its /metrics, the GraphQL API (its own /metrics; the services it calls are not needed for that, so it is
    given a closed port for each), the gateway's Envoy in front of them (one REST call made through it), and a
    Prometheus scraping them as the ServiceMonitors' jobs."""
    folder = tmp_path_factory.mktemp("alerts")
    dead = closed_port()
    database, database_url = asyncio.run(postgres.create_database())
    urls = {name: f"sqlite+aiosqlite:///{folder / (name + '.db')}" for name in SERVICES}
    urls[ON_POSTGRES] = database_url
    metrics = {name: free_port() for name in SERVICES}
    common = {"TESSERA_CIRCUIT_OPEN_SECONDS": "60", "TESSERA_DEFAULT_DEADLINE_SECONDS": "2"}
    processes = {name: ServiceProcess(name, {
        **common,
        "TESSERA_DATABASE_URL": urls[name],
        "TESSERA_METRICS_PORT": str(metrics[name]),
    }, folder / f"{name}.log") for name in SERVICES if name != "order"}
    processes[GRAPHQL_JOB] = ServiceProcess(GRAPHQL_JOB, {
        "TESSERA_GRAPHQL_PORT": "0",
        **{f"TESSERA_{name.upper()}_SERVICE_ADDR": f"127.0.0.1:{dead.getsockname()[1]}" for name in GATEWAY_UPSTREAMS},
    }, folder / "graphql.log", argv=[sys.executable, "-m", "tessera_graphql"])
    started: list[ServiceProcess] = []
    prometheus = gateway = None
    try:
        with ThreadPoolExecutor(len(processes)) as pool:
            for process in pool.map(lambda p: p.start(timeout=60), processes.values()):
                started.append(process)
        processes["order"] = ServiceProcess("order", {
            **common,
            "TESSERA_DATABASE_URL": urls["order"],
            "TESSERA_METRICS_PORT": str(metrics["order"]),
            "TESSERA_USER_SERVICE_ADDR": processes["user"].address,
            "TESSERA_INVENTORY_SERVICE_ADDR": processes["inventory"].address,
            "TESSERA_PAYMENT_SERVICE_ADDR": processes["payment"].address,
        }, folder / "order.log")
        started.append(processes["order"].start())
        addresses = {name: f"127.0.0.1:{dead.getsockname()[1]}" for name in GATEWAY_UPSTREAMS}
        addresses.update({name: processes[name].address for name in SERVICES})
        gateway = Gateway(folder, "edge", addresses, {"graphql": {"address": processes[GRAPHQL_JOB].address}}).start(
            list(SERVICES))
        jobs = {f"{name}-service": [f"127.0.0.1:{metrics[name]}"] for name in SERVICES}
        jobs[GRAPHQL_JOB] = [processes[GRAPHQL_JOB].address]
        jobs[GATEWAY_JOB] = [gateway.envoy.admin_url.removeprefix("http://")]
        prometheus = PrometheusServer(folder, jobs, [shortened_rules(folder)],
                                      metrics_paths={GATEWAY_JOB: "/stats/prometheus"}).start()
        wait_for(lambda: {t["labels"]["job"] for t in prometheus.api("targets")["activeTargets"]
                          if t["health"] == "up"} == set(jobs),
                 "every service and the gateway scraped", prometheus)
        # One REST call once the gateway has been scraped, so that its counters rise in Prometheus (and Envoy creates
        # a cluster's response-class series with its first response): the user service answers PERMISSION_DENIED
        # (403) to a subject reading another's account.
        reply = gateway.call("GET", f"/v1/users/{uuid.uuid4()}", token=gateway.mint("dashboard", "user:read"))
        assert reply.status == 403 and reply.json()["details"][0]["reason"] == "PERMISSION_DENIED", reply
        # One GraphQL operation through the gateway: the API's services are all at a closed port, so the caller's
        # account cannot be read and the answer is a 200 with an UNAVAILABLE error, which its counters see.
        reply = gateway.call("POST", "/graphql", body={"query": "{ me { id } }"},
                             token=gateway.mint(str(uuid.uuid4()), "user:read"))
        assert reply.status == 200 and reply.json()["errors"][0]["extensions"]["code"] == "UNAVAILABLE", reply
        yield processes, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        if gateway is not None:
            gateway.stop()
        dead.close()
        for process in started:
            process.stop()
        asyncio.run(postgres.drop_database(database))


def wait_for(condition, what: str, prometheus: PrometheusServer, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.25)
    raise AssertionError(f"not {what} after {timeout}s; prometheus log: {prometheus.log_text()[-2000:]}")


def present_names(prometheus: PrometheusServer) -> set[str]:
    """Every series name the scrapes have samples of, and every name a scraped metric family (its HELP/TYPE, also
    for a labelled metric with no series yet) would give its series."""
    names = set(prometheus.api("label/__name__/values"))
    suffixes = {"counter": ("", "_total"), "histogram": ("_bucket", "_count", "_sum"), "gauge": ("",),
                "summary": ("", "_count", "_sum"), "untyped": ("",)}
    for family, entries in prometheus.api("metadata").items():
        for entry in entries:
            names.update(f"{family}{suffix}" for suffix in suffixes.get(entry["type"], ("",)))
    return names


def test_every_metric_a_rule_reads_is_scraped_from_the_services(stack):
    _, prometheus = stack
    wait_for(lambda: "tessera_circuit_state" in present_names(prometheus), "the metrics' metadata", prometheus)
    referenced = alerts.referenced_metrics(alerts.load_groups())
    assert {"tessera_circuit_state", "tessera_saga_compensation_failures_total", "tessera_ready", "up"} <= referenced
    missing = referenced - present_names(prometheus)
    assert missing == set(), f"rules read metrics no service exports: {sorted(missing)}"
    # A rule on a renamed metric would read nothing: the same check names it.
    assert "tessera_circuit_state_renamed" not in present_names(prometheus)


def query_error(prometheus: PrometheusServer, expr: str) -> str | None:
    """Prometheus's error for an instant query of `expr`, or None when it runs."""
    url = f"{prometheus.url}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    try:
        with urllib.request.urlopen(url, timeout=10) as reply:
            body = json.loads(reply.read())
    except urllib.error.HTTPError as exc:
        body = json.loads(exc.read())
    return None if body["status"] == "success" else f"{body.get('errorType')}: {body.get('error')}"


DASHBOARD = dashboards.load()


def rising(prometheus: PrometheusServer, expr: str, label: str) -> set[str]:
    """The values of `label` of the series of `expr` above 0 now."""
    return {r["metric"].get(label) for r in prometheus.api("query", query=expr)["result"] if float(r["value"][1]) > 0}


def test_every_dashboard_query_runs_in_prometheus_with_its_variables_at_all(stack):
    _, prometheus = stack
    failed = {f"{title}: {expr}": error for title, expr in dashboards.exprs(DASHBOARD)
              if (error := query_error(prometheus, dashboards.substitute(expr, DASHBOARD))) is not None}
    assert failed == {}
    # A query Prometheus refuses is reported, so the check above can fail.
    assert "parse error" in query_error(prometheus, "sum by (job) (rate(tessera_ready[1m])")


def test_the_dashboard_variables_list_the_services_and_its_panels_show_them(stack):
    _, prometheus = stack
    variables = {v["name"]: v for v in dashboards.variables(DASHBOARD)}
    selector = dashboards.substitute(dashboards.label_values_selector(variables["job"]["query"]["query"]), DASHBOARD)
    jobs = {s["job"] for s in prometheus.api("series", **{"match[]": selector})}
    assert jobs == {f"{name}-service" for name in SERVICES} | {GRAPHQL_JOB}
    ready = next(p for p in dashboards.query_panels(DASHBOARD) if p["title"] == "Ready instances")
    result = prometheus.api("query", query=dashboards.substitute(ready["targets"][0]["expr"], DASHBOARD))["result"]
    assert {r["metric"]["job"]: r["value"][1] for r in result} == {
        **{f"{name}-service": "1" for name in SERVICES}, GRAPHQL_JOB: "1"}
    edge = next(p for p in dashboards.query_panels(DASHBOARD) if p["title"] == "Gateway targets up")
    [up] = prometheus.api("query", query=dashboards.substitute(edge["targets"][0]["expr"], DASHBOARD))["result"]
    assert up["value"][1] == "1"
    # The gateway panels select Envoy's series by the edge listener's prefix and the services' cluster names: the
    # REST call the stack made (answered 403 by the user service) and its GraphQL call (answered 200 by the API) are
    # the rates above 0 in them. The GraphQL panels show that operation, failed UNAVAILABLE in its 200.
    for title, label, values in (("Responses by status class", "envoy_response_code_class", {"2", "4"}),
                                 ("Upstream requests by service", "envoy_cluster_name", {"user", "graphql"}),
                                 ("GraphQL operations by outcome", "outcome", {"error"}),
                                 ("GraphQL errors by code", "code", {"UNAVAILABLE"})):
        panel = next(p for p in dashboards.query_panels(DASHBOARD) if p["title"] == title)
        expr = dashboards.substitute(panel["targets"][0]["expr"], DASHBOARD)
        wait_for(lambda expr=expr, label=label, values=values: rising(prometheus, expr, label) == values,
                 f"{title} showing {label}={values}", prometheus)


def test_every_metric_a_dashboard_panel_reads_is_scraped_from_the_services_and_the_gateway(stack):
    _, prometheus = stack
    wait_for(lambda: "envoy_http_downstream_rq_xx" in present_names(prometheus), "the gateway's metadata",
             prometheus)
    recorded = alerts.recorded_names(alerts.load_groups())
    referenced = dashboards.referenced_metrics(DASHBOARD)
    assert referenced & recorded, "the RED panels read the rules' recorded series"
    missing = referenced - recorded - present_names(prometheus)
    assert missing == set(), f"dashboard panels read metrics no service or the gateway exports: {sorted(missing)}"


def test_every_slo_ratio_is_recorded_from_the_real_scrapes(stack):
    """The SLO rules (generated from k8s/monitoring/slos.yaml) select what the gateway and the services export: each
    SLO's 5m error ratio has a series for the jobs that answered the stack's calls. The gateway's REST call (403) and
    GraphQL call (200) are no 5xx, so the edge's ratio is 0 (no 5xx counted is a ratio of 0, not no ratio)."""
    _, prometheus = stack

    def ratios() -> dict[tuple[str, str], float]:
        result = prometheus.api("query", query="namespace_job:slo_errors:ratio_rate5m")["result"]
        return {(r["metric"]["slo"], r["metric"]["job"]): float(r["value"][1]) for r in result}

    expected = {("edge-availability", GATEWAY_JOB), ("grpc-availability", "user-service"),
                ("grpc-latency", "user-service")}
    wait_for(lambda: expected <= ratios().keys() and ratios()[("edge-availability", GATEWAY_JOB)] == 0,
             "the SLO ratios recorded", prometheus)
    assert {slo for slo, _ in ratios()} == {s.name for s in slos.load().slos}


def firing(prometheus: PrometheusServer, name: str) -> list[dict]:
    return [a for a in prometheus.api("alerts")["alerts"]
            if a["labels"]["alertname"] == name and a["state"] == "firing"]


async def test_a_dead_user_service_fires_its_target_down_the_order_circuit_open_and_health_check_alerts(stack):
    processes, prometheus = stack
    assert firing(prometheus, "TesseraCircuitOpen") == [] and firing(prometheus, "TesseraTargetDown") == []
    user_address = processes["user"].address
    processes["user"].kill()  # by its PID: the process dies as in a crash

    async with grpc.aio.insecure_channel(processes["order"].address) as channel:
        stub = order_service_pb2_grpc.OrderServiceStub(channel)
        for _ in range(8):  # CreateOrder validates the customer with user first: each call fails there
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.CreateOrder(osvc.CreateOrderRequest(
                    customer_id=str(uuid.uuid4()), payment_method="pm_sandbox_ok", currency_code="EUR",
                    request_id=uuid.uuid4().hex,
                    items=[osvc.CreateOrderRequest.Item(product_id=str(uuid.uuid4()), quantity=1)]), timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

    [circuit] = await asyncio.to_thread(
        wait_for, lambda: firing(prometheus, "TesseraCircuitOpen"), "TesseraCircuitOpen firing", prometheus)
    # The dependency's address is an IP, which names no service: the alert has no failing_service.
    assert circuit["labels"] == {"alertname": "TesseraCircuitOpen", "severity": "critical", "job": "order-service",
                                 "instance": f"127.0.0.1:{processes['order'].env['TESSERA_METRICS_PORT']}",
                                 "dependency": user_address}
    assert circuit["annotations"]["summary"] == f"order-service keeps its circuit to {user_address} open"
    assert circuit["annotations"]["runbook_url"] == "README.md#tesseracircuitopen"

    [down] = await asyncio.to_thread(
        wait_for, lambda: firing(prometheus, "TesseraTargetDown"), "TesseraTargetDown firing", prometheus)
    assert down["labels"]["job"] == "user-service" and down["labels"]["severity"] == "warning"
    [service_down] = await asyncio.to_thread(
        wait_for, lambda: firing(prometheus, "TesseraServiceDown"), "TesseraServiceDown firing", prometheus)
    assert service_down["labels"]["job"] == "user-service"
    # failing_service names the service at fault on the source alert and on its callers' alerts about it: the label
    # Alertmanager's inhibit rules match on (k8s/monitoring/alertmanager.yml).
    assert service_down["labels"]["failing_service"] == "user-service"
    # The order service's readiness check of user fails too; it still serves (DEGRADED).
    [check] = await asyncio.to_thread(
        wait_for, lambda: firing(prometheus, "TesseraHealthCheckFailing"), "TesseraHealthCheckFailing firing",
        prometheus)
    assert (check["labels"]["job"], check["labels"]["check"], check["labels"]["critical"]) == (
        "order-service", "user-service", "false")
    assert check["labels"]["failing_service"] == "user-service"
    assert firing(prometheus, "TesseraNotReady") == []
