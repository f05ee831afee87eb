"""The OpenAPI 3.1 document generated from the descriptors and http rules."""

from __future__ import annotations

import json

import pytest

from tessera_gateway import DESCRIPTOR_SET, errors, openapi
from tessera_gateway.description import load
from tessera_gateway.descriptors import Contracts


@pytest.fixture(scope="module")
def contracts() -> Contracts:
    return Contracts.load(DESCRIPTOR_SET)


@pytest.fixture(scope="module")
def doc(contracts) -> dict:
    return openapi.build(contracts, load("dev"))


def test_every_rpc_has_an_operation(contracts, doc):
    seen = set()
    for rpc in contracts.rpcs:
        op = doc["paths"][openapi.openapi_path(rpc.http.path)][rpc.http.method.lower()]
        assert op["x-grpc-method"] == rpc.grpc_path
        seen.add(op["operationId"])
    assert len(seen) == len(contracts.rpcs) == 32
    assert doc["openapi"] == "3.1.0"


def test_parameters_bodies_and_security(doc):
    get_user = doc["paths"]["/v1/users/{id}"]["get"]
    assert get_user["parameters"] == [{"name": "id", "in": "path", "required": True,
                                       "schema": {"type": "string", "format": "uuid"},
                                       "description": "Id of the account. Required; a UUID."}]
    assert get_user["security"] == [{"bearerAuth": ["user:read", "admin"]}]
    listing = {p["name"]: p for p in doc["paths"]["/v1/users"]["get"]["parameters"]}
    assert set(listing) == {"page_size", "page_token", "status"}
    assert listing["status"]["schema"] == {"$ref": "#/components/schemas/tessera.user.v1.UserStatus"}
    create = doc["paths"]["/v1/users"]["post"]
    assert [p["name"] for p in create["parameters"]] == ["request_id"]
    assert create["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/tessera.user.v1.User"}
    update = doc["paths"]["/v1/users/{user_id}"]["patch"]
    assert update["parameters"][0]["x-field-path"] == "user.id"
    body = update["requestBody"]["content"]["application/json"]["schema"]
    assert "id" not in body["properties"] and "displayName" in body["properties"]
    batch = {p["name"]: p for p in doc["paths"]["/v1/products:batchGet"]["get"]["parameters"]}
    assert batch["ids"]["schema"]["type"] == "array" and batch["ids"]["explode"] is True


def test_schemas_follow_the_proto3_json_mapping(doc):
    user = doc["components"]["schemas"]["tessera.user.v1.User"]
    props = user["properties"]
    assert user["additionalProperties"] is False
    assert props["id"]["readOnly"] is True and props["id"]["format"] == "uuid"
    assert props["email"]["format"] == "email"
    assert props["version"]["type"] == ["string", "integer"] and props["version"]["format"] == "int64"
    assert props["createTime"]["format"] == "date-time"
    assert props["status"]["$ref"] == "#/components/schemas/tessera.user.v1.UserStatus"
    assert doc["components"]["schemas"]["tessera.user.v1.UserStatus"]["enum"] == [
        "USER_STATUS_UNSPECIFIED", "USER_STATUS_ACTIVE", "USER_STATUS_INACTIVE"]
    reserve = doc["components"]["schemas"]["tessera.inventory.v1.ReserveStockRequest"]["properties"]
    assert reserve["ttl"]["pattern"].endswith("s$")
    failure = doc["components"]["schemas"]["tessera.order.v1.OrderFailure"]["properties"]
    assert failure["metadata"]["type"] == "object" and failure["metadata"]["additionalProperties"] == {
        "type": "string"}


def test_errors_share_one_documented_shape(doc):
    status = doc["components"]["schemas"]["google.rpc.Status"]
    assert status["required"] == ["code", "message", "details"]
    detail_refs = [d.get("$ref") for d in status["properties"]["details"]["items"]["anyOf"]]
    assert "#/components/schemas/google.rpc.ErrorInfo.Detail" in detail_refs
    assert "#/components/schemas/google.rpc.BadRequest.Detail" in detail_refs
    responses = doc["paths"]["/v1/orders"]["post"]["responses"]
    assert {"200", "400", "401", "403", "404", "409", "413", "429", "503", "504", "default"} <= set(responses)
    assert "retry-after" in doc["components"]["responses"]["Error429"]["headers"]
    rate_limit = {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"}
    assert rate_limit <= set(doc["components"]["responses"]["Error429"]["headers"])
    assert rate_limit <= set(responses["200"]["headers"])
    for response in (responses["200"], *doc["components"]["responses"].values()):
        assert {"x-request-id", "x-correlation-id"} <= set(response["headers"])
    for e in errors.GATEWAY_ERRORS:
        assert f"`{e.reason}`" in doc["info"]["description"]


def test_every_reference_resolves(doc):
    refs = set()

    def walk(value):
        if isinstance(value, dict):
            if "$ref" in value:
                refs.add(value["$ref"])
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(doc)
    for ref in refs:
        node = doc
        for part in ref.removeprefix("#/").split("/"):
            node = node[part]
        assert node, ref
    json.dumps(doc)  # serialisable as served


def test_security_scheme_is_bearer_jwt(doc):
    scheme = doc["components"]["securitySchemes"]["bearerAuth"]
    assert scheme["type"] == "http" and scheme["scheme"] == "bearer" and scheme["bearerFormat"] == "JWT"
    assert doc["paths"]["/openapi.json"]["get"]["security"] == []


def test_the_cli_writes_the_document(tmp_path):
    out = tmp_path / "openapi.json"
    assert openapi.main(["--out", str(out)]) == 0
    assert json.loads(out.read_text())["info"]["title"] == "Tessera API"
