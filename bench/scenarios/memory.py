"""Idle memory: each service started alone on its own PostgreSQL database, its RSS once it serves."""

from __future__ import annotations

import importlib.util

from bench.harness import Run, idle_rss
from tessera_runtime.app import SERVICES

IDLE_TARGET_MB = 120.0


def available_services(wanted: tuple[str, ...]) -> list[str]:
    """The services of `wanted` whose composition root exists in this checkout."""
    found = []
    for name in wanted:
        module = SERVICES.get(name)
        if module is None:
            continue
        try:
            if importlib.util.find_spec(module) is not None:
                found.append(name)
        except ModuleNotFoundError:
            continue
    return found


def idle_memory(run: Run) -> list[str]:
    """Starts each service, reads its RSS after it settles, stops it. Returns notes on what could not start."""
    notes = []
    for service in available_services(run.config.services):
        try:
            process = run.tessera(service, run.dbs.create(service), label=f"{service}-idle")
        except RuntimeError as exc:
            notes.append(f"{service}: did not start for the idle measurement ({str(exc)[:200]})")
            continue
        try:
            run.note_memory(service, idle_mb=idle_rss(process, settle=1.5))
        finally:
            run.stop(process)
    return notes
