"""`python -m tessera_payment` runs the payment service."""

import sys

from tessera_runtime.app import run

sys.exit(run("payment"))
