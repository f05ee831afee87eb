"""`make run` extension: the Envoy gateway in front of every service the dev stack starts."""

from __future__ import annotations

from collections.abc import Callable

from tessera_gateway import generate, process
from tessera_runtime.devstack import Component, DevStack
from tessera_runtime.telemetry import otlp_collector_address

NAME = "gateway"


def _ready(admin_url: str, clusters: list[str]) -> Callable[[], bool]:
    """Ready when Envoy serves and each running service's cluster has a healthy host."""

    def check() -> bool:
        try:
            return process.admin_ready(admin_url) and all(
                process.healthy_hosts(admin_url, c) > 0 for c in clusters)
        except OSError:
            return False

    return check


def components(stack: DevStack) -> list[Component]:
    running = stack.service_addresses()
    overrides: dict = {"upstreams": {"addresses": running}}
    collector = otlp_collector_address()  # the services' OTEL_EXPORTER_OTLP_ENDPOINT, when they export spans
    if collector is not None:
        overrides["tracing"] = {"otlp_endpoint": collector}
    generated = generate.generate("dev", overrides)
    d = generated.description
    config = generate.write(generated, stack.data_dir / "gateway" / "envoy-dev.yaml")
    rest = f"http://{d.listener}"
    grpc = str(d.listener)
    admin = f"http://{d.admin}"
    mint = '.venv/bin/tessera token mint --sub dev-admin --scope admin'
    describe = [
        f"{NAME:<13} REST + gRPC {grpc}   OpenAPI {rest}/openapi.json   admin {admin} (loopback only)",
        "",
        "  Through the gateway (every call needs a token; `make token SUB=<user id> SCOPE=\"user:read\"` mints one):",
        f"    TOKEN=$({mint})",
        f"    curl -H \"authorization: Bearer $TOKEN\" '{rest}/v1/users?pageSize=5'",
        "    .venv/bin/grpcurl -plaintext -protoset gen/descriptors/tessera.pb -H \"authorization: Bearer $TOKEN\" "
        f"-d '{{\"page_size\":5}}' {grpc} tessera.user.v1.UserService/ListUsers",
    ]
    return [Component(
        name=NAME,
        argv=process.envoy_command(config),
        env={},
        ready=_ready(admin, sorted(running)),
        describe=describe,
    )]
