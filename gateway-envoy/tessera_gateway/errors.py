"""The gateway's error contract: the JSON shape of every REST error and the errors the gateway makes itself.

Every REST error body is the proto3 JSON of google.rpc.Status:

    {"code": <google.rpc.Code number>, "message": "<text for people>", "details": [<Any>, ...]}

Errors from a service are transcoded from its gRPC status and keep its details (ErrorInfo in the service's
domain, BadRequest for invalid input, ...). Errors the gateway makes itself carry one ErrorInfo in the gateway's
domain whose reason is one of GATEWAY_ERRORS, with metadata "request_id" (and the keys listed below), plus a
BadRequest naming the field for UNKNOWN_FIELD and UNKNOWN_QUERY_PARAMETER.

Over native gRPC the gateway's own refusals carry the same google.rpc.Status (code, message, ErrorInfo) in the
`grpc-status-details-bin` trailer, with grpc-status and grpc-message equal to its code and message.
"""

from __future__ import annotations

import dataclasses

# google.rpc.Code numbers.
CODES = {
    "OK": 0, "CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4, "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8, "FAILED_PRECONDITION": 9,
    "ABORTED": 10, "OUT_OF_RANGE": 11, "UNIMPLEMENTED": 12, "INTERNAL": 13, "UNAVAILABLE": 14, "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}

# The HTTP status of each gRPC code on REST (google.api / grpc-gateway mapping, which the transcoder applies).
HTTP_STATUS_OF_CODE = {
    "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400, "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400, "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
    "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
}


@dataclasses.dataclass(frozen=True)
class GatewayError:
    reason: str
    http_status: int
    code: str
    when: str
    metadata: tuple[str, ...] = ()  # ErrorInfo metadata keys besides request_id
    grpc_code: str | None = None  # the code over native gRPC, where gRPC's convention differs from REST's
    rest_only: bool = False  # only REST requests can cause it (JSON bodies, query parameters)

    @property
    def code_over_grpc(self) -> str | None:
        """The google.rpc.Code name a native gRPC client sees, or None if no gRPC call can cause this error."""
        if self.rest_only:
            return None
        return self.grpc_code or self.code


GATEWAY_ERRORS = (
    GatewayError("MALFORMED_REQUEST", 400, "INVALID_ARGUMENT",
                 "the body is not JSON of the request message, or a value has the wrong type, or the body gives a "
                 "field the path binds another value (BadRequest names it, in either spelling); over gRPC, a "
                 "request Envoy cannot accept (an escaped slash in the path)"),
    GatewayError("UNKNOWN_FIELD", 400, "INVALID_ARGUMENT",
                 "the JSON body names a field its message does not have (BadRequest lists each)", ("field",),
                 rest_only=True),
    GatewayError("UNKNOWN_QUERY_PARAMETER", 400, "INVALID_ARGUMENT",
                 "a query parameter names no field of the request (BadRequest names it)", ("field",),
                 rest_only=True),
    GatewayError("TOKEN_MISSING", 401, "UNAUTHENTICATED", "the route needs a bearer token and none was sent"),
    GatewayError("TOKEN_EXPIRED", 401, "UNAUTHENTICATED", "the token's exp has passed"),
    GatewayError("TOKEN_INVALID", 401, "UNAUTHENTICATED",
                 "bad signature, unknown key, wrong issuer or audience, no subject (sub), a control character in "
                 "sub or scope, a scope that is not a string, no exp, a lifetime over the cap, or a malformed token"),
    GatewayError("MISSING_SCOPE", 403, "PERMISSION_DENIED",
                 "the token's scope claim has none of the scopes the RPC needs", ("required_scopes",)),
    # gRPC's own word for a method the server does not have is UNIMPLEMENTED.
    GatewayError("ROUTE_NOT_FOUND", 404, "NOT_FOUND",
                 "no REST route matches the method and path, or no route matches the gRPC method",
                 grpc_code="UNIMPLEMENTED"),
    GatewayError("PAYLOAD_TOO_LARGE", 413, "RESOURCE_EXHAUSTED", "the request body exceeds the size limit"),
    GatewayError("RATE_LIMITED", 429, "RESOURCE_EXHAUSTED",
                 "the client's token bucket of the route class is empty; retry-after says when to retry",
                 ("route_class",)),
    GatewayError("UPSTREAM_UNAVAILABLE", 503, "UNAVAILABLE",
                 "the service is down, unhealthy, or its circuit breaker is open", ("service",)),
    GatewayError("UPSTREAM_TIMEOUT", 504, "DEADLINE_EXCEEDED",
                 "the service did not answer within the route timeout", ("service",)),
    GatewayError("GATEWAY_ERROR", 500, "INTERNAL", "any other error the gateway produces itself"),
)

BY_REASON = {e.reason: e for e in GATEWAY_ERRORS}


def code_of_http_status(status: int) -> str:
    """The gRPC code name the gateway reports for a local reply with this HTTP status and no better reason."""
    special = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
               405: "UNIMPLEMENTED", 408: "DEADLINE_EXCEEDED", 409: "ABORTED", 413: "RESOURCE_EXHAUSTED",
               429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL", 501: "UNIMPLEMENTED",
               502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
    if status in special:
        return special[status]
    return "INVALID_ARGUMENT" if 400 <= status < 500 else "UNKNOWN"


def markdown_table(*, grpc: bool = False) -> str:
    """The gateway's own errors as a Markdown table, for the OpenAPI description (REST) and, with the code each
    has over native gRPC, for the README."""
    head = "| HTTP | code | reason | when | metadata |"
    if grpc:
        head = "| HTTP | code | gRPC code | reason | when | metadata |"
    rows = [head, "|---" * head.count(" | ") + "|---|"]
    for e in GATEWAY_ERRORS:
        keys = ", ".join(("request_id", *e.metadata))
        cells = [str(e.http_status), f"{CODES[e.code]} {e.code}"]
        if grpc:
            over_grpc = e.code_over_grpc
            cells.append(f"{CODES[over_grpc]} {over_grpc}" if over_grpc else "(REST only)")
        cells += [f"`{e.reason}`", e.when, keys]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)
