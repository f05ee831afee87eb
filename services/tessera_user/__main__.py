"""`python -m tessera_user` runs the user service."""

import sys

from tessera_runtime.app import run

sys.exit(run("user"))
