/**
 * The one place where errors become HTTP: OpenAI's error JSON, { error: { message, type, param, code } },
 * with the status that fits. Internal errors are logged in full and answered without detail.
 */
import type { ZodError } from "zod";
import { RuntimeError, SnapshotError } from "../runtime/index.ts";

export interface ErrorBody {
  error: { message: string; type: string; param: string | null; code: string | null };
}

export class HttpError extends Error {
  constructor(
    readonly status: 400 | 401 | 404 | 409 | 413 | 429 | 500 | 503,
    message: string,
    readonly type: string,
    readonly code: string | null = null,
    readonly param: string | null = null,
  ) {
    super(message);
  }
}

export const badRequest = (message: string, param: string | null = null, code: string | null = null) =>
  new HttpError(400, message, "invalid_request_error", code, param);

export function fromZod(error: ZodError): HttpError {
  const issue = error.issues[0]!;
  const param = issue.path.map(String).join(".") || null;
  const message = error.issues
    .slice(0, 5)
    .map((i) => (i.path.length ? `${i.path.join(".")}: ${i.message}` : i.message))
    .join("; ");
  return badRequest(message, param);
}

/** Maps anything thrown to a status and body; `log` receives what the client is not shown. */
export function toErrorResponse(error: unknown, log: (message: string) => void): { status: number; body: ErrorBody } {
  const body = (e: HttpError): ErrorBody => ({ error: { message: e.message, type: e.type, param: e.param, code: e.code } });
  if (error instanceof HttpError) return { status: error.status, body: body(error) };
  if (error instanceof RuntimeError) {
    switch (error.kind) {
      case "invalid_request":
        return { status: 400, body: body(badRequest(error.message, error.param)) };
      case "queue_full":
        return { status: 429, body: body(new HttpError(429, error.message, "rate_limit_error", "queue_full")) };
      case "kv_memory_full":
        return { status: 429, body: body(new HttpError(429, error.message, "rate_limit_error", "kv_memory_full")) };
      case "not_found":
        return { status: 404, body: body(new HttpError(404, error.message, "invalid_request_error", "session_not_found")) };
      case "session_busy":
        return { status: 409, body: body(new HttpError(409, error.message, "invalid_request_error", "session_busy")) };
      case "invalid_snapshot": {
        const reason = error instanceof SnapshotError ? error.reason : "invalid_snapshot";
        const status = reason === "too_large" ? 413 : 400;
        return { status, body: body(new HttpError(status, error.message, "invalid_request_error", reason)) };
      }
      case "cancelled":
        // The client has gone; nobody reads this, but keep it well-formed.
        return { status: 499, body: body(new HttpError(400, error.message, "invalid_request_error", "cancelled")) };
      default:
        break;
    }
  }
  log(`internal error: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
  return { status: 500, body: body(new HttpError(500, "internal server error", "server_error", "internal_error")) };
}
