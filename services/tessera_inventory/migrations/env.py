"""Alembic environment of the inventory service."""

from tessera_inventory.adapters.orm import metadata
from tessera_runtime.migrations import run_env

run_env(metadata)
