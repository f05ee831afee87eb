"""The gateway's declarative description (gateway.yaml): one profile's values, checked, as frozen objects."""

from __future__ import annotations

import copy
import dataclasses
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tessera_gateway import DESCRIPTION, ROOT
from tessera_gateway.descriptors import Contracts, Rpc, Service

PROFILES = ("dev", "prod")
_SCOPE = re.compile(r"^[a-z][a-z0-9_.-]*(:[a-z][a-z0-9_.-]*)?$")
_HEADER = re.compile(r"^[a-z0-9-]+$")
HSTS = "strict-transport-security"


class DescriptionError(Exception):
    """gateway.yaml (with the profile and overrides applied) is malformed; the message names the key."""


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of base with over merged in: mappings merge key by key, everything else is replaced."""
    merged = copy.deepcopy(dict(base))
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


class _Section:
    """Reads one mapping of the description; every error names the dotted key, unknown keys are refused."""

    def __init__(self, data: Any, where: str) -> None:
        if not isinstance(data, Mapping):
            raise DescriptionError(f"{where or 'the description'} must be a mapping")
        self.data = dict(data)
        self.where = where
        self.seen: set[str] = set()

    def _key(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def raw(self, key: str, default: Any = ...) -> Any:
        self.seen.add(key)
        if key not in self.data:
            if default is ...:
                raise DescriptionError(f"{self._key(key)} is required")
            return default
        return self.data[key]

    def section(self, key: str, default: Any = ...) -> _Section:
        return _Section(self.raw(key, default), self._key(key))

    def int(self, key: str, default: Any = ..., *, minimum: int = 0) -> int:
        value = self.raw(key, default)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise DescriptionError(f"{self._key(key)} must be an integer >= {minimum}, got {value!r}")
        return value

    def str(self, key: str, default: Any = ...) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str) or not value:
            raise DescriptionError(f"{self._key(key)} must be a non-empty string, got {value!r}")
        return value

    def optional_str(self, key: str) -> str | None:
        value = self.raw(key, None)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise DescriptionError(f"{self._key(key)} must be a non-empty string or null, got {value!r}")
        return value

    def bool(self, key: str, default: Any = ...) -> bool:
        value = self.raw(key, default)
        if not isinstance(value, bool):
            raise DescriptionError(f"{self._key(key)} must be true or false, got {value!r}")
        return value

    def strings(self, key: str, default: Any = ...) -> tuple[str, ...]:
        value = self.raw(key, default)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise DescriptionError(f"{self._key(key)} must be a list of non-empty strings, got {value!r}")
        return tuple(value)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise DescriptionError(f"unknown key {self._key(unknown[0])}")


@dataclasses.dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, where: str) -> Address:
        host, sep, port = text.rpartition(":")
        if not sep or not host or not port.isdigit() or int(port) > 65535:
            raise DescriptionError(f"{where} must be HOST:PORT, got {text!r}")
        return cls(host, int(port))


@dataclasses.dataclass(frozen=True)
class RouteClass:
    name: str
    timeout_seconds: int
    burst: int
    refill: int
    refill_interval_seconds: int
    anonymous: bool


@dataclasses.dataclass(frozen=True)
class Limits:
    max_request_body_bytes: int
    max_request_headers_kb: int
    max_connections: int
    http2_max_concurrent_streams: int
    request_headers_timeout_seconds: int
    stream_idle_timeout_seconds: int
    idle_timeout_seconds: int
    max_tracked_clients: int


@dataclasses.dataclass(frozen=True)
class HealthCheck:
    interval_seconds: int
    timeout_seconds: int
    unhealthy_threshold: int
    healthy_threshold: int


@dataclasses.dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx: int
    consecutive_gateway_failure: int
    interval_seconds: int
    base_ejection_time_seconds: int
    max_ejection_percent: int


@dataclasses.dataclass(frozen=True)
class CircuitBreakers:
    max_connections: int
    max_pending_requests: int
    max_requests: int
    max_retries: int


@dataclasses.dataclass(frozen=True)
class UpstreamPolicy:
    connect_timeout_seconds: int
    health_check: HealthCheck
    outlier_detection: OutlierDetection
    circuit_breakers: CircuitBreakers
    retry_count: int
    retry_on: str


@dataclasses.dataclass(frozen=True)
class Cors:
    allow_origins: tuple[str, ...]
    allow_methods: tuple[str, ...]
    allow_headers: tuple[str, ...]
    expose_headers: tuple[str, ...]
    max_age_seconds: int


@dataclasses.dataclass(frozen=True)
class Jwt:
    issuer: str
    audiences: tuple[str, ...]
    clock_skew_seconds: int
    max_lifetime_seconds: int
    jwks_file: Path | None
    jwks_uri: str | None
    jwks_cache_seconds: int
    jwks_ca_file: str | None


@dataclasses.dataclass(frozen=True)
class Tls:
    cert_file: str
    key_file: str


@dataclasses.dataclass(frozen=True)
class Tracing:
    """Envoy's OpenTelemetry tracer; enabled when otlp_endpoint is set."""

    otlp_endpoint: Address | None
    service_name: str
    sampling_percent: float

    @property
    def enabled(self) -> bool:
        return self.otlp_endpoint is not None


@dataclasses.dataclass(frozen=True)
class GraphQLRoute:
    """The GraphQL API (tessera_graphql) behind one path: the gateway asks only for a valid token there, and the
    API asks each field's RPC for the scope `policy` gives it."""

    path: str
    route_class: RouteClass
    address: Address


@dataclasses.dataclass(frozen=True)
class RpcPolicy:
    scopes: tuple[str, ...]  # any one of them grants the call; the admin scope always does
    route_class: RouteClass


@dataclasses.dataclass(frozen=True)
class Description:
    profile: str
    error_domain: str
    scopes: tuple[str, ...]
    admin_scope: str
    canary_scope: str
    rpc_overrides: Mapping[str, Mapping[str, Any]]
    route_classes: Mapping[str, RouteClass]
    limits: Limits
    upstream: UpstreamPolicy
    cors: Cors
    security_headers: tuple[tuple[str, str], ...]
    jwt: Jwt
    access_log: str
    trusted_proxy_hops: int
    listener: Address
    admin: Address
    public_url: str
    upstream_template: str
    upstream_addresses: Mapping[str, Address]
    tls: Tls | None
    tracing: Tracing = Tracing(otlp_endpoint=None, service_name="tessera-gateway", sampling_percent=100.0)
    graphql: GraphQLRoute | None = None

    def policy(self, rpc: Rpc, service: Service) -> RpcPolicy:
        """Scopes and route class of one RPC: the convention unless `rpcs` overrides it."""
        override = self.rpc_overrides.get(rpc.full_name, {})
        scopes = tuple(override.get("scopes") or (f"{service.context}:{'read' if rpc.read_only else 'write'}",))
        for scope in scopes:
            if scope not in self.scopes:
                raise DescriptionError(
                    f"{rpc.full_name} needs scope {scope!r}, which is not in scopes; add it to scopes or set "
                    f"rpcs.{rpc.full_name}.scopes")
            if scope == self.canary_scope:
                raise DescriptionError(
                    f"{rpc.full_name} needs scope {scope!r}, which is canary_scope: it grants no RPC, only the "
                    "choice of a service's canary for the calls the token may make")
        class_name = override.get("route_class") or ("read" if rpc.read_only else "write")
        if class_name not in self.route_classes:
            raise DescriptionError(f"rpcs.{rpc.full_name}.route_class names unknown class {class_name!r}")
        route_class = self.route_classes[class_name]
        if route_class.anonymous:
            raise DescriptionError(f"{rpc.full_name}: RPCs need a token; class {class_name!r} is anonymous")
        return RpcPolicy(scopes=scopes, route_class=route_class)

    def upstream_address(self, context: str) -> Address:
        """Where a context's service listens in this profile."""
        if context in self.upstream_addresses:
            return self.upstream_addresses[context]
        from tessera_runtime.devstack import PORTS

        if context not in PORTS:
            raise DescriptionError(
                f"service {context!r} has no port in tessera_runtime.devstack.PORTS and no "
                f"upstreams.addresses.{context} in profile {self.profile}")
        return Address.parse(self.upstream_template.format(context=context, port=PORTS[context]),
                             f"upstreams.template for {context}")

    @property
    def public_class(self) -> RouteClass:
        """The class of the gateway's own anonymous routes (the OpenAPI document, unknown paths)."""
        for route_class in self.route_classes.values():
            if route_class.anonymous:
                return route_class
        raise DescriptionError("route_classes needs one class with anonymous: true for the public routes")

    def check_contracts(self, contracts: Contracts) -> None:
        """Fails unless every override names a real RPC and every RPC has a valid policy and upstream."""
        known = {rpc.full_name for rpc in contracts.rpcs}
        for name in self.rpc_overrides:
            if name not in known:
                raise DescriptionError(f"rpcs.{name} names no RPC in the descriptor set")
        contexts = sorted({service.context for service in contracts.services})
        for name in self.upstream_addresses:
            if name not in contexts:
                raise DescriptionError(f"upstreams.addresses.{name} names no service of the contracts "
                                       f"({', '.join(contexts)})")
        for service in contracts.services:
            self.upstream_address(service.context)
            for rpc in service.rpcs:
                self.policy(rpc, service)
        self.public_class  # noqa: B018 - raises when no anonymous class exists


def _route_classes(section: _Section) -> dict[str, RouteClass]:
    classes = {}
    for name in section.data:
        c = section.section(name)
        rc = RouteClass(
            name=name, timeout_seconds=c.int("timeout_seconds", minimum=1), burst=c.int("burst", minimum=1),
            refill=c.int("refill", minimum=1), refill_interval_seconds=c.int("refill_interval_seconds", minimum=1),
            anonymous=c.bool("anonymous", False),
        )
        c.done()
        classes[name] = rc
    if not classes:
        raise DescriptionError("route_classes must define at least one class")
    return classes


def _rpc_overrides(section: _Section) -> dict[str, dict[str, Any]]:
    overrides = {}
    for name in section.data:
        o = section.section(name)
        entry: dict[str, Any] = {}
        if "scopes" in o.data:
            entry["scopes"] = o.strings("scopes")
            if not entry["scopes"]:
                raise DescriptionError(f"rpcs.{name}.scopes must not be empty")
        if "route_class" in o.data:
            entry["route_class"] = o.str("route_class")
        o.done()
        overrides[name] = entry
    return overrides


def from_mapping(data: Mapping[str, Any], profile: str) -> Description:
    """Builds the description of one profile from the parsed YAML document."""
    top = _Section(data, "")
    defaults = top.raw("defaults")
    profiles = top.section("profiles")
    top.done()
    if profile not in profiles.data:
        raise DescriptionError(f"profiles.{profile} is not defined; known: {', '.join(sorted(profiles.data))}")
    values = _Section(deep_merge(defaults, profiles.raw(profile) or {}), "")

    scopes = values.strings("scopes")
    for scope in scopes:
        if not _SCOPE.match(scope):
            raise DescriptionError(f"scopes: {scope!r} is not a valid scope (e.g. user:read)")
    admin_scope = values.str("admin_scope")
    if admin_scope not in scopes:
        raise DescriptionError("admin_scope must be one of scopes")
    canary_scope = values.str("canary_scope")
    if canary_scope not in scopes:
        raise DescriptionError("canary_scope must be one of scopes")

    lim = values.section("limits")
    limits = Limits(**{f.name: lim.int(f.name, minimum=1) for f in dataclasses.fields(Limits)})
    lim.done()

    up = values.section("upstream")
    hc = up.section("health_check")
    health = HealthCheck(**{f.name: hc.int(f.name, minimum=1) for f in dataclasses.fields(HealthCheck)})
    hc.done()
    od = up.section("outlier_detection")
    outlier = OutlierDetection(**{f.name: od.int(f.name, minimum=1) for f in dataclasses.fields(OutlierDetection)})
    od.done()
    cb = up.section("circuit_breakers")
    breakers = CircuitBreakers(**{f.name: cb.int(f.name, minimum=1) for f in dataclasses.fields(CircuitBreakers)})
    cb.done()
    rt = up.section("retries")
    upstream = UpstreamPolicy(connect_timeout_seconds=up.int("connect_timeout_seconds", minimum=1),
                              health_check=health, outlier_detection=outlier, circuit_breakers=breakers,
                              retry_count=rt.int("num_retries"), retry_on=rt.str("retry_on"))
    rt.done()
    up.done()

    co = values.section("cors")
    cors = Cors(allow_origins=co.strings("allow_origins"), allow_methods=co.strings("allow_methods"),
                allow_headers=co.strings("allow_headers"), expose_headers=co.strings("expose_headers"),
                max_age_seconds=co.int("max_age_seconds"))
    co.done()

    sh = values.section("security_headers")
    headers = []
    for name in sh.data:
        if not _HEADER.match(name):
            raise DescriptionError(f"security_headers: {name!r} is not a lower-case header name")
        headers.append((name, sh.str(name)))
    sh.done()
    public_url = values.str("public_url")
    if HSTS in dict(headers) and not public_url.startswith("https://"):
        # Over plain http a browser ignores it; on a name later served over https it would lock out plain http.
        raise DescriptionError(f"security_headers.{HSTS} needs an https:// public_url, got {public_url!r}")

    jw = values.section("jwt")
    jwks_file = jw.optional_str("jwks_file")
    jwks_uri = jw.optional_str("jwks_uri")
    if (jwks_file is None) == (jwks_uri is None):
        raise DescriptionError(f"profiles.{profile}.jwt needs exactly one of jwks_file and jwks_uri")
    jwks_path = None
    if jwks_file is not None:
        jwks_path = Path(jwks_file) if Path(jwks_file).is_absolute() else ROOT / jwks_file
    jwt = Jwt(issuer=jw.str("issuer"), audiences=jw.strings("audiences"),
              clock_skew_seconds=jw.int("clock_skew_seconds"), max_lifetime_seconds=jw.int("max_lifetime_seconds"),
              jwks_file=jwks_path, jwks_uri=jwks_uri, jwks_cache_seconds=jw.int("jwks_cache_seconds", 600),
              jwks_ca_file=jw.optional_str("jwks_ca_file"))
    if not jwt.audiences:
        raise DescriptionError("jwt.audiences must name at least one audience")
    if jwks_uri is not None and not jwks_uri.startswith("https://"):
        raise DescriptionError("jwt.jwks_uri must be an https:// URL")
    jw.done()

    ups = values.section("upstreams")
    template = ups.str("template")
    addresses = {name: Address.parse(str(addr), f"upstreams.addresses.{name}")
                 for name, addr in (ups.raw("addresses", {}) or {}).items()}
    ups.done()

    tls_raw = values.raw("tls", None)
    tls = None
    if tls_raw is not None:
        ts = _Section(tls_raw, "tls")
        tls = Tls(cert_file=ts.str("cert_file"), key_file=ts.str("key_file"))
        ts.done()

    tr = values.section("tracing", {})
    endpoint = tr.optional_str("otlp_endpoint")
    sampling = tr.raw("sampling_percent", 100)
    if isinstance(sampling, bool) or not isinstance(sampling, int | float) or not 0 <= sampling <= 100:
        raise DescriptionError(f"tracing.sampling_percent must be a number from 0 to 100, got {sampling!r}")
    tracing = Tracing(
        otlp_endpoint=None if endpoint is None else Address.parse(endpoint, "tracing.otlp_endpoint"),
        service_name=tr.str("service_name", "tessera-gateway"), sampling_percent=float(sampling))
    tr.done()

    route_classes = _route_classes(values.section("route_classes"))
    graphql = None
    if (gq_raw := values.raw("graphql", None)) is not None:
        gq = _Section(gq_raw, "graphql")
        path, class_name = gq.str("path"), gq.str("route_class")
        if not re.fullmatch(r"/[a-z0-9/_-]*", path):
            raise DescriptionError(f"graphql.path must be a lower-case absolute path such as /graphql, got {path!r}")
        if class_name not in route_classes or route_classes[class_name].anonymous:
            raise DescriptionError(f"graphql.route_class must name a class that needs a token, got {class_name!r}")
        graphql = GraphQLRoute(path=path, route_class=route_classes[class_name],
                               address=Address.parse(gq.str("address"), "graphql.address"))
        gq.done()

    def address(key: str) -> Address:
        a = values.section(key)
        result = Address(a.str("address"), a.int("port"))
        if result.port > 65535:
            raise DescriptionError(f"{key}.port must be at most 65535")
        a.done()
        return result

    description = Description(
        profile=profile,
        error_domain=values.str("error_domain"),
        scopes=scopes,
        admin_scope=admin_scope,
        canary_scope=canary_scope,
        rpc_overrides=_rpc_overrides(values.section("rpcs", {})),
        route_classes=route_classes,
        limits=limits,
        upstream=upstream,
        cors=cors,
        security_headers=tuple(headers),
        jwt=jwt,
        access_log=values.str("access_log"),
        trusted_proxy_hops=values.int("trusted_proxy_hops", 0),
        listener=address("listener"),
        admin=address("admin"),
        public_url=public_url,
        upstream_template=template,
        upstream_addresses=addresses,
        tls=tls,
        tracing=tracing,
        graphql=graphql,
    )
    values.done()
    return description


def yaml_problem(exc: yaml.YAMLError) -> str:
    """What is wrong with a YAML text, in one line: the parser's problem and its line."""
    mark = getattr(exc, "problem_mark", None)
    where = f" (line {mark.line + 1})" if mark is not None else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


def load(profile: str = "dev", path: Path = DESCRIPTION, overrides: Mapping[str, Any] | None = None) -> Description:
    """Reads gateway.yaml and builds one profile; overrides are merged over the profile's values."""
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DescriptionError(f"{path}: is not YAML: {yaml_problem(exc)}") from None
    if overrides:
        data = deep_merge(data, {"profiles": {profile: dict(overrides)}})
    return from_mapping(data, profile)
