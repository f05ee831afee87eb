"""The gateway's tracing values in gateway.yaml and what they generate in the Envoy bootstrap."""

from __future__ import annotations

import json

import pytest

from tessera_gateway import description, generate
from tessera_gateway.bootstrap import TRACING_CLUSTER, render

BASE = {"listener": {"address": "127.0.0.1", "port": 0}, "admin": {"address": "127.0.0.1", "port": 0}}


def bootstrap(tmp_path, tracing: dict | None = None) -> dict:
    overrides = {**BASE, "jwt": {"jwks_file": str(tmp_path / "keys" / "jwks.json")}}
    if tracing is not None:
        overrides["tracing"] = tracing
    return json.loads(render(generate.generate("dev", overrides).config.bootstrap(), "json"))


def connection_manager(config: dict) -> dict:
    return config["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]


def test_tracing_is_off_without_a_collector(tmp_path):
    config = bootstrap(tmp_path)
    manager = connection_manager(config)
    assert "tracing" not in manager and "requestIdExtension" not in manager
    assert TRACING_CLUSTER not in [c["name"] for c in config["staticResources"]["clusters"]]
    # The access log has the field anyway, so its shape never depends on the profile.
    assert manager["accessLog"][0]["typedConfig"]["logFormat"]["jsonFormat"]["trace_id"] == "%TRACE_ID%"


def test_a_collector_turns_on_envoys_opentelemetry_tracer(tmp_path):
    config = bootstrap(tmp_path, {"otlp_endpoint": "127.0.0.1:4317", "sampling_percent": 25,
                                  "service_name": "edge"})
    tracing = connection_manager(config)["tracing"]
    assert tracing["randomSampling"] == {"value": 25.0} and tracing["spawnUpstreamSpan"] is True
    provider = tracing["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    assert provider["typedConfig"]["serviceName"] == "edge"
    assert provider["typedConfig"]["grpcService"]["envoyGrpc"]["clusterName"] == TRACING_CLUSTER
    # Client-supplied request ids reach the services unchanged.
    assert connection_manager(config)["requestIdExtension"]["typedConfig"]["packTraceReason"] is False
    [cluster] = [c for c in config["staticResources"]["clusters"] if c["name"] == TRACING_CLUSTER]
    address = cluster["loadAssignment"]["endpoints"][0]["lbEndpoints"][0]["endpoint"]["address"]["socketAddress"]
    assert (address["address"], address["portValue"]) == ("127.0.0.1", 4317)
    assert "http2ProtocolOptions" in json.dumps(cluster["typedExtensionProtocolOptions"])  # OTLP/gRPC needs h2


@pytest.mark.parametrize(("tracing", "key"), [
    ({"otlp_endpoint": "collector"}, "tracing.otlp_endpoint"),
    ({"otlp_endpoint": ""}, "tracing.otlp_endpoint"),
    ({"sampling_percent": 120}, "tracing.sampling_percent"),
    ({"sampling_percent": "all"}, "tracing.sampling_percent"),
    ({"service_name": ""}, "tracing.service_name"),
    ({"exporter": "zipkin"}, "tracing.exporter"),
])
def test_bad_tracing_values_name_their_key(tracing, key):
    with pytest.raises(description.DescriptionError, match=key):
        description.load("dev", overrides={"tracing": tracing})
