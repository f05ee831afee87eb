"""Alembic environment of the payment service."""

from tessera_payment.adapters.orm import metadata
from tessera_runtime.migrations import run_env

run_env(metadata)
