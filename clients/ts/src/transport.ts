// Native gRPC transport to Tessera: a deadline on every call, retries derived from the contracts, bearer tokens.
import type { DescMethod } from "@bufbuild/protobuf";
import { MethodOptions_IdempotencyLevel } from "@bufbuild/protobuf/wkt";
import { Code, ConnectError, type Interceptor, type Transport } from "@connectrpc/connect";
import { getAbortSignalReason } from "@connectrpc/connect/protocol";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { setTimeout as sleep } from "node:timers/promises";

/** Deadline of a call that sets no `timeoutMs` of its own: servers and the gateway stop work past it. */
export const DEFAULT_TIMEOUT_MS = 5_000;

/**
 * Transient failures worth another attempt: the server or a link was down, the gateway's rate limit, a
 * concurrency conflict. Only methods whose contract makes a repeat safe are retried (see isRetryable).
 */
export const RETRYABLE_CODES: readonly Code[] = [Code.Unavailable, Code.ResourceExhausted, Code.Aborted];

/** Whether the contract marks the method `NO_SIDE_EFFECTS` or `IDEMPOTENT`, so that repeating it is safe. */
export function isRetryable(method: DescMethod): boolean {
  return (
    method.idempotency === MethodOptions_IdempotencyLevel.NO_SIDE_EFFECTS ||
    method.idempotency === MethodOptions_IdempotencyLevel.IDEMPOTENT
  );
}

export interface RetryOptions {
  /** Attempts per call, the first included. Default 4. */
  maxAttempts?: number;
  /** Backoff before the second attempt; doubles per attempt up to maxBackoffMs. Default 50. */
  initialBackoffMs?: number;
  /** Default 1000. */
  maxBackoffMs?: number;
}

/**
 * Retries the contract's idempotent methods on RETRYABLE_CODES with exponential backoff (full jitter), within
 * the call's deadline: every attempt shares the call's signal, so the deadline bounds them all.
 */
export function retryIdempotent(options: RetryOptions = {}): Interceptor {
  const maxAttempts = options.maxAttempts ?? 4;
  const initial = options.initialBackoffMs ?? 50;
  const max = options.maxBackoffMs ?? 1_000;
  if (!Number.isInteger(maxAttempts) || maxAttempts < 1) {
    throw new RangeError(`maxAttempts must be a positive integer, got ${maxAttempts}`);
  }
  return (next) => async (req) => {
    if (req.stream || !isRetryable(req.method)) {
      return next(req);
    }
    for (let attempt = 1; ; attempt++) {
      try {
        return await next(req);
      } catch (e) {
        const err = ConnectError.from(e);
        if (attempt >= maxAttempts || !RETRYABLE_CODES.includes(err.code) || req.signal.aborted) {
          throw err;
        }
        const backoff = Math.random() * Math.min(max, initial * 2 ** (attempt - 1));
        try {
          await sleep(backoff, undefined, { signal: req.signal });
        } catch {
          throw ConnectError.from(getAbortSignalReason(req.signal), Code.DeadlineExceeded);
        }
      }
    }
  };
}

/** Sends `authorization: Bearer <token>` on every call that has no authorization header yet. */
export function bearerToken(token: string): Interceptor {
  return (next) => async (req) => {
    if (!req.header.has("authorization")) {
      req.header.set("authorization", `Bearer ${token}`);
    }
    return next(req);
  };
}

export interface TesseraTransportOptions extends RetryOptions {
  /** "http://host:port" of a service or of the gateway. */
  baseUrl: string;
  /** A JWT for the gateway; services reached directly in dev and test need none. */
  token?: string;
  /** Deadline of calls that set none. Default DEFAULT_TIMEOUT_MS. */
  timeoutMs?: number;
  /** More interceptors, innermost: they run once per attempt. */
  interceptors?: Interceptor[];
}

/** The standard interceptors in order: retries outermost, then the token, then the caller's own. */
export function tesseraInterceptors(options: Omit<TesseraTransportOptions, "baseUrl" | "timeoutMs">): Interceptor[] {
  return [
    retryIdempotent(options),
    ...(options.token ? [bearerToken(options.token)] : []),
    ...(options.interceptors ?? []),
  ];
}

/** A native gRPC (HTTP/2) transport to Tessera; pass it to createClient(Service, transport). */
export function createTesseraGrpcTransport(options: TesseraTransportOptions): Transport {
  return createGrpcTransport({
    baseUrl: options.baseUrl,
    defaultTimeoutMs: options.timeoutMs ?? DEFAULT_TIMEOUT_MS,
    interceptors: tesseraInterceptors(options),
  });
}
