"""The gateway's Lua filters, with the tables they read generated from the contracts and the description."""

from __future__ import annotations

import re
from collections.abc import Iterable

from tessera_gateway import PACKAGE_DIR, errors
from tessera_gateway.description import Description
from tessera_gateway.descriptors import Contracts, Field, Rpc

LUA_DIR = PACKAGE_DIR / "lua"
# Added by the connection manager's local_reply_config to every local reply (value: its HTTP status), so the
# error filter tells the gateway's own gRPC refusals from the services' replies; the filter removes it.
LOCAL_REPLY_HEADER = "x-tessera-local-reply"
# The token claims check (an RBAC filter) records its result in the RBAC filters' dynamic metadata under this
# prefix, so the error filter tells its refusals (invalid tokens, 401) from the scope check's (403).
TOKEN_CLAIMS_PREFIX = "token_claims_"
# The token claims check's policies, by the refusal's text: the error filter says which one refused.
CONTROL_CHARACTERS_POLICY = "control_characters"
SCOPE_NOT_A_STRING_POLICY = "scope_not_a_string"
CLAIMS_REFUSALS = {
    CONTROL_CHARACTERS_POLICY: "its scope claim holds a control character",
    SCOPE_NOT_A_STRING_POLICY: "its scope claim is not a string",
}

# Well-known types whose JSON form is a scalar (a string or a number), so their keys are never checked.
SCALAR_WELL_KNOWN = frozenset({
    "google.protobuf.Timestamp", "google.protobuf.Duration", "google.protobuf.FieldMask",
    "google.protobuf.DoubleValue", "google.protobuf.FloatValue", "google.protobuf.Int64Value",
    "google.protobuf.UInt64Value", "google.protobuf.Int32Value", "google.protobuf.UInt32Value",
    "google.protobuf.BoolValue", "google.protobuf.StringValue", "google.protobuf.BytesValue",
})
# Well-known types whose JSON form is free (objects with any keys, or any value).
FREE_WELL_KNOWN = frozenset({
    "google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue", "google.protobuf.Any",
})
_LUA_MAGIC = re.compile(r"([\^$()%.\[\]*+\-?])")
_SEGMENT = re.compile(r"\{([a-zA-Z0-9_.]+)(?:=([^}]*))?\}")


def lua_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\r", "\\r")
    return f'"{escaped}"'


def path_pattern(template: str) -> str:
    """A Lua pattern matching the paths of an http rule template: {var} is one segment, {var=**} any rest; each
    variable is a capture, in template order."""
    out, last = [], 0
    for m in _SEGMENT.finditer(template):
        out.append(_LUA_MAGIC.sub(r"%\1", template[last:m.start()]))
        pattern = m.group(2) or "*"
        out.append("(.+)" if "**" in pattern else "([^/]+)")
        last = m.end()
    out.append(_LUA_MAGIC.sub(r"%\1", template[last:]))
    return "^" + "".join(out) + "$"


class _Kinds:
    """Collects the messages reachable from the REST bodies, with the kind of each JSON key."""

    def __init__(self, contracts: Contracts) -> None:
        self.contracts = contracts
        self.messages: dict[str, dict[str, str]] = {}

    def message(self, name: str) -> str:
        if name in SCALAR_WELL_KNOWN:
            return ""
        if name in FREE_WELL_KNOWN:
            return "*"
        if name not in self.messages:
            self.messages[name] = {}
            keys: dict[str, str] = {}
            for f in self.contracts.message(name).fields:
                kind = self.field(f)
                keys[f.name] = kind
                keys[f.json_name] = kind
            self.messages[name] = keys
        return f"m:{name}"

    def field(self, f: Field) -> str:
        entry = self.contracts.map_entry(f)
        if entry is not None:
            value = entry.field("value")
            assert value is not None
            return "o:" + self.single(value)
        single = self.single(f)
        return f"a:{single}" if f.repeated else single

    def single(self, f: Field) -> str:
        return self.message(f.type_name) if f.kind == "message" else ""


def _table(entries: Iterable[str], indent: str = "  ") -> str:
    body = ",\n".join(indent + e for e in entries)
    return "{\n" + body + ("\n" if body else "") + "}"


def _body_rules(contracts: Contracts, kinds: _Kinds) -> list[tuple[Rpc, str]]:
    """The RPCs whose REST body the check reads (a JSON object of a message type), with that message's name.
    Verbs (":cancel") and longer literal paths first, so that a template with a variable never shadows them."""
    ordered = sorted(contracts.rpcs, key=lambda r: (":" not in r.http.path.rsplit("/", 1)[-1], -len(r.http.path)))
    rules = []
    for rpc in ordered:
        body = contracts.body_message(rpc)
        if body is not None and kinds.message(body).startswith("m:"):
            rules.append((rpc, body))
    return rules


def _spellings(contracts: Contracts, message: str, field_path: str) -> list[str]:
    """Every way a JSON body may name a field path of a message: each field by its proto or its JSON name."""
    name, _, rest = field_path.partition(".")
    f = contracts.message(message).field(name)
    assert f is not None
    names = list(dict.fromkeys((f.name, f.json_name)))
    if not rest:
        return names
    return [f"{n}.{tail}" for n in names for tail in _spellings(contracts, f.type_name, rest)]


def bound_body_fields(contracts: Contracts, rpc: Rpc) -> dict[str, str]:
    """The body keys (dotted paths from the body's root, as the body check names them) that name a field the
    path binds, each spelling with the bound field's path: a body repeating one must hold the path's value."""
    body = contracts.body_message(rpc)
    if body is None:
        return {}
    prefix = "" if rpc.http.body == "*" else rpc.http.body + "."
    bound = {}
    for variable in rpc.http.variables:
        if variable.startswith(prefix):
            for spelling in _spellings(contracts, body, variable[len(prefix):]):
                bound[prefix + spelling] = variable
    return bound


def body_rule_methods(contracts: Contracts) -> list[str]:
    """The HTTP methods of the body check's rules: a request with any other method passes it unread, so the
    gateway skips the filter for it."""
    return sorted({rpc.http.method for rpc, _ in _body_rules(contracts, _Kinds(contracts))})


def rest_body_source(contracts: Contracts, description: Description) -> str:
    kinds = _Kinds(contracts)
    rules = []
    for rpc, body in _body_rules(contracts, kinds):
        prefix = "" if rpc.http.body == "*" else rpc.http.body
        captures = {v: i for i, v in enumerate(rpc.http.variables, 1)}
        bound = [f"[{lua_string(k)}] = {{{captures[v]}, {lua_string(v)}}}"
                 for k, v in bound_body_fields(contracts, rpc).items()]
        rules.append(f"{{method = {lua_string(rpc.http.method)}, pattern = {lua_string(path_pattern(rpc.http.path))}, "
                     f"message = {lua_string(body)}, prefix = {lua_string(prefix)}, "
                     f"bound = {{{', '.join(bound)}}}}}")
    messages = []
    for name in sorted(kinds.messages):
        fields = [f"[{lua_string(k)}] = {lua_string(v)}" for k, v in sorted(kinds.messages[name].items())]
        messages.append(f"[{lua_string(name)}] = " + _table(fields, "    ").replace("\n}", "\n  }"))
    header = (
        "-- Generated by tessera_gateway.lua from the contracts; do not edit.\n"
        f"local DOMAIN = {lua_string(description.error_domain)}\n"
        f"local RULES = {_table(rules)}\n"
        f"local MESSAGES = {_table(messages)}\n"
    )
    return header + (LUA_DIR / "rest_body.lua").read_text()


def rest_errors_source(description: Description) -> str:
    codes = [f"{e.reason} = {errors.CODES[e.code]}" for e in errors.GATEWAY_ERRORS]
    grpc_codes = [f"{e.reason} = {errors.CODES[e.code_over_grpc]}" for e in errors.GATEWAY_ERRORS
                  if e.code_over_grpc is not None]
    statuses = [f"[{s}] = {errors.CODES[errors.code_of_http_status(s)]}"
                for s in (400, 401, 403, 404, 405, 408, 409, 413, 429, 431, 499, 500, 501, 502, 503, 504)]
    refusals = [f"[{lua_string(policy)}] = {lua_string(text)}" for policy, text in CLAIMS_REFUSALS.items()]
    header = (
        "-- Generated by tessera_gateway.lua from the description; do not edit.\n"
        f"local DOMAIN = {lua_string(description.error_domain)}\n"
        f"local CODES = {_table(codes)}\n"
        f"local GRPC_CODES = {_table(grpc_codes)}\n"
        f"local CODE_BY_STATUS = {_table(statuses)}\n"
        f"local MAX_BODY_BYTES = {description.limits.max_request_body_bytes}\n"
        f"local LOCAL_REPLY_HEADER = {lua_string(LOCAL_REPLY_HEADER)}\n"
        f"local CLAIMS_REFUSED_KEY = {lua_string(TOKEN_CLAIMS_PREFIX + 'enforced_engine_result')}\n"
        f"local CLAIMS_POLICY_KEY = {lua_string(TOKEN_CLAIMS_PREFIX + 'enforced_effective_policy_id')}\n"
        f"local CLAIMS_REFUSALS = {_table(refusals)}\n"
    )
    return header + (LUA_DIR / "rest_errors.lua").read_text()


def rest_head_source() -> str:
    return (LUA_DIR / "rest_head.lua").read_text()
