/**
 * The one place where errors become HTTP: OpenAI's error JSON, { error: { message, type, param, code } },
 * with the status that fits. Internal errors are logged in full and answered without detail.
 */
import { HTTPException } from "hono/http-exception";
import type { ZodError, core } from "zod";
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

/** What an array field holds, for "stop: at most 16 strings": by field name, else by element type. */
const ARRAY_NOUNS: Record<string, [string, string]> = {
  messages: ["message", "messages"],
  tools: ["tool", "tools"],
  tool_calls: ["tool call", "tool calls"],
  tokens: ["token id", "token ids"],
  content: ["content part", "content parts"],
};
const ELEMENT_NOUNS: Record<string, [string, string]> = {
  string: ["string", "strings"],
  number: ["number", "numbers"],
  object: ["object", "objects"],
};

function arrayNoun(issue: core.$ZodRawIssue, count: number | bigint): string {
  const field = [...(issue.path ?? [])].reverse().find((p) => typeof p === "string");
  const element = (issue.schema?._zod.def as { element?: core.$ZodType } | undefined)?.element?._zod.def.type;
  const [one, many] = (field !== undefined ? ARRAY_NOUNS[field] : undefined) ?? (element !== undefined ? ELEMENT_NOUNS[element] : undefined) ?? ["item", "items"];
  return Number(count) === 1 ? one : many;
}

function limitText(issue: core.$ZodRawIssue, bound: "at most" | "at least", limit: number | bigint, inclusive: boolean | undefined, origin: string): string {
  const strict = bound === "at most" ? "less than" : "greater than";
  const words = inclusive === false ? strict : bound;
  if (origin === "string") return `${words} ${limit} ${Number(limit) === 1 ? "character" : "characters"}`;
  if (origin === "array" || origin === "set") return `${words} ${limit} ${arrayNoun(issue, limit)}`;
  return `${words} ${limit}`;
}

const TYPE_NAMES: Record<string, string> = { int: "an integer", array: "an array", object: "an object", undefined: "nothing", null: "null" };
const typeName = (t: string) => TYPE_NAMES[t] ?? `a ${t}`;
const typeOf = (v: unknown) => (v === null ? "null" : Array.isArray(v) ? "array" : typeof v);

/**
 * Messages for zod's issues that name the limit or the expected type ("at most 16 strings", "at most 2",
 * "expected a number, got a string"); fromZod puts the field's path before them. Messages a schema sets
 * itself win over these (zod's precedence).
 */
export function zodIssueMessage(issue: core.$ZodRawIssue): string | undefined {
  switch (issue.code) {
    case "too_big":
      return limitText(issue, "at most", issue.maximum, issue.inclusive, issue.origin);
    case "too_small":
      return limitText(issue, "at least", issue.minimum, issue.inclusive, issue.origin);
    case "invalid_type":
      if (issue.input === undefined) return `required (${typeName(issue.expected)})`;
      return `expected ${typeName(issue.expected)}, got ${typeName(typeOf(issue.input))}`;
    case "invalid_value":
      return issue.values.length === 1 ? `must be ${JSON.stringify(issue.values[0])}` : `must be one of ${issue.values.map((v) => JSON.stringify(v)).join(", ")}`;
    case "invalid_format":
      return issue.format === "regex" ? "has the wrong format" : `must be a valid ${issue.format}`;
    case "invalid_key":
      return issue.issues[0]?.message ?? "invalid key";
    case "invalid_union": {
      // A branch of the right type that failed a limit says more than "no branch matched".
      const branches = issue.errors.filter((branch) => branch.length > 0);
      const typed = branches.find((branch) => !branch.every((i) => i.code === "invalid_type" && i.path.length === 0));
      if (typed) return typed.map((i) => (i.path.length ? `${i.path.join(".")}: ${i.message}` : i.message)).join("; ");
      const expected = branches.map((branch) => (branch[0]!.code === "invalid_type" ? typeName(branch[0]!.expected) : null)).filter((t) => t !== null);
      const got = typeName(typeOf(issue.input));
      return expected.length ? `expected ${[...new Set(expected)].join(" or ")}, got ${got}` : "does not match any accepted form";
    }
    default:
      return undefined;
  }
}

/**
 * Maps anything thrown to a status, body and extra headers; `log` receives what the client is not shown.
 * Only messages written for clients are passed on (HttpError, RuntimeError, hono's HTTPException below
 * 500); anything else (a RangeError from a stack overflow, a bug) is a 500 "internal server error".
 */
export function toErrorResponse(error: unknown, log: (message: string) => void): { status: number; body: ErrorBody; headers?: Record<string, string> } {
  const body = (e: HttpError): ErrorBody => ({ error: { message: e.message, type: e.type, param: e.param, code: e.code } });
  if (error instanceof HttpError) return { status: error.status, body: body(error) };
  if (error instanceof HTTPException) {
    // hono/bearer-auth: a missing, malformed or unknown key (401, or 400 for a malformed header) carries a challenge.
    const challenge = error.res?.headers.get("www-authenticate");
    if (challenge) {
      const e = new HttpError(401, "invalid or missing API key", "authentication_error", "invalid_api_key");
      return { status: 401, body: body(e), headers: { "www-authenticate": challenge } };
    }
    if (error.status < 500) {
      const e = new HttpError(error.status as 400, error.message || "the request was refused", "invalid_request_error");
      return { status: error.status, body: body(e) };
    }
  }
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
      case "store_failed":
        log(`session store: ${error.message}: ${error.cause instanceof Error ? error.cause.message : String(error.cause)}`);
        return { status: 503, body: body(new HttpError(503, error.message, "server_error", "store_failed")) };
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
