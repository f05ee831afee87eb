"""The GraphQL schema's own rules, with a fake of the services (the integration tests use the real ones)."""

from __future__ import annotations

import re

import grpc
from graphql import GraphQLInputObjectType, GraphQLList, get_nullable_type

from tessera_graphql.schema import ARGUMENTS, Context, build_schema
from tessera_graphql.upstream import UpstreamError
from tessera_runtime import context as callctx
from tessera_runtime.errors import FieldViolation, violations_text


class _Stubs:
    """Stands in for the service stubs: each attribute is a method the resolvers pass to Upstream.call."""

    def __getattr__(self, name: str):
        return name


class _Upstream:
    def __init__(self, fail: Exception) -> None:
        self.fail = fail
        self.users = self.inventory = self.orders = _Stubs()

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
