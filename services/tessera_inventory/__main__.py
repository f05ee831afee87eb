"""`python -m tessera_inventory` runs the inventory service."""

import sys

from tessera_runtime.app import run

sys.exit(run("inventory"))
