"""The whole chain behind the real Envoy: a tester's `canary: true` reaches every service an order touches.

The gateway lets the header through for a token with the canary scope (test_gateway_canary.py); the order service
behind it, here the real one in this process on port 0, passes it on to the user, inventory and payment servers
its saga calls, which record the metadata every call reached them with: what the mesh would route on at each hop.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from tessera_runtime import context as callctx
from tests.support.gateway import SERVICES, Gateway
from tests.support.order_stack import InProcessOrder, Neighbours
from tests.support.recording import MetadataRecorder, method_name, values
from tests.support.waiting import eventually

SAGA_CALLS = {"GetUser", "BatchGetProducts", "ReserveStock", "ProcessPayment", "CommitReservation"}


@pytest.fixture(scope="module")
async def chain(gateway_workdir, dead_port, tmp_path_factory) -> AsyncIterator[tuple[Gateway, Neighbours,
                                                                                     MetadataRecorder]]:
    """The dev gateway with the in-process order service as its order upstream (every other route is down); the
    order service calls real user, inventory and payment servers that record what they receive."""
    received = MetadataRecorder()
    folder = tmp_path_factory.mktemp("canary-chain")
    neighbours = await Neighbours(folder, (received,)).start()
    order = await InProcessOrder.start(neighbours.order_env(f"sqlite+aiosqlite:///{folder / 'order.db'}"))
    addresses = {name: f"127.0.0.1:{dead_port}" for name in SERVICES}
    addresses["order"] = f"127.0.0.1:{order.port}"
    gateway = Gateway(gateway_workdir, "canary-chain", addresses, {"graphql": {"address": f"127.0.0.1:{dead_port}"}})
    try:
        # Envoy's health checks of the order service are answered on this event loop: wait off it.
        await asyncio.to_thread(gateway.start, ["order"])
        yield gateway, neighbours, received
    finally:
        await asyncio.to_thread(gateway.stop)
        await order.stop()
        await neighbours.stop()


async def place(gateway: Gateway, neighbours: Neighbours, scopes: str, headers: dict[str, str]) -> str:
    """Places an order over REST as its customer; returns the correlation id the request went by."""
    customer, product = await neighbours.customer(), await neighbours.product(5)
    correlation_id = uuid.uuid4().hex
    token = gateway.mint(customer, scopes)
    response = await asyncio.to_thread(gateway.call, "POST", "/v1/orders", token=token, body={
        "customerId": customer, "paymentMethod": "pm_sandbox_ok", "currencyCode": "EUR",
        "requestId": uuid.uuid4().hex, "items": [{"productId": product, "quantity": 1}]},
        headers={callctx.CORRELATION_ID: correlation_id, **headers})
    assert response.status == 200, response.body
    assert response.json()["order"]["status"] == "ORDER_STATUS_CONFIRMED"
    return correlation_id


async def canary_downstream(received: MetadataRecorder, correlation_id: str) -> dict[str, list[str]]:
    """The `canary` values of each call the saga of that request made."""
    def calls() -> dict[str, list[str]]:
        return {method_name(m): values(md, callctx.CANARY) for m, md in received.of(callctx.CORRELATION_ID,
                                                                                     correlation_id)}
    await eventually(lambda: SAGA_CALLS <= set(calls()), f"the saga's calls of {correlation_id}")
    return calls()


async def test_a_testers_canary_reaches_every_service_of_the_order_and_nobody_elses_does(chain):
    gateway, neighbours, received = chain
    tester = await place(gateway, neighbours, "order:write canary", {"canary": "true"})
    assert await canary_downstream(received, tester) == {m: ["true"] for m in SAGA_CALLS}
    # A customer's token: the gateway removes the header, so no service on the way sees it.
    customer = await place(gateway, neighbours, "order:write", {"canary": "true"})
    assert await canary_downstream(received, customer) == {m: [] for m in SAGA_CALLS}
