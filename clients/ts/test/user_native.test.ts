// The user service over native gRPC: typed calls, proto3 JSON, error details, and parity with the Python client.
import { create, toJson, type JsonObject } from "@bufbuild/protobuf";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import { Code } from "@connectrpc/connect";
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { describe, it } from "node:test";
import {
  CreateUserRequestSchema,
  CreateUserResponseSchema,
  GetUserRequestSchema,
  GetUserResponseSchema,
  ListUsersRequestSchema,
  ListUsersResponseSchema,
  UserService,
} from "../gen/proto/tessera/user/v1/user_service_pb.js";
import { UserSchema, UserStatus } from "../gen/proto/tessera/user/v1/user_pb.js";
import { createTesseraClients, createTesseraGrpcTransport, failureOf } from "../src/index.js";
import { callOf, grpcUrl, outcomeOf, pythonSees, serviceTargets, type Call, type Outcome } from "./support.js";

const run = randomUUID().slice(0, 8);
const tessera = createTesseraClients(createTesseraGrpcTransport({ baseUrl: grpcUrl("user") }));

describe("user service over native gRPC", () => {
  it("creates and reads a user with typed messages", async () => {
    const { user } = await tessera.users.createUser({
      user: { email: `ada-${run}@Example.COM`, displayName: "Ada", profile: { givenName: "Ada", locale: "en" } },
      requestId: `ts-ada-${run}`,
    });
    assert.ok(user);
    assert.match(user.id, /^[0-9a-f-]{36}$/);
    assert.equal(user.email, `ada-${run}@example.com`);
    assert.equal(user.status, UserStatus.ACTIVE);
    assert.equal(typeof user.version, "bigint");
    assert.equal(user.version, 1n);
    assert.ok(user.createTime);
    assert.ok(Math.abs(timestampDate(user.createTime).getTime() - Date.now()) < 24 * 3600 * 1000);

    const json = toJson(UserSchema, user) as JsonObject;
    assert.equal(json.status, "USER_STATUS_ACTIVE");
    assert.equal(json.version, "1");
    assert.equal(json.displayName, "Ada");
    assert.match(String(json.createTime), /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$/);

    const got = await tessera.users.getUser({ id: user.id });
    assert.deepEqual(toJson(UserSchema, got.user!), json);
  });

  it("returns INVALID_ARGUMENT with ErrorInfo and a BadRequest naming each field", async () => {
    const err = await tessera.users
      .createUser({ user: { email: "not-an-address", displayName: "" }, requestId: `ts-bad-${run}` })
      .then(() => assert.fail("CreateUser accepted an invalid user"), failureOf);
    assert.equal(err.code, Code.InvalidArgument);
    assert.equal(err.codeName, "INVALID_ARGUMENT");
    assert.equal(err.errorInfo?.reason, "INVALID_ARGUMENT");
    assert.equal(err.errorInfo?.domain, "user.tessera.dev");
    const fields = err.badRequest?.fieldViolations.map((v) => v.field).sort();
    assert.deepEqual(fields, ["user.display_name", "user.email"]);
  });

  it("returns NOT_FOUND with the contract's reason", async () => {
    const err = await tessera.users
      .getUser({ id: randomUUID() })
      .then(() => assert.fail("GetUser found a user that does not exist"), failureOf);
    assert.equal(err.code, Code.NotFound);
    assert.equal(err.errorInfo?.reason, "USER_NOT_FOUND");
    assert.equal(err.badRequest, undefined);
  });

  it("sees exactly what the Python client sees for the same calls", async () => {
    const created = create(CreateUserRequestSchema, {
      user: { email: `grace-${run}@example.com`, displayName: "Grace", preferences: { preferredCurrencyCode: "EUR" } },
      requestId: `ts-grace-${run}`,
    });
    const calls: Call[] = [];
    const outcomes: Outcome[] = [];
    const record = async (call: Call, outcome: Promise<Outcome>) => {
      calls.push(call);
      outcomes.push(await outcome);
    };
    // A repeated CreateUser returns the first result, so Python's repeat of it must match to the last digit.
    await record(callOf(UserService.method.createUser, created),
      outcomeOf(CreateUserResponseSchema, () => tessera.users.createUser(created)));
    const first = outcomes[0] as { response: { user: { id: string } } };
    const get = create(GetUserRequestSchema, { id: first.response.user.id });
    await record(callOf(UserService.method.getUser, get), outcomeOf(GetUserResponseSchema, () => tessera.users.getUser(get)));
    const page = create(ListUsersRequestSchema, { pageSize: 1, status: UserStatus.ACTIVE });
    await record(callOf(UserService.method.listUsers, page),
      outcomeOf(ListUsersResponseSchema, () => tessera.users.listUsers(page)));
    const token = (outcomes[2] as { response: { nextPageToken?: string } }).response.nextPageToken;
    assert.ok(token, "a second page exists: this suite created at least two users");
    const next = create(ListUsersRequestSchema, { pageSize: 1, status: UserStatus.ACTIVE, pageToken: token });
    await record(callOf(UserService.method.listUsers, next),
      outcomeOf(ListUsersResponseSchema, () => tessera.users.listUsers(next)));
    const invalid = create(CreateUserRequestSchema, { user: { email: "nope", displayName: "x".repeat(101) }, requestId: "" });
    await record(callOf(UserService.method.createUser, invalid),
      outcomeOf(CreateUserResponseSchema, () => tessera.users.createUser(invalid)));
    const missing = create(GetUserRequestSchema, { id: randomUUID() });
    await record(callOf(UserService.method.getUser, missing),
      outcomeOf(GetUserResponseSchema, () => tessera.users.getUser(missing)));
    const malformed = create(GetUserRequestSchema, { id: "not-a-uuid" });
    await record(callOf(UserService.method.getUser, malformed),
      outcomeOf(GetUserResponseSchema, () => tessera.users.getUser(malformed)));

    const python = pythonSees(serviceTargets(), calls);
    assert.deepEqual(python, outcomes);
    // The comparison is only as strong as what was compared: make sure both successes and rich errors were in it.
    assert.ok("response" in outcomes[1] && "error" in outcomes[4] && "error" in outcomes[6]);
    assert.ok(((outcomes[4] as { error: JsonObject }).error.badRequest as JsonObject).fieldViolations);
  });
});
