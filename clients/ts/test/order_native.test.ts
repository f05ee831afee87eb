// The shopping scenario over native gRPC, straight to the services, compared call by call with the Python client.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { describe, it } from "node:test";
import { createTesseraClients, createTesseraGrpcTransport, type TesseraClients } from "../src/index.js";
import { runScenario } from "./scenario.js";
import { grpcUrl, pythonSees, serviceTargets } from "./support.js";

// One transport per service: each service is its own process, as in production behind the mesh.
function nativeClients(): TesseraClients {
  const at = (service: string) => createTesseraClients(createTesseraGrpcTransport({ baseUrl: grpcUrl(service) }));
  return { users: at("user").users, inventory: at("inventory").inventory, payments: at("payment").payments,
    orders: at("order").orders, notifications: at("user").notifications, analytics: at("analytics").analytics };
}

describe("shopping over native gRPC", () => {
  it("places, reads and lists orders, and the Python client sees the same for the same calls", async () => {
    const clients = nativeClients();
    const result = await runScenario({ accounts: clients, catalogue: clients, customer: () => clients },
      randomUUID().slice(0, 8));
    // Products' stock changed after they were created (orders sold units), so repeating CreateProduct returns
    // them as they are now; the scenario's final GetProduct calls compare their current state instead.
    const replayed = result.recorder.recorded.filter((r) => !r.call.method.endsWith("/CreateProduct"));
    const python = pythonSees(serviceTargets(), replayed.map((r) => r.call));
    assert.equal(python.length, replayed.length);
    for (const [i, r] of replayed.entries()) {
      assert.deepEqual(python[i], r.outcome, `call ${i}: ${r.call.method}`);
    }
    assert.ok(replayed.some((r) => "error" in r.outcome && "badRequest" in r.outcome.error));
    assert.ok(replayed.filter((r) => r.call.method.endsWith("/CreateOrder") && "response" in r.outcome).length === 3);
  });
});
