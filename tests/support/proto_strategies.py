"""Hypothesis strategies for protobuf requests made from message descriptors: arbitrary messages with the edge values
of every field type, and "near-valid" mutations that change one field of a valid request."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

F = FieldDescriptor

# Text a service must take or refuse by name: empty, blank, controls, NUL, direction overrides, joiners, scripts,
# astral planes, the largest code point, very long, and strings that look like what the field usually holds.
EDGE_STRINGS = (
    "", " ", "\t", "\n", "\x00", "a\x00b", "\x7f", "\x1b[31m", "\u202eevil", "\u200d", "\u3000", "\ufeff", "\uffff",
    "\U0010ffff", "é", "e\u0301", "日本語", "ﷺ", "👩\u200d👩\u200d👧", "Ω" * 300, "x" * 10_000, "y" * 70_000,
    "-1", "0", "9" * 40, "1e309", "NaN", "null", "true", "*", "%", "%00", "../..", "' OR 1=1 --", "\\", "\"",
    "AAAA", "====", "eyJ9", "@", "a@b", "a@b.c", "EUR", "eur", "XXX", "€", "2026-02-30", "2026-13-01", "0000-01-01",
    "9999-12-31", "2026-03-01", "2026-03-01T00:00:00Z", "+2026-03-01", "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "0B6F7D2C-3C1E-4D1A-9A59-6F1D1B9F1E2A", " 0b6f7d2c-3c1e-4d1a-9a59-6f1d1b9f1e2a", "0b6f7d2c3c1e4d1a9a596f1d1b9f1e2a",
    "{0b6f7d2c-3c1e-4d1a-9a59-6f1d1b9f1e2a}",
)
_TEXT = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=24)
# Values shaped like what fields hold (ids, dates, e-mail addresses, currency codes), so that checks of the shape pass
# and what lies behind them is reached.
_SHAPED = st.one_of(st.uuids().map(str), st.uuids().map(lambda u: u.hex), st.dates().map(str),
                    st.datetimes().map(lambda d: d.isoformat()), st.emails(),
                    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=3))
STRINGS = st.one_of(st.sampled_from(EDGE_STRINGS), _TEXT, _SHAPED)

_INT_RANGES = {
    F.TYPE_INT32: (-(2**31), 2**31 - 1), F.TYPE_SINT32: (-(2**31), 2**31 - 1), F.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    F.TYPE_INT64: (-(2**63), 2**63 - 1), F.TYPE_SINT64: (-(2**63), 2**63 - 1), F.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    F.TYPE_UINT32: (0, 2**32 - 1), F.TYPE_FIXED32: (0, 2**32 - 1),
    F.TYPE_UINT64: (0, 2**64 - 1), F.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    edges = [v for v in (0, 1, -1, 2, 100, 101, 1000, 1001, 10**6, 2**31 - 1, -(2**31), 2**32 - 1, 2**53 + 1,
                         2**63 - 1, -(2**63), 2**64 - 1, lo, hi) if lo <= v <= hi]
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi), st.integers(-3, 300).filter(lambda v: lo <= v <= hi))


def floats(width: int) -> st.SearchStrategy[float]:
    return st.one_of(st.sampled_from([0.0, -0.0, float("nan"), float("inf"), float("-inf"), 1e308, -1e-308]),
                     st.floats(width=width))


# Timestamps and durations just inside and outside their documented ranges (0001-01-01 .. 9999-12-31; ±10000 years).
_TS_SECONDS = (0, -1, 1, -62135596800, -62135596801, 253402300799, 253402300800, 2**63 - 1, -(2**63), 1_780_000_000)
_DURATION_SECONDS = (0, -1, 1, 60, 900, 86_400, 315_576_000_000, 315_576_000_001, -315_576_000_001, 2**63 - 1)
_NANOS = (0, 1, -1, 999_999_999, 10**9, -(10**9), 2**31 - 1)


@dataclasses.dataclass(frozen=True)
class _Context:
    """What a message's generation knows of the request around it: the field paths an update_mask may name."""

    mask_paths: tuple[str, ...]
    depth: int


def field_paths(descriptor: Descriptor, prefix: str = "", depth: int = 4) -> Iterator[str]:
    """Every dotted field path of a message type (messages followed `depth` levels down)."""
    for field in descriptor.fields:
        path = prefix + field.name
        yield path
        if field.message_type is not None and depth > 0 and not _is_map(field):
            yield from field_paths(field.message_type, path + ".", depth - 1)


def _is_map(field: FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _mask_paths(request: Descriptor) -> tuple[str, ...]:
    """Paths an update_mask may name: each resource field's paths, with and without the resource's own name."""
    paths: list[str] = []
    for field in request.fields:
        if field.message_type is not None and not field.message_type.full_name.startswith("google.protobuf"):
            for path in field_paths(field.message_type, depth=2):
                paths += [path, f"{field.name}.{path}", _camel(path)]
    return tuple(dict.fromkeys(paths))


def _camel(path: str) -> str:
    return re.sub(r"_([a-z])", lambda m: m.group(1).upper(), path)


def _field_mask(ctx: _Context) -> st.SearchStrategy[list[str]]:
    known = st.sampled_from(ctx.mask_paths) if ctx.mask_paths else st.nothing()
    path = st.one_of(known, known, st.sampled_from(["", "*", "nope", "a.b.c", "id", ".", "Name", "x" * 300]), STRINGS)
    return st.lists(path, max_size=4)


def scalar(field: FieldDescriptor) -> st.SearchStrategy[Any]:
    """Values of one element of a scalar or enum field."""
    t = field.type
    if t == F.TYPE_STRING:
        return STRINGS
    if t == F.TYPE_BYTES:
        return st.one_of(st.binary(max_size=32), st.sampled_from([b"", b"\x00", b"\xff" * 4096]))
    if t == F.TYPE_BOOL:
        return st.booleans()
    if t in (F.TYPE_DOUBLE, F.TYPE_FLOAT):
        return floats(64 if t == F.TYPE_DOUBLE else 32)
    if t == F.TYPE_ENUM:
        known = [v.number for v in field.enum_type.values]
        return st.one_of(st.sampled_from(known), st.sampled_from([-1, 99, 2**31 - 1, -(2**31)]))
    lo, hi = _INT_RANGES[t]
    return integers(lo, hi)


def _single(field: FieldDescriptor, ctx: _Context) -> st.SearchStrategy[Any]:
    """One value for a field: a Python scalar, or a message of the field's type."""
    if field.message_type is None:
        return scalar(field)
    return _message(field.message_type, ctx)


def _well_known(descriptor: Descriptor, ctx: _Context) -> st.SearchStrategy[Message] | None:
    cls = message_factory.GetMessageClass(descriptor)
    name = descriptor.full_name
    if name in ("google.protobuf.Timestamp", "google.protobuf.Duration"):
        seconds = _TS_SECONDS if name.endswith("Timestamp") else _DURATION_SECONDS
        return st.builds(lambda s, n: cls(seconds=s, nanos=n),
                         st.one_of(st.sampled_from(seconds), integers(-(2**63), 2**63 - 1)),
                         st.one_of(st.sampled_from(_NANOS), st.integers(-(2**31), 2**31 - 1)))
    if name == "google.protobuf.FieldMask":
        return _field_mask(ctx).map(lambda paths: cls(paths=paths))
    if name in ("google.protobuf.Any", "google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue"):
        return st.just(cls())  # followed no further: unbounded recursion with nothing a Tessera request carries
    return None  # the wrappers and Empty are ordinary messages


def _message(descriptor: Descriptor, ctx: _Context) -> st.SearchStrategy[Message]:
    special = _well_known(descriptor, ctx)
    if special is not None:
        return special
    cls = message_factory.GetMessageClass(descriptor)
    inner = dataclasses.replace(ctx, depth=ctx.depth - 1)
    if ctx.depth <= 0:
        return st.just(cls())

    @st.composite
    def build(draw: st.DrawFn) -> Message:
        msg = cls()
        chosen_oneofs = {o.name: draw(st.sampled_from([None, *o.fields])) for o in descriptor.oneofs}
        for field in descriptor.fields:
            oneof = field.containing_oneof
            if oneof is not None and chosen_oneofs[oneof.name] is not field:
                continue
            if not draw(st.booleans()) and oneof is None:
                continue  # left unset: the default of a scalar, absent for a message
            set_field(msg, field, draw(_values(field, inner)))
        return msg

    return build()


def _values(field: FieldDescriptor, ctx: _Context) -> st.SearchStrategy[Any]:
    """What one field is set to: a value, or a list of values for a repeated field (a map's entries as pairs)."""
    if _is_map(field):
        entry = field.message_type
        key, value = entry.fields_by_name["key"], entry.fields_by_name["value"]
        return st.lists(st.tuples(scalar(key), _single(value, ctx)), max_size=3)
    if field.is_repeated:
        one = _single(field, ctx)
        many = st.tuples(one, st.sampled_from([101, 501, 1001])).map(lambda p: [p[0]] * p[1])
        return st.one_of(st.lists(one, max_size=5), many)
    return _single(field, ctx)


def set_field(msg: Message, field: FieldDescriptor, value: Any) -> None:
    """Sets `field` of `msg` to `value` as _values draws it (a list for repeated fields, pairs for maps)."""
    target = getattr(msg, field.name)
    if _is_map(field):
        target.clear()
        for k, v in value:
            if isinstance(v, Message):
                target[k].CopyFrom(v)
            else:
                target[k] = v
    elif field.is_repeated:
        del target[:]
        if field.message_type is not None:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(msg, field.name, value)


def messages(descriptor: Descriptor, depth: int = 4) -> st.SearchStrategy[Message]:
    """Arbitrary messages of a request type, with edge values in every field."""
    return _message(descriptor, _Context(mask_paths=_mask_paths(descriptor), depth=depth))


@dataclasses.dataclass(frozen=True)
class Mutation:
    """A change to one field of a request: the path to it, and whether it is cleared or set to a value. An index
    into a repeated field is taken modulo the list's length when the mutation is applied."""

    path: tuple[tuple[FieldDescriptor, int | None], ...]
    clear: bool
    value: Any = None
    edit: Callable[[Any], Any] | None = None

    def apply(self, request: Message) -> Message:
        msg = request.__class__()
        msg.CopyFrom(request)
        target = msg
        for field, index in self.path[:-1]:
            if field.is_repeated:
                items = getattr(target, field.name)
                if not items:
                    items.add()
                target = items[index % len(items)]
            else:
                target = getattr(target, field.name)
        field, _ = self.path[-1]
        if self.clear:
            target.ClearField(field.name)
        elif self.edit is not None:
            value = self.edit(getattr(target, field.name))
            if field.type in _INT_RANGES:
                lo, hi = _INT_RANGES[field.type]
                value = max(lo, min(hi, value))
            setattr(target, field.name, value)
        else:
            set_field(target, field, self.value)
        return msg

    def describe(self) -> str:
        return ".".join(f.name + (f"[{i}]" if i is not None else "") for f, i in self.path)


def _string_edit(kind: str, at: float, char: str) -> Callable[[str], str]:
    def edit(value: str) -> str:
        i = int(len(value) * at)
        return {"cut": value[:i], "insert": value[:i] + char + value[i:], "replace": value[:i] + char + value[i + 1:],
                "swapcase": value.swapcase(), "pad": f" {value} ", "double": value * 2}[kind]

    edit.__qualname__ = f"{kind}({at:.2f}, {char!r})"
    return edit


def _int_edit(delta: int, negate: bool) -> Callable[[int], int]:
    def edit(value: int) -> int:
        return -value if negate else value + delta

    edit.__qualname__ = f"{'negate' if negate else f'add({delta})'}"
    return edit


# Edits of the value a valid request holds: an id or page token a character off, cut short or padded; a number one
# past its limit.
_STRING_EDITS = st.builds(_string_edit, st.sampled_from(["cut", "insert", "replace", "swapcase", "pad", "double"]),
                          st.floats(0, 1), st.sampled_from(["-", "0", "z", "=", "/", "+", "\x00", "é", " ", "%"]))
_INT_EDITS = st.builds(_int_edit, st.sampled_from([1, -1, 1000, -(2**31), 2**31]), st.booleans())
_EDITS = {F.TYPE_STRING: _STRING_EDITS, **{t: _INT_EDITS for t in (F.TYPE_INT32, F.TYPE_INT64, F.TYPE_SINT32,
                                                                    F.TYPE_SINT64, F.TYPE_SFIXED32, F.TYPE_SFIXED64)}}


def _paths(descriptor: Descriptor, depth: int) -> Iterator[tuple[tuple[FieldDescriptor, int | None], ...]]:
    for field in descriptor.fields:
        index = 0 if field.is_repeated and not _is_map(field) else None
        yield ((field, None),)
        if field.message_type is None or depth <= 0 or _is_map(field):
            continue
        if field.message_type.full_name.startswith("google.protobuf.") and not field.is_repeated:
            inner_depth = 0  # a Timestamp's seconds, a FieldMask's paths: one level, no further
        else:
            inner_depth = depth - 1
        for rest in _paths(field.message_type, inner_depth):
            yield ((field, index), *rest)


def mutations(descriptor: Descriptor, depth: int = 4) -> st.SearchStrategy[Mutation]:
    """One-field changes to a valid request of this type."""
    ctx = _Context(mask_paths=_mask_paths(descriptor), depth=2)
    paths = list(_paths(descriptor, depth))

    @st.composite
    def build(draw: st.DrawFn) -> Mutation:
        path = draw(st.sampled_from(paths))
        if any(f.is_repeated for f, _ in path[:-1]):
            path = tuple((f, draw(st.integers(0, 3)) if f.is_repeated else None) for f, _ in path)
        field = path[-1][0]
        kind = draw(st.integers(0, 5))
        if kind == 0:
            return Mutation(path, clear=True)
        if kind == 1 and not field.is_repeated and field.type in _EDITS:
            return Mutation(path, clear=False, edit=draw(_EDITS[field.type]))
        return Mutation(path, clear=False, value=draw(_values(field, ctx)))

    return build()


def names_request_field(descriptor: Descriptor, request: Message, path: str) -> bool:
    """Whether a violation's field path ("items[2].quantity", "update_mask.paths[0]") names a field the request
    message has, with any list index inside the list the request sent."""
    target: Any = request
    desc: Descriptor | None = descriptor
    for part in path.split("."):
        m = re.fullmatch(r"([a-z][a-z0-9_]*)(?:\[(\d+)\])?", part)
        if m is None or desc is None or m.group(1) not in desc.fields_by_name:
            return False
        field = desc.fields_by_name[m.group(1)]
        value = getattr(target, field.name) if target is not None else None
        if m.group(2) is not None:
            if not field.is_repeated or _is_map(field) or value is None or int(m.group(2)) >= len(value):
                return False
            value = value[int(m.group(2))]
        desc = field.message_type
        target = value if isinstance(value, Message) else None
    return True


def _corrupt(kind: str, at: float, byte: int) -> Callable[[bytes], bytes]:
    def corrupt(data: bytes) -> bytes:
        i = int(len(data) * at)
        return {"cut": data[:i], "flip": data[:i] + bytes([(data[i] if i < len(data) else 0) ^ byte]) + data[i + 1:],
                "insert": data[:i] + bytes([byte]) + data[i:],
                # a string field that is not UTF-8, a varint that never ends, a group, a field number 0
                "append": data + {0: b"\x0a\x02\xff\xfe", 1: b"\x08" + b"\xff" * 11, 2: b"\x0b\x0c", 3: b"\x00\x01"}[
                    byte % 4]}[kind]

    corrupt.__qualname__ = f"{kind}({at:.2f}, {byte:#x})"
    return corrupt


def corruptions() -> st.SearchStrategy[Callable[[bytes], bytes]]:
    """Changes to a serialized request's bytes: cut short, a byte flipped or inserted, or malformed fields appended."""
    return st.builds(_corrupt, st.sampled_from(["cut", "flip", "insert", "append"]), st.floats(0, 0.999),
                     st.integers(1, 255))
