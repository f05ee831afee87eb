// Tessera from TypeScript: create a customer, read it back, and read a typed error, over REST or native gRPC.
//
//   make clients
//   TOKEN=$(.venv/bin/tessera token mint --sub ops --scope admin)
//   node clients/ts/gen/build/examples/quickstart.js http://127.0.0.1:8080 "$TOKEN"        # REST via the gateway
//   node clients/ts/gen/build/examples/quickstart.js http://127.0.0.1:8080 "$TOKEN" grpc   # gRPC via the gateway
import { toJsonString } from "@bufbuild/protobuf";
import { randomUUID } from "node:crypto";
import { UserSchema, UserStatus } from "../gen/proto/tessera/user/v1/user_pb.js";
import {
  createTesseraClients,
  createTesseraGrpcTransport,
  createTesseraRestTransport,
  failureOf,
} from "../src/index.js";

const [baseUrl = "http://127.0.0.1:8080", token, transport = "rest"] = process.argv.slice(2);
const options = { baseUrl, token, timeoutMs: 5_000 };
const tessera = createTesseraClients(
  transport === "grpc" ? createTesseraGrpcTransport(options) : createTesseraRestTransport(options),
);

const email = `ada-${randomUUID().slice(0, 8)}@example.com`;
// CreateUser is not idempotent by contract, so it is never retried automatically: its request_id makes a repeat
// by hand safe. GetUser is NO_SIDE_EFFECTS and is retried on UNAVAILABLE within the 5 s deadline.
const { user } = await tessera.users.createUser({
  user: { email, displayName: "Ada Lovelace" },
  requestId: `quickstart-${email}`,
});
console.log(`created ${user!.id} ${UserStatus[user!.status]} version ${user!.version}`);
const { user: read } = await tessera.users.getUser({ id: user!.id });
console.log(`read back: ${toJsonString(UserSchema, read!)}`);
try {
  await tessera.users.getUser({ id: randomUUID() });
} catch (e) {
  const failure = failureOf(e);
  console.log(`unknown id: ${failure.codeName} ${failure.errorInfo?.reason} (${failure.errorInfo?.domain})`);
}
