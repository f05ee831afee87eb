"""Alembic environment of the notification service."""

from tessera_notification.adapters.orm import metadata
from tessera_runtime.migrations import run_env

run_env(metadata)
