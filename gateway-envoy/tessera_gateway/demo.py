"""`make demo`: a scripted walk through Tessera's REST API, through the gateway.

It creates a customer and two products, places an order that succeeds and one the payment processor declines
(its stock reservation is released: the saga compensates), then reads everything back, and ends with the day's
business metrics as the analytics service counted them from the events. It uses the gateway of a
running `make run` when one answers, and otherwise starts its own stack in a temporary folder and stops it after.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import tempfile
import time
import urllib.parse
from typing import Any

from tessera_gateway import description, tokens

CUSTOMER_SCOPES = ["user:read", "order:read", "order:write", "payment:read", "notification:read", "inventory:read"]
# Step 5: the customer's account, orders and their products as one graph (the GraphQL API at /graphql).
GRAPH = """{ me { displayName orders { orders { status total { currencyCode amountMinor }
  items { quantity product { name stockAvailable } } } } } }"""


class DemoError(Exception):
    """A step did not end as the scenario expects."""


class Api:
    """A small REST client for the gateway that prints each call."""

    def __init__(self, base_url: str) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80

    def call(self, method: str, path: str, token: str, body: Any = None, *, quiet: bool = False) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            headers = {"authorization": f"Bearer {token}"}
            data = None
            if body is not None:
                data = json.dumps(body).encode()
                headers["content-type"] = "application/json"
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            payload = response.read()
        finally:
            conn.close()
        if not quiet:
            print(f"  {method} {path} -> {response.status}")
        return response.status, json.loads(payload) if payload else None

    def expect(self, status: int, method: str, path: str, token: str, body: Any = None) -> Any:
        got, payload = self.call(method, path, token, body)
        if got != status:
            raise DemoError(f"{method} {path}: expected {status}, got {got}: {json.dumps(payload)}")
        return payload

    def answers(self) -> bool:
        try:
            conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
            conn.request("GET", "/openapi.json")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False


def money(m: dict[str, Any]) -> str:
    return f"{int(m['amountMinor']) / 100:.2f} {m['currencyCode']}"


def scenario(api: Api, mint) -> None:
    run = time.strftime("%Y%m%d%H%M%S")
    admin = mint("demo-admin", ["admin"])

    print("\n1. An operator registers a customer and adds two products to the catalogue")
    customer = api.expect(200, "POST", f"/v1/users?requestId=demo-user-{run}", admin,
                          {"email": f"ada.{run}@example.com", "displayName": "Ada Lovelace"})["user"]
    print(f"     customer {customer['id']} ({customer['email']})")
    products = []
    for sku, name, cents in (("LAMP", "Desk lamp", 3999), ("BULB", "LED bulb", 499)):
        product = api.expect(200, "POST", f"/v1/products?requestId=demo-{sku}-{run}", admin, {
            "sku": f"{sku}-{run}", "name": name, "price": {"currencyCode": "EUR", "amountMinor": str(cents)},
            "stockOnHand": "10"})["product"]
        products.append(product)
        print(f"     product {product['id']} {name} at {money(product['price'])}, {product['stockOnHand']} in stock")

    token = mint(customer["id"], CUSTOMER_SCOPES)
    items = [{"productId": products[0]["id"], "quantity": 1}, {"productId": products[1]["id"], "quantity": 4}]

    before = day_metrics(api, admin)
    print("\n2. The customer places an order: reserve stock, charge the card, confirm")
    order = api.expect(200, "POST", "/v1/orders", token, {
        "customerId": customer["id"], "items": items, "paymentMethod": "pm_sandbox_ok",
        "currencyCode": "EUR", "requestId": f"demo-order-ok-{run}"})["order"]
    if order["status"] != "ORDER_STATUS_CONFIRMED":
        raise DemoError(f"the order should be CONFIRMED, it is {order['status']}")
    print(f"     order {order['id']} {order['status']}, total {money(order['total'])}")

    print("\n3. The customer places another order with a card the processor declines")
    status, error = api.call("POST", "/v1/orders", token, {
        "customerId": customer["id"], "items": items, "paymentMethod": "pm_sandbox_declined",
        "currencyCode": "EUR", "requestId": f"demo-order-declined-{run}"})
    info = next((d for d in (error or {}).get("details", []) if d.get("@type", "").endswith("ErrorInfo")), {})
    if status < 400 or info.get("reason") != "PAYMENT_DECLINED":
        raise DemoError(f"the second order should be declined, got {status}: {json.dumps(error)}")
    declined_id = info["metadata"]["order_id"]
    print(f"     refused with HTTP {status}, {info['reason']}: {error['message']}")

    print("\n4. Reading it all back")
    declined = api.expect(200, "GET", f"/v1/orders/{declined_id}", token)["order"]
    steps = ", ".join(f"{s['name'].removeprefix('SAGA_STEP_NAME_')}={s['status'].removeprefix('SAGA_STEP_STATUS_')}"
                      for s in declined["saga"])
    print(f"     declined order {declined_id} {declined['status']}: {steps}")
    if declined["status"] != "ORDER_STATUS_FAILED":
        raise DemoError(f"the declined order should be FAILED, it is {declined['status']}")
    listed = api.expect(200, "GET", f"/v1/orders?customerId={customer['id']}", token)["orders"]
    print(f"     the customer has {len(listed)} orders: "
          + ", ".join(f"{o['id'][:8]}… {o['status'].removeprefix('ORDER_STATUS_')}" for o in listed))
    for product, item in zip(products, items, strict=True):
        now = api.expect(200, "GET", f"/v1/products/{product['id']}", admin)["product"]
        print(f"     {now['name']}: {now['stockOnHand']} on hand, {now['stockReserved']} reserved "
              f"(bought {item['quantity']}; the declined order's reservation was released)")
        if int(now["stockOnHand"]) != 10 - item["quantity"] or int(now["stockReserved"]) != 0:
            raise DemoError(f"stock of {now['name']} is {now['stockOnHand']}/{now['stockReserved']}")
    payments = api.expect(200, "GET", f"/v1/payments?customerId={customer['id']}", token)["payments"]
    print("     payments: " + ", ".join(f"{money(p['amount'])} {p['status'].removeprefix('PAYMENT_STATUS_')}"
                                        for p in payments))

    print("\n5. The same, as one GraphQL query: the account, its orders and their products")
    answer = api.expect(200, "POST", "/graphql", token, {"query": GRAPH})
    if answer.get("errors"):
        raise DemoError(f"the GraphQL query failed: {json.dumps(answer['errors'])}")
    me = answer["data"]["me"]
    for o in me["orders"]["orders"]:
        lines = ", ".join(f"{i['quantity']} x {i['product']['name']}" for i in o["items"])
        print(f"     {me['displayName']}: {o['status']} {money(o['total'])}: {lines}")
    if sorted(o["status"] for o in me["orders"]["orders"]) != ["CONFIRMED", "FAILED"]:
        raise DemoError(f"GraphQL should show one CONFIRMED and one FAILED order: {json.dumps(me)}")

    print("\n6. The day's business metrics, counted by the analytics service from the events")
    show_analytics(api, admin, before)
    print("\nThe demo ran to the end.")


ANALYTICS_WAIT_SECONDS = 15.0


def day_metrics(api: Api, token: str, *, quiet: bool = False) -> dict[str, Any] | None:
    """Today's (UTC) metrics, or None when the analytics service does not answer (not running)."""
    today = time.strftime("%Y-%m-%d", time.gmtime())
    status, body = api.call("GET", f"/v1/analytics/dailyMetrics/{today}", token, quiet=quiet)
    return body["metrics"] if status == 200 else None


def show_analytics(api: Api, token: str, before: dict[str, Any] | None) -> None:
    """Waits for the two orders to be counted (the events travel through the broker), then prints the day. Without
    the analytics service or a broker the demo still ends: the metrics are extra, and say why they are missing."""
    if before is None:
        print("     the analytics service does not answer: no metrics to show")
        return
    deadline = time.monotonic() + ANALYTICS_WAIT_SECONDS
    while True:
        now = day_metrics(api, token, quiet=True)
        if now is not None and int(now["ordersConfirmed"]) > int(before["ordersConfirmed"]) and \
                int(now["ordersFailed"]) > int(before["ordersFailed"]):
            break
        if time.monotonic() > deadline:
            print(f"     the demo's orders were not counted within {ANALYTICS_WAIT_SECONDS:.0f} s "
                  "(is RabbitMQ running? the events wait in the outbox until it is)")
            return
        time.sleep(0.5)
    reasons = ", ".join(f"{r['reason']} {r['count']}" for r in now["failureReasons"]) or "none"
    revenue = ", ".join(money(m) for m in now["revenue"]) or "nothing"
    print(f"     {now['date']} (UTC): accounts registered {now['usersRegistered']}; orders confirmed "
          f"{now['ordersConfirmed']}, failed {now['ordersFailed']} ({reasons}), cancelled {now['ordersCancelled']}")
    print(f"     revenue {revenue}; payments refunded {now['paymentsRefunded']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tessera_gateway.demo", description=__doc__.splitlines()[0])
    dev = description.load("dev")
    parser.add_argument("--gateway", default=f"http://{dev.listener}", help="base URL of the gateway")
    args = parser.parse_args(argv)
    api = Api(args.gateway)

    def mint(subject: str, scopes: list[str]) -> str:
        assert dev.jwt.jwks_file is not None
        key = tokens.ensure_keys(dev.jwt.jwks_file.parent)
        return tokens.mint(key, subject=subject, scopes=scopes, issuer=dev.jwt.issuer,
                           audience=dev.jwt.audiences[0], ttl_seconds=600)

    stack = None
    if not api.answers():
        print(f"No gateway answers at {args.gateway}; starting a private stack for the demo…")
        from tessera_runtime import devstack

        os.environ["TESSERA_DATA_DIR"] = tempfile.mkdtemp(prefix="tessera-demo-")
        stack = devstack.DevStack()
        stack.add_services()
        stack.add_extensions()
        stack.start()
        problems = stack.wait_ready(timeout=120)
        if problems:
            stack.stop()
            print("Tessera did not start:\n  " + "\n  ".join(problems), file=sys.stderr)
            return 1
    try:
        scenario(api, mint)
    except DemoError as exc:
        print(f"\nThe demo stopped: {exc}", file=sys.stderr)
        return 1
    finally:
        if stack is not None:
            stack.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
