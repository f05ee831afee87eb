"""The contracts as the gateway sees them: services, RPCs, http rules and message shapes from the descriptor set."""

from __future__ import annotations

import dataclasses
import re
from functools import cached_property
from pathlib import Path

from google.api import annotations_pb2, http_pb2  # noqa: F401 - registers the google.api.http extension
from google.protobuf import descriptor_pb2
from google.protobuf.message import DecodeError

# Leading comments that mark a field as set by the server only; the contracts say so in words.
_OUTPUT_ONLY = re.compile(r"\bOutput only\b")
_HTTP_METHODS = ("get", "put", "post", "delete", "patch")
# A path variable of an http rule template: {field.path} or {field.path=pattern}.
_VARIABLE = re.compile(r"\{([a-zA-Z0-9_.]+)(?:=([^}]*))?\}")

SCALAR_TYPES = {
    descriptor_pb2.FieldDescriptorProto.TYPE_DOUBLE: "double",
    descriptor_pb2.FieldDescriptorProto.TYPE_FLOAT: "float",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT64: "int64",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT64: "uint64",
    descriptor_pb2.FieldDescriptorProto.TYPE_INT32: "int32",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED64: "fixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_FIXED32: "fixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_BOOL: "bool",
    descriptor_pb2.FieldDescriptorProto.TYPE_STRING: "string",
    descriptor_pb2.FieldDescriptorProto.TYPE_BYTES: "bytes",
    descriptor_pb2.FieldDescriptorProto.TYPE_UINT32: "uint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED32: "sfixed32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SFIXED64: "sfixed64",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT32: "sint32",
    descriptor_pb2.FieldDescriptorProto.TYPE_SINT64: "sint64",
}
_MESSAGE = descriptor_pb2.FieldDescriptorProto.TYPE_MESSAGE
_ENUM = descriptor_pb2.FieldDescriptorProto.TYPE_ENUM
_REPEATED = descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED


class ContractError(Exception):
    """The descriptor set does not describe what the gateway needs (an RPC without an http rule, ...)."""


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    json_name: str
    number: int
    kind: str  # a scalar type name ("string", "int64", ...), "message" or "enum"
    type_name: str  # full name of the message or enum type, "" for scalars
    repeated: bool
    comment: str
    output_only: bool


@dataclasses.dataclass(frozen=True)
class MessageType:
    full_name: str
    fields: tuple[Field, ...]
    comment: str
    is_map_entry: bool

    def field(self, name: str) -> Field | None:
        return next((f for f in self.fields if f.name == name), None)


@dataclasses.dataclass(frozen=True)
class EnumType:
    full_name: str
    values: tuple[tuple[str, int, str], ...]  # (name, number, comment)
    comment: str


@dataclasses.dataclass(frozen=True)
class HttpRule:
    method: str  # upper case: GET, POST, PATCH, PUT, DELETE
    path: str  # the template as written, e.g. /v1/users/{user.id}
    body: str  # "" (no body), "*" (the whole request) or a top-level request field name

    @property
    def variables(self) -> tuple[str, ...]:
        """Field paths bound from the path, in template order."""
        return tuple(m.group(1) for m in _VARIABLE.finditer(self.path))


@dataclasses.dataclass(frozen=True)
class Rpc:
    service: str  # full service name
    name: str
    input_type: str
    output_type: str
    idempotency: str  # NO_SIDE_EFFECTS, IDEMPOTENT or IDEMPOTENCY_UNKNOWN
    http: HttpRule
    comment: str

    @property
    def full_name(self) -> str:
        return f"{self.service}.{self.name}"

    @property
    def grpc_path(self) -> str:
        return f"/{self.service}/{self.name}"

    @property
    def read_only(self) -> bool:
        return self.idempotency == "NO_SIDE_EFFECTS"


@dataclasses.dataclass(frozen=True)
class Service:
    full_name: str
    package: str
    rpcs: tuple[Rpc, ...]
    comment: str

    @property
    def context(self) -> str:
        """The bounded context, e.g. "user" for tessera.user.v1: it names the upstream and the scopes."""
        parts = self.package.split(".")
        if len(parts) < 3 or parts[0] != "tessera":
            raise ContractError(f"{self.full_name}: package {self.package!r} is not tessera.<context>.<version>")
        return parts[1]

    @property
    def short_name(self) -> str:
        return self.full_name.rsplit(".", 1)[-1]


def _comment(locations: dict[tuple[int, ...], descriptor_pb2.SourceCodeInfo.Location], path: tuple[int, ...]) -> str:
    loc = locations.get(path)
    if loc is None:
        return ""
    return " ".join(line.strip() for line in loc.leading_comments.strip().splitlines()).strip()


def _http_rule(rpc_name: str, options: descriptor_pb2.MethodOptions) -> HttpRule:
    if not options.HasExtension(annotations_pb2.http):
        raise ContractError(f"{rpc_name} has no google.api.http rule; every RPC must have one")
    rule = options.Extensions[annotations_pb2.http]
    pattern = rule.WhichOneof("pattern")
    if pattern not in _HTTP_METHODS:
        raise ContractError(f"{rpc_name}: http rule pattern {pattern!r} is not supported")
    return HttpRule(method=pattern.upper(), path=getattr(rule, pattern), body=rule.body)


class Contracts:
    """Every tessera.* service in a FileDescriptorSet, with the message and enum types reachable from it."""

    def __init__(self, fds: descriptor_pb2.FileDescriptorSet) -> None:
        self.fds = fds
        self.messages: dict[str, MessageType] = {}
        self.enums: dict[str, EnumType] = {}
        services: list[Service] = []
        for file in fds.file:
            locations = {tuple(loc.path): loc for loc in file.source_code_info.location}
            prefix = f".{file.package}" if file.package else ""
            for i, msg in enumerate(file.message_type):
                self._add_message(msg, prefix, (4, i), locations)
            for i, enum in enumerate(file.enum_type):
                self._add_enum(enum, prefix, (5, i), locations)
            if not file.package.startswith("tessera."):
                continue
            for si, svc in enumerate(file.service):
                full = f"{file.package}.{svc.name}"
                rpcs = []
                for mi, method in enumerate(svc.method):
                    if method.client_streaming or method.server_streaming:
                        raise ContractError(f"{full}.{method.name}: streaming RPCs are not exposed by the gateway")
                    level = descriptor_pb2.MethodOptions.IdempotencyLevel.Name(method.options.idempotency_level)
                    rpcs.append(Rpc(
                        service=full, name=method.name, input_type=method.input_type.lstrip("."),
                        output_type=method.output_type.lstrip("."), idempotency=level,
                        http=_http_rule(f"{full}.{method.name}", method.options),
                        comment=_comment(locations, (6, si, 2, mi)),
                    ))
                services.append(Service(full_name=full, package=file.package, rpcs=tuple(rpcs),
                                        comment=_comment(locations, (6, si))))
        self.services = tuple(sorted(services, key=lambda s: s.full_name))
        for rpc in self.rpcs:
            self._check_binding(rpc)

    @classmethod
    def load(cls, path: Path) -> Contracts:
        if not path.exists():
            raise ContractError(f"descriptor set {path} not found; run `make gen`")
        try:
            fds = descriptor_pb2.FileDescriptorSet.FromString(path.read_bytes())
        except DecodeError:
            raise ContractError(f"descriptor set {path} is not a FileDescriptorSet; run `make gen`") from None
        return cls(fds)

    @cached_property
    def rpcs(self) -> tuple[Rpc, ...]:
        return tuple(rpc for svc in self.services for rpc in svc.rpcs)

    def service(self, full_name: str) -> Service:
        for svc in self.services:
            if svc.full_name == full_name:
                return svc
        raise ContractError(f"service {full_name} is not in the descriptor set")

    def message(self, full_name: str) -> MessageType:
        try:
            return self.messages[full_name]
        except KeyError:
            raise ContractError(f"message {full_name} is not in the descriptor set") from None

    def resolve(self, message: str, field_path: str) -> Field:
        """The field a dotted path such as "user.id" names, starting from a message type."""
        current = self.message(message)
        parts = field_path.split(".")
        for i, part in enumerate(parts):
            f = current.field(part)
            if f is None:
                raise ContractError(f"{message} has no field {field_path!r}")
            if i == len(parts) - 1:
                return f
            if f.kind != "message" or f.repeated:
                raise ContractError(f"{message}: {field_path!r} goes through a non-message field")
            current = self.message(f.type_name)
        raise ContractError(f"{message}: empty field path")

    def body_message(self, rpc: Rpc) -> str | None:
        """Full name of the message the REST body holds, or None when the rule takes no body."""
        if not rpc.http.body:
            return None
        if rpc.http.body == "*":
            return rpc.input_type
        f = self.resolve(rpc.input_type, rpc.http.body)
        if f.kind != "message" or f.repeated:
            raise ContractError(f"{rpc.full_name}: body field {rpc.http.body!r} must be a singular message")
        return f.type_name

    def _check_binding(self, rpc: Rpc) -> None:
        for variable in rpc.http.variables:
            f = self.resolve(rpc.input_type, variable)
            if f.kind == "message" or f.repeated:
                raise ContractError(f"{rpc.full_name}: path variable {variable!r} must be a singular scalar")
        self.body_message(rpc)

    def _add_message(self, msg: descriptor_pb2.DescriptorProto, prefix: str, path: tuple[int, ...],
                     locations: dict) -> None:
        full = f"{prefix}.{msg.name}".lstrip(".")
        for i, nested in enumerate(msg.nested_type):
            self._add_message(nested, f".{full}", (*path, 3, i), locations)
        for i, enum in enumerate(msg.enum_type):
            self._add_enum(enum, f".{full}", (*path, 4, i), locations)
        fields = []
        for i, f in enumerate(msg.field):
            comment = _comment(locations, (*path, 2, i))
            if f.type == _MESSAGE:
                kind = "message"
            elif f.type == _ENUM:
                kind = "enum"
            else:
                kind = SCALAR_TYPES[f.type]
            fields.append(Field(
                name=f.name, json_name=f.json_name or f.name, number=f.number, kind=kind,
                type_name=f.type_name.lstrip("."), repeated=f.label == _REPEATED, comment=comment,
                output_only=bool(_OUTPUT_ONLY.search(comment)),
            ))
        self.messages[full] = MessageType(full_name=full, fields=tuple(fields), comment=_comment(locations, path),
                                          is_map_entry=msg.options.map_entry)

    def _add_enum(self, enum: descriptor_pb2.EnumDescriptorProto, prefix: str, path: tuple[int, ...],
                  locations: dict) -> None:
        full = f"{prefix}.{enum.name}".lstrip(".")
        values = tuple((v.name, v.number, _comment(locations, (*path, 2, i))) for i, v in enumerate(enum.value))
        self.enums[full] = EnumType(full_name=full, values=values, comment=_comment(locations, path))

    def map_entry(self, f: Field) -> MessageType | None:
        """The key/value entry type when f is a map field, else None."""
        if f.kind != "message" or not f.repeated:
            return None
        entry = self.messages.get(f.type_name)
        return entry if entry is not None and entry.is_map_entry else None
