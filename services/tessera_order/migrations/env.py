"""Alembic environment of the order service."""

from tessera_order.adapters.orm import metadata
from tessera_runtime.migrations import run_env

run_env(metadata)
