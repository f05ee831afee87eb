"""The GraphQL schema's own rules, with a fake of the services (the integration tests use the real ones)."""

from __future__ import annotations

import re

import grpc
from google.rpc import error_details_pb2
from graphql import GraphQLError, GraphQLInputObjectType, GraphQLList, get_nullable_type

from tessera_graphql import metrics
from tessera_graphql.schema import ARGUMENTS, Context, build_schema
from tessera_graphql.upstream import UpstreamError
from tessera_runtime import context as callctx
from tessera_runtime.errors import FieldViolation, InvalidArgument, violations_text


class _Stubs:
    """Stands in for the service stubs: each attribute is a method the resolvers pass to Upstream.call."""

    def __getattr__(self, name: str):
        return name


class _Upstream:
    def __init__(self, fail: Exception) -> None:
        self.fail = fail
        self.users = self.inventory = self.orders = self.analytics = _Stubs()

    async def call(self, method, request):
        raise self.fail


async def _run(query: str, fail: Exception):
    principal = callctx.Principal("0b6f7d2c-3c1e-4d1a-9a59-6f1d1b9f1e2a", frozenset({"admin"}))
    return await build_schema().execute(query, context_value={
        "principal": principal, "tessera": Context(_Upstream(fail))})  # type: ignore[arg-type]


async def test_an_unexpected_error_is_masked_and_the_services_answers_are_not():
    hidden = await _run('{ product(id: "p") { name } }', RuntimeError("connection pool of 10.0.0.7 exhausted"))
    assert [e.message for e in hidden.errors] == ["Unexpected error."]
    shown = await _run('{ product(id: "p") { name } }', UpstreamError(
        grpc.StatusCode.NOT_FOUND, "product p not found", reason="PRODUCT_NOT_FOUND"))
    assert [(e.message, e.extensions["reason"]) for e in shown.errors] == [("product p not found",
                                                                             "PRODUCT_NOT_FOUND")]
    invalid = await _run("{ product { name } }", RuntimeError("never called"))
    assert "Query.product(id:)" in invalid.errors[0].message  # GraphQL's own validation, shown as it is


async def test_a_violation_of_a_field_the_api_filled_itself_names_no_argument():
    """updateDisplayName fills update_mask itself and `me` sends the token's subject as the id: a violation of such
    a field has `field` null (no input of the caller's to mark) and keeps the contract's name in contractField."""
    refused = [("update_mask", "must name at least one path"), ("user.display_name", "is required")]
    shown = await _run('mutation { updateDisplayName(id: "u", displayName: "") { id } }', UpstreamError(
        grpc.StatusCode.INVALID_ARGUMENT, violations_text([FieldViolation(f, d) for f, d in refused]),
        reason="INVALID_ARGUMENT", violations=tuple(refused)))
    [error] = shown.errors
    assert [(v["field"], v["contractField"]) for v in error.extensions["fieldViolations"]] == [
        (None, "update_mask"), ("displayName", "user.display_name")]
    assert error.message == "invalid request: update_mask: must name at least one path; displayName: is required"

    shown = await _run("{ me { id } }", UpstreamError(grpc.StatusCode.INVALID_ARGUMENT, "id is not one we know",
                                                       violations=(("id", "is not one we know"),)))
    [error] = shown.errors
    assert error.extensions["fieldViolations"] == [{"field": None, "contractField": "id",
                                                    "description": "is not one we know"}]
    assert error.message == "id is not one we know", "a message of the service's own words is shown as it is"


def _refusal(*violations: tuple[str, str]) -> UpstreamError:
    """What the service's InvalidArgument of `violations` reaches the API as: its message and its BadRequest (both
    as many as a status carries)."""
    error = InvalidArgument([FieldViolation(f, d) for f, d in violations], domain="tessera.dev")
    bad = error_details_pb2.BadRequest()
    error.details()[1].Unpack(bad)
    return UpstreamError(grpc.StatusCode.INVALID_ARGUMENT, error.message, reason="INVALID_ARGUMENT",
                         violations=tuple((v.field, v.description) for v in bad.field_violations))


async def test_a_description_naming_a_contract_field_names_the_argument_the_caller_sent_instead():
    shown = await _run('{ dailyMetricsRange(startDate: "2026-05-03", endDate: "2026-05-01") { nextPageToken } }',
                       _refusal(("end_date", "must not be before start_date (2026-05-03)")))
    [error] = shown.errors
    assert error.extensions["fieldViolations"] == [{"field": "endDate", "contractField": "end_date",
                                                    "description": "must not be before startDate (2026-05-03)"}]
    assert error.message == "invalid request: endDate: must not be before startDate (2026-05-03)"

    # An item's path, with its index; a plain word that is also a field's name ("items") is left as it is.
    shown = await _run(
        'mutation { createOrder(input: {customerId: "c", items: [], paymentMethod: "p", currencyCode: "EUR", '
        'requestId: "r"}) { id } }',
        _refusal(("items[1].product_id", "names the product items[0].product_id names"),
                 ("items", "must contain at most 50 items")))
    [error] = shown.errors
    assert [v["description"] for v in error.extensions["fieldViolations"]] == [
        "names the product input.items[0].productId names", "must contain at most 50 items"]
    assert "product_id" not in error.message

    # A field the API filled itself has no argument of the caller's to name: its contract name stays.
    shown = await _run('mutation { updateDisplayName(id: "u", displayName: "") { id } }',
                       _refusal(("user.display_name", "is required when update_mask names it")))
    assert shown.errors[0].extensions["fieldViolations"][0]["description"] == "is required when update_mask names it"


async def test_a_violation_list_the_service_cut_short_names_the_arguments_and_keeps_its_count():
    """Forty items with a malformed product id and quantity: the service's message lists the first few and counts
    the rest, and its BadRequest lists as many as fit and says how many more it left out."""
    refused = [v for i in range(40) for v in ((f"items[{i}].product_id", "must be a UUID such as "
                                               "0b6f7d2c-3c1e-4d1a-9a59-6f1d1b9f1e2a"),
                                              (f"items[{i}].quantity", "must be between 1 and 1000"))]
    sent = _refusal(*refused)
    assert len(sent.violations) < len(refused) and sent.message.endswith(" more"), "the service cut both lists"
    [listing, rest] = re.fullmatch(r"invalid request: (.*); and (\d+) more", sent.message).groups()
    shown = await _run(
        'mutation { createOrder(input: {customerId: "c", items: [], paymentMethod: "p", currencyCode: "EUR", '
        'requestId: "r"}) { id } }', sent)
    [error] = shown.errors
    listed = listing.count("; ") + 1
    assert error.message == "invalid request: " + "; ".join(
        f"{v['field']}: {v['description']}" for v in error.extensions["fieldViolations"][:listed]
    ) + f"; and {rest} more"
    assert error.message.startswith("invalid request: input.items[0].productId: must be a UUID")
    assert "product_id" not in error.message and "; items[" not in error.message


def test_every_argument_path_is_one_the_schema_has():
    """Each field violation's GraphQL path is an argument of its field, or an input field (a list's item) within one:
    a path misspelled here, or an argument renamed in the schema, fails this test."""
    schema = build_schema()._schema
    for key, arguments in ARGUMENTS.items():
        type_name, field_name = key.split(".")
        field = schema.get_type(type_name).fields[field_name]
        for contract_path, path in arguments.paths.items():
            [argument, *rest] = re.findall(r"[^.\[\]]+|\[\]", path)
            assert argument in field.args, f"{key}: {path} ({contract_path})"
            current = get_nullable_type(field.args[argument].type)
            for part in rest:
                if part == "[]":
                    assert isinstance(current, GraphQLList), f"{key}: {path} ({contract_path})"
                    current = get_nullable_type(current.of_type)
                else:
                    assert isinstance(current, GraphQLInputObjectType) and part in current.fields, f"{key}: {path}"
                    current = get_nullable_type(current.fields[part].type)
            assert path.count("[]") == contract_path.count("[]"), f"{key}: {path} ({contract_path})"


def _counts() -> dict[tuple[str, ...], float]:
    return {(s.name, *sorted(s.labels.values())): s.value
            for family in (metrics.OPERATIONS, metrics.ERRORS) for s in family.collect()[0].samples}


async def _moved(query: str, fail: Exception) -> dict[tuple[str, ...], float]:
    before = _counts()
    await _run(query, fail)
    return {k: v - before.get(k, 0) for k, v in _counts().items() if v != before.get(k, 0)}


async def test_graphqls_own_refusals_and_a_masked_error_are_counted_with_codes_of_their_own():
    never = RuntimeError("never called")
    assert await _moved("{ product { name } }", never) == {
        ("tessera_graphql_operations_total", "error", "query"): 1,
        ("tessera_graphql_errors_total", "GRAPHQL_VALIDATION_FAILED"): 1}
    assert await _moved("{ product(id: ", never) == {
        ("tessera_graphql_operations_total", "error", "unknown"): 1,
        ("tessera_graphql_errors_total", "GRAPHQL_PARSE_FAILED"): 1}
    # An error no resolver meant to show is answered "Unexpected error." with no code: it is the API's INTERNAL.
    assert await _moved('{ product(id: "p") { name } }', RuntimeError("pool of 10.0.0.7 exhausted")) == {
        ("tessera_graphql_operations_total", "error", "query"): 1,
        ("tessera_graphql_errors_total", "INTERNAL"): 1}
    # A code outside the closed set (none the API makes today) is never a label value of its own.
    assert metrics.error_code(GraphQLError("x", extensions={"code": "SOMETHING free text"})) == "UNKNOWN"
