"""Method-level authorization: the catalog grants each service exactly the methods its code calls on another.

The methods come from the code, not from a second hand-typed list: the stubs each service's package calls are
read from its source (tests/support/k8s.py) and must equal `SERVICE_CALLS` in services/tessera_deploy/catalog.py,
which `make k8s-mesh` turns into the AuthorizationPolicies.
"""

from __future__ import annotations

import importlib

import pytest

from tessera_deploy import ROOT, catalog
from tessera_deploy.catalog import SERVICE_CALLS, workloads
from tests.support.k8s import (
    StubUseError,
    call_problems,
    exposed_stub_calls,
    package_stub_calls,
    stub_attributes,
    stub_calls,
)

DOWNSTREAM = ROOT / "services" / "tessera_order" / "adapters" / "downstream.py"
GRAPHQL_PACKAGE = ROOT / "services" / "tessera_graphql"


def _contract_methods() -> set[str]:
    """Every method path of the contracts, read through the generated *_pb2 modules (not the descriptor set)."""
    paths = set()
    for w in workloads():
        module = importlib.import_module(f"tessera.{w.name}.v1.{w.name}_service_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            paths |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    return paths


def test_each_service_is_granted_exactly_the_methods_its_code_calls():
    assert set(SERVICE_CALLS) <= {w.k8s_name for w in workloads()} | {catalog.GRAPHQL}, (
        "SERVICE_CALLS names an unknown caller")
    problems = []
    for w in workloads():
        package = ROOT / "services" / f"tessera_{w.name}"
        assert package.is_dir(), package
        problems += call_problems(w.k8s_name, package_stub_calls(package), SERVICE_CALLS.get(w.k8s_name, ()))
    assert problems == [], "\n".join(problems)
    # The reader does see the order saga's calls: on every service it orchestrates.
    called = package_stub_calls(ROOT / "services" / "tessera_order")
    assert {p.split("/")[1] for p in called} == {
        "tessera.user.v1.UserService", "tessera.inventory.v1.InventoryService", "tessera.payment.v1.PaymentService"}


def graphql_calls(folder=GRAPHQL_PACKAGE) -> set[str]:
    """What the GraphQL API's package calls: through stubs it uses where it builds them, and through those its
    Upstream class holds for the schema."""
    direct = {p for path in sorted(folder.rglob("*.py")) for p in stub_calls(path.read_text(), path.name)}
    return direct | exposed_stub_calls(folder)


def test_the_graphql_api_is_granted_exactly_the_methods_its_schema_calls():
    """The stubs live in upstream.py (`self.users = UserServiceStub(...)`); the schema's resolvers call their
    methods (`u.orders.CreateOrder`): together they are what SERVICE_CALLS must grant graphql, no more."""
    assert stub_attributes((GRAPHQL_PACKAGE / "upstream.py").read_text()) == {
        "users": "tessera.user.v1.UserService", "inventory": "tessera.inventory.v1.InventoryService",
        "orders": "tessera.order.v1.OrderService", "analytics": "tessera.analytics.v1.AnalyticsService"}
    called = graphql_calls()
    assert call_problems(catalog.GRAPHQL, called, SERVICE_CALLS[catalog.GRAPHQL]) == []
    assert len(SERVICE_CALLS[catalog.GRAPHQL]) == len(set(SERVICE_CALLS[catalog.GRAPHQL])) == 13
    # Its grants on each service are those methods, one by one; no health checks (it makes none), no payment.
    for w in workloads():
        [grant] = [g for g in w.grants if g.caller == catalog.GRAPHQL] or [None]
        mine = sorted(p for p in called if p.split("/")[1] in w.grpc_services)
        if w.name in ("user", "inventory", "order", "analytics"):
            assert grant is not None and sorted(grant.paths) == mine and not grant.health, w.name
        else:
            assert grant is None and mine == [], w.name


def test_a_schema_field_calling_an_ungranted_method_is_refused(tmp_path):
    package = tmp_path / "tessera_graphql"
    package.mkdir()
    for path in GRAPHQL_PACKAGE.glob("*.py"):
        (package / path.name).write_text(path.read_text())
    schema = package / "schema.py"
    schema.write_text(schema.read_text().replace("lambda u: u.orders.CancelOrder", "lambda u: u.orders.DeleteOrder"))
    assert call_problems(catalog.GRAPHQL, graphql_calls(package), SERVICE_CALLS[catalog.GRAPHQL]) == [
        "graphql calls /tessera.order.v1.OrderService/DeleteOrder, which services/tessera_deploy/catalog.py "
        "SERVICE_CALLS does not grant it",
        "SERVICE_CALLS grants graphql /tessera.order.v1.OrderService/CancelOrder, which its code never calls"]


def test_every_granted_method_is_in_the_contracts():
    methods = _contract_methods()
    granted = {p for paths in SERVICE_CALLS.values() for p in paths}
    assert granted and granted <= methods, sorted(granted - methods)


def test_a_method_the_code_calls_without_a_grant_is_refused():
    source = DOWNSTREAM.read_text().replace("    async def commit_reservation(", (
        "    async def get_reservation(self, reservation_id: str) -> Reservation:\n"
        "        reply = await _call(\"inventory\", self.stub.GetReservation,\n"
        "                            inventory_pb2.GetReservationRequest(id=reservation_id))\n"
        "        return _reservation(reply.reservation)\n\n"
        "    async def commit_reservation("), 1)
    called = stub_calls(source, "downstream.py")
    assert "/tessera.inventory.v1.InventoryService/GetReservation" in called
    assert call_problems("order-service", called, SERVICE_CALLS["order-service"]) == [
        "order-service calls /tessera.inventory.v1.InventoryService/GetReservation, which "
        "services/tessera_deploy/catalog.py SERVICE_CALLS does not grant it"]


def test_a_grant_the_code_no_longer_uses_is_refused():
    source = DOWNSTREAM.read_text().replace("self.stub.VoidPayment", "self.void_payment")
    assert call_problems("order-service", stub_calls(source), SERVICE_CALLS["order-service"]) == [
        "SERVICE_CALLS grants order-service /tessera.payment.v1.PaymentService/VoidPayment, which its code never "
        "calls"]


IMPORTS = "from tessera.user.v1 import user_service_pb2_grpc\n"


@pytest.mark.parametrize("code", [
    # The method name is computed: nobody can tell which one is called.
    "class A:\n    def __init__(self, ch):\n        self.stub = user_service_pb2_grpc.UserServiceStub(ch)\n"
    "    def call(self, name):\n        return getattr(self.stub, name)()\n",
    # The stub leaves the class.
    "class A:\n    def __init__(self, ch):\n        self.stub = user_service_pb2_grpc.UserServiceStub(ch)\n"
    "    def call(self):\n        return helper(self.stub)\n",
    # A local stub passed on.
    "def call(ch):\n    stub = user_service_pb2_grpc.UserServiceStub(ch)\n    return helper(stub)\n",
    # A stub kept in a container.
    "STUBS = [user_service_pb2_grpc.UserServiceStub(None)]\n",
])
def test_stub_uses_that_hide_the_method_are_refused(code):
    with pytest.raises(StubUseError, match=r"tessera\.user\.v1\.UserService"):
        stub_calls(IMPORTS + code)


def test_local_stubs_imported_stub_classes_and_aliases_are_followed():
    code = (
        "from tessera.user.v1.user_service_pb2_grpc import UserServiceStub\n"
        "import tessera.payment.v1.payment_service_pb2_grpc as payments\n"
        + IMPORTS
        + "def a(ch):\n    stub = UserServiceStub(ch)\n    return stub.GetUser(1), stub.ListUsers(2)\n"
        "def b(ch):\n    return payments.PaymentServiceStub(ch).GetPayment(3)\n"
        "class C:\n    def __init__(self, ch):\n        self.users = user_service_pb2_grpc.UserServiceStub(ch)\n"
        "    async def go(self):\n        return await self.users.DeleteUser.with_call(4)\n"
    )
    assert stub_calls(code) == {"/tessera.user.v1.UserService/GetUser", "/tessera.user.v1.UserService/ListUsers",
                                "/tessera.payment.v1.PaymentService/GetPayment",
                                "/tessera.user.v1.UserService/DeleteUser"}


def test_the_catalog_refuses_a_grant_of_a_method_the_contracts_lack(monkeypatch):
    monkeypatch.setitem(SERVICE_CALLS, "order-service",
                        (*SERVICE_CALLS["order-service"], "/tessera.user.v1.UserService/GetUsers"))
    with pytest.raises(LookupError, match=r"SERVICE_CALLS\['order-service'\] lists "
                                          r"/tessera.user.v1.UserService/GetUsers, which no contract"):
        catalog.workloads.__wrapped__(catalog.DESCRIPTOR_SET)
