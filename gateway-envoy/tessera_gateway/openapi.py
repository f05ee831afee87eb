"""OpenAPI 3.1 document of the REST API, generated from the same descriptors and http rules as the gateway.

Usage: python -m tessera_gateway.openapi [--profile dev|prod] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from tessera_gateway import BUILD_DIR, DESCRIPTOR_SET, errors
from tessera_gateway import description as description_module
from tessera_gateway.description import Description
from tessera_gateway.descriptors import ContractError, Contracts, Field, MessageType, Rpc, Service

OPENAPI_VERSION = "3.1.0"
SCHEMA_REF = "#/components/schemas/"
_VARIABLE = re.compile(r"\{([a-zA-Z0-9_.]+)(?:=[^}]*)?\}")
_UUID_FIELD = re.compile(r"\ba UUID\b")
_EMAIL_FIELD = re.compile(r"^E-mail address\b")
_INT64_KINDS = {"int64", "sint64", "sfixed64"}
_UINT64_KINDS = {"uint64", "fixed64"}
_INT32_KINDS = {"int32", "sint32", "sfixed32"}
_UINT32_KINDS = {"uint32", "fixed32"}
_WRAPPERS = {
    "google.protobuf.DoubleValue": "double", "google.protobuf.FloatValue": "float",
    "google.protobuf.Int64Value": "int64", "google.protobuf.UInt64Value": "uint64",
    "google.protobuf.Int32Value": "int32", "google.protobuf.UInt32Value": "uint32",
    "google.protobuf.BoolValue": "bool", "google.protobuf.StringValue": "string",
    "google.protobuf.BytesValue": "bytes",
}
# Rich error details the services and the gateway put into google.rpc.Status.details.
ERROR_DETAILS = ("google.rpc.ErrorInfo", "google.rpc.BadRequest", "google.rpc.PreconditionFailure",
                 "google.rpc.RetryInfo", "google.rpc.ResourceInfo")
# Error responses every operation documents (the mapping of gRPC codes and the gateway's own errors).
# On every response: the request id and the correlation id (the client's, or the request id).
ID_HEADERS = {
    "x-request-id": {"$ref": "#/components/headers/RequestId"},
    "x-correlation-id": {"$ref": "#/components/headers/CorrelationId"},
}
# On every response of a request that reached the rate limiter (successes and 429s; refusals made earlier, such
# as a missing token, never counted against a bucket and carry none).
RATE_LIMIT_HEADERS = {
    "x-ratelimit-limit": {"$ref": "#/components/headers/RateLimitLimit"},
    "x-ratelimit-remaining": {"$ref": "#/components/headers/RateLimitRemaining"},
    "x-ratelimit-reset": {"$ref": "#/components/headers/RateLimitReset"},
}
ERROR_RESPONSES = {
    "400": "Invalid request: a field is invalid (BadRequest names it), the body is not JSON of the message, a "
           "field or query parameter is unknown, or a precondition failed (FAILED_PRECONDITION, OUT_OF_RANGE).",
    "401": "No bearer token, or the token is expired or invalid (UNAUTHENTICATED).",
    "403": "The token lacks a scope the method needs, or the caller may not act on this resource "
           "(PERMISSION_DENIED).",
    "404": "The resource does not exist, or no route matches the path (NOT_FOUND).",
    "409": "The resource already exists, or the request conflicts with another (ALREADY_EXISTS, ABORTED).",
    "413": "The request body is larger than the gateway accepts.",
    "429": "Too many requests: the client's bucket for this route class is empty (RESOURCE_EXHAUSTED).",
    "499": "The client cancelled the call (CANCELLED).",
    "500": "An unexpected error (INTERNAL, UNKNOWN, DATA_LOSS).",
    "501": "Not implemented (UNIMPLEMENTED).",
    "503": "The service or one it depends on is unavailable; retry later (UNAVAILABLE).",
    "504": "The service did not answer in time (DEADLINE_EXCEEDED).",
}


def parameter_name(field_path: str) -> str:
    """The OpenAPI name of a path variable: dots become underscores (user.id -> user_id), which tools accept."""
    return field_path.replace(".", "_")


def openapi_path(template: str) -> str:
    """An http rule template as an OpenAPI path: {user.id=pattern} becomes {user_id}."""
    return _VARIABLE.sub(lambda m: "{" + parameter_name(m.group(1)) + "}", template)


def _first_sentence(text: str) -> str:
    sentence = text.split(". ", 1)[0].rstrip(".")
    return sentence[:120]


class _Builder:
    def __init__(self, contracts: Contracts, description: Description) -> None:
        self.c = contracts
        self.d = description
        self.schemas: dict[str, Any] = {}

    # -- schemas -----------------------------------------------------------------------------------------------

    def scalar(self, kind: str) -> dict[str, Any]:
        if kind == "string":
            return {"type": "string"}
        if kind == "bytes":
            return {"type": "string", "contentEncoding": "base64"}
        if kind == "bool":
            return {"type": "boolean"}
        if kind in _INT32_KINDS:
            return {"type": "integer", "format": "int32", "minimum": -(2**31), "maximum": 2**31 - 1}
        if kind in _UINT32_KINDS:
            return {"type": "integer", "minimum": 0, "maximum": 2**32 - 1}
        if kind in _INT64_KINDS:
            # proto3 JSON writes 64-bit integers as strings (JavaScript numbers lose precision) and reads both.
            return {"type": ["string", "integer"], "format": "int64", "pattern": "^-?[0-9]+$"}
        if kind in _UINT64_KINDS:
            return {"type": ["string", "integer"], "format": "uint64", "pattern": "^[0-9]+$", "minimum": 0}
        if kind in ("double", "float"):
            return {"type": "number"}
        raise ValueError(f"unknown scalar kind {kind}")

    def well_known(self, name: str) -> dict[str, Any] | None:
        if name == "google.protobuf.Timestamp":
            return {"type": "string", "format": "date-time",
                    "description": "RFC 3339 time in UTC, e.g. 2026-01-31T12:00:00Z."}
        if name == "google.protobuf.Duration":
            return {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]{1,9})?s$",
                    "description": "Seconds with up to nine fractional digits and an s suffix, e.g. 1.5s."}
        if name == "google.protobuf.FieldMask":
            return {"type": "string",
                    "description": "Comma-separated field paths, e.g. displayName,profile.locale."}
        if name == "google.protobuf.Struct":
            return {"type": "object", "additionalProperties": True}
        if name == "google.protobuf.Value":
            return {}
        if name == "google.protobuf.ListValue":
            return {"type": "array"}
        if name == "google.protobuf.Empty":
            return {"type": "object", "additionalProperties": False}
        if name == "google.protobuf.Any":
            return {"type": "object", "required": ["@type"], "properties": {"@type": {"type": "string"}},
                    "additionalProperties": True}
        if name in _WRAPPERS:
            schema = self.scalar(_WRAPPERS[name])
            types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
            return {**schema, "type": [*types, "null"]}
        return None

    def enum_ref(self, name: str) -> dict[str, Any]:
        if name not in self.schemas:
            enum = self.c.enums[name]
            lines = [enum.comment, ""] + [f"- `{v}`: {comment}" for v, _, comment in enum.values]
            self.schemas[name] = {"type": "string", "enum": [v for v, _, _ in enum.values],
                                  "description": "\n".join(lines).strip()}
        return {"$ref": SCHEMA_REF + name}

    def message_ref(self, name: str) -> dict[str, Any]:
        wkt = self.well_known(name)
        if wkt is not None:
            return wkt
        if name not in self.schemas:
            self.schemas[name] = {}  # placeholder, so recursive messages terminate
            self.schemas[name] = self.message_schema(self.c.message(name))
        return {"$ref": SCHEMA_REF + name}

    def message_schema(self, message: MessageType, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
        properties = {f.json_name: self.field_schema(f) for f in message.fields if f.name not in exclude}
        schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
        if message.comment:
            schema["description"] = message.comment
        return schema

    def single(self, f: Field) -> dict[str, Any]:
        if f.kind == "message":
            return self.message_ref(f.type_name)
        if f.kind == "enum":
            return self.enum_ref(f.type_name)
        return self.scalar(f.kind)

    def field_schema(self, f: Field) -> dict[str, Any]:
        schema = self._field_schema(f)
        # The contracts state these in words on each field; the formats let clients and generators follow them.
        target = schema.get("items", schema) if f.repeated else schema
        if f.kind == "string" and _UUID_FIELD.search(f.comment):
            target["format"] = "uuid"
        elif f.kind == "string" and _EMAIL_FIELD.search(f.comment):
            target["format"] = "email"
        return schema

    def _field_schema(self, f: Field) -> dict[str, Any]:
        entry = self.c.map_entry(f)
        if entry is not None:
            value = entry.field("value")
            assert value is not None
            schema: dict[str, Any] = {"type": "object", "additionalProperties": self.single(value)}
        elif f.repeated:
            schema = {"type": "array", "items": self.single(f)}
        else:
            schema = dict(self.single(f))
        if f.comment:
            schema["description"] = f.comment
        if f.output_only:
            schema["readOnly"] = True
        return schema

    def error_schemas(self) -> None:
        details = []
        for name in ERROR_DETAILS:
            if name not in self.c.messages:
                continue
            schema = self.message_schema(self.c.message(name))
            schema["properties"] = {"@type": {"const": f"type.googleapis.com/{name}"}, **schema["properties"]}
            schema["required"] = ["@type"]
            self.schemas[f"{name}.Detail"] = schema
            details.append({"$ref": f"{SCHEMA_REF}{name}.Detail"})
        details.append(self.well_known("google.protobuf.Any"))
        self.schemas["google.rpc.Status"] = {
            "type": "object",
            "description": "Every error: the proto3 JSON of google.rpc.Status. `code` is the google.rpc.Code "
                           "number, `message` is for people, `details` always holds an ErrorInfo (the service's "
                           "domain for service errors, the gateway's domain for the gateway's own).",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "integer", "minimum": 0, "maximum": 16, "description": "google.rpc.Code"},
                "message": {"type": "string"},
                "details": {"type": "array", "items": {"anyOf": details}},
            },
            "additionalProperties": False,
        }

    # -- operations --------------------------------------------------------------------------------------------

    def query_parameters(self, message: str, prefix: str, skip: set[str], depth: int = 0,
                         seen: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        params: list[dict[str, Any]] = []
        for f in self.c.message(message).fields:
            path = f"{prefix}{f.name}"
            if path in skip or self.c.map_entry(f) is not None:
                continue
            if f.kind == "message" and self.well_known(f.type_name) is None:
                if f.repeated or depth >= 4 or f.type_name in seen:
                    continue
                params += self.query_parameters(f.type_name, f"{path}.", skip, depth + 1, (*seen, message))
                continue
            schema = self.field_schema(f)
            schema.pop("description", None)
            param: dict[str, Any] = {"name": path, "in": "query", "required": False, "schema": schema}
            if f.repeated:
                param.update(style="form", explode=True)
            if f.comment:
                param["description"] = f.comment
            params.append(param)
        return params

    def operation(self, service: Service, rpc: Rpc) -> dict[str, Any]:
        policy = self.d.policy(rpc, service)
        variables = rpc.http.variables
        params = []
        for v in variables:
            f = self.c.resolve(rpc.input_type, v)
            schema = self.field_schema(f)
            schema.pop("readOnly", None)
            description = schema.pop("description", f.comment)
            param = {"name": parameter_name(v), "in": "path", "required": True, "schema": schema,
                     "description": description}
            if "." in v:
                param["x-field-path"] = v  # the request field the transcoder binds it to
            params.append(param)
        body = rpc.http.body
        if body != "*":
            skip = set(variables) | ({body} if body else set())
            params += self.query_parameters(rpc.input_type, "", skip)
        accepted = list(dict.fromkeys((*policy.scopes, self.d.admin_scope)))
        op: dict[str, Any] = {
            "operationId": f"{service.short_name}_{rpc.name}",
            "summary": _first_sentence(rpc.comment) or rpc.name,
            "description": f"{rpc.comment}\n\nNeeds a token with one of the scopes: {', '.join(accepted)}. "
                           f"Route class `{policy.route_class.name}` (timeout {policy.route_class.timeout_seconds} "
                           f"s). gRPC: `{rpc.grpc_path}`.",
            "tags": [service.short_name],
            "parameters": params,
            "security": [{"bearerAuth": accepted}],
            "responses": self.responses(rpc.output_type),
            "x-grpc-method": rpc.grpc_path,
            "x-required-scopes": accepted,
            "x-route-class": policy.route_class.name,
            "x-idempotency": rpc.idempotency,
        }
        if body:
            op["requestBody"] = {"required": True,
                                 "content": {"application/json": {"schema": self.body_schema(rpc)}}}
        return op

    def body_schema(self, rpc: Rpc) -> dict[str, Any]:
        name = self.c.body_message(rpc)
        assert name is not None
        prefix = "" if rpc.http.body == "*" else rpc.http.body + "."
        bound = frozenset(v[len(prefix):] for v in rpc.http.variables
                          if v.startswith(prefix) and "." not in v[len(prefix):])
        if not bound:
            return self.message_ref(name)
        # Fields bound from the path must not be repeated in the body (the gateway refuses the collision).
        self.message_ref(name)
        return self.message_schema(self.c.message(name), exclude=bound)

    def responses(self, output: str | None) -> dict[str, Any]:
        responses: dict[str, Any] = {}
        if output is not None:
            responses["200"] = {"description": "OK",
                                "headers": {**ID_HEADERS, **RATE_LIMIT_HEADERS},
                                "content": {"application/json": {"schema": self.message_ref(output)}}}
        for status in ERROR_RESPONSES:
            responses[status] = {"$ref": f"#/components/responses/Error{status}"}
        responses["default"] = {"$ref": "#/components/responses/ErrorDefault"}
        return responses

    def error_responses(self) -> dict[str, Any]:
        content = {"application/json": {"schema": {"$ref": SCHEMA_REF + "google.rpc.Status"}}}
        out = {}
        for status, text in ERROR_RESPONSES.items():
            headers = dict(ID_HEADERS)
            if status == "429":
                headers["retry-after"] = {"$ref": "#/components/headers/RetryAfter"}
                headers.update(RATE_LIMIT_HEADERS)
            out[f"Error{status}"] = {"description": text, "headers": headers, "content": content}
        out["ErrorDefault"] = {"description": "Any other error, in the same shape.", "content": content,
                               "headers": dict(ID_HEADERS)}
        return out

    def document(self) -> dict[str, Any]:
        paths: dict[str, dict[str, Any]] = {}
        tags = []
        for service in self.c.services:
            tags.append({"name": service.short_name, "description": service.comment})
            for rpc in service.rpcs:
                item = paths.setdefault(openapi_path(rpc.http.path), {})
                item[rpc.http.method.lower()] = self.operation(service, rpc)
        paths["/openapi.json"] = {"get": {
            "operationId": "Gateway_GetOpenApi", "summary": "This document", "tags": ["Gateway"],
            "security": [],
            "responses": {"200": {"description": "The OpenAPI document of the REST API.",
                                  "headers": {**ID_HEADERS, **RATE_LIMIT_HEADERS},
                                  "content": {"application/json": {"schema": {"type": "object"}}}},
                          "429": {"$ref": "#/components/responses/Error429"},
                          "default": {"$ref": "#/components/responses/ErrorDefault"}},
        }}
        tags.append({"name": "Gateway", "description": "Served by the gateway itself."})
        self.error_schemas()
        intro = (
            "REST/JSON API of Tessera, served by the Envoy edge gateway, which transcodes every call to the gRPC "
            "service named in `x-grpc-method` (the same gateway also accepts native gRPC). JSON follows the "
            "proto3 JSON mapping: lowerCamelCase names (the proto names are accepted too), 64-bit integers as "
            "strings, enums by name, timestamps in RFC 3339. Unknown JSON fields and unknown query parameters "
            "are refused with 400.\n\n"
            "Authentication: `Authorization: Bearer <JWT>` (RS256) from the configured issuer and audience; "
            "each operation lists the scopes that grant it (one suffices). Rate limits apply per token subject "
            "and route class; successful and 429 responses carry the client's bucket in `x-ratelimit-limit`, "
            "`x-ratelimit-remaining` and `x-ratelimit-reset` (draft RFC 03), and 429 responses say when to "
            "retry in `retry-after`.\n\n"
            "Canaries: a request with the header `canary: true` reaches the canary (v2) of every service on its way "
            "that runs one (the services pass it on to the calls they make for it) when the token holds the scope "
            f"`{self.d.canary_scope}` (or `{self.d.admin_scope}`); the gateway removes the `canary` header from every "
            "other request, which the canaries' traffic weights alone then route.\n\n"
            "Errors: every error body is a google.rpc.Status (`code`, `message`, `details`). Errors the "
            "gateway produces itself carry an ErrorInfo in domain "
            f"`{self.d.error_domain}` with one of these reasons:\n\n{errors.markdown_table()}\n"
        )
        return {
            "openapi": OPENAPI_VERSION,
            "info": {"title": "Tessera API", "version": "v1", "description": intro},
            "servers": [{"url": self.d.public_url}],
            "tags": tags,
            "security": [{"bearerAuth": []}],
            "paths": paths,
            "components": {
                "schemas": dict(sorted(self.schemas.items())),
                "responses": self.error_responses(),
                "headers": {
                    "RequestId": {"description": "The request id: the client's x-request-id, or one the gateway "
                                                 "made. Quote it when reporting a problem.",
                                  "required": True, "schema": {"type": "string"}},
                    "CorrelationId": {"description": "The correlation id: the client's x-correlation-id, or the "
                                                     "request id. The services log it and pass it on to the calls "
                                                     "and events the request causes.",
                                      "required": True, "schema": {"type": "string"}},
                    "RetryAfter": {"description": "Seconds to wait before retrying.", "required": True,
                                   "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                    "RateLimitLimit": {"description": "The size of the client's token bucket for this route class "
                                                       "(requests at once).", "required": True,
                                       "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                    "RateLimitRemaining": {"description": "Requests left in the client's bucket after this one.",
                                           "required": True, "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                    "RateLimitReset": {"description": "Seconds until the bucket is next refilled.", "required": True,
                                       "schema": {"type": "string", "pattern": "^[0-9]+$"}},
                },
                "securitySchemes": {"bearerAuth": {
                    "type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                    "description": f"RS256 JWT from {self.d.jwt.issuer} for audience "
                                   f"{', '.join(self.d.jwt.audiences)}; the `scope` claim is a space-delimited "
                                   f"list of: {', '.join(self.d.scopes)}.",
                }},
            },
        }


def build(contracts: Contracts, description: Description) -> dict[str, Any]:
    """The OpenAPI document as a JSON-ready dict."""
    description.check_contracts(contracts)
    return _Builder(contracts, description).document()


def render(document: dict[str, Any]) -> str:
    return json.dumps(document, indent=1, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tessera_gateway.openapi", description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=description_module.PROFILES, default="dev")
    parser.add_argument("--out", type=Path, default=BUILD_DIR / "openapi.json")
    parser.add_argument("--descriptors", type=Path, default=DESCRIPTOR_SET)
    args = parser.parse_args(argv)
    try:
        doc = build(Contracts.load(args.descriptors), description_module.load(args.profile))
    except (description_module.DescriptionError, ContractError) as exc:
        print(f"openapi: {exc}", file=sys.stderr)
        return 2
    try:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(render(doc))
    except OSError as exc:
        print(f"openapi: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"openapi: {len(doc['paths'])} paths -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
