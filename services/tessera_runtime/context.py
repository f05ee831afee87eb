"""Per-call context shared by interceptors, handlers and outgoing clients: ids, caller identity, deadline, and
whether the call asked for the canary."""

from __future__ import annotations

import contextvars
import dataclasses
import re
import time
from collections.abc import Mapping

from tessera_runtime.logs import correlation_id_var, request_id_var

# Metadata keys. The gateway sets the identity keys from a verified JWT; services trust them only from it.
REQUEST_ID = "x-request-id"
CORRELATION_ID = "x-correlation-id"
SUBJECT = "x-user-id"
SCOPES = "x-user-scopes"
ADMIN_SCOPE = "admin"
# The header (gRPC metadata key) the mesh routes on to a service's canary v2, and the one value it routes there:
# Istio's VirtualServices match it exactly (tessera_deploy.mesh.CANARY_HEADER; the gateway's CANARY_HEADER).
CANARY = "canary"
CANARY_VALUE = "true"


@dataclasses.dataclass(frozen=True)
class Principal:
    """Who the call is made for, as established by the gateway."""

    subject: str
    scopes: frozenset[str]

    @property
    def is_admin(self) -> bool:
        return ADMIN_SCOPE in self.scopes

    def may_act_for(self, customer_id: str) -> bool:
        return self.is_admin or self.subject == customer_id


_MAX_ID_LENGTH = 128
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def sendable(value: str) -> bool:
    """Whether gRPC can send `value` as a (text) metadata value: printable ASCII, spaces included."""
    return value.isascii() and value.isprintable()


def clean_id(value: str | None) -> str | None:
    """A caller's request or correlation id as it may be kept: 1 to 128 printable ASCII characters (what gRPC
    metadata can carry back to the caller), else None."""
    if not value or len(value) > _MAX_ID_LENGTH or not sendable(value):
        return None
    return value


def split_scopes(text: str) -> frozenset[str]:
    """The scopes of a space-delimited scope string, cut at spaces only, as the gateway cuts the token's scope claim
    before it checks a route's scopes (RFC 6749): "admin\tx" is one scope, never admin."""
    return frozenset(s for s in text.split(" ") if s)


def principal_from(headers: Mapping[str, str]) -> Principal | None:
    """The caller the gateway named in a call's metadata or an HTTP request's headers (lower-case keys)."""
    subject = headers.get(SUBJECT)
    if not subject:
        return None
    return Principal(subject=_canonical_subject(subject), scopes=split_scopes(headers.get(SCOPES, "")))


def _canonical_subject(subject: str) -> str:
    """Accounts are named by lower-case UUIDs everywhere in Tessera, and a UUID reads the same in either case (RFC
    4122): a token whose subject spells one in upper case is that account, compared and stored as its ids are."""
    lower = subject.lower()
    return lower if lower != subject and _UUID.fullmatch(lower) else subject


def asks_for_canary(values: list[str]) -> bool:
    """Whether a call whose `canary` header (or metadata key) came with `values` is one the mesh sends to the
    canary: one value, exactly `true`, as Istio's exact match reads it (Envoy joins repeated values with a comma
    before matching, so two copies are `true,true`, which matches nothing; `True` and ` true` are no match)."""
    return len(values) == 1 and values[0] == CANARY_VALUE


principal_var: contextvars.ContextVar[Principal | None] = contextvars.ContextVar("principal", default=None)
deadline_var: contextvars.ContextVar[float | None] = contextvars.ContextVar("deadline", default=None)
# Set for the work of a call that arrived with `canary: true`: every gRPC call made for it asks for the canary too.
canary_var: contextvars.ContextVar[bool] = contextvars.ContextVar("canary", default=False)


def current_request_id() -> str | None:
    return request_id_var.get()


def current_correlation_id() -> str | None:
    return correlation_id_var.get()


def current_principal() -> Principal | None:
    return principal_var.get()


def remaining_seconds() -> float | None:
    """Seconds left before the current call's deadline, or None when the call has no deadline."""
    deadline = deadline_var.get()
    return None if deadline is None else deadline - time.monotonic()


def outgoing_metadata() -> list[tuple[str, str]]:
    """Metadata that follows the work to the next service: ids, the caller's identity, and `canary: true` when the
    call being served asked for the canary (so the mesh sends the whole chain of calls to the v2 of every service
    that runs one)."""
    md: list[tuple[str, str]] = []
    if (rid := request_id_var.get()) is not None:
        md.append((REQUEST_ID, rid))
    if (cid := correlation_id_var.get()) is not None:
        md.append((CORRELATION_ID, cid))
    if (p := principal_var.get()) is not None:
        md.append((SUBJECT, p.subject))
        md.append((SCOPES, " ".join(sorted(p.scopes))))
    if canary_var.get():
        md.append((CANARY, CANARY_VALUE))
    return md
