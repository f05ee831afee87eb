// The client transports' own behaviour, on real sockets: retries only where the contract allows, deadlines, tokens.
import { Code, type Interceptor } from "@connectrpc/connect";
import assert from "node:assert/strict";
import { once } from "node:events";
import { createServer as createHttpServer, type IncomingMessage } from "node:http";
import { createServer as createTcpServer, type AddressInfo, type Socket } from "node:net";
import { after, describe, it } from "node:test";
import { OrderService } from "../gen/proto/tessera/order/v1/order_service_pb.js";
import { UserService } from "../gen/proto/tessera/user/v1/user_service_pb.js";
import { create } from "@bufbuild/protobuf";
import {
  createTesseraClients,
  createTesseraGrpcTransport,
  createTesseraRestTransport,
  failureOf,
  isRetryable,
  restRequest,
} from "../src/index.js";

/** Counts the attempts that reach the wire: an interceptor inside the retry loop. */
function attemptCounter(): { interceptor: Interceptor; counts: Map<string, number> } {
  const counts = new Map<string, number>();
  return {
    counts,
    interceptor: (next) => async (req) => {
      counts.set(req.method.name, (counts.get(req.method.name) ?? 0) + 1);
      return next(req);
    },
  };
}

/** A port on 127.0.0.1 where nothing listens: connections are refused at once. */
async function closedPort(): Promise<number> {
  const server = createTcpServer();
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as AddressInfo;
  server.close();
  await once(server, "close");
  return port;
}

describe("contract-derived retries", () => {
  it("marks exactly the NO_SIDE_EFFECTS and IDEMPOTENT methods retryable", () => {
    assert.deepEqual(OrderService.methods.filter(isRetryable).map((m) => m.name), ["GetOrder", "ListOrders", "CancelOrder"]);
    assert.deepEqual(UserService.methods.filter((m) => !isRetryable(m)).map((m) => m.name), ["CreateUser"]);
  });

  it("retries an idempotent call on UNAVAILABLE up to maxAttempts and never retries a create", async () => {
    const { interceptor, counts } = attemptCounter();
    const baseUrl = `http://127.0.0.1:${await closedPort()}`;
    const tessera = createTesseraClients(createTesseraGrpcTransport({ baseUrl, maxAttempts: 3, interceptors: [interceptor] }));
    const read = await tessera.users.getUser({ id: "x" }).then(() => assert.fail("nothing listens"), failureOf);
    const write = await tessera.users.createUser({ requestId: "x" }).then(() => assert.fail("nothing listens"), failureOf);
    assert.equal(read.code, Code.Unavailable);
    assert.equal(write.code, Code.Unavailable);
    assert.deepEqual(Object.fromEntries(counts), { GetUser: 3, CreateUser: 1 });
  });
});

describe("deadlines", () => {
  const sockets: Socket[] = [];
  // Accepts connections and never answers: a hung server.
  const silent = createTcpServer((socket) => sockets.push(socket));
  after(() => {
    sockets.forEach((s) => s.destroy());
    silent.close();
  });

  it("ends a call to a server that never answers with DEADLINE_EXCEEDED, without retrying it", async () => {
    silent.listen(0, "127.0.0.1");
    await once(silent, "listening");
    const { port } = silent.address() as AddressInfo;
    const { interceptor, counts } = attemptCounter();
    const tessera = createTesseraClients(createTesseraGrpcTransport({
      baseUrl: `http://127.0.0.1:${port}`, timeoutMs: 300, interceptors: [interceptor],
    }));
    const failure = await tessera.users.getUser({ id: "x" }).then(() => assert.fail("a silent server answered"), failureOf);
    assert.equal(failure.code, Code.DeadlineExceeded);
    assert.equal(counts.get("GetUser"), 1);
  });
});

describe("REST transport", () => {
  const seen: { method?: string; url?: string; authorization?: string; timeout?: string; body: string }[] = [];
  let outages = 0;
  // Scripted REST peer: records each request; the first `outages` answers are Envoy-style plain-text 503s.
  const server = createHttpServer(async (req: IncomingMessage, res) => {
    let body = "";
    for await (const chunk of req) body += chunk;
    seen.push({ method: req.method, url: req.url, authorization: req.headers.authorization,
      timeout: req.headers["grpc-timeout"] as string | undefined, body });
    if (outages > 0) {
      outages--;
      res.writeHead(503, { "content-type": "text/plain" }).end("upstream connect error");
      return;
    }
    res.writeHead(200, { "content-type": "application/json" })
      .end(JSON.stringify({ user: { id: "u-1", status: "USER_STATUS_ACTIVE", version: "7" } }));
  });
  after(() => server.close());

  it("builds requests from the HTTP rules: path variables, body field, query parameters", () => {
    const update = restRequest(UserService.method.updateUser,
      create(UserService.method.updateUser.input, {
        user: { id: "a/b", displayName: "Ada" }, updateMask: { paths: ["display_name", "profile.given_name"] } }));
    assert.equal(update.verb, "PATCH");
    // A FieldMask's proto3 JSON form is its paths in lowerCamelCase, comma-separated.
    assert.equal(update.path, "/v1/users/a%2Fb?update_mask=displayName%2Cprofile.givenName");
    assert.deepEqual(JSON.parse(update.body!), { id: "a/b", display_name: "Ada" });
    const list = restRequest(OrderService.method.listOrders, create(OrderService.method.listOrders.input, {
      pageSize: 2, pageToken: "t+/=", status: 2, customerId: "c-1" }));
    assert.equal(list.verb, "GET");
    assert.equal(list.path, "/v1/orders?page_size=2&page_token=t%2B%2F%3D&customer_id=c-1&status=ORDER_STATUS_CONFIRMED");
    assert.equal(list.body, undefined);
    const cancel = restRequest(OrderService.method.cancelOrder,
      create(OrderService.method.cancelOrder.input, { id: "o-1", reason: "changed my mind" }));
    assert.equal(cancel.path, "/v1/orders/o-1:cancel");
    assert.deepEqual(JSON.parse(cancel.body!), { reason: "changed my mind" });
  });

  it("retries idempotent calls, sends the token and the deadline, and parses proto3 JSON", async () => {
    server.listen(0, "127.0.0.1");
    await once(server, "listening");
    const { port } = server.address() as AddressInfo;
    const tessera = createTesseraClients(createTesseraRestTransport({
      baseUrl: `http://127.0.0.1:${port}/`, token: "tok-1", timeoutMs: 4_000, maxAttempts: 3,
    }));
    outages = 2;
    const { user } = await tessera.users.getUser({ id: "u-1" });
    assert.equal(user?.version, 7n);
    assert.equal(seen.length, 3);
    assert.ok(seen.every((r) => r.method === "GET" && r.url === "/v1/users/u-1" && r.authorization === "Bearer tok-1"));
    assert.ok(seen.every((r) => r.timeout !== undefined && /^\d+m$/.test(r.timeout) && parseInt(r.timeout) <= 4_000));

    seen.length = 0;
    outages = 1;
    const failure = await tessera.users.createUser({ user: { email: "a@example.com" }, requestId: "r-1" })
      .then(() => assert.fail("the outage was hidden"), failureOf);
    assert.equal(failure.code, Code.Unavailable);
    assert.equal(failure.message, "upstream connect error");
    assert.equal(seen.length, 1, "a create is never retried");
    assert.deepEqual(JSON.parse(seen[0].body), { email: "a@example.com" });
  });
});
