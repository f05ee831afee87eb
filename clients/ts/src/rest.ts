// REST/JSON transport through the Envoy gateway, driven by each method's google.api.http rule in the contracts.
//
// The gateway transcodes REST to gRPC from the same HTTP rules, so a client made with
// createClient(Service, createTesseraRestTransport(...)) has the same typed methods, messages and errors as one
// over native gRPC: proto3 JSON on the wire (int64 as strings, enums by name, RFC 3339 timestamps), and
// {code, message, details} error bodies turned back into ConnectError with ErrorInfo / BadRequest details.
import {
  create,
  createRegistry,
  fromJson,
  getOption,
  hasOption,
  toJson,
  type DescField,
  type DescMessage,
  type DescMethodUnary,
  type JsonObject,
  type JsonValue,
  type MessageShape,
} from "@bufbuild/protobuf";
import { AnySchema } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, createContextValues, type Transport, type UnaryResponse } from "@connectrpc/connect";
import { getAbortSignalReason, runUnaryCall } from "@connectrpc/connect/protocol";
import { http } from "../gen/proto/google/api/annotations_pb.js";
import type { HttpRule } from "../gen/proto/google/api/http_pb.js";
import { file_google_rpc_error_details } from "../gen/proto/google/rpc/error_details_pb.js";
import { DEFAULT_TIMEOUT_MS, tesseraInterceptors, type TesseraTransportOptions } from "./transport.js";

// Error details Tessera sends; a detail of another type is kept undecoded.
const detailRegistry = createRegistry(file_google_rpc_error_details);

/** An HTTP request derived from a message and its method's HTTP rule. */
export interface RestRequest {
  verb: string;
  /** Path and query, to append to the base URL. */
  path: string;
  body?: string;
}

function rule(method: DescMethodUnary): HttpRule {
  if (!hasOption(method, http)) {
    throw new ConnectError(`${method.parent.typeName}.${method.name} has no google.api.http rule`, Code.Unimplemented);
  }
  return getOption(method, http);
}

function fieldByPath(desc: DescMessage, path: string): DescField[] {
  const fields: DescField[] = [];
  let current: DescMessage | undefined = desc;
  for (const name of path.split(".")) {
    const field: DescField | undefined = current?.fields.find((f) => f.name === name);
    if (!field) {
      throw new ConnectError(`HTTP rule names ${path}, which ${desc.typeName} does not have`, Code.Internal);
    }
    fields.push(field);
    current = field.message;
  }
  return fields;
}

function valueAt(message: Record<string, unknown>, fields: DescField[]): unknown {
  let value: unknown = message;
  for (const field of fields) {
    value = value === undefined ? undefined : (value as Record<string, unknown>)[field.localName];
  }
  return value;
}

// Query parameters use proto field names, dotted for nested messages, repeated keys for repeated fields.
function appendQuery(params: URLSearchParams, prefix: string, value: JsonValue): void {
  if (Array.isArray(value)) {
    for (const item of value) appendQuery(params, prefix, item);
  } else if (value !== null && typeof value === "object") {
    for (const [key, inner] of Object.entries(value)) appendQuery(params, prefix ? `${prefix}.${key}` : key, inner);
  } else if (value !== null) {
    params.append(prefix, String(value));
  }
}

/** The HTTP request for a call: path variables, body and query parameters as the method's HTTP rule says. */
export function restRequest<I extends DescMessage>(method: DescMethodUnary<I>, message: MessageShape<I>): RestRequest {
  const httpRule = rule(method);
  const pattern = httpRule.pattern;
  if (pattern.case === undefined || pattern.case === "custom") {
    throw new ConnectError(`unsupported HTTP rule on ${method.name}`, Code.Unimplemented);
  }
  const verb = pattern.case.toUpperCase();
  const bound = new Set<string>();
  const path = pattern.value.replace(/\{([^}=]+)(=[^}]*)?\}/g, (_, fieldPath: string) => {
    const value = valueAt(message as Record<string, unknown>, fieldByPath(method.input, fieldPath));
    bound.add(fieldPath.split(".")[0]);
    return encodeURIComponent(String(value ?? ""));
  });
  const json = toJson(method.input, message, { useProtoFieldName: true }) as JsonObject;
  let body: string | undefined;
  if (httpRule.body === "*") {
    const rest: JsonObject = {};
    for (const [key, value] of Object.entries(json)) {
      if (!bound.has(key) && value !== undefined) rest[key] = value;
    }
    body = JSON.stringify(rest);
  } else if (httpRule.body !== "") {
    const bodyJson = json[httpRule.body];
    body = JSON.stringify(bodyJson === undefined ? {} : bodyJson);
    bound.add(httpRule.body);
  }
  const params = new URLSearchParams();
  if (httpRule.body !== "*") {
    for (const [key, value] of Object.entries(json)) {
      if (!bound.has(key) && value !== undefined) appendQuery(params, key, value);
    }
  }
  const query = params.toString();
  return { verb, path: query ? `${path}?${query}` : path, body };
}

// Used when an error body is not the gateway's JSON status, e.g. a plain-text reply of Envoy itself.
const codeByHttpStatus: Record<number, Code> = {
  400: Code.InvalidArgument,
  401: Code.Unauthenticated,
  403: Code.PermissionDenied,
  404: Code.NotFound,
  409: Code.Aborted,
  429: Code.ResourceExhausted,
  499: Code.Canceled,
  500: Code.Internal,
  501: Code.Unimplemented,
  503: Code.Unavailable,
  504: Code.DeadlineExceeded,
};

/** Turns an error response into a ConnectError that carries the same details a gRPC error would. */
export function errorFromResponse(status: number, text: string, headers: Headers): ConnectError {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    parsed = undefined;
  }
  if (parsed !== null && typeof parsed === "object" && typeof (parsed as JsonObject).code === "number") {
    const body = parsed as { code: number; message?: string; details?: JsonObject[] };
    const err = new ConnectError(body.message ?? "", body.code as Code, headers);
    err.details = (body.details ?? []).map((detail) => {
      const any = fromJson(AnySchema, detail, { registry: detailRegistry });
      return { type: any.typeUrl.slice(any.typeUrl.lastIndexOf("/") + 1), value: any.value, debug: detail };
    });
    return err;
  }
  return new ConnectError(text.trim(), codeByHttpStatus[status] ?? Code.Unknown, headers);
}

export type TesseraRestTransportOptions = TesseraTransportOptions & {
  /** The fetch to use; default globalThis.fetch. */
  fetch?: typeof globalThis.fetch;
};

/**
 * A Transport that calls Tessera's REST API through the gateway (baseUrl "http://host:port"). Unary methods only,
 * which is every Tessera method. Retries, token and deadline work as in createTesseraGrpcTransport; the deadline is
 * also sent as grpc-timeout so that the gateway and the service stop working when the client gives up.
 */
export function createTesseraRestTransport(options: TesseraRestTransportOptions): Transport {
  const baseUrl = options.baseUrl.replace(/\/+$/, "");
  const doFetch = options.fetch ?? globalThis.fetch;
  const interceptors = tesseraInterceptors(options);
  return {
    async unary(method, signal, timeoutMs, header, input, contextValues) {
      timeoutMs = timeoutMs === undefined ? (options.timeoutMs ?? DEFAULT_TIMEOUT_MS) : timeoutMs <= 0 ? undefined : timeoutMs;
      const first = restRequest(method, create(method.input, input));
      return await runUnaryCall({
        interceptors,
        signal,
        timeoutMs,
        req: {
          stream: false,
          service: method.parent,
          method,
          requestMethod: first.verb,
          url: baseUrl + first.path,
          header: new Headers(header),
          contextValues: contextValues ?? createContextValues(),
          message: input,
        },
        next: async (req) => {
          const request = restRequest(req.method, req.message);
          const headers = new Headers(req.header);
          headers.set("accept", "application/json");
          if (request.body !== undefined) headers.set("content-type", "application/json");
          if (timeoutMs !== undefined) headers.set("grpc-timeout", `${Math.max(1, Math.ceil(timeoutMs))}m`);
          let res: Response;
          let text: string;
          try {
            res = await doFetch(baseUrl + request.path, {
              method: request.verb,
              headers,
              body: request.body,
              signal: req.signal,
            });
            text = await res.text();
          } catch (e) {
            if (req.signal.aborted) {
              throw ConnectError.from(getAbortSignalReason(req.signal), Code.DeadlineExceeded);
            }
            throw ConnectError.from(e, Code.Unavailable);
          }
          if (!res.ok) {
            throw errorFromResponse(res.status, text, res.headers);
          }
          const message = fromJson(req.method.output, text === "" ? {} : (JSON.parse(text) as JsonValue));
          const response: UnaryResponse<typeof req.method.input, typeof req.method.output> = {
            stream: false,
            service: req.service,
            method: req.method,
            header: res.headers,
            message,
            trailer: new Headers(),
          };
          return response;
        },
      });
    },
    stream() {
      return Promise.reject(new ConnectError("Tessera's REST API has no streaming methods", Code.Unimplemented));
    },
  };
}
