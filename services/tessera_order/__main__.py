"""`python -m tessera_order` runs the order service."""

import sys

from tessera_runtime.app import run

sys.exit(run("order"))
