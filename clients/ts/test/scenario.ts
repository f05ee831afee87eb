// The shopping scenario the Node suite runs over each transport: a customer, two products, orders, paging, errors.
//
// Every call is recorded as (method, request) with what it returned as proto3 JSON, so that the same calls can be
// replayed by the Python client and compared, and so that two transports can be compared with each other.
import { create, toJson, type DescMessage, type DescMethodUnary, type MessageShape } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import assert from "node:assert/strict";
import type { Product } from "../gen/proto/tessera/inventory/v1/product_pb.js";
import { InventoryService } from "../gen/proto/tessera/inventory/v1/inventory_service_pb.js";
import {
  OrderStatus,
  SagaStepName,
  SagaStepStatus,
  type Order,
} from "../gen/proto/tessera/order/v1/order_pb.js";
import { OrderService } from "../gen/proto/tessera/order/v1/order_service_pb.js";
import { UserService } from "../gen/proto/tessera/user/v1/user_service_pb.js";
import type { User } from "../gen/proto/tessera/user/v1/user_pb.js";
import { failureJson, failureOf, type Failure, type TesseraClients } from "../src/index.js";
import type { Call, Outcome } from "./support.js";

/** A call made and what it returned, in the shapes python_client.py reports. */
export interface Recorded {
  call: Call;
  outcome: Outcome;
}

export class Recorder {
  readonly recorded: Recorded[] = [];

  /** Makes a call through `fn`, records it and its outcome, and returns the typed response or throws. */
  async call<I extends DescMessage, O extends DescMessage>(
    method: DescMethodUnary<I, O>,
    request: MessageShape<I>,
    fn: (request: MessageShape<I>) => Promise<MessageShape<O>>,
  ): Promise<MessageShape<O>> {
    const call: Call = { method: `${method.parent.typeName}/${method.name}`, request: toJson(method.input, request) };
    try {
      const response = await fn(request);
      this.recorded.push({ call, outcome: { response: toJson(method.output, response) } });
      return response;
    } catch (e) {
      this.recorded.push({ call, outcome: { error: failureJson(failureOf(e)) } });
      throw e;
    }
  }

  /** Like call(), for a call that must fail: returns the failure. */
  async fails<I extends DescMessage, O extends DescMessage>(
    method: DescMethodUnary<I, O>,
    request: MessageShape<I>,
    fn: (request: MessageShape<I>) => Promise<MessageShape<O>>,
  ): Promise<Failure> {
    try {
      await this.call(method, request, fn);
    } catch (e) {
      return failureOf(e);
    }
    assert.fail(`${method.name} succeeded but must fail`);
  }
}

export interface ScenarioResult {
  customer: User;
  products: Product[];
  orders: Order[];
  recorder: Recorder;
}

export interface Actors {
  /** Creates accounts. */
  accounts: TesseraClients;
  /** Manages the catalogue: through the gateway, staff with the admin scope. */
  catalogue: TesseraClients;
  /** Acts as the given customer (order:read, order:write for that subject). */
  customer: (customerId: string) => TesseraClients;
}

const money = (amount: bigint, currencyCode = "EUR") => ({ currencyCode, amountMinor: amount });

export async function runScenario(actors: Actors, tag: string): Promise<ScenarioResult> {
  const rec = new Recorder();
  const users = actors.accounts.users;
  const inventory = actors.catalogue.inventory;

  const customer = (
    await rec.call(UserService.method.createUser,
      create(UserService.method.createUser.input, {
        user: { email: `shopper-${tag}@example.com`, displayName: `Shopper ${tag}` },
        requestId: `user-${tag}`,
      }),
      (r) => users.createUser(r))
  ).user!;

  const products: Product[] = [];
  for (const [i, [price, stock]] of ([[1999n, 10n], [250n, 5n]] as const).entries()) {
    const created = await rec.call(InventoryService.method.createProduct,
      create(InventoryService.method.createProduct.input, {
        product: { sku: `SKU-${tag}-${i}`, name: `Widget ${i} ${tag}`, price: money(price), stockOnHand: stock },
        requestId: `product-${tag}-${i}`,
      }),
      (r) => inventory.createProduct(r));
    products.push(created.product!);
  }
  assert.equal(products[0].price?.amountMinor, 1999n);
  assert.equal(products[0].stockAvailable, 10n);

  const orders = actors.customer(customer.id).orders;
  const placed: Order[] = [];
  for (let n = 0; n < 3; n++) {
    const reply = await rec.call(OrderService.method.createOrder,
      create(OrderService.method.createOrder.input, {
        customerId: customer.id,
        items: [{ productId: products[0].id, quantity: 2 }, { productId: products[1].id, quantity: 1 }],
        paymentMethod: "pm_sandbox_ok",
        currencyCode: "EUR",
        requestId: `order-${tag}-${n}`,
      }),
      (r) => orders.createOrder(r));
    placed.push(reply.order!);
  }
  const order = placed[0];
  assert.equal(order.status, OrderStatus.CONFIRMED);
  assert.equal(order.customerId, customer.id);
  assert.deepEqual(order.total && { c: order.total.currencyCode, a: order.total.amountMinor }, { c: "EUR", a: 4248n });
  assert.equal(order.items[0].unitPrice?.amountMinor, 1999n);
  assert.equal(order.items[0].lineTotal?.amountMinor, 3998n);
  assert.equal(order.items[0].sku, `SKU-${tag}-0`);
  assert.deepEqual(order.saga.map((s) => s.name), [
    SagaStepName.VALIDATE_CUSTOMER, SagaStepName.CREATE_ORDER, SagaStepName.RESERVE_STOCK,
    SagaStepName.PROCESS_PAYMENT, SagaStepName.CONFIRM_ORDER,
  ]);
  assert.ok(order.saga.every((s) => s.status === SagaStepStatus.SUCCEEDED));
  assert.ok(order.confirmTime && order.createTime && order.paymentId && order.reservationId);

  const read = await rec.call(OrderService.method.getOrder,
    create(OrderService.method.getOrder.input, { id: order.id }), (r) => orders.getOrder(r));
  assert.equal(read.order?.id, order.id);
  assert.equal(read.order?.status, OrderStatus.CONFIRMED);

  // Newest first, two per page, CONFIRMED only: the declined order placed below must not change these pages when
  // the Python client repeats the calls. The first order is alone on the second page.
  const first = await rec.call(OrderService.method.listOrders,
    create(OrderService.method.listOrders.input, { customerId: customer.id, status: OrderStatus.CONFIRMED, pageSize: 2 }),
    (r) => orders.listOrders(r));
  assert.deepEqual(first.orders.map((o) => o.id), [placed[2].id, placed[1].id]);
  assert.ok(first.nextPageToken);
  const second = await rec.call(OrderService.method.listOrders,
    create(OrderService.method.listOrders.input, {
      customerId: customer.id, status: OrderStatus.CONFIRMED, pageSize: 2, pageToken: first.nextPageToken,
    }),
    (r) => orders.listOrders(r));
  assert.deepEqual(second.orders.map((o) => o.id), [placed[0].id]);
  assert.equal(second.nextPageToken, "");

  const invalid = await rec.fails(OrderService.method.createOrder,
    create(OrderService.method.createOrder.input, {
      customerId: customer.id,
      items: [{ productId: products[0].id, quantity: 0 }],
      paymentMethod: "pm_sandbox_ok",
      currencyCode: "euro",
      requestId: `order-${tag}-invalid`,
    }),
    (r) => orders.createOrder(r));
  assert.equal(invalid.code, Code.InvalidArgument);
  assert.equal(invalid.errorInfo?.domain, "order.tessera.dev");
  assert.equal(invalid.errorInfo?.reason, "INVALID_ARGUMENT");
  assert.deepEqual(invalid.badRequest?.fieldViolations.map((v) => v.field).sort(), ["currency_code", "items[0].quantity"]);

  const declined = await rec.fails(OrderService.method.createOrder,
    create(OrderService.method.createOrder.input, {
      customerId: customer.id,
      items: [{ productId: products[1].id, quantity: 1 }],
      paymentMethod: "pm_sandbox_declined",
      currencyCode: "EUR",
      requestId: `order-${tag}-declined`,
    }),
    (r) => orders.createOrder(r));
  assert.equal(declined.code, Code.FailedPrecondition);
  assert.equal(declined.errorInfo?.reason, "PAYMENT_DECLINED");
  assert.equal(declined.errorInfo?.metadata.decline_code, "card_declined");
  assert.ok(declined.errorInfo?.metadata.order_id);

  const failed = await rec.call(OrderService.method.getOrder,
    create(OrderService.method.getOrder.input, { id: declined.errorInfo!.metadata.order_id }),
    (r) => orders.getOrder(r));
  assert.equal(failed.order?.status, OrderStatus.FAILED);
  assert.equal(failed.order?.failure?.reason, "PAYMENT_DECLINED");
  assert.equal(failed.order?.failure?.step, SagaStepName.PROCESS_PAYMENT);

  const missing = await rec.fails(OrderService.method.getOrder,
    create(OrderService.method.getOrder.input, { id: "00000000-0000-4000-8000-000000000000" }),
    (r) => orders.getOrder(r));
  assert.equal(missing.code, Code.NotFound);
  assert.equal(missing.errorInfo?.reason, "ORDER_NOT_FOUND");

  const stock = [];
  for (const product of products) {
    const reply = await rec.call(InventoryService.method.getProduct,
      create(InventoryService.method.getProduct.input, { id: product.id }), (r) => inventory.getProduct(r));
    stock.push(reply.product!);
  }
  assert.equal(stock[0].stockOnHand, 4n, "three orders of two units were sold from ten");
  assert.equal(stock[1].stockOnHand, 2n, "three orders of one unit were sold from five");
  assert.equal(stock[1].stockReserved, 0n, "the declined order's reservation was released");

  return { customer, products, orders: placed, recorder: rec };
}
