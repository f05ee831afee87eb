"""Every ErrorInfo reason a service's code gives is a value of the ErrorReason enum of its contract."""

from __future__ import annotations

import ast

import pytest
from tessera.inventory.v1 import product_pb2
from tessera.notification.v1 import notification_pb2
from tessera.order.v1 import order_pb2
from tessera.payment.v1 import payment_pb2
from tessera.user.v1 import user_pb2

from tessera_runtime.config import ROOT

CONTRACTS = {"user": user_pb2, "inventory": product_pb2, "payment": payment_pb2, "order": order_pb2,
             "notification": notification_pb2}


def _reasons_given(service: str) -> dict[str, str]:
    """The string constants passed as `reason=` anywhere in the service's package, with where each is given."""
    found: dict[str, str] = {}
    for path in sorted((ROOT / "services" / f"tessera_{service}").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                for keyword in node.keywords:
                    if (keyword.arg == "reason" and isinstance(keyword.value, ast.Constant)
                            and isinstance(keyword.value.value, str)):
                        found.setdefault(keyword.value.value, f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


@pytest.mark.parametrize("service", sorted(CONTRACTS))
def test_every_reason_given_is_in_the_contract(service):
    documented = {name.removeprefix("ERROR_REASON_") for name in CONTRACTS[service].ErrorReason.keys()}
    given = _reasons_given(service)
    assert given, f"no reason= found in tessera_{service}: the scan is broken"
    missing = {reason: where for reason, where in given.items() if reason not in documented}
    assert not missing, f"reasons {service} gives that its ErrorReason enum does not list: {missing}"
