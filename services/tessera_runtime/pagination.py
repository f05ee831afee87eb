"""Opaque keyset page tokens: bound to the method and filter that issued them, refused anywhere else."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

from tessera_runtime.errors import FieldViolation, InvalidArgument, has_nul

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 200
# What the rows of one page may weigh: a gRPC client refuses a message above 4 MiB by default, and the rest of the
# response, its JSON form through the gateway and the estimate's slack need room.
MAX_PAGE_BYTES = 3 * 1024 * 1024


def page_size(requested: int, domain: str, field: str = "page_size") -> int:
    """Applies the contract: 0 → default, above the maximum → the maximum, negative → INVALID_ARGUMENT."""
    if requested < 0:
        raise InvalidArgument([FieldViolation(field, "must not be negative")], domain=domain)
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def _fingerprint(method: str, filters: dict[str, Any]) -> str:
    raw = json.dumps([method, filters], sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()[:16]


def encode(method: str, filters: dict[str, Any], key: list[Any]) -> str:
    """Token for the page after the row whose sort key is `key`."""
    body = json.dumps({"f": _fingerprint(method, filters), "k": key}, separators=(",", ":"), default=str).encode()
    crc = zlib.crc32(body).to_bytes(4, "big")
    return base64.urlsafe_b64encode(crc + body).decode().rstrip("=")


def decode(token: str, method: str, filters: dict[str, Any], domain: str,
           field: str = "page_token") -> list[Any] | None:
    """Sort key of the last row of the previous page, or None for the first page."""
    if not token:
        return None
    invalid = InvalidArgument([FieldViolation(field, "is not a page token issued by this method")], domain=domain)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        crc, body = raw[:4], raw[4:]
        if len(raw) < 5 or zlib.crc32(body).to_bytes(4, "big") != crc:
            raise invalid
        data = json.loads(body)
    except (ValueError, TypeError):
        raise invalid from None
    if not isinstance(data, dict) or data.get("f") != _fingerprint(method, filters) or not isinstance(
            data.get("k"), list):
        raise InvalidArgument([FieldViolation(field, "was issued for another method or other filters")],
                              domain=domain)
    return data["k"]


def decode_time_key(token: str, method: str, filters: dict[str, Any], domain: str,
                    field: str = "page_token") -> tuple[dt.datetime, str] | None:
    """The (create_time, id) cursor most lists page by, or None for the first page."""
    key = decode(token, method, filters, domain, field)
    if key is None:
        return None
    # Only a token made by hand gets past the checks above and fails these: the tokens issued here carry a UTC time
    # and a row's id. Whatever it holds must be refused here, not fail the query.
    try:
        if len(key) != 2 or not isinstance(key[1], str) or has_nul(key[1]):
            raise ValueError("not a (time, id) pair")
        after = dt.datetime.fromisoformat(str(key[0]))
        if after.tzinfo is None:
            raise ValueError("a time without its offset")
        return after.astimezone(dt.UTC), key[1]
    except (ValueError, TypeError, OverflowError):
        raise InvalidArgument([FieldViolation(field, "is malformed")], domain=domain) from None


def next_page(rows: list[T], size: int, method: str, filters: dict[str, Any],
              weight: Callable[[T], int] | None = None) -> tuple[list[T], str]:
    """Given up to size + 1 rows (each with create_time and id), the page and the token of the next one. With
    `weight` (at least the bytes a row takes in the response), the page also ends before the row that would take it
    over MAX_PAGE_BYTES, after one row at least: page_size is a maximum, and the token continues where it ended."""
    if weight is not None:
        total = 0
        for i, row in enumerate(rows[:size]):
            total += weight(row)
            if total > MAX_PAGE_BYTES and i > 0:
                size = i
                break
    if len(rows) <= size:
        return rows, ""
    page = rows[:size]
    last = page[-1]
    return page, encode(method, filters, [last.create_time.isoformat(), last.id])  # type: ignore[attr-defined]
