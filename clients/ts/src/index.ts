// Tessera's TypeScript client: typed service clients over native gRPC or over REST through the gateway.
//
//   import { createTesseraClients, createTesseraGrpcTransport } from "@tessera/client";
//   const tessera = createTesseraClients(createTesseraGrpcTransport({ baseUrl: "http://127.0.0.1:50051" }));
//   const { user } = await tessera.users.getUser({ id });
import { createClient, type Client, type Transport } from "@connectrpc/connect";
import { AnalyticsService } from "../gen/proto/tessera/analytics/v1/analytics_service_pb.js";
import { InventoryService } from "../gen/proto/tessera/inventory/v1/inventory_service_pb.js";
import { NotificationService } from "../gen/proto/tessera/notification/v1/notification_service_pb.js";
import { OrderService } from "../gen/proto/tessera/order/v1/order_service_pb.js";
import { PaymentService } from "../gen/proto/tessera/payment/v1/payment_service_pb.js";
import { UserService } from "../gen/proto/tessera/user/v1/user_service_pb.js";

export { codeName, failureJson, failureOf, type Failure } from "./errors.js";
export {
  createTesseraRestTransport,
  errorFromResponse,
  restRequest,
  type RestRequest,
  type TesseraRestTransportOptions,
} from "./rest.js";
export {
  bearerToken,
  createTesseraGrpcTransport,
  DEFAULT_TIMEOUT_MS,
  isRetryable,
  retryIdempotent,
  RETRYABLE_CODES,
  tesseraInterceptors,
  type RetryOptions,
  type TesseraTransportOptions,
} from "./transport.js";

/** One typed client per Tessera service, all over the same transport. */
export interface TesseraClients {
  users: Client<typeof UserService>;
  inventory: Client<typeof InventoryService>;
  payments: Client<typeof PaymentService>;
  orders: Client<typeof OrderService>;
  notifications: Client<typeof NotificationService>;
  analytics: Client<typeof AnalyticsService>;
}

export function createTesseraClients(transport: Transport): TesseraClients {
  return {
    users: createClient(UserService, transport),
    inventory: createClient(InventoryService, transport),
    payments: createClient(PaymentService, transport),
    orders: createClient(OrderService, transport),
    notifications: createClient(NotificationService, transport),
    analytics: createClient(AnalyticsService, transport),
  };
}
