"""The GraphQL API's own metrics, at its /metrics beside the runtime's (tessera_ready, circuits, client RED).

A service's error reaches a GraphQL caller as an entry of `errors` in an HTTP 200, so the HTTP outcome alone says
nothing of it: each operation is counted again by how its answer ended, and by the codes of its errors.

| name | type | labels | meaning |
|---|---|---|---|
| tessera_graphql_requests_total | counter | outcome (ok, client_error, server_error) | /graphql HTTP requests |
| tessera_graphql_request_duration_seconds | histogram | outcome | /graphql HTTP request latency |
| tessera_graphql_operations_total | counter | operation_type (OPERATION_TYPES), outcome (OUTCOMES) | operations run |
| tessera_graphql_operation_duration_seconds | histogram | operation_type | an operation's parse to its answer |
| tessera_graphql_errors_total | counter | code (CODES) | operations answered with an error of `code` |

An operation's outcome is ok (no errors), partial (data and errors) or error (no data); its type is query, mutation
or unknown (a document that does not parse). An operation with errors of two codes counts once under each.

The labels are closed sets: an operation's type, never the operation name a client chose (free text: one series
per name a client invents), and a code from CODES, never a message, path or field name.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import grpc
from graphql import GraphQLError, GraphQLSyntaxError
from prometheus_client import Counter, Histogram
from strawberry.extensions import SchemaExtension

# The `code` an error's extensions carry: a service's (or this API's) gRPC status name. An error of GraphQL itself
# has no code; it counts as GRAPHQL_PARSE_FAILED (the document is no GraphQL, or has more tokens than
# TESSERA_GRAPHQL_MAX_TOKENS: the parser stops there) or GRAPHQL_VALIDATION_FAILED (it names what the schema lacks,
# breaks the depth, alias or one-mutation limit, or its variables do not fit), and an error no resolver meant to
# show (answered "Unexpected error.") as INTERNAL.
PARSE_FAILED = "GRAPHQL_PARSE_FAILED"
VALIDATION_FAILED = "GRAPHQL_VALIDATION_FAILED"
CODES = (*(c.name for c in grpc.StatusCode if c is not grpc.StatusCode.OK), PARSE_FAILED, VALIDATION_FAILED)
# The codes that are the system's fault, not the caller's: the set TesseraGrpcServerErrors counts for a service.
SERVER_CODES = ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS")
OPERATION_TYPES = ("query", "mutation", "unknown")
OUTCOMES = ("ok", "partial", "error")

REQUESTS = Counter("tessera_graphql_requests_total", "GraphQL HTTP requests by outcome.", ["outcome"])
DURATION = Histogram("tessera_graphql_request_duration_seconds", "GraphQL HTTP request latency.", ["outcome"],
                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
OPERATIONS = Counter(
    "tessera_graphql_operations_total",
    "GraphQL operations run, by type and outcome: ok (no errors), partial (data and errors), error (no data).",
    ["operation_type", "outcome"])
OPERATION_DURATION = Histogram(
    "tessera_graphql_operation_duration_seconds", "Time a GraphQL operation took, from its parse to its answer.",
    ["operation_type"], buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
ERRORS = Counter(
    "tessera_graphql_errors_total",
    "GraphQL operations whose answer has at least one error with this extensions code, once per code.", ["code"])

# Every series exists from the start, at 0: a ratio over them, and a rule or panel reading them, has series to read
# before the first failure.
for _type in OPERATION_TYPES:
    OPERATION_DURATION.labels(_type)
    for _outcome in OUTCOMES:
        OPERATIONS.labels(_type, _outcome)
for _code in CODES:
    ERRORS.labels(_code)


def error_code(error: GraphQLError) -> str:
    """The label of an error of an answer: its extensions code, or the code of what kind of error it is."""
    code = (error.extensions or {}).get("code")
    if isinstance(code, str):
        return code if code in CODES else "UNKNOWN"
    if isinstance(error, GraphQLSyntaxError) or isinstance(error.original_error, GraphQLSyntaxError):
        return PARSE_FAILED
    if error.original_error is not None and not isinstance(error.original_error, GraphQLError):
        return "INTERNAL"
    if error.message == "Unexpected error.":  # the masked form of the above, which keeps no original error
        return "INTERNAL"
    return VALIDATION_FAILED


def outcome_of(data: Any, errors: list[GraphQLError] | None) -> str:
    if not errors:
        return "ok"
    if not isinstance(data, dict) or all(value is None for value in data.values()):
        return "error"
    return "partial"


class OperationMetrics(SchemaExtension):
    """Counts each operation the schema runs by how its answer ended, and the codes of its errors."""

    def on_operation(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        context = self.execution_context
        try:
            kind = context.operation_type.value
        except Exception:  # no document (a syntax error), or no operation in it
            kind = "unknown"
        if kind not in OPERATION_TYPES:
            kind = "unknown"
        result = context.result
        errors = list(getattr(result, "errors", None) or context.pre_execution_errors or [])
        OPERATIONS.labels(kind, outcome_of(getattr(result, "data", None), errors)).inc()
        OPERATION_DURATION.labels(kind).observe(time.perf_counter() - start)
        for code in sorted({error_code(e) for e in errors}):
            ERRORS.labels(code).inc()
