"""Alembic environment of the user service."""

from tessera_runtime.migrations import run_env
from tessera_user.adapters.orm import metadata

run_env(metadata)
