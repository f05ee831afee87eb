// What a failed Tessera call says, whatever the transport: code, message, ErrorInfo and BadRequest.
import { toJson, type JsonObject } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import {
  BadRequestSchema,
  ErrorInfoSchema,
  type BadRequest,
  type ErrorInfo,
} from "../gen/proto/google/rpc/error_details_pb.js";

export interface Failure {
  code: Code;
  /** The canonical gRPC name, e.g. "INVALID_ARGUMENT", as grpcurl and Python print it. */
  codeName: string;
  message: string;
  /**
   * Every Tessera error has one: reason (a name of the service's ErrorReason, or of tessera.common.v1.ErrorReason
   * for the reasons every service shares, without prefix) and domain ("<ctx>.tessera.dev").
   */
  errorInfo?: ErrorInfo;
  /** Invalid input: one field violation per invalid request field, by proto field path. */
  badRequest?: BadRequest;
}

/** "InvalidArgument" -> "INVALID_ARGUMENT". */
export function codeName(code: Code): string {
  return Code[code].replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/** Reads a ConnectError (or anything thrown by a client call) as a Failure. */
export function failureOf(error: unknown): Failure {
  const err = ConnectError.from(error);
  const [errorInfo] = err.findDetails(ErrorInfoSchema);
  const [badRequest] = err.findDetails(BadRequestSchema);
  return { code: err.code, codeName: codeName(err.code), message: err.rawMessage, errorInfo, badRequest };
}

/** A Failure as plain proto3 JSON, comparable across languages and transports. */
export function failureJson(failure: Failure): JsonObject {
  const json: JsonObject = { code: failure.codeName, message: failure.message };
  if (failure.errorInfo) json.errorInfo = toJson(ErrorInfoSchema, failure.errorInfo);
  if (failure.badRequest) json.badRequest = toJson(BadRequestSchema, failure.badRequest);
  return json;
}
