"""Tracing configuration from the standard OTEL_* variables: defaults, exporters, samplers, and bad values."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import sampling

from tessera_runtime.config import ConfigError
from tessera_runtime.telemetry import TelemetrySettings, otlp_collector_address


def test_without_an_endpoint_nothing_is_exported_and_nothing_recorded():
    settings = TelemetrySettings.from_env({})
    assert settings.exporters == () and not settings.disabled
    # Spans still get ids (for logs and propagation) but none is recorded.
    assert settings.build_sampler() is sampling.ALWAYS_OFF


def test_an_otlp_endpoint_turns_the_otlp_exporter_on():
    settings = TelemetrySettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"})
    assert settings.exporters == ("otlp",)
    assert settings.otlp_endpoint == "http://collector:4317"
    assert settings.build_sampler().get_description() == sampling.ParentBased(sampling.ALWAYS_ON).get_description()


def test_the_traces_endpoint_wins_over_the_general_one():
    settings = TelemetrySettings.from_env({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://a:4317",
                                           "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://b:4317"})
    assert settings.otlp_endpoint == "http://b:4317"


@pytest.mark.parametrize(("value", "expected"), [
    ("console", ("console",)),
    ("otlp, console", ("otlp", "console")),
    ("none", ()),
    ("console,none,console", ("console",)),
])
def test_exporters_are_listed_by_name(value, expected):
    settings = TelemetrySettings.from_env({"OTEL_TRACES_EXPORTER": value,
                                           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert settings.exporters == expected


def test_an_explicit_none_wins_over_an_endpoint():
    settings = TelemetrySettings.from_env({"OTEL_TRACES_EXPORTER": "none",
                                           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"})
    assert settings.exporters == ()


@pytest.mark.parametrize(("sampler", "arg", "description"), [
    ("always_on", None, "AlwaysOnSampler"),
    ("always_off", None, "AlwaysOffSampler"),
    ("traceidratio", "0.25", "TraceIdRatioBased{0.25}"),
    ("parentbased_traceidratio", "0.5", "ParentBased{root:TraceIdRatioBased{0.5}"),
    ("parentbased_always_off", None, "ParentBased{root:AlwaysOffSampler"),
])
def test_samplers_are_built_from_their_names(sampler, arg, description):
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": sampler}
    if arg is not None:
        env["OTEL_TRACES_SAMPLER_ARG"] = arg
    assert TelemetrySettings.from_env(env).build_sampler().get_description().startswith(description)


def test_insecure_is_read_when_given():
    assert TelemetrySettings.from_env({}).otlp_insecure is None
    assert TelemetrySettings.from_env({"OTEL_EXPORTER_OTLP_INSECURE": "true"}).otlp_insecure is True
    assert TelemetrySettings.from_env({"OTEL_EXPORTER_OTLP_TRACES_INSECURE": "false",
                                       "OTEL_EXPORTER_OTLP_INSECURE": "true"}).otlp_insecure is False


def test_the_sdk_can_be_disabled():
    assert TelemetrySettings.from_env({"OTEL_SDK_DISABLED": "true"}).disabled


@pytest.mark.parametrize(("env", "variable"), [
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
    ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
     "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"),
    ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"}, "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"}, "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "-0.1"}, "OTEL_TRACES_SAMPLER_ARG"),
    ({"OTEL_SDK_DISABLED": "perhaps"}, "OTEL_SDK_DISABLED"),
    ({"OTEL_EXPORTER_OTLP_INSECURE": "maybe"}, "OTEL_EXPORTER_OTLP_INSECURE"),
])
def test_a_bad_value_names_its_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        TelemetrySettings.from_env(env)


def test_a_protocol_matters_only_when_otlp_exports():
    settings = TelemetrySettings.from_env({"OTEL_TRACES_EXPORTER": "console",
                                           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    assert settings.exporters == ("console",)


@pytest.mark.parametrize(("env", "address"), [
    ({}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, "collector:4317"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://otel.example:443/"}, "otel.example:443"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:14317"}, "127.0.0.1:14317"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector"}, "collector:4317"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_TRACES_EXPORTER": "console"}, None),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317", "OTEL_SDK_DISABLED": "true"}, None),
])
def test_the_collector_address_for_the_gateway_follows_the_services(env, address):
    assert otlp_collector_address(env) == address


def test_a_collector_endpoint_without_a_host_is_refused():
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_ENDPOINT"):
        otlp_collector_address({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://:4317"})
