// Shared by the Node suite: where the services are (from test/stack.py), and what the Python client sees.
import type { DescMessage, JsonObject, JsonValue, MessageShape } from "@bufbuild/protobuf";
import { toJson } from "@bufbuild/protobuf";
import type { DescMethodUnary } from "@bufbuild/protobuf";
import { execFileSync } from "node:child_process";
import { join } from "node:path";
import { failureJson, failureOf } from "../src/index.js";

export function env(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: run the suite through clients/ts/test/stack.py (make test-clients)`);
  }
  return value;
}

export const grpcUrl = (service: string): string => `http://${env(`TESSERA_${service.toUpperCase()}_ADDR`)}`;

/** One call as both languages make it: the method's full name and the request as proto3 JSON. */
export interface Call {
  method: string;
  request: JsonValue;
}

/** What one call returned, as proto3 JSON: the response, or the failure (code, message, ErrorInfo, BadRequest). */
export type Outcome = { response: JsonValue } | { error: JsonObject };

export function callOf<I extends DescMessage, O extends DescMessage>(
  method: DescMethodUnary<I, O>,
  request: MessageShape<I>,
): Call {
  return { method: `${method.parent.typeName}/${method.name}`, request: toJson(method.input, request) };
}

/** Runs `fn` (a client call) and records what it returned in the same JSON shape the Python client reports. */
export async function outcomeOf<O extends DescMessage>(output: O, fn: () => Promise<MessageShape<O>>): Promise<Outcome> {
  try {
    return { response: toJson(output, await fn()) };
  } catch (e) {
    return { error: failureJson(failureOf(e)) };
  }
}

/** Where the Python client sends each service's calls: by service full name, "*" for the rest. */
export type Targets = Record<string, string>;

/** The services' own addresses (native gRPC, no gateway). */
export function serviceTargets(): Targets {
  return {
    "tessera.user.v1.UserService": env("TESSERA_USER_ADDR"),
    "tessera.inventory.v1.InventoryService": env("TESSERA_INVENTORY_ADDR"),
    "tessera.payment.v1.PaymentService": env("TESSERA_PAYMENT_ADDR"),
    "tessera.order.v1.OrderService": env("TESSERA_ORDER_ADDR"),
    "tessera.analytics.v1.AnalyticsService": env("TESSERA_ANALYTICS_ADDR"),
  };
}

/** Makes the same calls with the Python client (tessera_client) and returns what it saw, call by call. */
export function pythonSees(targets: Targets, calls: Call[], token?: string): Outcome[] {
  const script = join(env("TESSERA_ROOT"), "clients", "ts", "test", "python_client.py");
  const out = execFileSync(env("TESSERA_PYTHON"), [script], {
    input: JSON.stringify({ targets, token, calls }),
    encoding: "utf8",
    timeout: 120_000,
  });
  return JSON.parse(out) as Outcome[];
}

/** A gateway token for `subject` with `scopes`, signed with this run's key (test/stack.py mint). */
export function mintToken(subject: string, scopes: string[]): string {
  const script = join(env("TESSERA_ROOT"), "clients", "ts", "test", "stack.py");
  return execFileSync(env("TESSERA_PYTHON"),
    [script, "mint", "--keys", env("TESSERA_GATEWAY_KEYS"), "--sub", subject, "--scope", scopes.join(" ")],
    { encoding: "utf8", timeout: 60_000 }).trim();
}

/** The gateway serves every service, over native gRPC and REST alike. */
export const gatewayTargets = (): Targets => ({ "*": env("TESSERA_GATEWAY_ADDR") });
