"""The generated Envoy bootstrap: one route per RPC from the descriptors, filters in a safe order, policies."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2

from tessera_deploy import mesh
from tessera_gateway import DESCRIPTOR_SET, generate, lua, process
from tessera_gateway.bootstrap import CANARY_HEADER, TRACING_CLUSTER, GatewayConfig, render, to_envoy_dict
from tessera_gateway.description import load
from tessera_gateway.descriptors import ContractError, Contracts
from tessera_runtime import context as callctx

HCM = "envoy.filters.network.http_connection_manager"


def hcm_of(config: dict) -> dict:
    return config["staticResources"]["listeners"][0]["filterChains"][0]["filters"][0]["typedConfig"]


@pytest.fixture(scope="module")
def keys_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("gateway-keys")


@pytest.fixture(scope="module")
def dev(keys_dir) -> generate.Generated:
    return generate.generate("dev", {"jwt": {"jwks_file": str(keys_dir / "jwks.json")}})


@pytest.fixture(scope="module")
def dev_config(dev) -> dict:
    return to_envoy_dict(dev.config.bootstrap())


@pytest.fixture(scope="module")
def prod_config() -> dict:
    return to_envoy_dict(generate.generate("prod").config.bootstrap())


def routes_of(config: dict) -> dict[str, dict]:
    return {r["name"]: r for r in hcm_of(config)["routeConfig"]["virtualHosts"][0]["routes"]}


def test_every_rpc_in_the_descriptor_set_has_one_grpc_route(dev, dev_config):
    contracts = Contracts.load(DESCRIPTOR_SET)
    routes = routes_of(dev_config)
    assert len(contracts.rpcs) == 32
    for rpc in contracts.rpcs:
        route = routes[rpc.full_name]
        assert route["match"] == {"path": rpc.grpc_path, "grpc": {}}
        assert route["route"]["cluster"] == rpc.service.split(".")[1]
        assert route["metadata"]["filterMetadata"]["tessera"] == {"client_class": "read" if rpc.read_only else (
            "saga" if rpc.name == "CreateOrder" else "write")}
    assert [name for name in routes if "." not in name] == ["graphql", "openapi", "not_found"]


def test_the_graphql_route_needs_a_token_and_no_scope(dev_config):
    route = routes_of(dev_config)["graphql"]
    assert route["match"] == {"path": "/graphql"} and route["route"]["cluster"] == "graphql"
    assert route["route"]["timeout"] == "35s"
    assert route["metadata"]["filterMetadata"]["tessera"] == {"client_class": "graphql"}
    # jwt_authn stays on (no per-route override disables it); RBAC lets any authenticated caller through.
    assert "envoy.filters.http.jwt_authn" not in route.get("typedPerFilterConfig", {})
    rbac = route["typedPerFilterConfig"]["envoy.filters.http.rbac"]["rbac"]["rules"]["policies"]
    assert rbac == {"authenticated": {"permissions": [{"any": True}], "principals": [{"any": True}]}}


def test_routes_require_whole_scopes_through_rbac(dev_config):
    route = routes_of(dev_config)["tessera.user.v1.UserService.GetUser"]
    rbac = route["typedPerFilterConfig"]["envoy.filters.http.rbac"]["rbac"]["rules"]
    principals = rbac["policies"]["scopes"]["principals"][0]["orIds"]["ids"]
    matchers = [p["sourcedMetadata"]["metadataMatcher"] for p in principals]
    assert [m["value"] for m in matchers] == [_whole_scope("user:read"), _whole_scope("admin")]
    assert all(m["path"] == [{"key": "jwt_payload"}, {"key": "scope"}] for m in matchers)
    # A whole word of the space-delimited claim (the regex is RE2's and Python's alike, matched whole).
    regex = matchers[0]["value"]["stringMatch"]["safeRegex"]["regex"]
    assert all(re.fullmatch(regex, c) for c in ("user:read", "admin user:read", "user:read x", "a user:read b"))
    assert not any(re.fullmatch(regex, c) for c in ("user:readonly", "xuser:read", "user:read\tadmin", "", "user"))
    # The payment RPCs of the order saga are for operators only over the edge: VoidPayment as much as a charge.
    for saga_only in ("ProcessPayment", "RefundPayment", "VoidPayment"):
        route = routes_of(dev_config)[f"tessera.payment.v1.PaymentService.{saga_only}"]
        ids = route["typedPerFilterConfig"]["envoy.filters.http.rbac"]["rbac"]["rules"]["policies"]["scopes"][
            "principals"][0]["orIds"]["ids"]
        assert [p["sourcedMetadata"]["metadataMatcher"]["value"] for p in ids] == [_whole_scope("admin")], saga_only
    jwt = next(f for f in hcm_of(dev_config)["httpFilters"] if f["name"] == "envoy.filters.http.jwt_authn")
    provider = jwt["typedConfig"]["providers"]["tessera"]
    # The scope claim stays as the token holds it, so the token claims check tells a string from an array.
    assert "normalizePayloadInMetadata" not in provider


def _whole_scope(scope: str) -> dict:
    return {"stringMatch": {"safeRegex": {"regex": f"(?s)(?:.* )?{re.escape(scope)}(?: .*)?"}}}


def test_filter_order_authenticates_before_rate_limiting_and_authorising(dev_config):
    names = [f["name"] for f in hcm_of(dev_config)["httpFilters"]]
    assert names == [
        "envoy.filters.http.header_mutation", "tessera.rest_head", "envoy.filters.http.cors", "tessera.rest_errors",
        "tessera.rest_grpc_headers", "tessera.rest_grpc_request_headers", "envoy.filters.http.buffer",
        "tessera.rest_body",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.jwt_authn", "tessera.token_claims", "tessera.canary_header",
        "envoy.filters.http.local_ratelimit",
        "envoy.filters.http.rbac", "envoy.filters.http.router",
    ]


def _skip_predicates(wrapped: dict) -> list[dict]:
    """The predicates of an ExtensionWithMatcher whose every match skips the filter (and nothing else)."""
    matcher = wrapped["xdsMatcher"]
    assert set(matcher) == {"matcherList"}  # no on_no_match: a request no predicate matches runs the filter
    skip = "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"
    assert all(m["onMatch"]["action"]["typedConfig"]["@type"] == skip for m in matcher["matcherList"]["matchers"])
    return [m["predicate"] for m in matcher["matcherList"]["matchers"]]


def _single(predicate: dict, input_type: str) -> tuple[dict, dict]:
    single = predicate["singlePredicate"]
    assert single["input"]["typedConfig"]["@type"] == f"type.googleapis.com/envoy.type.matcher.v3.{input_type}"
    return single["input"]["typedConfig"], single["valueMatch"]


def test_body_check_runs_only_where_a_body_rule_can_apply(dev, dev_config):
    # The Lua body check would read nothing on a GET or a native gRPC call: the matcher skips it there, so those
    # requests never start its coroutine. Any method an http rule with a body uses must still reach it.
    wrapped = next(f for f in hcm_of(dev_config)["httpFilters"] if f["name"] == "tessera.rest_body")["typedConfig"]
    inner = wrapped["extensionConfig"]
    assert inner["name"] == "tessera.rest_body"
    assert inner["typedConfig"]["defaultSourceCode"]["inlineString"] == lua.rest_body_source(
        dev.config.contracts, dev.description)
    grpc, other_methods = _skip_predicates(wrapped)
    config, match = _single(grpc, "HttpRequestHeaderMatchInput")
    assert config == {"@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
                      "headerName": "content-type"}
    # gRPC as Envoy tells it: application/grpc-web and the like are transcoded as REST, so they are checked.
    grpc_type = re.compile(match["safeRegex"]["regex"])
    assert [t for t in ("application/grpc", "application/grpc+proto", "application/grpc;charset=utf-8",
                        "application/grpc-web", "application/grpcx", "application/json") if grpc_type.search(t)] == [
        "application/grpc", "application/grpc+proto", "application/grpc;charset=utf-8"]
    config, match = _single(other_methods["notMatcher"], "HttpRequestHeaderMatchInput")
    assert config["headerName"] == ":method"
    methods = lua.body_rule_methods(dev.config.contracts)
    assert methods == ["PATCH", "POST"]
    assert set(methods) == {r.http.method for r in dev.config.contracts.rpcs
                            if dev.config.contracts.body_message(r) is not None}
    regex = re.compile(match["safeRegex"]["regex"])
    assert [m for m in ("GET", "DELETE", "PUT", "PATCH", "POST", "OPTIONS") if regex.fullmatch(m)] == methods


def test_the_canary_header_is_removed_unless_the_token_holds_the_canary_or_admin_scope(dev_config):
    # The mesh routes `canary: true` to a service's v2: only a token with the canary scope (or admin, which every
    # route accepts) may send it on. The check reads the verified claim, so it comes after jwt_authn.
    filters = hcm_of(dev_config)["httpFilters"]
    names = [f["name"] for f in filters]
    assert names.index("envoy.filters.http.jwt_authn") < names.index("tessera.canary_header")
    wrapped = filters[names.index("tessera.canary_header")]["typedConfig"]
    strip = wrapped["extensionConfig"]["typedConfig"]
    assert strip["@type"] == "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation"
    assert strip["mutations"] == {"requestMutations": [{"remove": CANARY_HEADER}]}
    claims = []
    for predicate in _skip_predicates(wrapped):
        single = predicate["singlePredicate"]
        assert single["input"]["typedConfig"] == {
            "@type": "type.googleapis.com/envoy.extensions.matching.common_inputs.network.v3.DynamicMetadataInput",
            "filter": "envoy.filters.http.jwt_authn", "path": [{"key": "jwt_payload"}, {"key": "scope"}]}
        claims.append(single["customMatch"]["typedConfig"]["value"])
    # The same whole-scope match as the routes' RBAC: "canaryx" or "canary\tx" is not canary.
    assert claims == [_whole_scope("canary"), _whole_scope("admin")]
    # The header the mesh's canary routes match on.
    assert CANARY_HEADER == mesh.CANARY_HEADER == "canary"


@pytest.mark.parametrize("profile", ["dev", "prod"])
def test_browsers_may_send_the_canary_header(profile, dev_config, prod_config):
    """A tester's browser sends `canary` only if the preflight allows it (the scope check above still applies)."""
    config = dev_config if profile == "dev" else prod_config
    cors = hcm_of(config)["routeConfig"]["virtualHosts"][0]["typedPerFilterConfig"]["envoy.filters.http.cors"]
    assert CANARY_HEADER in [h.strip() for h in cors["allowHeaders"].split(",")]
    # The key the services pass on to the services they call is the same header.
    assert callctx.CANARY == CANARY_HEADER and callctx.CANARY_VALUE == "true"


def test_rest_requests_lose_grpc_headers_native_grpc_requests_keep_them(dev_config):
    # A REST client's grpc-timeout would become the service's deadline: every grpc-* request header goes, except on
    # a native gRPC request (the same content-type test as the body check's), whose deadline must reach the service.
    filters = hcm_of(dev_config)["httpFilters"]
    names = [f["name"] for f in filters]
    assert names.index("tessera.rest_grpc_request_headers") < names.index("envoy.filters.http.grpc_json_transcoder")
    wrapped = filters[names.index("tessera.rest_grpc_request_headers")]["typedConfig"]
    mutations = wrapped["extensionConfig"]["typedConfig"]["mutations"]
    assert mutations == {"requestMutations": [{"removeOnMatch": {"keyMatcher": {"prefix": "grpc-"}}}]}
    (grpc,) = _skip_predicates(wrapped)
    body_check = filters[names.index("tessera.rest_body")]["typedConfig"]
    assert grpc == _skip_predicates(body_check)[0]


def test_head_filter_runs_only_on_head_requests(dev_config):
    # Only a HEAD's response loses its body; every other request skips the filter and pays no Lua coroutine.
    wrapped = next(f for f in hcm_of(dev_config)["httpFilters"] if f["name"] == "tessera.rest_head")["typedConfig"]
    assert wrapped["extensionConfig"]["typedConfig"]["defaultSourceCode"]["inlineString"] == lua.rest_head_source()
    (not_head,) = _skip_predicates(wrapped)
    config, match = _single(not_head["notMatcher"], "HttpRequestHeaderMatchInput")
    assert (config["headerName"], match) == (":method", {"exact": "HEAD"})


def test_error_filter_skips_only_a_services_successful_reply(dev, dev_config):
    # Its response half changes errors and the gateway's own (marked) replies, gRPC refusals included, which
    # are 200s with the mark: only an unmarked reply below 400 may skip it.
    wrapped = next(f for f in hcm_of(dev_config)["httpFilters"] if f["name"] == "tessera.rest_errors")["typedConfig"]
    inner = wrapped["extensionConfig"]
    assert inner["typedConfig"]["defaultSourceCode"]["inlineString"] == lua.rest_errors_source(dev.description)
    (both,) = _skip_predicates(wrapped)
    status, unmarked = both["andMatcher"]["predicate"]
    _, status_match = _single(status, "HttpResponseStatusCodeMatchInput")
    regex = re.compile(status_match["safeRegex"]["regex"])
    assert [s for s in (100, 200, 204, 304, 399, 400, 401, 404, 429, 500, 503) if regex.fullmatch(str(s))] == [
        100, 200, 204, 304, 399]
    config, present = _single(unmarked["notMatcher"], "HttpResponseHeaderMatchInput")
    assert config["headerName"] == lua.LOCAL_REPLY_HEADER
    assert re.compile(present["safeRegex"]["regex"]).fullmatch("")  # any value, even empty, is a mark


def test_rest_responses_lose_grpc_headers_in_a_builtin_filter_native_grpc_keeps_them(dev_config):
    filters = hcm_of(dev_config)["httpFilters"]
    wrapped = next(f for f in filters if f["name"] == "tessera.rest_grpc_headers")["typedConfig"]
    (grpc,) = _skip_predicates(wrapped)
    # By the response's content-type: a gRPC call the connection manager refuses before any filter sees the
    # request still gets its grpc-status.
    config, match = _single(grpc, "HttpResponseHeaderMatchInput")
    assert (config["headerName"], match) == ("content-type", {"prefix": "application/grpc"})
    mutations = wrapped["extensionConfig"]["typedConfig"]["mutations"]
    assert mutations == {"responseMutations": [{"removeOnMatch": {"keyMatcher": {"prefix": "grpc-"}}}]}
    # After the error filter in the chain, so each response reaches it first on the way out.
    names = [f["name"] for f in filters]
    assert names.index("tessera.rest_grpc_headers") == names.index("tessera.rest_errors") + 1


def test_access_log_measures_the_upstream_time_itself(dev_config):
    # The router suppresses x-envoy-upstream-service-time, so the log cannot take it from the response.
    (log,) = hcm_of(dev_config)["accessLog"]
    fields = log["typedConfig"]["logFormat"]["jsonFormat"]
    assert fields["upstream_ms"] == "%COMMON_DURATION(US_TX_BEG:US_RX_BEG:ms)%"
    router = hcm_of(dev_config)["httpFilters"][-1]["typedConfig"]
    assert router["suppressEnvoyHeaders"] is True


def test_local_envoy_runs_one_worker(tmp_path):
    # make run, the tests and the benchmark run Envoy on the machine that runs every service.
    argv = process.envoy_command(tmp_path / "envoy.yaml")
    assert argv[argv.index("--concurrency") + 1] == str(process.LOCAL_CONCURRENCY) == "1"


def test_every_local_reply_is_marked_with_its_status_for_the_error_filter(dev, dev_config):
    # The error filter gives the gateway's own gRPC refusals their google.rpc.Status by this mark; without it
    # they would reach gRPC clients without grpc-status-details-bin.
    (mapper,) = hcm_of(dev_config)["localReplyConfig"]["mappers"]
    comparison = mapper["filter"]["statusCodeFilter"]["comparison"]
    assert comparison["op"] == "GE" and comparison["value"].get("defaultValue", 0) == 0
    assert mapper["headersToAdd"] == [{"header": {"key": lua.LOCAL_REPLY_HEADER, "value": "%RESPONSE_CODE%"},
                                       "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    assert set(mapper) == {"filter", "headersToAdd"}  # bodies and statuses are left to the error filter
    assert f'local LOCAL_REPLY_HEADER = "{lua.LOCAL_REPLY_HEADER}"' in lua.rest_errors_source(dev.description)


def test_unknown_routes_fail_closed(dev_config):
    filters = {f["name"]: f["typedConfig"] for f in hcm_of(dev_config)["httpFilters"]}
    # Without a per-route override, a token is required and RBAC denies everything.
    assert filters["envoy.filters.http.jwt_authn"]["rules"] == [
        {"match": {"prefix": "/"}, "requires": {"providerName": "tessera"}}]
    # Rules present with no policy (action ALLOW is the default, so it is not written): nothing is allowed.
    assert filters["envoy.filters.http.rbac"]["rules"] == {}
    anonymous = routes_of(dev_config)["not_found"]["typedPerFilterConfig"]
    assert anonymous["envoy.filters.http.jwt_authn"]["disabled"] is True


def test_identity_headers_are_stripped_and_security_headers_added(dev, dev_config):
    mutation = hcm_of(dev_config)["httpFilters"][0]["typedConfig"]["mutations"]
    assert {"remove": "x-user-id"} in mutation["requestMutations"]
    assert {"remove": "x-user-scopes"} in mutation["requestMutations"]
    added = {m["append"]["header"]["key"]: m["append"]["header"]["value"]
             for m in mutation["responseMutations"] if "append" in m}
    assert added == {"x-correlation-id": "%REQ(x-correlation-id)%", **dict(dev.description.security_headers)}
    jwt = next(f for f in hcm_of(dev_config)["httpFilters"] if f["name"] == "envoy.filters.http.jwt_authn")
    assert jwt["typedConfig"]["providers"]["tessera"]["claimToHeaders"] == [
        {"headerName": "x-user-id", "claimName": "sub"}, {"headerName": "x-user-scopes", "claimName": "scope"}]


def test_rate_limits_are_per_subject_or_address_and_per_class(dev, dev_config):
    rl = next(f for f in hcm_of(dev_config)["httpFilters"] if f["name"] == "envoy.filters.http.local_ratelimit")
    config = rl["typedConfig"]
    descriptors = {d["entries"][0]["value"]: d for d in config["descriptors"]}
    assert set(descriptors) == set(dev.description.route_classes)
    assert descriptors["read"]["entries"][1] == {"key": "client"}
    assert descriptors["public"]["entries"][1] == {"key": "remote_address"}
    assert descriptors["read"]["tokenBucket"] == {"maxTokens": 100, "tokensPerFill": 50, "fillInterval": "1s"}
    subject_action = config["rateLimits"][0]["actions"][1]
    assert subject_action == {"requestHeaders": {"headerName": "x-user-id", "descriptorKey": "client"}}
    assert config["rateLimitedAsResourceExhausted"] is True
    assert config["filterEnforced"]["defaultValue"]["numerator"] == 100


def test_prod_responses_carry_hsts_and_dev_responses_do_not(dev_config, prod_config):
    def added(config: dict) -> dict[str, str]:
        mutation = hcm_of(config)["httpFilters"][0]["typedConfig"]["mutations"]
        return {m["append"]["header"]["key"]: m["append"]["header"]["value"]
                for m in mutation["responseMutations"] if "append" in m}

    assert "strict-transport-security" not in added(dev_config)
    assert added(prod_config)["strict-transport-security"] == "max-age=63072000; includeSubDomains"


def test_correlation_id_is_the_clients_or_the_request_id_and_is_returned(dev_config):
    mutation = hcm_of(dev_config)["httpFilters"][0]["typedConfig"]["mutations"]
    # On the way in, after the client's identity headers are gone: the client's, else the request id.
    assert mutation["requestMutations"][-1] == {"append": {
        "header": {"key": "x-correlation-id", "value": "%REQ(x-request-id)%"}, "appendAction": "ADD_IF_ABSENT"}}
    # On the way out, over whatever a service or a filter set: the one the services were given.
    assert {"append": {"header": {"key": "x-correlation-id", "value": "%REQ(x-correlation-id)%"},
                       "appendAction": "OVERWRITE_IF_EXISTS_OR_ADD"}} in mutation["responseMutations"]
    cors = hcm_of(dev_config)["routeConfig"]["virtualHosts"][0]["typedPerFilterConfig"]["envoy.filters.http.cors"]
    assert "x-correlation-id" in [h.strip() for h in cors["allowHeaders"].split(",")]
    assert "x-correlation-id" in [h.strip() for h in cors["exposeHeaders"].split(",")]
    log = hcm_of(dev_config)["accessLog"][0]["typedConfig"]["logFormat"]["jsonFormat"]
    assert log["correlation_id"] == "%REQ(X-CORRELATION-ID)%"


RATE_LIMIT_HEADERS = ("x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset")


@pytest.mark.parametrize("profile", ["dev", "prod"])
def test_rate_limit_headers_are_sent_and_exposed_to_browsers(profile, dev_config, prod_config):
    config = dev_config if profile == "dev" else prod_config
    rl = next(f for f in hcm_of(config)["httpFilters"] if f["name"] == "envoy.filters.http.local_ratelimit")
    assert rl["typedConfig"]["enableXRatelimitHeaders"] == "DRAFT_VERSION_03"
    cors = hcm_of(config)["routeConfig"]["virtualHosts"][0]["typedPerFilterConfig"]["envoy.filters.http.cors"]
    exposed = [h.strip() for h in cors["exposeHeaders"].split(",")]
    assert set(RATE_LIMIT_HEADERS) | {"retry-after", "x-request-id"} <= set(exposed)


def test_only_idempotent_rpcs_are_retried(dev_config):
    routes = routes_of(dev_config)
    assert "retryPolicy" in routes["tessera.user.v1.UserService.GetUser"]["route"]
    assert "retryPolicy" in routes["tessera.order.v1.OrderService.CancelOrder"]["route"]
    assert "retryPolicy" not in routes["tessera.order.v1.OrderService.CreateOrder"]["route"]
    assert routes["tessera.order.v1.OrderService.CreateOrder"]["route"]["timeout"] == "30s"


def test_upstreams_are_http2_with_grpc_health_checks_outlier_detection_and_breakers(dev_config):
    clusters = {c["name"]: c for c in dev_config["staticResources"]["clusters"]}
    user = clusters["user"]
    assert "http2ProtocolOptions" in user["typedExtensionProtocolOptions"][
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]["explicitHttpConfig"]
    assert user["healthChecks"][0]["grpcHealthCheck"] == {"serviceName": "tessera.user.v1.UserService"}
    assert user["outlierDetection"]["consecutive5xx"] == 5  # protoc's json name, not betterproto's 5Xx
    assert user["circuitBreakers"]["thresholds"][0]["maxRequests"] == 1024


def test_admin_is_on_loopback_in_every_profile(dev_config, prod_config):
    for config in (dev_config, prod_config):
        assert config["admin"]["address"]["socketAddress"]["address"] == "127.0.0.1"


def test_prod_differs_from_dev_only_in_values(dev_config, prod_config):
    def shape(config: dict) -> tuple:
        hcm = hcm_of(config)
        # The JWKS and trace collector clusters exist when a value names them (a remote JWKS, a collector).
        clusters = [c["name"] for c in config["staticResources"]["clusters"]]
        return ([f["name"] for f in hcm["httpFilters"]], list(routes_of(config)),
                [c for c in clusters if c not in ("jwks", TRACING_CLUSTER)])

    assert shape(dev_config) == shape(prod_config)
    providers = [next(f for f in hcm_of(c)["httpFilters"] if f["name"] == "envoy.filters.http.jwt_authn")
                 ["typedConfig"]["providers"]["tessera"] for c in (dev_config, prod_config)]
    assert "localJwks" in providers[0] and "remoteJwks" not in providers[0]
    assert providers[1]["remoteJwks"]["httpUri"]["cluster"] == "jwks"
    jwks = next(c for c in prod_config["staticResources"]["clusters"] if c["name"] == "jwks")
    assert jwks["transportSocket"]["name"] == "envoy.transport_sockets.tls"
    prod_user = next(c for c in prod_config["staticResources"]["clusters"] if c["name"] == "user")
    assert prod_user["type"] == "STRICT_DNS"
    # Behind Istio's ingress the client address is the last x-forwarded-for entry it added.
    assert "xffNumTrustedHops" not in hcm_of(dev_config) and hcm_of(prod_config)["xffNumTrustedHops"] == 1
    # Prod exports its spans to the cluster's collector, found by DNS like the services.
    collector = next(c for c in prod_config["staticResources"]["clusters"] if c["name"] == TRACING_CLUSTER)
    assert collector["type"] == "STRICT_DNS"
    assert hcm_of(prod_config)["tracing"]["provider"]["typedConfig"]["grpcService"]["envoyGrpc"] == {
        "clusterName": TRACING_CLUSTER}


def test_rendering_is_deterministic(dev):
    assert render(dev.config.bootstrap()) == render(dev.config.bootstrap())


def test_the_openapi_document_is_served_inline(dev, dev_config):
    route = routes_of(dev_config)["openapi"]
    assert route["match"]["path"] == "/openapi.json"
    import json

    assert json.loads(route["directResponse"]["body"]["inlineString"]) == dev.openapi


@pytest.mark.parametrize(("template", "matches", "misses"), [
    ("/v1/users", ["/v1/users"], ["/v1/users/x", "/v1/usersx"]),
    ("/v1/users/{id}", ["/v1/users/abc"], ["/v1/users", "/v1/users/a/b"]),
    ("/v1/users/{user.id}", ["/v1/users/a-b"], ["/v1/users/"]),
    ("/v1/users/{id}:deactivate", ["/v1/users/a1:deactivate"], ["/v1/users/a1:activate", "/v1/users/a1"]),
    ("/v1/files/{name=**}", ["/v1/files/a/b/c"], ["/v1/files"]),
])
def test_lua_path_patterns_follow_http_rule_templates(template, matches, misses):
    import re

    # Lua patterns used here are a subset that reads the same as a regular expression once % escapes are undone.
    regex = re.compile(lua.path_pattern(template).replace("%", "\\"))
    assert all(regex.match(p) for p in matches)
    assert not any(regex.match(p) for p in misses)


def test_lua_body_tables_know_json_and_proto_names(dev):
    source = lua.rest_body_source(dev.config.contracts, dev.description)
    assert '["displayName"] = ""' in source and '["display_name"] = ""' in source
    assert '["items"] = "a:m:tessera.order.v1.CreateOrderRequest.Item"' in source
    assert 'pattern = "^/v1/users/([^/]+):deactivate$"' in source
    # A field the path binds, in both spellings, with the path variable it must equal.
    assert 'bound = {["product_id"] = {1, "product_id"}, ["productId"] = {1, "product_id"}}' in source
    assert 'bound = {["user.id"] = {1, "user.id"}}' in source


def _with_extra_service(contracts: Contracts) -> descriptor_pb2.FileDescriptorSet:
    fds = descriptor_pb2.FileDescriptorSet()
    fds.CopyFrom(contracts.fds)
    file = fds.file.add(name="tessera/shipping/v1/shipping_service.proto", package="tessera.shipping.v1",
                        syntax="proto3", dependency=["google/api/annotations.proto"])
    for name in ("GetShipmentRequest", "GetShipmentResponse"):
        msg = file.message_type.add(name=name)
        msg.field.add(name="id", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                      label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL, json_name="id")
    method = file.service.add(name="ShippingService").method.add(
        name="GetShipment", input_type=".tessera.shipping.v1.GetShipmentRequest",
        output_type=".tessera.shipping.v1.GetShipmentResponse")
    method.options.idempotency_level = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
    method.options.Extensions[annotations_pb2.http].get = "/v1/shipments/{id}"
    return fds


def test_a_new_service_is_routed_by_regeneration_alone(keys_dir):
    contracts = Contracts(_with_extra_service(Contracts.load(DESCRIPTOR_SET)))
    d = load("dev", overrides={
        "scopes": [*load("dev").scopes, "shipping:read", "shipping:write"],
        "upstreams": {"addresses": {"shipping": "127.0.0.1:50056"}},
        "jwt": {"jwks_file": str(keys_dir / "jwks.json")},
    })
    from tessera_gateway import openapi

    document = openapi.build(contracts, d)
    config = to_envoy_dict(GatewayConfig(d, contracts, "{}").bootstrap())
    route = routes_of(config)["tessera.shipping.v1.ShippingService.GetShipment"]
    assert route["route"]["cluster"] == "shipping"
    assert "shipping" in [c["name"] for c in config["staticResources"]["clusters"]]
    assert document["paths"]["/v1/shipments/{id}"]["get"]["x-required-scopes"] == ["shipping:read", "admin"]


def test_an_rpc_without_an_http_rule_is_refused():
    fds = _with_extra_service(Contracts.load(DESCRIPTOR_SET))
    fds.file[-1].service[0].method[0].options.ClearExtension(annotations_pb2.http)
    with pytest.raises(ContractError, match=r"has no google\.api\.http rule"):
        Contracts(fds)


@pytest.mark.parametrize(("argv", "message"), [
    (["--upstream", "usr=127.0.0.1:6000"], "gateway: upstreams.addresses.usr names no service of the contracts"),
    (["--values", "{tmp}/missing.yaml"], "gateway: --values {tmp}/missing.yaml: cannot be read: "),
    (["--values", "{tmp}/broken.yaml"], "gateway: --values {tmp}/broken.yaml: is not YAML: "),
    (["--descriptors", "{tmp}/broken.yaml"], "gateway: descriptor set {tmp}/broken.yaml is not a FileDescriptorSet"),
])
def test_the_generator_refuses_bad_arguments_in_one_line(tmp_path, argv, message):
    (tmp_path / "broken.yaml").write_text("route_classes: [\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run([sys.executable, "-m", "tessera_gateway.generate", "--profile", "dev", "--out",
                             str(tmp_path / "envoy.yaml"), *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(message.replace("{tmp}", str(tmp_path))), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "envoy.yaml").exists()


@pytest.mark.parametrize("module", ["tessera_gateway.generate", "tessera_gateway.openapi"])
def test_an_output_file_that_cannot_be_written_is_named_in_one_line(tmp_path, module):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    out = blocker / "gateway" / "out.yaml"
    result = subprocess.run([sys.executable, "-m", module, "--profile", "dev", "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith(f"{module.rsplit('.', 1)[-1].replace('generate', 'gateway')}: cannot write {out}: ")
    assert len(result.stderr.strip().splitlines()) == 1
