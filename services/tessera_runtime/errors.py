"""Domain errors and their one mapping to google.rpc.Status with ErrorInfo and BadRequest details."""

from __future__ import annotations

import dataclasses
import unicodedata
import uuid
from collections.abc import Iterable, Mapping

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2


@dataclasses.dataclass(frozen=True)
class FieldViolation:
    """One invalid field: its path in the request (snake_case, dotted, with [i] for list items) and why."""

    field: str
    description: str


class DomainError(Exception):
    """Base of the errors handlers raise. The interceptor turns each into a status with ErrorInfo."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    default_reason = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        domain: str = "tessera.dev",
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.domain = domain
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=self.domain, metadata=self.metadata))
        return [info]

    def to_status(self) -> status_pb2.Status:
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=self.details())


# A status travels in trailers (its message percent-encoded, and again inside grpc-status-details-bin with the
# details), which gRPC clients refuse above 8 KiB by default (grpc.max_metadata_size): the call then fails
# RESOURCE_EXHAUSTED and the caller never sees the error. So an InvalidArgument's message lists its violations up to
# _MAX_MESSAGE bytes and its BadRequest up to _MAX_VIOLATION_BYTES, each then saying how many it left out, and a
# field path or description (which may quote the request, an update_mask path) is cut at _MAX_VIOLATION_TEXT
# characters.
_MAX_MESSAGE = 600
_MAX_VIOLATION_BYTES = 2500
_MAX_VIOLATION_TEXT = 100


def _clip(text: str) -> str:
    return text if len(text) <= _MAX_VIOLATION_TEXT else text[:_MAX_VIOLATION_TEXT - 1] + "…"


class InvalidArgument(DomainError):
    """The request is malformed; carries one violation per invalid field (as many as a status can carry)."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Iterable[FieldViolation], *, domain: str = "tessera.dev",
                 message: str | None = None, reason: str | None = None) -> None:
        self.violations = list(violations)
        if not self.violations:
            raise ValueError("InvalidArgument needs at least one field violation")
        super().__init__(message or violations_text(self.violations), reason=reason, domain=domain)

    def details(self) -> list[any_pb2.Any]:
        listed: list[error_details_pb2.BadRequest.FieldViolation] = []
        size = 0
        for v in self.violations:
            item = error_details_pb2.BadRequest.FieldViolation(field=_clip(v.field), description=_clip(v.description))
            size += item.ByteSize() + 3  # with its tag and length
            left = len(self.violations) - len(listed) - 1
            if size > _MAX_VIOLATION_BYTES and left:
                item.description += f" (and {left} more violations not listed)"
                listed.append(item)
                break
            listed.append(item)
        bad = any_pb2.Any()
        bad.Pack(error_details_pb2.BadRequest(field_violations=listed))
        return [*super().details(), bad]


def violations_text(violations: list[FieldViolation]) -> str:
    """An InvalidArgument's message when it is given none: "invalid request: " and each violation, as many as fit."""
    shown: list[str] = []
    size = 0
    for i, v in enumerate(violations):
        part = f"{_clip(v.field)}: {_clip(v.description)}"
        size += len(part.encode()) + 2
        if size > _MAX_MESSAGE - 40 and shown:  # room for the start and the count of the rest
            return "invalid request: " + "; ".join(shown) + f"; and {len(violations) - i} more"
        shown.append(part)
    text = "invalid request: " + "; ".join(shown)
    if len(text.encode()) <= _MAX_MESSAGE:
        return text
    return text.encode()[:_MAX_MESSAGE - 3].decode(errors="ignore") + "…"


class NotFound(DomainError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(DomainError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(DomainError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(DomainError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class PermissionDenied(DomainError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(DomainError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class Unavailable(DomainError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


# The ErrorInfo reason of a call that failed because the service's database could not be used just then (the
# connection was refused, lost or the server is shutting down; SQLite's write lock stayed taken). The caller may retry;
# a write may or may not have been applied (a connection lost during COMMIT), so its request_id must go with it.
DATABASE_UNAVAILABLE = "DATABASE_UNAVAILABLE"


class DeadlineExceeded(DomainError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class ResourceExhausted(DomainError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


def internal_status(domain: str = "tessera.dev") -> status_pb2.Status:
    """The status for an unexpected failure: nothing of the cause is revealed to the caller."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=domain))
    return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error", details=[info])


class Violations:
    """Collects field violations while a request is checked, then raises them all at once."""

    def __init__(self, domain: str) -> None:
        self.domain = domain
        self.items: list[FieldViolation] = []

    def add(self, field: str, description: str) -> None:
        self.items.append(FieldViolation(field, description))

    def __bool__(self) -> bool:
        return bool(self.items)

    def raise_if_any(self) -> None:
        if self.items:
            raise InvalidArgument(self.items, domain=self.domain)


def is_uuid(value: str) -> bool:
    """A UUID in canonical text form (any case), the form every id in the contracts takes."""
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


# Free text may hold line breaks and tabs, but not NUL, which PostgreSQL's text cannot store: refused, naming the
# field, rather than failing the statement that would store it.
NUL_REFUSED = "must not contain the NUL character (U+0000)"


def has_nul(value: str) -> bool:
    return "\x00" in value


# The zero-width non-joiner and joiner: Persian and Indic names and emoji sequences need them.
_JOINERS = frozenset("\u200c\u200d")


def is_blank(value: str) -> bool:
    """Nothing a reader would see: only spaces of any script and zero-width joiners, or nothing at all."""
    return all(c.isspace() or c in _JOINERS for c in value)


def is_one_line_text(value: str) -> bool:
    """Text shown to people on one line, such as a name: printable characters and spaces of any script (the
    ideographic space of Japanese names, no-break spaces) and the zero-width joiners, which str.isprintable() counts
    out; never control characters, line breaks or direction overrides."""
    return value.isprintable() or all(
        c.isprintable() or c in _JOINERS or unicodedata.category(c) == "Zs" for c in value)


def check_uuid(value: str, field: str, v: Violations, *, required: bool = True) -> None:
    """The id check of every service: `field` is required (unless told otherwise) and a UUID."""
    if not value:
        if required:
            v.add(field, "is required")
    elif not is_uuid(value):
        v.add(field, "must be a UUID such as 0b6f7d2c-3c1e-4d1a-9a59-6f1d1b9f1e2a")
