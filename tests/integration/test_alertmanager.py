"""Tessera's Alertmanager configuration (k8s/monitoring/alertmanager.yml) checked by the real amtool and a real
Alertmanager (Debian's 0.25, `make prometheus`): the file is valid, every alert of the rules routes by its severity
(critical pages, warning tickets), and one fault pages once: alerts posted as Prometheus posts them are inhibited by
the alert of the fault's source and never delivered to the webhook, while the source is.

The running Alertmanager uses the shipped routes and inhibit rules through one test-only override
(tests/support/alertmanager.py `config_for_tests`): a webhook to the test's HTTP server on each receiver, and
group_wait and group_interval of 1s instead of 30s and 5m, so that notifications arrive in a test's time.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator

import pytest
import yaml

from tessera_deploy import alertmanager, alerts
from tests.support.alertmanager import AlertmanagerServer, WebhookSink, amtool, config_for_tests
from tests.support.waiting import wait_for

SOURCE = alertmanager.SOURCE_FILE
RECEIVER_OF_SEVERITY = {"critical": "tessera-page", "warning": "tessera-ticket"}
NAMESPACE = "tessera"


def test_amtool_accepts_the_shipped_config():
    result = amtool("check-config", SOURCE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    shipped = alertmanager.load()
    assert f" - {len(shipped['inhibit_rules'])} inhibit rules" in result.stdout
    assert " - 2 receivers" in result.stdout


def test_amtool_refuses_a_broken_config(tmp_path):
    broken = alertmanager.load()
    broken["inhibit_rules"][0]["target_matchers"] = ['alertname=~"TesseraServiceDown|(']
    path = tmp_path / "alertmanager.yml"
    path.write_text(yaml.safe_dump(broken))
    result = amtool("check-config", path)
    assert result.returncode != 0 and "FAILED" in result.stdout + result.stderr


def routed_to(*labels: str) -> str:
    """The receiver `amtool config routes test` finds for an alert with `labels` (name=value)."""
    result = amtool("config", "routes", "test", f"--config.file={SOURCE}", *labels)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("rule", alerts.alerting_rules(alerts.load_groups()), ids=lambda r: r["alert"])
def test_every_alert_routes_by_its_severity(rule):
    severity = rule["labels"]["severity"]
    assert routed_to(f"alertname={rule['alert']}", f"severity={severity}", f"namespace={NAMESPACE}",
                     "job=order-service") == RECEIVER_OF_SEVERITY[severity]


def test_an_alert_without_a_severity_gets_a_ticket_and_amtool_verifies_the_receiver():
    assert routed_to("alertname=SomethingElse", f"namespace={NAMESPACE}") == "tessera-ticket"
    result = amtool("config", "routes", "test", f"--config.file={SOURCE}", "--verify.receivers=tessera-page",
                    "alertname=TesseraTargetDown", "severity=warning")
    assert result.returncode != 0, "amtool reports a receiver other than the expected one"


def test_the_test_override_changes_only_the_group_timing_and_the_receivers_integrations():
    shipped, tested = alertmanager.load(), config_for_tests("http://127.0.0.1:9")
    assert tested["inhibit_rules"] == shipped["inhibit_rules"]
    assert tested["route"]["routes"] == shipped["route"]["routes"]
    assert {k: v for k, v in tested["route"].items() if k not in ("group_wait", "group_interval")} == {
        k: v for k, v in shipped["route"].items() if k not in ("group_wait", "group_interval")}
    assert [r["name"] for r in tested["receivers"]] == [r["name"] for r in shipped["receivers"]]


def alert(name: str, severity: str, **labels: str) -> dict:
    """A firing alert as Prometheus posts it to /api/v2/alerts."""
    now = datetime.datetime.now(datetime.UTC)
    return {
        "labels": {"alertname": name, "severity": severity, "namespace": NAMESPACE, **labels},
        "annotations": {"summary": f"{name} of {labels.get('job')}",
                        "runbook_url": f"README.md#{name.lower()}"},
        "startsAt": now.isoformat(),
        "endsAt": (now + datetime.timedelta(minutes=10)).isoformat(),
        "generatorURL": "http://prometheus.monitoring:9090/graph",
    }


USER_DNS = "user-service.tessera.svc.cluster.local:50051"
PAYMENT_DNS = "payment-service.tessera.svc.cluster.local:50053"

# The faults' sources: every user-service target down (so TesseraServiceDown), one order-service target down, the
# gateway's 5xx over its critical level (and so over its warning level too), order-service's availability budget
# burning fast enough to page (and so, over longer windows, for a ticket too).
SERVICE_DOWN = alert("TesseraServiceDown", "critical", job="user-service", failing_service="user-service")
TARGET_DOWN = alert("TesseraTargetDown", "warning", job="order-service", instance="10.0.0.2:9090")
GATEWAY_CRITICAL = alert("TesseraGatewayErrors", "critical", job="tessera-gateway")
SLO_PAGE = alert("TesseraGrpcAvailabilityBudgetBurn", "critical", job="order-service", slo="grpc-availability",
                 window="1h")
# No serving instance of an address that names no service (a static:/// list): no failing_service. It must silence
# nothing of the caller's that lacks the label too (Alertmanager takes two missing labels for equal): its broker
# check (DELIVERED_BESIDE).
STATIC_EMPTY = alert("TesseraNoServingInstance", "critical", job="order-service", instance="10.0.0.1:9090",
                     dependency="static:///10.0.3.5:50053,10.0.3.6:50053", health="serving")
SOURCES = [SERVICE_DOWN, TARGET_DOWN, GATEWAY_CRITICAL, SLO_PAGE, STATIC_EMPTY]
# Alerts the sources inhibit, each alone in its group: they prove the inhibitor holds the sources before the
# alerts below arrive.
PROBES = {
    "user's own target down": (alert("TesseraTargetDown", "warning", job="user-service", instance="10.0.1.1:9090"),
                               SERVICE_DOWN),
    "the down target's slow method": (alert("TesseraGrpcServerSlow", "warning", job="order-service",
                                            instance="10.0.0.2:9090", grpc_service="tessera.order.v1.OrderService",
                                            grpc_method="CreateOrder"), TARGET_DOWN),
    "the gateway's warning level": (alert("TesseraGatewayErrors", "warning", job="tessera-gateway"),
                                    GATEWAY_CRITICAL),
    "the SLO page's ticket": (alert("TesseraGrpcAvailabilityBudgetBurn", "warning", job="order-service",
                                    slo="grpc-availability", window="1d"), SLO_PAGE),
}
# Each group (namespace, alertname, job) holds an inhibited alert and one the same fault does not explain: the
# group's notification carries the second and not the first.
INHIBITED = {
    "order's circuit to user": (
        alert("TesseraCircuitOpen", "critical", job="order-service", instance="10.0.0.1:9090",
              dependency=USER_DNS, failing_service="user-service"), SERVICE_DOWN),
    "order's health check of user": (
        alert("TesseraHealthCheckFailing", "warning", job="order-service", instance="10.0.0.1:9090",
              check="user-service", critical="false", failing_service="user-service"), SERVICE_DOWN),
    "the down target's readiness": (
        alert("TesseraNotReady", "warning", job="order-service", instance="10.0.0.2:9090"), TARGET_DOWN),
    "the down service's own SLO page": (
        alert("TesseraGrpcLatencyBudgetBurn", "critical", job="user-service", slo="grpc-latency", window="1h"),
        SERVICE_DOWN),
}
DELIVERED_BESIDE = {
    "order's circuit to payment": alert("TesseraCircuitOpen", "critical", job="order-service",
                                        instance="10.0.0.1:9090", dependency=PAYMENT_DNS,
                                        failing_service="payment-service"),
    "order's broker check": alert("TesseraHealthCheckFailing", "warning", job="order-service",
                                  instance="10.0.0.1:9090", check="broker", critical="false"),
    "another target's readiness": alert("TesseraNotReady", "warning", job="order-service",
                                        instance="10.0.0.3:9090"),
    # What the gateway's clients see, whichever service is at fault (as TesseraGatewayErrors).
    "the edge's SLO page": alert("TesseraEdgeAvailabilityBudgetBurn", "critical", job="tessera-gateway",
                                 slo="edge-availability", window="1h"),
    # Another SLO of the service the page is about: the critical-over-warning rule keeps to the same alert.
    "order's latency ticket": alert("TesseraGrpcLatencyBudgetBurn", "warning", job="order-service",
                                    slo="grpc-latency", window="3d"),
}


@pytest.fixture
def running(tmp_path) -> Iterator[tuple[AlertmanagerServer, WebhookSink]]:
    sink = WebhookSink().start()
    server = None
    try:
        server = AlertmanagerServer(tmp_path, config_for_tests(sink.url)).start()
        yield server, sink
    finally:
        if server is not None:
            server.stop()
        sink.stop()


def held(server: AlertmanagerServer, posted: dict) -> dict | None:
    """The alert Alertmanager holds with the labels of `posted`."""
    return next((a for a in server.alerts() if a["labels"] == posted["labels"]), None)


def delivered(sink: WebhookSink) -> list[tuple[str, dict]]:
    """(receiver, labels) of every alert in every notification so far."""
    return [(body["receiver"], a["labels"]) for path, body in sink.received() for a in body["alerts"]
            if path == f"/{body['receiver']}"]


def test_one_fault_pages_once_its_consequences_are_inhibited_and_never_delivered(running):
    server, sink = running
    server.post_alerts(SOURCES)
    server.post_alerts([probe for probe, _ in PROBES.values()])
    # The API reports inhibition as the inhibitor sees it now: once the probes show as inhibited by the sources,
    # the inhibitor holds them, so the alerts posted next are checked against them at their group's first flush.
    sources = {}
    for what, (probe, source) in PROBES.items():
        status = wait_for(lambda probe=probe: (h := held(server, probe)) and h["status"]["inhibitedBy"] and h,
                          what=f"{what} inhibited").get("status")
        sources[what] = held(server, source)["fingerprint"]
        assert status["state"] == "suppressed" and status["inhibitedBy"] == [sources[what]], (what, status)

    server.post_alerts([target for target, _ in INHIBITED.values()] + list(DELIVERED_BESIDE.values()))

    expected = {(RECEIVER_OF_SEVERITY[a["labels"]["severity"]], tuple(sorted(a["labels"].items())))
                for a in [*SOURCES, *DELIVERED_BESIDE.values()]}
    wait_for(lambda: expected <= {(r, tuple(sorted(labels.items()))) for r, labels in delivered(sink)},
             what="the sources and the alerts beside the inhibited ones delivered")

    for what, (target, source) in INHIBITED.items():
        status = held(server, target)["status"]
        assert status["state"] == "suppressed", (what, status)
        assert held(server, source)["fingerprint"] in status["inhibitedBy"], (what, status)
    # The circuit's group was flushed with both of its alerts in it: the notification carries only payment's.
    inhibited = [a["labels"] for a, _ in [*INHIBITED.values(), *PROBES.values()]]
    assert [(r, labels) for r, labels in delivered(sink) if labels in inhibited] == []
    delivered_labels = [labels for _, labels in delivered(sink)]
    for alert_ in [*SOURCES, *DELIVERED_BESIDE.values()]:
        assert held(server, alert_)["status"] == {"state": "active", "inhibitedBy": [], "silencedBy": []}
        assert delivered_labels.count(alert_["labels"]) == 1, alert_["labels"]
    # One page for the service down, one for the circuit the fault does not explain, one for the discovery of an
    # address naming no service, one for the gateway's errors and one for each SLO page (not a ticket for their
    # warning level too); the rest are tickets.
    pages = [labels["alertname"] for r, labels in delivered(sink) if r == "tessera-page"]
    assert sorted(pages) == ["TesseraCircuitOpen", "TesseraEdgeAvailabilityBudgetBurn", "TesseraGatewayErrors",
                             "TesseraGrpcAvailabilityBudgetBurn", "TesseraNoServingInstance", "TesseraServiceDown"]
    groups = {tuple(sorted(body["groupLabels"])) for _, body in sink.received()}
    assert groups == {("alertname", "job", "namespace")}
