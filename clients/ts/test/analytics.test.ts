// The analytics service over native gRPC and through the gateway (REST and gRPC): the day's metrics, error details
// naming the field, the analytics:read scope, and parity with the Python client for the same calls.
import { create } from "@bufbuild/protobuf";
import { Code } from "@connectrpc/connect";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { describe, it } from "node:test";
import {
  AnalyticsService,
  GetDailyMetricsRequestSchema,
  GetDailyMetricsResponseSchema,
  GetMetricsSummaryRequestSchema,
  GetMetricsSummaryResponseSchema,
  ListDailyMetricsRequestSchema,
  ListDailyMetricsResponseSchema,
} from "../gen/proto/tessera/analytics/v1/analytics_service_pb.js";
import {
  createTesseraClients,
  createTesseraGrpcTransport,
  createTesseraRestTransport,
  failureOf,
  type TesseraClients,
} from "../src/index.js";
import {
  callOf,
  env,
  gatewayTargets,
  grpcUrl,
  mintToken,
  outcomeOf,
  pythonSees,
  serviceTargets,
  type Call,
  type Outcome,
} from "./support.js";

const run = randomUUID().slice(0, 8);
const today = () => new Date().toISOString().slice(0, 10);

/** Calls whose answers hold still while the rest of the suite places orders: days long past, and refusals. */
async function fixedCalls(tessera: TesseraClients): Promise<{ call: Call; outcome: Outcome }[]> {
  const a = tessera.analytics;
  const recorded: { call: Call; outcome: Outcome }[] = [];
  const get = create(GetDailyMetricsRequestSchema, { date: "2001-03-01" });
  recorded.push({ call: callOf(AnalyticsService.method.getDailyMetrics, get),
    outcome: await outcomeOf(GetDailyMetricsResponseSchema, () => a.getDailyMetrics(get)) });
  for (const list of [
    { startDate: "2001-02-27", endDate: "2001-03-02", pageSize: 2 },
    { startDate: "2001-03-02", endDate: "2001-03-01" },
    { startDate: "2001-03-01", endDate: "2001-03-01", pageSize: -1 },
  ].map((init) => create(ListDailyMetricsRequestSchema, init))) {
    recorded.push({ call: callOf(AnalyticsService.method.listDailyMetrics, list),
      outcome: await outcomeOf(ListDailyMetricsResponseSchema, () => a.listDailyMetrics(list)) });
  }
  for (const summary of [{ startDate: "2001-03-01", endDate: "2001-03-07" }, { startDate: "2001-02-30" }]
    .map((init) => create(GetMetricsSummaryRequestSchema, init))) {
    recorded.push({ call: callOf(AnalyticsService.method.getMetricsSummary, summary),
      outcome: await outcomeOf(GetMetricsSummaryResponseSchema, () => a.getMetricsSummary(summary)) });
  }
  return recorded;
}

function assertPythonSees(targets: Record<string, string>, recorded: { call: Call; outcome: Outcome }[],
  token?: string): void {
  const python = pythonSees(targets, recorded.map((r) => r.call), token);
  assert.equal(python.length, recorded.length);
  for (const [i, r] of recorded.entries()) assert.deepEqual(python[i], r.outcome, `call ${i}: ${r.call.method}`);
}

describe("analytics over native gRPC", () => {
  const native = createTesseraClients(createTesseraGrpcTransport({ baseUrl: grpcUrl("analytics") }));

  it("counts a registration made through the user service on today's metrics", async () => {
    const users = createTesseraClients(createTesseraGrpcTransport({ baseUrl: grpcUrl("user") })).users;
    await users.createUser({ user: { email: `counted-${run}@example.com`, displayName: "Counted" },
      requestId: `ts-counted-${run}` });
    const deadline = Date.now() + 60_000;
    let registered = 0n;
    while (registered === 0n && Date.now() < deadline) {
      const { metrics } = await native.analytics.getDailyMetrics({ date: today() });
      assert.equal(metrics?.date, today());
      registered = metrics!.usersRegistered;
      if (registered === 0n) await new Promise((resolve) => setTimeout(resolve, 200));
    }
    assert.ok(registered >= 1n, "the registration was not counted within 60 s");
  });

  it("pages days, names the bad field, and the Python client sees the same for the same calls", async () => {
    const recorded = await fixedCalls(native);
    const listed = recorded[1].outcome as { response: { dailyMetrics: { date: string }[]; nextPageToken: string } };
    assert.deepEqual(listed.response.dailyMetrics.map((d) => d.date), ["2001-02-27", "2001-02-28"]);
    assert.ok(listed.response.nextPageToken);
    const fields = recorded.filter((r) => "error" in r.outcome).map((r) => {
      const error = (r.outcome as { error: { code: string; badRequest: { fieldViolations: { field: string }[] } } }).error;
      assert.equal(error.code, "INVALID_ARGUMENT");
      return error.badRequest.fieldViolations.map((v) => v.field);
    });
    assert.deepEqual(fields, [["end_date"], ["page_size"], ["start_date", "end_date"]]);
    assertPythonSees(serviceTargets(), recorded);
  });
});

describe("analytics through the gateway", () => {
  for (const transport of ["rest", "grpc"] as const) {
    const through = (token?: string) => {
      const options = { baseUrl: env("TESSERA_GATEWAY_URL"), token };
      return createTesseraClients(transport === "rest" ? createTesseraRestTransport(options)
        : createTesseraGrpcTransport(options));
    };

    it(`over ${transport} reads with analytics:read, as the Python client does, and refuses other tokens`, async () => {
      const token = mintToken(`analyst-${run}`, ["analytics:read"]);
      const recorded = await fixedCalls(through(token));
      assert.ok("response" in recorded[0].outcome, JSON.stringify(recorded[0].outcome));
      assertPythonSees(gatewayTargets(), recorded, token);

      const scopeless = await through(mintToken(`clerk-${run}`, ["user:read", "order:read"])).analytics
        .getDailyMetrics({ date: "2001-03-01" }).then(() => assert.fail(`${transport}: no analytics:read`), failureOf);
      assert.equal(scopeless.code, Code.PermissionDenied, transport);
      const anonymous = await through().analytics.getDailyMetrics({ date: "2001-03-01" })
        .then(() => assert.fail(`${transport}: no token`), failureOf);
      assert.equal(anonymous.code, Code.Unauthenticated, transport);
    });
  }
});
