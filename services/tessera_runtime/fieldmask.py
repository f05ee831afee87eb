"""update_mask rules shared by every Update RPC: at least one path, only the resource's updatable fields."""

from __future__ import annotations

from collections.abc import Iterable

from tessera_runtime.errors import Violations


def check_update_mask(paths: Iterable[str], *, mutable: frozenset[str], immutable: frozenset[str], resource: str,
                      violations: Violations) -> set[str]:
    """Adds a violation on `update_mask` for an empty mask and for each output-only, immutable or unknown path;
    returns the paths as a set."""
    paths = list(paths)
    if not paths:
        violations.add("update_mask", "must name at least one path")
    for path in paths:
        if path in immutable:
            violations.add("update_mask", f"path {path!r} is output only or immutable")
        elif path not in mutable:
            violations.add("update_mask", f"path {path!r} is not an updatable field of {resource}")
    return set(paths)
