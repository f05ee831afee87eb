"""The gRPC services behind the GraphQL API, called for the caller: with their identity, ids and deadline, and
only with the scopes the edge would ask of the same RPC over REST.

Which scope an RPC needs comes from the gateway's own description (gateway-envoy/gateway.yaml and the contracts'
descriptor set): the convention `<context>:read` / `<context>:write` and its overrides (reservations and payments
need `admin`). So a GraphQL query can read and change nothing the caller's token could not over REST or native
gRPC through the gateway, and the services still decide whose data it is (a customer reads only their own). The
same description names the scopes that may choose a service's canary (`canary_scope`, and `admin_scope`): only for
a caller holding one does a request's `canary: true` follow its calls (app.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping

import grpc
from tessera.analytics.v1 import analytics_service_pb2, analytics_service_pb2_grpc
from tessera.inventory.v1 import inventory_service_pb2, inventory_service_pb2_grpc
from tessera.order.v1 import order_service_pb2, order_service_pb2_grpc
from tessera.user.v1 import user_service_pb2, user_service_pb2_grpc

from tessera_runtime import context as callctx
from tessera_runtime.clients import NOT_SENT_REASONS, error_details, open_channel
from tessera_runtime.config import CircuitSettings
from tessera_runtime.discovery.model import DiscoverySettings
from tessera_runtime.errors import FieldViolation, violations_text

USER = user_service_pb2.DESCRIPTOR.services_by_name["UserService"]
INVENTORY = inventory_service_pb2.DESCRIPTOR.services_by_name["InventoryService"]
ORDER = order_service_pb2.DESCRIPTOR.services_by_name["OrderService"]
ANALYTICS = analytics_service_pb2.DESCRIPTOR.services_by_name["AnalyticsService"]


def _no_argument(field: str) -> None:
    """No contract field came from a GraphQL argument: the API filled the whole request itself."""
    return None


class UpstreamError(Exception):
    """A call the GraphQL API made failed, or was not made: its gRPC status and the ErrorInfo and BadRequest the
    service (or this layer) gave, for the `extensions` of the GraphQL error."""

    def __init__(self, code: grpc.StatusCode, message: str, *, reason: str = "", domain: str = "",
                 metadata: Mapping[str, str] | None = None,
                 violations: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason
        self.domain = domain
        self.metadata = dict(metadata or {})
        self.violations = violations

    @classmethod
    def from_rpc(cls, err: grpc.aio.AioRpcError) -> UpstreamError:
        info, bad = error_details(err)
        if info is None:  # no service answered (unreachable, timed out): gRPC's own text names cluster addresses
            return cls(err.code(), _NO_ANSWER.get(err.code(), "the service could not be used"))
        if info.reason in NOT_SENT_REASONS:
            # Refused by this process's own circuit breaker, or no healthy instance was discovered: no service
            # answered, and its text and metadata name the service's address. The reason stays; the rest is the
            # words of any unreachable service.
            return cls(err.code(), _NO_ANSWER[grpc.StatusCode.UNAVAILABLE], reason=info.reason, domain=info.domain)
        return cls(err.code(), err.details() or "", reason=info.reason, domain=info.domain,
                   metadata=info.metadata,
                   violations=tuple((v.field, v.description) for v in bad.field_violations) if bad else ())

    def shown_message(self, argument: Callable[[str], str | None] = _no_argument) -> str:
        """The message, naming the GraphQL arguments where the service's own text named the contract's fields: its
        list of violations whole, or cut short with the count of the rest the service gave. A message of the
        service's own words is shown as it is."""
        if not self.violations:
            return self.message
        sent = [FieldViolation(f, d) for f, d in self.violations]
        shown = self._shown(argument)
        if self.message == violations_text(sent):
            return _listing(shown)
        cut = _CUT_SHORT.fullmatch(self.message)
        if cut is not None:
            # The BadRequest may list more than the message (or fewer than the request broke, cut short itself): the
            # message listed the first `listed`, and its count of the rest is the service's.
            for listed in range(1, len(sent)):
                if violations_text(sent[:listed]) == cut.group(1):
                    return f"{_listing(shown[:listed])}; and {cut.group(2)} more"
        return self.message

    def _shown(self, argument: Callable[[str], str | None]) -> list[FieldViolation]:
        return [FieldViolation(argument(f) or f, in_callers_words(d, argument)) for f, d in self.violations]

    def extensions(self, argument: Callable[[str], str | None] = _no_argument) -> dict[str, object]:
        """The GraphQL error's extensions; `argument` gives the path of the GraphQL argument (or input field) the
        caller sent a contract field at, or None for a field the GraphQL API filled itself."""
        data: dict[str, object] = {"code": self.code.name}
        if self.reason:
            data["reason"] = self.reason
        if self.domain:
            data["domain"] = self.domain
        if self.metadata:
            data["metadata"] = self.metadata
        if self.violations:
            data["fieldViolations"] = [{"field": argument(f), "contractField": f,
                                        "description": in_callers_words(d, argument)} for f, d in self.violations]
        return data


# A contract's field path as a description may name it: snake_case, dotted, with list indexes ("start_date",
# "items[0].product_id"). Only a name that is more than one plain word is taken for a field: "items" or "status" in
# a description is as likely an English word.
_CONTRACT_PATH = re.compile(r"(?<![\w.\[\]])[a-z][a-z0-9]*(?:_[a-z0-9]+)*(?:\[\d+\])?"
                            r"(?:\.[a-z][a-z0-9]*(?:_[a-z0-9]+)*(?:\[\d+\])?)*(?![\w\[])")
_CUT_SHORT = re.compile(r"(.*); and (\d+) more", re.DOTALL)


def in_callers_words(description: str, argument: Callable[[str], str | None]) -> str:
    """A violation's description with each contract field it names that the caller sent as a GraphQL argument (or
    input field) named by that argument's path instead: "must not be before start_date" → "... before startDate"."""

    def rename(match: re.Match[str]) -> str:
        name = match.group(0)
        if not any(mark in name for mark in "_.["):
            return name
        return argument(name) or name

    return _CONTRACT_PATH.sub(rename, description)


def _listing(violations: list[FieldViolation]) -> str:
    return "invalid request: " + "; ".join(f"{v.field}: {v.description}" for v in violations)


_NO_ANSWER = {
    grpc.StatusCode.UNAVAILABLE: "the service could not be reached; retry later",
    grpc.StatusCode.DEADLINE_EXCEEDED: "the service did not answer in time",
}


@dataclasses.dataclass(frozen=True)
class Scopes:
    """The scopes each RPC needs (any one grants it), the scope that grants every RPC, and the scope that lets a
    caller choose the canary of the services it calls (the gateway's `canary_scope`; the admin scope does too)."""

    needed: Mapping[str, tuple[str, ...]]  # "/package.Service/Method" → scopes
    admin: str
    canary: str

    @classmethod
    def from_gateway(cls, profile: str) -> Scopes:
        from tessera_gateway import DESCRIPTOR_SET
        from tessera_gateway import description as gd
        from tessera_gateway.descriptors import Contracts

        described = gd.load(profile)
        contracts = Contracts.load(DESCRIPTOR_SET)
        return cls({f"/{s.full_name}/{r.name}": described.policy(r, s).scopes
                    for s in contracts.services for r in s.rpcs}, described.admin_scope, described.canary_scope)

    def may_choose_canary(self, principal: callctx.Principal) -> bool:
        """Whether the caller may send its calls to the services' canaries, as the gateway decides it: the canary
        or the admin scope, as a whole scope of the verified token."""
        return self.canary in principal.scopes or self.admin in principal.scopes

    def check(self, method: str) -> None:
        principal = callctx.current_principal()
        needed = self.needed.get(method)
        if needed is None:
            raise UpstreamError(grpc.StatusCode.INTERNAL, f"{method} is not a method of the contracts")
        if principal is None:
            raise UpstreamError(grpc.StatusCode.UNAUTHENTICATED, "the request carries no caller identity",
                                reason="TOKEN_MISSING")
        if self.admin in principal.scopes or any(s in principal.scopes for s in needed):
            return
        raise UpstreamError(grpc.StatusCode.PERMISSION_DENIED,
                            f"the token lacks the scope {' or '.join(needed)} this field needs",
                            reason="MISSING_SCOPE", metadata={"scopes": " ".join(needed), "method": method})


class _ScopeInterceptor(grpc.aio.UnaryUnaryClientInterceptor):
    """Refuses, before it leaves, a call the caller's token has no scope for."""

    def __init__(self, scopes: Scopes) -> None:
        self.scopes = scopes

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        method = client_call_details.method
        self.scopes.check(method.decode() if isinstance(method, bytes) else method)
        return await continuation(client_call_details, request)


class Upstream:
    """One channel per service, shared by every request; stubs whose failures are UpstreamError."""

    def __init__(self, addresses: Mapping[str, str], scopes: Scopes, default_deadline: float,
                 circuit: CircuitSettings = CircuitSettings(), discovery: DiscoverySettings | None = None) -> None:
        guard = _ScopeInterceptor(scopes)
        self.channels = {
            name: open_channel(addresses[name], [service], default_deadline=default_deadline,
                               extra_interceptors=(guard,), circuit=circuit, discovery=discovery)
            for name, service in (("user", USER), ("inventory", INVENTORY), ("order", ORDER),
                                  ("analytics", ANALYTICS))
        }
        self.users = user_service_pb2_grpc.UserServiceStub(self.channels["user"])
        self.inventory = inventory_service_pb2_grpc.InventoryServiceStub(self.channels["inventory"])
        self.orders = order_service_pb2_grpc.OrderServiceStub(self.channels["order"])
        self.analytics = analytics_service_pb2_grpc.AnalyticsServiceStub(self.channels["analytics"])

    async def call(self, method, request):
        try:
            return await method(request)
        except grpc.aio.AioRpcError as err:
            raise UpstreamError.from_rpc(err) from None

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
