"""`python -m tessera_notification` runs the notification service."""

import sys

from tessera_runtime.app import run

sys.exit(run("notification"))
