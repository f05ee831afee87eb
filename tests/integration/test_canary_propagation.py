"""`canary: true` follows a call through every service it reaches, and nothing else.

The mesh routes a call carrying `canary: true` to a service's canary v2 (k8s/README.md, "Canary workflow"); the
services pass it on to the calls they make for that call, so a tester reaches the v2 of every service on the way.
Here the real order service (and the GraphQL API in front of it) runs over real user, inventory and payment
servers on port 0, each of which records the metadata every call reached it with: what they record is exactly
what the mesh would route on.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from aiohttp import web
from tessera.order.v1 import order_pb2
from tessera.order.v1 import order_service_pb2 as svc
from tessera.payment.v1 import payment_service_pb2

from tessera_graphql.app import GraphQLSettings, build_app
from tessera_order.adapters.downstream import GrpcCustomerDirectory, GrpcInventory, GrpcPayments
from tessera_order.service_layer.ports import Downstream
from tessera_runtime import context as callctx
from tessera_runtime.clients import open_channel
from tests.support.graphql import CUSTOMER, GraphQL
from tests.support.order_stack import InProcessOrder, Neighbours
from tests.support.recording import MetadataRecorder, method_name, values
from tests.support.waiting import eventually

# What the CreateOrder saga calls, from validating the customer to committing the stock.
SAGA_CALLS = {"GetUser", "BatchGetProducts", "ReserveStock", "ProcessPayment", "CommitReservation"}
PAYMENT_SERVICE = payment_service_pb2.DESCRIPTOR.services_by_name["PaymentService"]
CANARY = [("canary", "true")]
# Values the mesh's exact match on `true` does not route to v2 (two copies are matched joined: `true,true`).
NOT_CANARY = {
    "capitalised": [("canary", "True")],
    "false": [("canary", "false")],
    "other": [("canary", "yes")],
    "empty": [("canary", "")],
    "repeated": [("canary", "true"), ("canary", "true")],
    "list": [("canary", "true,true")],
}


def every(methods: set[str], canary_values: list[str]) -> dict[str, list[str]]:
    """Each of `methods` called with these `canary` values (saga_calls' form)."""
    return {m: list(canary_values) for m in methods}


@pytest.fixture(scope="module")
def received() -> MetadataRecorder:
    """What the user, inventory and payment servers received."""
    return MetadataRecorder()


@pytest.fixture(scope="module")
def order_received() -> MetadataRecorder:
    """What the order server received."""
    return MetadataRecorder()


@pytest.fixture(scope="module")
async def neighbours(tmp_path_factory, received) -> AsyncIterator[Neighbours]:
    stack = await Neighbours(tmp_path_factory.mktemp("canary-neighbours"), (received,)).start()
    yield stack
    await stack.stop()


@pytest.fixture(scope="module")
async def order(neighbours, order_received, tmp_path_factory) -> AsyncIterator[InProcessOrder]:
    folder = tmp_path_factory.mktemp("canary-order")
    service = await InProcessOrder.start(neighbours.order_env(f"sqlite+aiosqlite:///{folder / 'order.db'}"),
                                         (order_received,))
    yield service
    await service.stop()


def saga_calls(recorder: MetadataRecorder, correlation_id: str) -> dict[str, list[str]]:
    """The `canary` values of the calls a request (named by its correlation id) caused, by method; a method called
    more than once with different values shows as such."""
    seen: dict[str, set[tuple[str, ...]]] = {}
    for method, md in recorder.of(callctx.CORRELATION_ID, correlation_id):
        seen.setdefault(method_name(method), set()).add(tuple(values(md, callctx.CANARY)))
    return {m: list(v.pop()) if len(v) == 1 else sorted(v) for m, v in seen.items()}


async def place(order: InProcessOrder, neighbours: Neighbours, metadata: list[tuple[str, str]]) -> str:
    """Places an order with `metadata` and waits for the saga's last call; returns the correlation id it went by."""
    customer, product = await neighbours.customer(), await neighbours.product(5)
    correlation_id = uuid.uuid4().hex
    reply = await order.stub.CreateOrder(svc.CreateOrderRequest(
        customer_id=customer, payment_method="pm_sandbox_ok", currency_code="EUR", request_id=uuid.uuid4().hex,
        items=[svc.CreateOrderRequest.Item(product_id=product, quantity=1)]),
        metadata=[(callctx.CORRELATION_ID, correlation_id), *metadata], timeout=20)
    assert reply.order.status == order_pb2.ORDER_STATUS_CONFIRMED, reply.order
    return correlation_id


async def saga_done(recorder: MetadataRecorder, correlation_id: str) -> None:
    await eventually(lambda: SAGA_CALLS <= set(saga_calls(recorder, correlation_id)),
                     f"the saga's calls of {correlation_id}")


def canary_only_from(recorder: MetadataRecorder, correlation_ids: set[str]) -> None:
    """No call the servers received carries `canary` but those of the given requests: not the plain requests
    served meanwhile, nor the order service's readiness checks, nor the tests' own seeding calls."""
    for method, md in recorder.calls:
        if values(md, callctx.CANARY):
            assert set(values(md, callctx.CORRELATION_ID)) & correlation_ids, (method, md)


async def test_canary_true_follows_the_order_saga_to_every_service_and_stays_with_its_call(order, neighbours,
                                                                                          received):
    """A CreateOrder with `canary: true` passes it on to every call of its saga (user, inventory, payment), while
    plain CreateOrders served at the same time pass nothing on: the flag belongs to the call, not the process."""
    canary, *plain = await asyncio.gather(place(order, neighbours, CANARY), place(order, neighbours, []),
                                          place(order, neighbours, []))
    for correlation_id in (canary, *plain):
        await saga_done(received, correlation_id)
    assert saga_calls(received, canary) == every(SAGA_CALLS, ["true"])
    for correlation_id in plain:
        assert saga_calls(received, correlation_id) == every(SAGA_CALLS, [])
    # And after it: a plain order placed once the canary's call has ended.
    after = await place(order, neighbours, [])
    await saga_done(received, after)
    assert saga_calls(received, after) == every(SAGA_CALLS, [])
    canary_only_from(received, {canary})


@pytest.mark.parametrize("metadata", NOT_CANARY.values(), ids=NOT_CANARY.keys())
async def test_only_the_value_the_mesh_routes_on_is_passed_on(order, neighbours, received, metadata):
    """The order service received the metadata as sent (the recorder on it shows it), but passes on only the one
    value the mesh routes to v2, `true`, sent once; the same order with `canary: true` passes it on."""
    other, control = await asyncio.gather(place(order, neighbours, metadata), place(order, neighbours, CANARY))
    await saga_done(received, other)
    await saga_done(received, control)
    assert saga_calls(received, other) == every(SAGA_CALLS, [])
    assert saga_calls(received, control) == every(SAGA_CALLS, ["true"])


class InterruptedPayments(GrpcPayments):
    """The real payments client, but the first charge interrupts the saga before it is sent (as a crash of the
    order process would): the recovery resumes it from PROCESS_PAYMENT."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        super().__init__(channel, 5.0)
        self.interrupted = False

    async def process_payment(self, **kw):
        if not self.interrupted:
            self.interrupted = True
            raise RuntimeError("the order process died before it charged the customer")
        return await super().process_payment(**kw)


async def test_a_saga_resumed_by_the_recovery_goes_by_the_weights(neighbours, received, tmp_path):
    """The steps run from the request pass `canary: true` on; the rest, resumed later by the recovery, have no
    request to take it from (the store keeps the caller's identity and trace, not the flag): they pass nothing on,
    so the mesh routes them by each service's canary weights."""
    channels = [open_channel(neighbours.address(s), []) for s in ("user", "inventory")]
    payment_channel = open_channel(neighbours.address("payment"), [PAYMENT_SERVICE])
    downstream = Downstream(GrpcCustomerDirectory(channels[0]), GrpcInventory(channels[1]),
                            InterruptedPayments(payment_channel))
    service = await InProcessOrder.start(neighbours.order_env(f"sqlite+aiosqlite:///{tmp_path / 'order.db'}"),
                                         downstream=downstream)
    try:
        customer, product = await neighbours.customer(), await neighbours.product(5)
        correlation_id, request_id = uuid.uuid4().hex, uuid.uuid4().hex
        try:
            await service.stub.CreateOrder(svc.CreateOrderRequest(
                customer_id=customer, payment_method="pm_sandbox_ok", currency_code="EUR",
                request_id=uuid.uuid4().hex, items=[svc.CreateOrderRequest.Item(product_id=product, quantity=1)]),
                metadata=[(callctx.CORRELATION_ID, correlation_id), (callctx.REQUEST_ID, request_id), *CANARY],
                timeout=20)
        except grpc.aio.AioRpcError:
            pass  # the interrupted saga's answer; the recovery finishes it
        await saga_done(received, correlation_id)
    finally:
        await service.stop()
        for channel in (*channels, payment_channel):
            await channel.close()
    calls = received.of(callctx.CORRELATION_ID, correlation_id)
    from_request = [(method_name(m), values(md, callctx.CANARY)) for m, md in calls
                    if (callctx.REQUEST_ID, request_id) in md]
    resumed = [(method_name(m), values(md, callctx.CANARY)) for m, md in calls
               if (callctx.REQUEST_ID, request_id) not in md]
    assert from_request == [("GetUser", ["true"]), ("BatchGetProducts", ["true"]), ("ReserveStock", ["true"])]
    assert resumed == [("ProcessPayment", []), ("CommitReservation", [])]


# The GraphQL API in front of the same services.

PLACE = """
mutation Place($input: CreateOrderInput!) { createOrder(input: $input) { id status } }"""


@pytest.fixture(scope="module")
async def graphql(neighbours, order) -> AsyncIterator[GraphQL]:
    settings = GraphQLSettings.from_env({
        "TESSERA_GRAPHQL_PORT": "0", "TESSERA_USER_SERVICE_ADDR": neighbours.address("user"),
        "TESSERA_INVENTORY_SERVICE_ADDR": neighbours.address("inventory"),
        "TESSERA_ORDER_SERVICE_ADDR": f"127.0.0.1:{order.port}"})
    runner = web.AppRunner(build_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    async with aiohttp.ClientSession() as session:
        yield GraphQL(f"http://127.0.0.1:{runner.addresses[0][1]}/graphql", session)
    await runner.cleanup()


async def place_over_graphql(graphql: GraphQL, neighbours: Neighbours, scopes: str,
                             headers: list[tuple[str, str]]) -> str:
    """Places an order through the GraphQL API as a caller with `scopes`, reads it back with its customer and
    products in the same request, and returns the correlation id the request went by."""
    customer, product = await neighbours.customer(), await neighbours.product(5)
    correlation_id = uuid.uuid4().hex
    query = PLACE.replace("status }", "status customer { id } items { product { id } } }")
    sent = {callctx.CORRELATION_ID: correlation_id, "x-user-id": customer, "x-user-scopes": scopes}
    async with graphql.session.post(graphql.url, json={"query": query, "variables": {"input": {
            "customerId": customer, "paymentMethod": "pm_sandbox_ok", "currencyCode": "EUR",
            "requestId": uuid.uuid4().hex, "items": [{"productId": product, "quantity": 1}]}}},
            headers=[*sent.items(), *headers]) as response:
        body = await response.json()
    assert response.status == 200 and "errors" not in body, body
    assert body["data"]["createOrder"]["status"] == "CONFIRMED"
    return correlation_id


def chain(order_received: MetadataRecorder, received: MetadataRecorder, correlation_id: str) -> dict[str, list[str]]:
    """The `canary` values of the calls one GraphQL request caused: its CreateOrder, the saga's calls, and the
    API's own reads of the customer and the products."""
    return {**saga_calls(order_received, correlation_id), **saga_calls(received, correlation_id)}


async def graphql_chain(graphql, neighbours, order_received, received, scopes: str,
                        headers: list[tuple[str, str]]) -> dict[str, list[str]]:
    correlation_id = await place_over_graphql(graphql, neighbours, scopes, headers)
    await saga_done(received, correlation_id)
    return chain(order_received, received, correlation_id)


@pytest.mark.parametrize("scope", ["canary", "admin"])
async def test_graphql_passes_canary_on_for_a_caller_with_the_canary_or_admin_scope(graphql, neighbours,
                                                                                 order_received, received, scope):
    """The whole chain: GraphQL → order (CreateOrder) → user, inventory, payment, and GraphQL's own reads."""
    calls = await graphql_chain(graphql, neighbours, order_received, received, f"{CUSTOMER} {scope}",
                                [("Canary", "true")])
    assert calls == every({"CreateOrder", *SAGA_CALLS}, ["true"])
    # The same caller without the header: nothing.
    calls = await graphql_chain(graphql, neighbours, order_received, received, f"{CUSTOMER} {scope}", [])
    assert calls == every({"CreateOrder", *SAGA_CALLS}, [])


@pytest.mark.parametrize("scopes", [CUSTOMER, f"{CUSTOMER} canaryx", f"{CUSTOMER} canary:read"],
                         ids=["no-canary", "suffix", "context"])
async def test_graphql_drops_canary_for_a_caller_without_the_scope(graphql, neighbours, order_received, received,
                                                                   scopes):
    """Behind the gateway the header of such a caller never arrives; should it, the API drops it itself. The
    same request from a caller with the scope passes it on."""
    without, control = await asyncio.gather(
        graphql_chain(graphql, neighbours, order_received, received, scopes, CANARY),
        graphql_chain(graphql, neighbours, order_received, received, f"{CUSTOMER} canary", CANARY))
    assert without == every({"CreateOrder", *SAGA_CALLS}, [])
    assert control == every({"CreateOrder", *SAGA_CALLS}, ["true"])


@pytest.mark.parametrize("headers", NOT_CANARY.values(), ids=NOT_CANARY.keys())
async def test_graphql_passes_on_only_the_value_the_mesh_routes_on(graphql, neighbours, order_received, received,
                                                                   headers):
    without, control = await asyncio.gather(
        graphql_chain(graphql, neighbours, order_received, received, f"{CUSTOMER} canary", headers),
        graphql_chain(graphql, neighbours, order_received, received, f"{CUSTOMER} canary", CANARY))
    assert without == every({"CreateOrder", *SAGA_CALLS}, [])
    assert control == every({"CreateOrder", *SAGA_CALLS}, ["true"])
