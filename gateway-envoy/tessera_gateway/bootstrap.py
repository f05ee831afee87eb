"""Builds the Envoy bootstrap of the edge gateway with envoy-data-plane typed objects.

One listener speaks HTTP/1.1 and HTTP/2 (h2c): REST/JSON requests are transcoded to gRPC, native gRPC passes
through, and both then meet the same route per RPC, so authentication, scopes, rate limits and timeouts are
applied once, on the gRPC method. Every local reply is marked with its HTTP status (local_reply_config) for the
error filter. The HTTP filters, in order:

  header_mutation   strips client-sent identity headers; sets x-correlation-id (the client's, else the request
                    id) for the services; returns it and adds the security headers on every response
  tessera.rest_head (Lua)    drops the response body of a HEAD request (answered as its GET by the error filter);
                             run on HEAD requests only (matcher), after every filter that writes a body
  cors              answers preflights of allowed origins
  tessera.rest_errors (Lua)  answers a REST HEAD as its GET (rewrites the method, which it records first);
                             drops a gRPC call's grpc-timeout that gRPC would not read (the route timeout governs);
                             turns every REST error into google.rpc.Status JSON, strips grpc-*; gives the
                             gateway's own gRPC refusals the same Status in grpc-status-details-bin; its response
                             half is skipped (matcher) on a service's successful reply, which it would not change
  tessera.rest_grpc_headers  (header_mutation) strips grpc-* from every REST response; skipped for gRPC replies
  tessera.rest_grpc_request_headers  (header_mutation) strips grpc-* (grpc-timeout, ...) from every REST request,
                             which the route's timeout governs; skipped for gRPC requests, whose deadline travels on
  buffer            caps the request body (413)
  tessera.rest_body (Lua)    refuses unknown JSON fields (400) before the transcoder drops them, and a body
                             giving a path-bound field another value in either spelling; wrapped in a
                             matcher that skips it for native gRPC and for methods no REST body rule uses, so
                             GET/DELETE and gRPC calls never start a Lua coroutine for it
  grpc_json_transcoder       REST/JSON -> gRPC per google.api.http; gRPC status -> HTTP status + JSON body
  jwt_authn         RS256 token: signature, issuer, audience, expiry, a subject without control characters;
                    subject and scopes -> x-user-id/x-user-scopes
  tessera.token_claims (rbac)  refuses a scope claim with a control character, or that is no string (the error
                               filter makes it a 401)
  tessera.canary_header  (header_mutation) removes the `canary` header the mesh routes to a service's v2 on, unless
                         the token holds the canary or the admin scope (a matcher skips it then)
  local_ratelimit   token bucket per (route class, subject), or per (route class, address) on anonymous routes;
                    x-ratelimit-limit/-remaining/-reset of that bucket on the response (429 included)
  rbac              the route's scopes, matched as whole words of the space-delimited scope claim
  router
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import ipaddress
import json
import re

import betterproto2
from envoy_data_plane.envoy.config.accesslog.v3 import (
    AccessLog,
    AccessLogFilter,
    ComparisonFilter,
    ComparisonFilterOp,
    StatusCodeFilter,
)
from envoy_data_plane.envoy.config.bootstrap.v3 import Admin, Bootstrap, BootstrapStaticResources
from envoy_data_plane.envoy.config.cluster.v3 import (
    CircuitBreakers,
    CircuitBreakersThresholds,
    Cluster,
    ClusterDiscoveryType,
    ClusterDnsLookupFamily,
    OutlierDetection,
)
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutation as HeaderMutationRule
from envoy_data_plane.envoy.config.common.mutation_rules.v3 import HeaderMutationRemoveOnMatch
from envoy_data_plane.envoy.config.core.v3 import (
    Address,
    DataSource,
    GrpcService,
    GrpcServiceEnvoyGrpc,
    HeaderValue,
    HeaderValueOption,
    HeaderValueOptionHeaderAppendAction,
    HealthCheck,
    HealthCheckGrpcHealthCheck,
    HealthCheckHttpHealthCheck,
    Http2ProtocolOptions,
    HttpProtocolOptions,
    HttpProtocolOptionsHeadersWithUnderscoresAction,
    HttpUri,
    Metadata,
    RoutingPriority,
    RuntimeFractionalPercent,
    RuntimeUInt32,
    SocketAddress,
    SubstitutionFormatString,
    TransportSocket,
    TypedExtensionConfig,
)
from envoy_data_plane.envoy.config.core.v3 import RetryPolicy as CoreRetryPolicy
from envoy_data_plane.envoy.config.endpoint.v3 import ClusterLoadAssignment, Endpoint, LbEndpoint, LocalityLbEndpoints
from envoy_data_plane.envoy.config.listener.v3 import Filter, FilterChain, Listener
from envoy_data_plane.envoy.config.overload.v3 import OverloadManager, ResourceMonitor
from envoy_data_plane.envoy.config.rbac.v3 import (
    Permission,
    Policy,
    Principal,
    PrincipalSet,
    Rbac,
    RbacAction,
    SourcedMetadata,
)
from envoy_data_plane.envoy.config.route.v3 import (
    DirectResponseAction,
    HeaderMatcher,
    RateLimit,
    RateLimitAction,
    RateLimitActionMetaData,
    RateLimitActionMetaDataSource,
    RateLimitActionRemoteAddress,
    RateLimitActionRequestHeaders,
    RetryPolicy,
    Route,
    RouteAction,
    RouteActionClusterNotFoundResponseCode,
    RouteConfiguration,
    RouteMatch,
    RouteMatchGrpcRouteMatchOptions,
    VirtualHost,
)
from envoy_data_plane.envoy.config.trace.v3 import OpenTelemetryConfig, TracingHttp
from envoy_data_plane.envoy.extensions.access_loggers.file.v3 import FileAccessLog
from envoy_data_plane.envoy.extensions.common.matching.v3 import ExtensionWithMatcher
from envoy_data_plane.envoy.extensions.common.ratelimit.v3 import (
    LocalRateLimitDescriptor,
    RateLimitDescriptorEntry,
    XRateLimitHeadersRfcVersion,
)
from envoy_data_plane.envoy.extensions.filters.common.matcher.action.v3 import SkipFilter
from envoy_data_plane.envoy.extensions.filters.http.buffer.v3 import Buffer
from envoy_data_plane.envoy.extensions.filters.http.cors.v3 import Cors, CorsPolicy
from envoy_data_plane.envoy.extensions.filters.http.grpc_json_transcoder.v3 import (
    GrpcJsonTranscoder,
    GrpcJsonTranscoderPrintOptions,
    GrpcJsonTranscoderRequestValidationOptions,
)
from envoy_data_plane.envoy.extensions.filters.http.header_mutation.v3 import HeaderMutation, Mutations
from envoy_data_plane.envoy.extensions.filters.http.jwt_authn.v3 import (
    JwksAsyncFetch,
    JwtAuthentication,
    JwtCacheConfig,
    JwtClaimToHeader,
    JwtHeader,
    JwtProvider,
    JwtRequirement,
    PerRouteConfig,
    RemoteJwks,
    RequirementRule,
)
from envoy_data_plane.envoy.extensions.filters.http.local_ratelimit.v3 import LocalRateLimit
from envoy_data_plane.envoy.extensions.filters.http.lua.v3 import Lua
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import Rbac as RbacFilter
from envoy_data_plane.envoy.extensions.filters.http.rbac.v3 import RbacPerRoute
from envoy_data_plane.envoy.extensions.filters.http.router.v3 import Router
from envoy_data_plane.envoy.extensions.filters.network.http_connection_manager.v3 import (
    HttpConnectionManager,
    HttpConnectionManagerCodecType,
    HttpConnectionManagerPathWithEscapedSlashesAction,
    HttpConnectionManagerServerHeaderTransformation,
    HttpConnectionManagerTracing,
    HttpFilter,
    LocalReplyConfig,
    RequestIdExtension,
    ResponseMapper,
)
from envoy_data_plane.envoy.extensions.matching.common_inputs.network.v3 import (
    DynamicMetadataInput,
    DynamicMetadataInputPathSegment,
)
from envoy_data_plane.envoy.extensions.matching.input_matchers.metadata.v3 import Metadata as MetadataInputMatcher
from envoy_data_plane.envoy.extensions.request_id.uuid.v3 import UuidRequestIdConfig
from envoy_data_plane.envoy.extensions.resource_monitors.downstream_connections.v3 import (
    DownstreamConnectionsConfig,
)
from envoy_data_plane.envoy.extensions.transport_sockets.tls.v3 import (
    CertificateValidationContext,
    CommonTlsContext,
    DownstreamTlsContext,
    TlsCertificate,
    UpstreamTlsContext,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import (
    HttpProtocolOptions as UpstreamHttpProtocolOptions,
)
from envoy_data_plane.envoy.extensions.upstreams.http.v3 import HttpProtocolOptionsExplicitHttpConfig
from envoy_data_plane.envoy.type.matcher.v3 import (
    HttpRequestHeaderMatchInput,
    HttpResponseHeaderMatchInput,
    HttpResponseStatusCodeMatchInput,
    MetadataMatcher,
    MetadataMatcherPathSegment,
    StringMatcher,
    ValueMatcher,
)
from envoy_data_plane.envoy.type.matcher.v3 import RegexMatcher as EnvoyRegexMatcher
from envoy_data_plane.envoy.type.metadata.v3 import MetadataKey, MetadataKeyPathSegment
from envoy_data_plane.envoy.type.v3 import FractionalPercent, FractionalPercentDenominatorType, Percent, TokenBucket
from envoy_data_plane.google.protobuf import Any, Struct
from envoy_data_plane.xds.core.v3 import TypedExtensionConfig as XdsTypedExtensionConfig
from envoy_data_plane.xds.type.matcher.v3 import (
    Matcher,
    MatcherMatcherList,
    MatcherMatcherListFieldMatcher,
    MatcherMatcherListPredicate,
    MatcherMatcherListPredicatePredicateList,
    MatcherMatcherListPredicateSinglePredicate,
    MatcherOnMatch,
    RegexMatcher,
    RegexMatcherGoogleRe2,
)
from envoy_data_plane.xds.type.matcher.v3 import StringMatcher as XdsStringMatcher
from google.protobuf import descriptor_pb2

from tessera_gateway import lua
from tessera_gateway.description import Address as DescriptionAddress
from tessera_gateway.description import Description, RouteClass
from tessera_gateway.descriptors import Contracts, Rpc, Service

JWT_FILTER = "envoy.filters.http.jwt_authn"
RBAC_FILTER = "envoy.filters.http.rbac"
CORS_FILTER = "envoy.filters.http.cors"
REST_ERRORS_FILTER = "tessera.rest_errors"
REST_BODY_FILTER = "tessera.rest_body"
REST_HEAD_FILTER = "tessera.rest_head"
REST_GRPC_HEADERS_FILTER = "tessera.rest_grpc_headers"
REST_GRPC_REQUEST_HEADERS_FILTER = "tessera.rest_grpc_request_headers"
TOKEN_CLAIMS_FILTER = "tessera.token_claims"
CANARY_FILTER = "tessera.canary_header"
JWT_PROVIDER = "tessera"
JWT_PAYLOAD = "jwt_payload"
JWKS_CLUSTER = "jwks"
TRACING_CLUSTER = "otel_collector"
GRAPHQL_CLUSTER = "graphql"
# Route metadata namespace read by the rate limit actions.
ROUTE_NS = "tessera"
SUBJECT_HEADER = "x-user-id"
SCOPES_HEADER = "x-user-scopes"
IDENTITY_HEADERS = (SUBJECT_HEADER, SCOPES_HEADER)
REQUEST_ID_HEADER = "x-request-id"
# The services read it (tessera_runtime.context.CORRELATION_ID), log it and pass it on to calls and events.
CORRELATION_HEADER = "x-correlation-id"
# The header the mesh routes to a service's v2 on (`canary: true`; tessera_deploy.mesh.CANARY_HEADER).
CANARY_HEADER = "canary"
# Never set on a request that reaches the router: the catch-all route looks for a cluster by it and finds none.
UNROUTED_HEADER = "x-tessera-unrouted"
RETRYABLE = ("NO_SIDE_EFFECTS", "IDEMPOTENT")
OPENAPI_PATH = "/openapi.json"
# A gRPC request's content-type, as Envoy and the transcoder tell one (application/grpc-web is not: it is transcoded).
GRPC_CONTENT_TYPE = r"^application/grpc([+;].*)?$"
# Control characters other than the tab (a regex class's contents): no header value may hold one (HTTP/2 and the
# services refuse it), so a token whose sub or scope holds one is refused before they become x-user-id/-scopes.
CONTROL_CHARACTERS = r"\x00-\x08\x0a-\x1f\x7f"
# Never set in the runtime: the local reply mapper's status filter keeps its default, 0, and matches every reply.
LOCAL_REPLY_RUNTIME_KEY = "tessera.local_reply.min_status"


def _seconds(value: int | float) -> dt.timedelta:
    return dt.timedelta(seconds=value)


def _filter(name: str, message: betterproto2.Message) -> HttpFilter:
    return HttpFilter(name=name, typed_config=Any.pack(message))


def _socket(address: DescriptionAddress) -> Address:
    return Address(socket_address=SocketAddress(address=address.host, port_value=address.port))


def _percent(value: int) -> RuntimeFractionalPercent:
    return RuntimeFractionalPercent(default_value=FractionalPercent(
        numerator=value, denominator=FractionalPercentDenominatorType.HUNDRED))


def _header(key: str, value: str, action: HeaderValueOptionHeaderAppendAction) -> HeaderValueOption:
    return HeaderValueOption(header=HeaderValue(key=key, value=value), append_action=action)


def _request_header(name: str, match: XdsStringMatcher) -> MatcherMatcherListPredicate:
    """A matcher predicate on one request header (pseudo-headers such as :method included)."""
    return MatcherMatcherListPredicate(single_predicate=MatcherMatcherListPredicateSinglePredicate(
        input=XdsTypedExtensionConfig(name=f"request-header {name}",
                                      typed_config=Any.pack(HttpRequestHeaderMatchInput(header_name=name))),
        value_match=match,
    ))


def _response_header(name: str, match: XdsStringMatcher) -> MatcherMatcherListPredicate:
    """A matcher predicate on one response header; a header the response lacks never matches."""
    return MatcherMatcherListPredicate(single_predicate=MatcherMatcherListPredicateSinglePredicate(
        input=XdsTypedExtensionConfig(name=f"response-header {name}",
                                      typed_config=Any.pack(HttpResponseHeaderMatchInput(header_name=name))),
        value_match=match,
    ))


def _response_status(match: XdsStringMatcher) -> MatcherMatcherListPredicate:
    """A matcher predicate on the response's HTTP status (as its decimal text)."""
    return MatcherMatcherListPredicate(single_predicate=MatcherMatcherListPredicateSinglePredicate(
        input=XdsTypedExtensionConfig(name="response-status",
                                      typed_config=Any.pack(HttpResponseStatusCodeMatchInput())),
        value_match=match,
    ))


def _grpc_request() -> MatcherMatcherListPredicate:
    """A matcher predicate true for a native gRPC request (by its content-type, as Envoy and the transcoder tell)."""
    return _request_header("content-type", XdsStringMatcher(safe_regex=RegexMatcher(
        google_re2=RegexMatcherGoogleRe2(), regex=GRPC_CONTENT_TYPE)))


def _skip_when(*predicates: MatcherMatcherListPredicate) -> Matcher:
    """A filter matcher that skips the filter for a request matching any of the predicates, else runs it."""
    skip = MatcherOnMatch(action=XdsTypedExtensionConfig(name="skip", typed_config=Any.pack(SkipFilter())))
    return Matcher(matcher_list=MatcherMatcherList(matchers=[
        MatcherMatcherListFieldMatcher(predicate=p, on_match=skip) for p in predicates]))


@dataclasses.dataclass(frozen=True)
class RouteInfo:
    """What the Lua error filter and the access log may read about a route."""

    service: str
    route_class: RouteClass
    scopes: tuple[str, ...]

    def metadata(self) -> Metadata:
        c = self.route_class
        lua_md = {"service": self.service, "route_class": c.name, "scopes": " ".join(self.scopes),
                  "retry_after": str(c.refill_interval_seconds), "timeout": f"{c.timeout_seconds} s"}
        key = "anonymous_class" if c.anonymous else "client_class"
        return Metadata(filter_metadata={
            REST_ERRORS_FILTER: Struct.from_dict(lua_md),
            ROUTE_NS: Struct.from_dict({key: c.name}),
        })


def _scope_claim(value: ValueMatcher) -> Principal:
    """The token's scope claim as jwt_authn leaves it in the metadata: as the token holds it, not split."""
    return Principal(sourced_metadata=SourcedMetadata(metadata_matcher=MetadataMatcher(
        filter=JWT_FILTER, path=[MetadataMatcherPathSegment(key=JWT_PAYLOAD), MetadataMatcherPathSegment(key="scope")],
        value=value)))


def _whole_scope(scope: str) -> ValueMatcher:
    """A scope claim holding `scope` as one of its space-delimited words (RFC 6749 section 3.3), so "user:readonly"
    never grants "user:read", nor "admin\tx" admin. The token claims check refused a claim that is no string."""
    return ValueMatcher(string_match=StringMatcher(safe_regex=EnvoyRegexMatcher(
        regex=f"(?s)(?:.* )?{re.escape(scope)}(?: .*)?")))


def _token_has_scope(scope: str) -> MatcherMatcherListPredicate:
    """A filter matcher predicate true for a request whose verified token holds `scope` as a whole scope: the claim
    jwt_authn left in the metadata, matched as the rbac filter matches it. A request without a verified token (an
    anonymous route, a refused token) has no claim and never matches."""
    claim = DynamicMetadataInput(filter=JWT_FILTER, path=[DynamicMetadataInputPathSegment(key=JWT_PAYLOAD),
                                                          DynamicMetadataInputPathSegment(key="scope")])
    return MatcherMatcherListPredicate(single_predicate=MatcherMatcherListPredicateSinglePredicate(
        input=XdsTypedExtensionConfig(name="jwt-scope", typed_config=Any.pack(claim)),
        custom_match=XdsTypedExtensionConfig(name="whole-scope", typed_config=Any.pack(
            MetadataInputMatcher(value=_whole_scope(scope)))),
    ))


def _scope_not_a_string() -> Principal:
    """A scope claim that is there but no string (an array, a number, a boolean, an object, null)."""
    string = _scope_claim(ValueMatcher(string_match=StringMatcher(safe_regex=EnvoyRegexMatcher(regex="(?s).*"))))
    return Principal(and_ids=PrincipalSet(ids=[_scope_claim(ValueMatcher(present_match=True)),
                                               Principal(not_id=string)]))


class GatewayConfig:
    """The Envoy bootstrap of one profile of the description, for one set of contracts."""

    def __init__(self, description: Description, contracts: Contracts, openapi_document: str) -> None:
        description.check_contracts(contracts)
        self.d = description
        self.contracts = contracts
        self.openapi_document = openapi_document

    # -- routes ------------------------------------------------------------------------------------------------

    def _scope_policy(self, scopes: tuple[str, ...]) -> RbacPerRoute:
        accepted = list(dict.fromkeys((*scopes, self.d.admin_scope)))
        principals = [_scope_claim(_whole_scope(s)) for s in accepted]
        return RbacPerRoute(rbac=RbacFilter(rules=Rbac(action=RbacAction.ALLOW, policies={
            "scopes": Policy(permissions=[Permission(any=True)], principals=[Principal(or_ids=PrincipalSet(
                ids=principals))]),
        })))

    def _rpc_route(self, service: Service, rpc: Rpc) -> Route:
        policy = self.d.policy(rpc, service)
        c = policy.route_class
        timeout = _seconds(c.timeout_seconds)
        # The class timeout bounds every call; a gRPC client's shorter deadline travels on in grpc-timeout and
        # the service enforces it. (max_stream_duration.grpc_timeout_header_max would replace this timeout by
        # the header's, leaving calls without one unbounded.)
        action = RouteAction(cluster=service.context, timeout=timeout)
        if rpc.idempotency in RETRYABLE and self.d.upstream.retry_count > 0:
            action.retry_policy = RetryPolicy(retry_on=self.d.upstream.retry_on,
                                              num_retries=self.d.upstream.retry_count)
        info = RouteInfo(service=service.context, route_class=c,
                         scopes=tuple(dict.fromkeys((*policy.scopes, self.d.admin_scope))))
        return Route(
            name=rpc.full_name,
            match=RouteMatch(path=rpc.grpc_path, grpc=RouteMatchGrpcRouteMatchOptions()),
            route=action,
            metadata=info.metadata(),
            typed_per_filter_config={RBAC_FILTER: Any.pack(self._scope_policy(policy.scopes))},
        )

    def _graphql_route(self) -> Route:
        g = self.d.graphql
        assert g is not None
        info = RouteInfo(service="graphql", route_class=g.route_class, scopes=())
        # A valid token is all this route asks (jwt_authn requires one on every route); the API checks each field's
        # scope itself, so RBAC lets every authenticated caller through here.
        anyone = RbacPerRoute(rbac=RbacFilter(rules=Rbac(action=RbacAction.ALLOW, policies={
            "authenticated": Policy(permissions=[Permission(any=True)], principals=[Principal(any=True)])})))
        return Route(
            name="graphql",
            match=RouteMatch(path=g.path),
            route=RouteAction(cluster=GRAPHQL_CLUSTER, timeout=_seconds(g.route_class.timeout_seconds)),
            metadata=info.metadata(),
            typed_per_filter_config={RBAC_FILTER: Any.pack(anyone)},
        )

    def _anonymous(self) -> dict[str, Any]:
        return {JWT_FILTER: Any.pack(PerRouteConfig(disabled=True)), RBAC_FILTER: Any.pack(RbacPerRoute())}

    def routes(self) -> list[Route]:
        public = RouteInfo(service="gateway", route_class=self.d.public_class, scopes=())
        routes = [self._rpc_route(s, r) for s in self.contracts.services for r in s.rpcs]
        if self.d.graphql is not None:
            routes.append(self._graphql_route())
        routes.append(Route(
            name="openapi",
            match=RouteMatch(path=OPENAPI_PATH, headers=[HeaderMatcher(
                name=":method", string_match=StringMatcher(exact="GET"))]),
            direct_response=DirectResponseAction(status=200, body=DataSource(inline_string=self.openapi_document)),
            response_headers_to_add=[_header("content-type", "application/json",
                                             HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD)],
            metadata=public.metadata(),
            typed_per_filter_config=self._anonymous(),
        ))
        # Everything else: REST paths before transcoding and unknown paths, answered 404 without asking for a
        # token. It routes by a header the gateway always strips, so no cluster is ever found; a direct response
        # would do the same, but the CORS filter only answers preflights on routes with a route action.
        routes.append(Route(
            name="not_found", match=RouteMatch(prefix="/"),
            route=RouteAction(cluster_header=UNROUTED_HEADER,
                              cluster_not_found_response_code=RouteActionClusterNotFoundResponseCode.NOT_FOUND),
            metadata=public.metadata(), typed_per_filter_config=self._anonymous(),
        ))
        return routes

    def route_configuration(self) -> RouteConfiguration:
        per_filter: dict[str, Any] = {}
        cors = self.d.cors
        if cors.allow_origins:
            per_filter[CORS_FILTER] = Any.pack(CorsPolicy(
                allow_origin_string_match=[StringMatcher(exact=o) for o in cors.allow_origins],
                allow_methods=", ".join(cors.allow_methods), allow_headers=", ".join(cors.allow_headers),
                expose_headers=", ".join(cors.expose_headers), max_age=str(cors.max_age_seconds),
                allow_credentials=False,
            ))
        return RouteConfiguration(
            name="edge",
            virtual_hosts=[VirtualHost(name="tessera", domains=["*"], routes=self.routes(),
                                       typed_per_filter_config=per_filter)],
            max_direct_response_body_size_bytes=len(self.openapi_document.encode()) + 1024,
        )

    # -- HTTP filters ------------------------------------------------------------------------------------------

    def _header_mutation(self) -> HeaderMutation:
        """Runs first on the way in and last on the way out, so every response gets its headers, the gateway's
        own refusals included. The correlation id is the client's x-correlation-id, kept as sent like its
        x-request-id, or else the request id (which the connection manager has made by now); the services read it
        from the request and every response returns the one the services were given."""
        add_if_absent = HeaderValueOptionHeaderAppendAction.ADD_IF_ABSENT
        overwrite = HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD
        return HeaderMutation(mutations=Mutations(
            request_mutations=[
                *(HeaderMutationRule(remove=h) for h in (*IDENTITY_HEADERS, UNROUTED_HEADER)),
                HeaderMutationRule(append=_header(CORRELATION_HEADER, f"%REQ({REQUEST_ID_HEADER})%", add_if_absent)),
            ],
            response_mutations=[
                HeaderMutationRule(append=_header(CORRELATION_HEADER, f"%REQ({CORRELATION_HEADER})%", overwrite)),
                *(HeaderMutationRule(append=_header(k, v, add_if_absent)) for k, v in self.d.security_headers),
                HeaderMutationRule(remove="server"),
                HeaderMutationRule(remove="x-powered-by"),
            ],
        ))

    def _transcoder(self) -> GrpcJsonTranscoder:
        descriptors = descriptor_pb2.FileDescriptorSet()
        descriptors.CopyFrom(self.contracts.fds)
        for file in descriptors.file:
            file.ClearField("source_code_info")  # comments: two thirds of the bytes, no use to Envoy
        return GrpcJsonTranscoder(
            proto_descriptor_bin=descriptors.SerializeToString(deterministic=True),
            services=[s.full_name for s in self.contracts.services],
            print_options=GrpcJsonTranscoderPrintOptions(always_print_primitive_fields=True),
            convert_grpc_status=True,
            request_validation_options=GrpcJsonTranscoderRequestValidationOptions(
                reject_unknown_query_parameters=True, reject_binding_body_field_collisions=True),
            max_request_body_size=self.d.limits.max_request_body_bytes,
        )

    def _jwt(self) -> JwtAuthentication:
        j = self.d.jwt
        provider = JwtProvider(
            issuer=j.issuer, audiences=list(j.audiences),
            # The subject is who the call acts for (x-user-id) and whose bucket the rate limit takes from: a token
            # without one (absent or empty) is refused here, not passed on as a caller without identity whose
            # requests no bucket counts.
            # A subject with a control character is refused here as well: copied into x-user-id, it would fail the
            # call upstream (a 503 that counts toward ejecting a healthy service).
            subjects=StringMatcher(safe_regex=EnvoyRegexMatcher(regex=f"[^{CONTROL_CHARACTERS}]+")),
            from_headers=[JwtHeader(name="authorization", value_prefix="Bearer ")],
            forward=False, payload_in_metadata=JWT_PAYLOAD,
            claim_to_headers=[JwtClaimToHeader(header_name=SUBJECT_HEADER, claim_name="sub"),
                              JwtClaimToHeader(header_name=SCOPES_HEADER, claim_name="scope")],
            clock_skew_seconds=j.clock_skew_seconds, max_lifetime=_seconds(j.max_lifetime_seconds),
            require_expiration=True,
            # A client sends the same token on every request until it expires: verify its RS256 signature once
            # and reuse the result (Envoy still checks the token's time constraints on every cache hit).
            jwt_cache_config=JwtCacheConfig(jwt_cache_size=1000),
        )
        if j.jwks_file is not None:
            provider.local_jwks = DataSource(filename=str(j.jwks_file))
        else:
            provider.remote_jwks = RemoteJwks(
                http_uri=HttpUri(uri=j.jwks_uri, cluster=JWKS_CLUSTER, timeout=_seconds(5)),
                cache_duration=_seconds(j.jwks_cache_seconds),
                async_fetch=JwksAsyncFetch(fast_listener=False),
                retry_policy=CoreRetryPolicy(num_retries=3),
            )
        return JwtAuthentication(
            providers={JWT_PROVIDER: provider},
            # Every route needs a token unless its own config disables the filter: a route added without a
            # thought for authentication fails closed.
            rules=[RequirementRule(match=RouteMatch(prefix="/"), requires=JwtRequirement(provider_name=JWT_PROVIDER))],
        )

    def _token_claims(self) -> HttpFilter:
        """Refuses a token whose scope claim holds a control character (jwt_authn checks the subject itself):
        copied into x-user-scopes it would fail the call upstream, a 503 counted toward ejecting the service. It
        refuses as well a scope claim that is no string (RFC 6749 section 3.3: space-delimited words): jwt_authn
        copies no other kind into x-user-scopes as the services read it, so the gateway and the services would
        disagree on what it grants. It runs before the rate limiter, so such a token takes nobody's bucket; the
        error filter makes its refusal a 401 TOKEN_INVALID by the engine result it records."""
        control = HeaderMatcher(name=SCOPES_HEADER, string_match=StringMatcher(safe_regex=EnvoyRegexMatcher(
            regex=f"(?s).*[{CONTROL_CHARACTERS}].*")))
        return _filter(TOKEN_CLAIMS_FILTER, RbacFilter(
            rules=Rbac(action=RbacAction.DENY, policies={
                lua.CONTROL_CHARACTERS_POLICY: Policy(permissions=[Permission(any=True)],
                                                      principals=[Principal(header=control)]),
                lua.SCOPE_NOT_A_STRING_POLICY: Policy(permissions=[Permission(any=True)],
                                                      principals=[_scope_not_a_string()]),
            }),
            rules_stat_prefix=lua.TOKEN_CLAIMS_PREFIX,
        ))

    def _canary_header(self) -> HttpFilter:
        """Removes the `canary` header (every value; Envoy keeps header names in lower case, whatever the client
        spelt) from a request whose token lacks the canary scope and the admin scope, so nobody else can choose a
        service's unreleased v2 (the mesh routes `canary: true` there). A matcher skips it for a token with either
        scope, whose header reaches the service as sent, over REST (the transcoder passes headers on as metadata)
        and native gRPC alike. It runs after jwt_authn, whose verified claims it reads; on an anonymous route there
        are none, and the header goes."""
        strip = HeaderMutation(mutations=Mutations(request_mutations=[HeaderMutationRule(remove=CANARY_HEADER)]))
        may_choose = dict.fromkeys((self.d.canary_scope, self.d.admin_scope))
        return _filter(CANARY_FILTER, ExtensionWithMatcher(
            extension_config=TypedExtensionConfig(name=CANARY_FILTER, typed_config=Any.pack(strip)),
            xds_matcher=_skip_when(*(_token_has_scope(s) for s in may_choose)),
        ))

    def _rate_limit(self) -> LocalRateLimit:
        classes = list(self.d.route_classes.values())
        descriptors = []
        for c in classes:
            client_key = "remote_address" if c.anonymous else "client"
            descriptors.append(LocalRateLimitDescriptor(
                entries=[RateLimitDescriptorEntry(key="route_class", value=c.name),
                         RateLimitDescriptorEntry(key=client_key)],
                token_bucket=TokenBucket(max_tokens=c.burst, tokens_per_fill=c.refill,
                                         fill_interval=_seconds(c.refill_interval_seconds)),
            ))

        def class_of(key: str) -> RateLimitAction:
            return RateLimitAction(metadata=RateLimitActionMetaData(
                descriptor_key="route_class", source=RateLimitActionMetaDataSource.ROUTE_ENTRY,
                metadata_key=MetadataKey(key=ROUTE_NS, path=[MetadataKeyPathSegment(key=key)])))

        total = sum(c.refill for c in classes) * 1000
        return LocalRateLimit(
            stat_prefix="rate_limit",
            # Only requests that match no descriptor use this bucket; every route has a class, so it is a backstop.
            token_bucket=TokenBucket(max_tokens=total, tokens_per_fill=total, fill_interval=_seconds(1)),
            filter_enabled=_percent(100), filter_enforced=_percent(100),
            descriptors=descriptors,
            rate_limits=[
                # Authenticated routes: the subject comes from x-user-id, which only jwt_authn can have set.
                RateLimit(actions=[class_of("client_class"), RateLimitAction(
                    request_headers=RateLimitActionRequestHeaders(header_name=SUBJECT_HEADER,
                                                                  descriptor_key="client"))]),
                RateLimit(actions=[class_of("anonymous_class"),
                                   RateLimitAction(remote_address=RateLimitActionRemoteAddress())]),
            ],
            always_consume_default_token_bucket=False,
            rate_limited_as_resource_exhausted=True,
            # x-ratelimit-limit / -remaining / -reset (draft RFC 03) of the client's bucket on every response of
            # a rate-limited request, the 429 included: limit is the bucket's burst, remaining its tokens left,
            # reset the seconds until its next refill.
            enable_x_ratelimit_headers=XRateLimitHeadersRfcVersion.DRAFT_VERSION_03,
            max_dynamic_descriptors=self.d.limits.max_tracked_clients,
        )

    def _rest_errors(self) -> HttpFilter:
        """The error filter, whose response half runs only on a reply it may change: an error (400 and up) or
        one the gateway made itself (local_reply_config marks every local reply, gRPC refusals included). A
        service's successful reply skips it in the matcher, so the common case pays no second Lua coroutine;
        its request half always runs, since it records what the access log and the error messages need."""
        source = Lua(default_source_code=DataSource(inline_string=lua.rest_errors_source(self.d)))
        success = _response_status(XdsStringMatcher(safe_regex=RegexMatcher(
            google_re2=RegexMatcherGoogleRe2(), regex="^[1-3][0-9][0-9]$")))
        marked = _response_header(lua.LOCAL_REPLY_HEADER, XdsStringMatcher(safe_regex=RegexMatcher(
            google_re2=RegexMatcherGoogleRe2(), regex=".*")))
        matcher = _skip_when(MatcherMatcherListPredicate(and_matcher=MatcherMatcherListPredicatePredicateList(
            predicate=[success, MatcherMatcherListPredicate(not_matcher=marked)])))
        return _filter(REST_ERRORS_FILTER, ExtensionWithMatcher(
            extension_config=TypedExtensionConfig(name=REST_ERRORS_FILTER, typed_config=Any.pack(source)),
            xds_matcher=matcher,
        ))

    def _rest_grpc_headers(self) -> HttpFilter:
        """Removes the gRPC transport headers (grpc-status, grpc-message, grpc-accept-encoding, ...) from every
        REST response; a gRPC response skips it. Built in, so the successful REST replies that skip the error
        filter lose them too; placed after the error filter, it sees each response before that filter does.
        It tells gRPC by the response's content-type, not the request's: a request the connection manager refuses
        before any filter reads it still gets its gRPC local reply, grpc-status and all."""
        strip = HeaderMutation(mutations=Mutations(response_mutations=[
            HeaderMutationRule(remove_on_match=HeaderMutationRemoveOnMatch(key_matcher=StringMatcher(prefix="grpc-")))
        ]))
        return _filter(REST_GRPC_HEADERS_FILTER, ExtensionWithMatcher(
            extension_config=TypedExtensionConfig(name=REST_GRPC_HEADERS_FILTER, typed_config=Any.pack(strip)),
            xds_matcher=_skip_when(_response_header("content-type", XdsStringMatcher(prefix="application/grpc"))),
        ))

    def _rest_grpc_request_headers(self) -> HttpFilter:
        """Removes the headers gRPC reserves for its wire protocol (grpc-timeout, grpc-encoding, ...) from every REST
        request: the transcoder would pass them on to the service as if a gRPC client had sent them, so a REST
        client's grpc-timeout would set the service's deadline (the route's timeout governs REST calls). A gRPC
        request skips it by its content-type and keeps them, its deadline included. Runs before the transcoder,
        which adds the gRPC headers of the transcoded call itself."""
        strip = HeaderMutation(mutations=Mutations(request_mutations=[
            HeaderMutationRule(remove_on_match=HeaderMutationRemoveOnMatch(key_matcher=StringMatcher(prefix="grpc-")))
        ]))
        return _filter(REST_GRPC_REQUEST_HEADERS_FILTER, ExtensionWithMatcher(
            extension_config=TypedExtensionConfig(name=REST_GRPC_REQUEST_HEADERS_FILTER,
                                                  typed_config=Any.pack(strip)),
            xds_matcher=_skip_when(_grpc_request()),
        ))

    def _rest_body(self) -> HttpFilter:
        """The unknown-field check, run only where it can refuse something: on non-gRPC requests whose method
        an http rule with a body uses. Everything else (every GET, every native gRPC call) skips the filter in
        the matcher, so it pays no Lua coroutine; the script itself would let those requests pass unread."""
        source = Lua(default_source_code=DataSource(inline_string=lua.rest_body_source(self.contracts, self.d)))
        methods = lua.body_rule_methods(self.contracts)
        method_regex = RegexMatcher(google_re2=RegexMatcherGoogleRe2(),
                                    regex="^(?:" + "|".join(re.escape(m) for m in methods) + ")$")
        matcher = _skip_when(
            _grpc_request(),
            MatcherMatcherListPredicate(not_matcher=_request_header(":method",
                                                                    XdsStringMatcher(safe_regex=method_regex))),
        )
        return _filter(REST_BODY_FILTER, ExtensionWithMatcher(
            extension_config=TypedExtensionConfig(name=REST_BODY_FILTER, typed_config=Any.pack(source)),
            xds_matcher=matcher,
        ))

    def _rest_head(self) -> HttpFilter:
        """Drops the body of the response to a HEAD request, which the error filter answers as its GET; outside
        every filter that writes a body, so it sees the response after they have. A matcher runs it on HEAD
        requests only, so other requests pay no Lua coroutine for it."""
        source = Lua(default_source_code=DataSource(inline_string=lua.rest_head_source()))
        return _filter(REST_HEAD_FILTER, ExtensionWithMatcher(
            extension_config=TypedExtensionConfig(name=REST_HEAD_FILTER, typed_config=Any.pack(source)),
            xds_matcher=_skip_when(MatcherMatcherListPredicate(
                not_matcher=_request_header(":method", XdsStringMatcher(exact="HEAD")))),
        ))

    def http_filters(self) -> list[HttpFilter]:
        return [
            _filter("envoy.filters.http.header_mutation", self._header_mutation()),
            self._rest_head(),
            _filter(CORS_FILTER, Cors()),
            self._rest_errors(),
            self._rest_grpc_headers(),
            self._rest_grpc_request_headers(),
            _filter("envoy.filters.http.buffer", Buffer(max_request_bytes=self.d.limits.max_request_body_bytes)),
            self._rest_body(),
            _filter("envoy.filters.http.grpc_json_transcoder", self._transcoder()),
            _filter(JWT_FILTER, self._jwt()),
            self._token_claims(),
            self._canary_header(),
            _filter("envoy.filters.http.local_ratelimit", self._rate_limit()),
            _filter(RBAC_FILTER, RbacFilter(rules=Rbac(action=RbacAction.ALLOW, policies={}))),
            _filter("envoy.filters.http.router", Router(suppress_envoy_headers=True)),
        ]

    def _local_reply(self) -> LocalReplyConfig:
        """Marks every local reply (JWT, RBAC, rate limit, buffer, router, ...) with its HTTP status. Over gRPC a
        local reply is a trailers-only 200 whose grpc-status Envoy derives from that status; the error filter
        needs the status to give the refusal the same google.rpc.Status as over REST, and the mark to leave the
        services' own replies alone. Bodies are left as they are (the error filter writes the REST JSON)."""
        every_reply = AccessLogFilter(status_code_filter=StatusCodeFilter(comparison=ComparisonFilter(
            op=ComparisonFilterOp.GE, value=RuntimeUInt32(default_value=0, runtime_key=LOCAL_REPLY_RUNTIME_KEY))))
        return LocalReplyConfig(mappers=[ResponseMapper(
            filter=every_reply,
            headers_to_add=[_header(lua.LOCAL_REPLY_HEADER, "%RESPONSE_CODE%",
                                    HeaderValueOptionHeaderAppendAction.OVERWRITE_IF_EXISTS_OR_ADD)],
        )])

    # -- listener ----------------------------------------------------------------------------------------------

    def _access_log(self) -> AccessLog:
        fields = {
            "time": "%START_TIME%",
            "request_id": "%REQ(X-REQUEST-ID)%",
            "correlation_id": "%REQ(X-CORRELATION-ID)%",
            "protocol": "%DYNAMIC_METADATA(tessera.gateway:protocol)%",
            "rest_method": "%DYNAMIC_METADATA(tessera.gateway:method)%",
            "rest_path": "%DYNAMIC_METADATA(tessera.gateway:path)%",
            "route": "%ROUTE_NAME%",
            "status": "%RESPONSE_CODE%",
            "grpc_status": "%GRPC_STATUS(NUMBER)%",
            "details": "%RESPONSE_CODE_DETAILS%",
            "flags": "%RESPONSE_FLAGS%",
            "duration_ms": "%DURATION%",
            # From the request's first byte sent upstream to the response's first byte back (the router's
            # x-envoy-upstream-service-time header is suppressed, so the log cannot read it from the response).
            "upstream_ms": "%COMMON_DURATION(US_TX_BEG:US_RX_BEG:ms)%",
            "bytes_in": "%BYTES_RECEIVED%",
            "bytes_out": "%BYTES_SENT%",
            "upstream": "%UPSTREAM_HOST%",
            "subject": f"%DYNAMIC_METADATA({JWT_FILTER}:{JWT_PAYLOAD}:sub)%",
            "client": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%",
            "user_agent": "%REQ(USER-AGENT)%",
            "traceparent": "%REQ(TRACEPARENT)%",
            # The trace Envoy started or continued for this request: the same id as in the services' logs.
            "trace_id": "%TRACE_ID%",
        }
        return AccessLog(name="envoy.access_loggers.file", typed_config=Any.pack(FileAccessLog(
            path=self.d.access_log, log_format=SubstitutionFormatString(json_format=Struct.from_dict(fields)))))

    def connection_manager(self) -> HttpConnectionManager:
        lim = self.d.limits
        manager = HttpConnectionManager(
            stat_prefix="edge",
            codec_type=HttpConnectionManagerCodecType.AUTO,
            route_config=self.route_configuration(),
            http_filters=self.http_filters(),
            access_log=[self._access_log()],
            use_remote_address=True,
            # The client address (anonymous rate limits, access log) is read from x-forwarded-for past this many
            # trusted proxies in front of the gateway (none in dev; Istio's ingress gateway in the cluster).
            xff_num_trusted_hops=self.d.trusted_proxy_hops,
            generate_request_id=True,
            preserve_external_request_id=True,
            always_set_request_id_in_response=True,
            server_header_transformation=HttpConnectionManagerServerHeaderTransformation.PASS_THROUGH,
            common_http_protocol_options=HttpProtocolOptions(
                idle_timeout=_seconds(lim.idle_timeout_seconds),
                headers_with_underscores_action=HttpProtocolOptionsHeadersWithUnderscoresAction.REJECT_REQUEST,
                max_headers_count=100,
            ),
            http2_protocol_options=Http2ProtocolOptions(max_concurrent_streams=lim.http2_max_concurrent_streams),
            max_request_headers_kb=lim.max_request_headers_kb,
            request_headers_timeout=_seconds(lim.request_headers_timeout_seconds),
            stream_idle_timeout=_seconds(lim.stream_idle_timeout_seconds),
            normalize_path=True,
            merge_slashes=True,
            path_with_escaped_slashes_action=HttpConnectionManagerPathWithEscapedSlashesAction.REJECT_REQUEST,
            local_reply_config=self._local_reply(),
        )
        if self.d.tracing.enabled:
            self._add_tracing(manager)
        return manager

    # -- tracing -----------------------------------------------------------------------------------------------

    def _add_tracing(self, manager: HttpConnectionManager) -> None:
        """Envoy's OpenTelemetry tracer: a server span per request (continuing an incoming W3C traceparent) and an
        upstream client span, whose context goes to the service as `traceparent`; spans go over OTLP/gRPC."""
        t = self.d.tracing
        manager.tracing = HttpConnectionManagerTracing(
            random_sampling=Percent(value=t.sampling_percent),
            spawn_upstream_span=True,
            provider=TracingHttp(name="envoy.tracers.opentelemetry", typed_config=Any.pack(OpenTelemetryConfig(
                grpc_service=GrpcService(envoy_grpc=GrpcServiceEnvoyGrpc(cluster_name=TRACING_CLUSTER),
                                         timeout=_seconds(2)),
                service_name=t.service_name,
            ))),
        )
        # Envoy would otherwise rewrite one character of x-request-id to record why a request was traced; the
        # request id must reach the services and the access log exactly as the client sent it.
        manager.request_id_extension = RequestIdExtension(typed_config=Any.pack(UuidRequestIdConfig(
            pack_trace_reason=False, use_request_id_for_trace_sampling=False)))

    def tracing_cluster(self) -> Cluster:
        endpoint = self.d.tracing.otlp_endpoint
        assert endpoint is not None
        return Cluster(
            name=TRACING_CLUSTER,
            type=self._discovery(endpoint.host),
            dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
            connect_timeout=_seconds(1),
            load_assignment=ClusterLoadAssignment(cluster_name=TRACING_CLUSTER, endpoints=[LocalityLbEndpoints(
                lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_socket(endpoint)))])]),
            typed_extension_protocol_options={
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(UpstreamHttpProtocolOptions(
                    explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                        http2_protocol_options=Http2ProtocolOptions()),
                )),
            },
        )

    def listener(self) -> Listener:
        chain = FilterChain(filters=[Filter(name="envoy.filters.network.http_connection_manager",
                                            typed_config=Any.pack(self.connection_manager()))])
        if self.d.tls is not None:
            chain.transport_socket = TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(
                DownstreamTlsContext(common_tls_context=CommonTlsContext(
                    tls_certificates=[TlsCertificate(certificate_chain=DataSource(filename=self.d.tls.cert_file),
                                                     private_key=DataSource(filename=self.d.tls.key_file))],
                    alpn_protocols=["h2", "http/1.1"],
                ))))
        return Listener(name="edge", address=_socket(self.d.listener), filter_chains=[chain],
                        per_connection_buffer_limit_bytes=self.d.limits.max_request_body_bytes + 65536)

    # -- clusters ----------------------------------------------------------------------------------------------

    @staticmethod
    def _discovery(host: str) -> ClusterDiscoveryType:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return ClusterDiscoveryType.STRICT_DNS
        return ClusterDiscoveryType.STATIC

    def _checked_cluster(self, name: str, address: DescriptionAddress, **check: Any) -> Cluster:
        """A cluster of one upstream the gateway routes requests to: health-checked (`check` names the kind of
        check) and ejected on failures, with the description's upstream policy."""
        up = self.d.upstream
        hc, od = up.health_check, up.outlier_detection
        return Cluster(
            name=name,
            type=self._discovery(address.host),
            dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED,
            connect_timeout=_seconds(up.connect_timeout_seconds),
            load_assignment=ClusterLoadAssignment(cluster_name=name, endpoints=[LocalityLbEndpoints(
                lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_socket(address)))])]),
            health_checks=[HealthCheck(
                timeout=_seconds(hc.timeout_seconds), interval=_seconds(hc.interval_seconds),
                unhealthy_threshold=hc.unhealthy_threshold, healthy_threshold=hc.healthy_threshold,
                # Envoy checks a cluster with no traffic yet only once a minute by default: a gateway started
                # next to its services would then answer 503 for up to a minute after they became ready.
                no_traffic_interval=_seconds(hc.interval_seconds),
                unhealthy_interval=_seconds(hc.interval_seconds),
                **check,
            )],
            outlier_detection=OutlierDetection(
                consecutive_5xx=od.consecutive_5xx, consecutive_gateway_failure=od.consecutive_gateway_failure,
                enforcing_consecutive_gateway_failure=100, interval=_seconds(od.interval_seconds),
                base_ejection_time=_seconds(od.base_ejection_time_seconds),
                max_ejection_percent=od.max_ejection_percent,
            ),
        )

    def service_cluster(self, service: Service) -> Cluster:
        """A service: HTTP/2, gRPC health checks against the service's own name, circuit-breaker thresholds."""
        cb = self.d.upstream.circuit_breakers
        cluster = self._checked_cluster(
            service.context, self.d.upstream_address(service.context),
            grpc_health_check=HealthCheckGrpcHealthCheck(service_name=service.full_name))
        cluster.typed_extension_protocol_options = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": Any.pack(UpstreamHttpProtocolOptions(
                explicit_http_config=HttpProtocolOptionsExplicitHttpConfig(
                    http2_protocol_options=Http2ProtocolOptions(max_concurrent_streams=1000)),
            )),
        }
        cluster.circuit_breakers = CircuitBreakers(thresholds=[CircuitBreakersThresholds(
            priority=RoutingPriority.DEFAULT, max_connections=cb.max_connections,
            max_pending_requests=cb.max_pending_requests, max_requests=cb.max_requests,
            max_retries=cb.max_retries,
        )])
        return cluster

    def graphql_cluster(self) -> Cluster:
        """The GraphQL API: HTTP/1.1 (aiohttp), checked on its /health, ejected like a service on failures."""
        g = self.d.graphql
        assert g is not None
        return self._checked_cluster(GRAPHQL_CLUSTER, g.address,
                                     http_health_check=HealthCheckHttpHealthCheck(path="/health"))

    def jwks_cluster(self) -> Cluster | None:
        uri = self.d.jwt.jwks_uri
        if uri is None:
            return None
        host = uri.split("://", 1)[1].split("/", 1)[0]
        name, _, port = host.partition(":")
        tls = UpstreamTlsContext(sni=name)
        if self.d.jwt.jwks_ca_file:
            tls.common_tls_context = CommonTlsContext(validation_context=CertificateValidationContext(
                trusted_ca=DataSource(filename=self.d.jwt.jwks_ca_file)))
        return Cluster(
            name=JWKS_CLUSTER, type=ClusterDiscoveryType.STRICT_DNS,
            dns_lookup_family=ClusterDnsLookupFamily.V4_PREFERRED, connect_timeout=_seconds(5),
            load_assignment=ClusterLoadAssignment(cluster_name=JWKS_CLUSTER, endpoints=[LocalityLbEndpoints(
                lb_endpoints=[LbEndpoint(endpoint=Endpoint(address=_socket(
                    DescriptionAddress(name, int(port or 443)))))])]),
            transport_socket=TransportSocket(name="envoy.transport_sockets.tls", typed_config=Any.pack(tls)),
        )

    # -- bootstrap ---------------------------------------------------------------------------------------------

    def bootstrap(self) -> Bootstrap:
        clusters = [self.service_cluster(s) for s in self.contracts.services]
        if self.d.graphql is not None:
            clusters.append(self.graphql_cluster())
        jwks = self.jwks_cluster()
        if jwks is not None:
            clusters.append(jwks)
        if self.d.tracing.enabled:
            clusters.append(self.tracing_cluster())
        return Bootstrap(
            admin=Admin(address=_socket(self.d.admin)),
            static_resources=BootstrapStaticResources(listeners=[self.listener()], clusters=clusters),
            overload_manager=OverloadManager(resource_monitors=[ResourceMonitor(
                name="envoy.resource_monitors.global_downstream_max_connections",
                typed_config=Any.pack(DownstreamConnectionsConfig(
                    max_active_downstream_connections=self.d.limits.max_connections)),
            )]),
        )


def _proto_json_name(name: str) -> str:
    """protoc's json_name: underscores removed, the character after each one upper-cased."""
    out, upper = [], False
    for ch in name:
        if ch == "_":
            upper = True
        else:
            out.append(ch.upper() if upper else ch)
            upper = False
    return "".join(out)


@functools.cache
def _json_name_fixes() -> dict[str, str]:
    """Keys betterproto2 camel-cases differently from protoc (consecutive_5xx -> consecutive5Xx, not 5xx)."""
    fixes: dict[str, str] = {}
    pending = list(betterproto2.Message.__subclasses__())
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if not dataclasses.is_dataclass(cls):
            continue
        for f in dataclasses.fields(cls):
            produced = betterproto2.Casing.CAMEL(f.name).rstrip("_")
            expected = _proto_json_name(f.name.rstrip("_"))
            if produced != expected:
                fixes[produced] = expected
    return fixes


def _fix_keys(value: object, fixes: dict[str, str]) -> object:
    if isinstance(value, dict):
        return {fixes.get(k, k): _fix_keys(v, fixes) for k, v in value.items()}
    if isinstance(value, list):
        return [_fix_keys(v, fixes) for v in value]
    return value


def to_envoy_dict(bootstrap: Bootstrap) -> dict:
    """The bootstrap as proto3 JSON-ready data, with field names as Envoy's parser expects them."""
    fixed = _fix_keys(bootstrap.to_dict(), _json_name_fixes())
    assert isinstance(fixed, dict)
    return fixed


def render(bootstrap: Bootstrap, fmt: str = "yaml") -> str:
    """The bootstrap as Envoy reads it: proto3 JSON, or the same structure as YAML."""
    data = to_envoy_dict(bootstrap)
    if fmt == "json":
        return json.dumps(data, indent=2, sort_keys=False) + "\n"
    import yaml

    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)  # libyaml: ten times faster on this size
    return yaml.dump(data, Dumper=dumper, sort_keys=False, width=120)
