"""Every ErrorInfo reason a service's code gives is a value of the ErrorReason enum of its contract, and every one the
shared runtime gives is a value of tessera.common.v1.ErrorReason (or of every service's enum)."""

from __future__ import annotations

import ast

import pytest
from tessera.analytics.v1 import analytics_pb2
from tessera.common.v1 import error_reason_pb2
from tessera.inventory.v1 import product_pb2
from tessera.notification.v1 import notification_pb2
from tessera.order.v1 import order_pb2
from tessera.payment.v1 import payment_pb2
from tessera.user.v1 import user_pb2

from tessera_runtime.config import ROOT

CONTRACTS = {"user": user_pb2, "inventory": product_pb2, "payment": payment_pb2, "order": order_pb2,
             "notification": notification_pb2, "analytics": analytics_pb2}


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


def _reasons_given_by_runtime() -> dict[str, str]:
    """The reasons tessera_runtime gives, with where: string constants passed as `reason=` (to an error or to an
    ErrorInfo), module constants passed so (DATABASE_UNAVAILABLE), and the default reason of each error it raises
    without one (MalformedRequest, InvalidArgument)."""
    trees = {path: ast.parse(path.read_text(), str(path))
             for path in sorted((ROOT / "services" / "tessera_runtime").rglob("*.py"))}
    constants: dict[str, str] = {}
    defaults: dict[str, str] = {}
    for tree in trees.values():
        for node in tree.body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                    and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)):
                constants[node.targets[0].id] = node.value.value
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                for statement in node.body:
                    if (isinstance(statement, ast.Assign) and isinstance(statement.value, ast.Constant)
                            and any(getattr(t, "id", None) == "default_reason" for t in statement.targets)):
                        defaults[node.name] = statement.value.value
    found: dict[str, str] = {}
    for path, tree in trees.items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno}"
            reasons = [k.value for k in node.keywords if k.arg == "reason"]
            for value in reasons:
                if isinstance(value, ast.Constant) and isinstance(value.value, str):
                    found.setdefault(value.value, where)
                elif isinstance(value, ast.Name) and value.id in constants:
                    found.setdefault(constants[value.id], where)
            called = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            if not reasons and called in defaults:
                found.setdefault(defaults[called], where)
    return found


def test_every_reason_the_runtime_gives_is_in_a_contract():
    common = {name.removeprefix("ERROR_REASON_") for name in error_reason_pb2.ErrorReason.keys()}
    in_every_service = set.intersection(*({name.removeprefix("ERROR_REASON_") for name in c.ErrorReason.keys()}
                                          for c in CONTRACTS.values()))
    given = _reasons_given_by_runtime()
    assert {"DATABASE_UNAVAILABLE", "MALFORMED_REQUEST", "INTERNAL", "CIRCUIT_OPEN"} <= set(given), (
        f"the scan is broken: {given}")
    missing = {reason: where for reason, where in given.items() if reason not in common | in_every_service}
    assert not missing, f"reasons the runtime gives that tessera.common.v1.ErrorReason does not list: {missing}"
