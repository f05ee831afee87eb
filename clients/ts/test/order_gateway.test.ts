// The shopping scenario through the Envoy gateway with tokens, over REST/JSON and over native gRPC: both must see
// exactly what the Python client sees, and the REST wire format must be the canonical proto3 JSON mapping.
import { toJson, type JsonObject } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { randomUUID } from "node:crypto";
import { join } from "node:path";
import { before, describe, it } from "node:test";
import { BadRequestSchema, ErrorInfoSchema } from "../gen/proto/google/rpc/error_details_pb.js";
import { OrderSchema } from "../gen/proto/tessera/order/v1/order_pb.js";
import { UserSchema } from "../gen/proto/tessera/user/v1/user_pb.js";
import {
  createTesseraClients,
  createTesseraGrpcTransport,
  createTesseraRestTransport,
  failureJson,
  failureOf,
  type Failure,
  type TesseraClients,
} from "../src/index.js";
import { runScenario, type Recorded, type ScenarioResult } from "./scenario.js";
import { env, gatewayTargets, grpcUrl, mintToken, pythonSees } from "./support.js";

type Transport = "rest" | "grpc";

function gatewayClients(transport: Transport, token?: string): TesseraClients {
  const options = { baseUrl: env("TESSERA_GATEWAY_URL"), token };
  return createTesseraClients(transport === "rest" ? createTesseraRestTransport(options) : createTesseraGrpcTransport(options));
}

async function scenarioThroughGateway(transport: Transport): Promise<ScenarioResult> {
  const staff = gatewayClients(transport, env("TESSERA_ADMIN_TOKEN"));
  const customers = new Map<string, TesseraClients>();
  return runScenario({
    accounts: staff,
    catalogue: staff,
    // The customer acts with a token of their own: subject = their user id, only the order scopes.
    customer: (id) => {
      if (!customers.has(id)) customers.set(id, gatewayClients(transport, mintToken(id, ["order:read", "order:write"])));
      return customers.get(id)!;
    },
  }, `${transport}-${randomUUID().slice(0, 8)}`);
}

function comparable(recorded: Recorded[]): Recorded[] {
  // Repeating CreateProduct returns the product as it is now (orders sold units since); the scenario's final
  // GetProduct calls compare the products' current state instead.
  return recorded.filter((r) => !r.call.method.endsWith("/CreateProduct"));
}

function assertPythonSeesTheSame(recorded: Recorded[]): void {
  const calls = comparable(recorded);
  const python = pythonSees(gatewayTargets(), calls.map((r) => r.call), env("TESSERA_ADMIN_TOKEN"));
  assert.equal(python.length, calls.length);
  for (const [i, r] of calls.entries()) {
    assert.deepEqual(python[i], r.outcome, `call ${i}: ${r.call.method}`);
  }
}

describe("shopping through the gateway", () => {
  let rest: ScenarioResult;

  before(async () => {
    rest = await scenarioThroughGateway("rest");
  });

  it("over REST sees what the Python client sees over gRPC for the same calls", () => {
    assertPythonSeesTheSame(rest.recorder.recorded);
  });

  it("over native gRPC with a token sees what the Python client sees", async () => {
    const grpc = await scenarioThroughGateway("grpc");
    assertPythonSeesTheSame(grpc.recorder.recorded);
  });

  it("sends the canonical proto3 JSON on the wire: int64 money as strings, enum names, RFC 3339, camelCase", async () => {
    const order = rest.orders[0];
    const customerToken = mintToken(rest.customer.id, ["order:read"]);
    const res = await fetch(`${env("TESSERA_GATEWAY_URL")}/v1/orders/${order.id}`, {
      headers: { authorization: `Bearer ${customerToken}` },
    });
    assert.equal(res.status, 200);
    assert.match(res.headers.get("content-type") ?? "", /^application\/json/);
    const body = (await res.json()) as { order: JsonObject };
    const wire = body.order;
    assert.deepEqual(wire.total, { currencyCode: "EUR", amountMinor: "4248" });
    assert.equal(wire.status, "ORDER_STATUS_CONFIRMED");
    assert.equal(wire.customerId, rest.customer.id);
    assert.match(String(wire.createTime), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{3}|\.\d{6}|\.\d{9})?Z$/);
    assert.equal((wire.saga as JsonObject[])[0].name, "SAGA_STEP_NAME_VALIDATE_CUSTOMER");
    // The same order read natively, printed by protobuf-es with fields of implicit presence included (the gateway
    // prints those too), is the same JSON document to the last character of every value.
    const native = createTesseraClients(createTesseraGrpcTransport({ baseUrl: grpcUrl("order") }));
    const { order: nativeOrder } = await native.orders.getOrder({ id: order.id });
    assert.deepEqual(wire, toJson(OrderSchema, nativeOrder!, { alwaysEmitImplicit: true }));
  });

  it("runs the TypeScript and Python quickstart examples through the gateway", () => {
    const token = env("TESSERA_ADMIN_TOKEN");
    const example = join(env("TESSERA_ROOT"), "clients", "ts", "gen", "build", "examples", "quickstart.js");
    for (const transport of ["rest", "grpc"]) {
      const out = execFileSync(process.execPath, [example, env("TESSERA_GATEWAY_URL"), token, transport],
        { encoding: "utf8", timeout: 60_000 }).split("\n");
      assert.match(out[0], /^created [0-9a-f-]{36} ACTIVE version 1$/, transport);
      assert.equal(JSON.parse(out[1].replace(/^read back: /, "")).status, "USER_STATUS_ACTIVE", transport);
      assert.equal(out[2], "unknown id: NOT_FOUND USER_NOT_FOUND (user.tessera.dev)", transport);
    }
    const python = join(env("TESSERA_ROOT"), "clients", "python", "examples", "quickstart.py");
    const out = execFileSync(env("TESSERA_PYTHON"), [python, "--target", env("TESSERA_GATEWAY_ADDR"), "--token", token],
      { encoding: "utf8", timeout: 60_000 }).split("\n");
    assert.match(out[0], /^created [0-9a-f-]{36} USER_STATUS_ACTIVE version 1 at /);
    assert.ok(out.includes("unknown id: NOT_FOUND USER_NOT_FOUND (user.tessera.dev)"));
  });

  it("updates with a field mask in the query string, as the native call would", async () => {
    const staff = gatewayClients("rest", env("TESSERA_ADMIN_TOKEN"));
    const { user } = await staff.users.updateUser({
      user: { id: rest.customer.id, displayName: "Renamed Shopper", profile: { givenName: "Ren", familyName: "Ignored" } },
      updateMask: { paths: ["display_name", "profile.given_name"] },
    });
    assert.equal(user?.displayName, "Renamed Shopper");
    assert.equal(user?.profile?.givenName, "Ren");
    assert.equal(user?.profile?.familyName, "", "paths outside the mask are not changed");
    const native = createTesseraClients(createTesseraGrpcTransport({ baseUrl: grpcUrl("user") }));
    const { user: read } = await native.users.getUser({ id: rest.customer.id });
    assert.deepEqual(toJson(UserSchema, read!), toJson(UserSchema, user!));
  });

  it("sends errors as {code, message, details} with the same ErrorInfo and BadRequest as gRPC", async () => {
    const request = { customerId: rest.customer.id, items: [{ productId: rest.products[0].id, quantity: 0 }],
      paymentMethod: "pm_sandbox_ok", currencyCode: "EUR", requestId: `wire-${randomUUID()}` };
    const res = await fetch(`${env("TESSERA_GATEWAY_URL")}/v1/orders`, {
      method: "POST",
      headers: { authorization: `Bearer ${mintToken(rest.customer.id, ["order:write"])}`, "content-type": "application/json" },
      body: JSON.stringify(request),
    });
    assert.equal(res.status, 400);
    const body = (await res.json()) as { code: number; message: string; details: JsonObject[] };
    // The same call natively: the wire body is its status, details printed as proto3 JSON Any (the gateway prints
    // fields of implicit presence too, such as an empty metadata map).
    const native = createTesseraClients(createTesseraGrpcTransport({ baseUrl: grpcUrl("order") }));
    const failure = await native.orders.createOrder(request).then(() => assert.fail("accepted quantity 0"), failureOf);
    assert.equal(body.code, Code.InvalidArgument);
    assert.equal(body.code, failure.code);
    assert.equal(body.message, failure.message);
    assert.deepEqual(body.details, [
      { "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        ...(toJson(ErrorInfoSchema, failure.errorInfo!, { alwaysEmitImplicit: true }) as JsonObject) },
      { "@type": "type.googleapis.com/google.rpc.BadRequest",
        ...(toJson(BadRequestSchema, failure.badRequest!, { alwaysEmitImplicit: true }) as JsonObject) },
    ]);
    assert.deepEqual(failure.badRequest?.fieldViolations.map((v) => v.field), ["items[0].quantity"]);
  });

  it("maps the gateway's refusals and the services' permission errors to the same codes on both transports", async () => {
    const order = rest.orders[0];
    const stranger = mintToken(randomUUID(), ["order:read"]);
    const failures = new Map<Transport, Failure[]>();
    for (const transport of ["rest", "grpc"] as const) {
      const anonymous = await gatewayClients(transport).orders.getOrder({ id: order.id }).then(
        () => assert.fail(`${transport}: a call without a token was let through`), failureOf);
      assert.equal(anonymous.code, Code.Unauthenticated, transport);
      const scopeless = await gatewayClients(transport, mintToken(rest.customer.id, ["user:read"])).orders
        .getOrder({ id: order.id })
        .then(() => assert.fail(`${transport}: a token without order:read was let through`), failureOf);
      assert.equal(scopeless.code, Code.PermissionDenied, transport);
      const foreign = await gatewayClients(transport, stranger).orders.getOrder({ id: order.id }).then(
        () => assert.fail(`${transport}: another customer read the order`), failureOf);
      assert.equal(foreign.code, Code.PermissionDenied, transport);
      assert.equal(foreign.errorInfo?.domain, "order.tessera.dev", transport);
      assert.equal(foreign.errorInfo?.reason, "PERMISSION_DENIED", transport);
      failures.set(transport, [anonymous, scopeless, foreign]);
    }
    // The service's own error crosses the gateway unchanged on both transports.
    assert.deepEqual(failureJson(failures.get("rest")![2]), failureJson(failures.get("grpc")![2]));
  });

  it("gives the gateway's own refusals an ErrorInfo on both transports", async () => {
    const order = rest.orders[0];
    for (const transport of ["rest", "grpc"] as const) {
      const anonymous = await gatewayClients(transport).orders.getOrder({ id: order.id }).then(
        () => assert.fail(`${transport}: a call without a token was let through`), failureOf);
      assert.equal(anonymous.errorInfo?.reason, "TOKEN_MISSING", `${transport}: ${anonymous.message}`);
      assert.equal(anonymous.errorInfo?.domain, "gateway.tessera.dev", transport);
      const scopeless = await gatewayClients(transport, mintToken(rest.customer.id, ["user:read"])).orders
        .getOrder({ id: order.id })
        .then(() => assert.fail(`${transport}: a token without order:read was let through`), failureOf);
      assert.equal(scopeless.errorInfo?.domain, "gateway.tessera.dev", `${transport}: ${scopeless.message}`);
    }
  });
});
