"""`python -m tessera_analytics` runs the analytics service."""

import sys

from tessera_runtime.app import run

sys.exit(run("analytics"))
