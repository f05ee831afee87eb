"""Alembic environment of the analytics service."""

from tessera_analytics.adapters.orm import metadata
from tessera_runtime.migrations import run_env

run_env(metadata)
