/**
 * What a session may hold, checked the same way on the way in (a request, an uploaded snapshot) and on the
 * way out (a snapshot the server writes and later reads back): messages in the runtime's ChatMessage shape
 * and template variables, with a bound on how deeply request-provided JSON may nest.
 */
import { z } from "zod";
import { RESERVED_TEMPLATE_VARIABLES } from "./chat-template.ts";
import { invalidRequest } from "./errors.ts";

/**
 * How deeply a request-provided JSON value (tool-call arguments, tool parameters, a template variable) may
 * nest. A snapshot holds such values a few levels below its header's root, and the snapshot reader allows
 * SNAPSHOT_NESTING_DEPTH levels there, so anything the API accepts is stored and read back.
 */
export const MAX_JSON_DEPTH = 32;
/** Levels of a snapshot header above a message's tool-call arguments (header > meta > messages > message > tool_calls > call > function > arguments). */
const HEADER_LEVELS = 8;
export const SNAPSHOT_NESTING_DEPTH = MAX_JSON_DEPTH + HEADER_LEVELS;

/** Depth of a JSON-like value: a scalar is 0, `[]` or `{}` is 1, `[[1]]` is 2. Iterative, so no input can overflow the stack. */
export function jsonDepth(value: unknown, stopAbove = Infinity): number {
  let deepest = 0;
  const stack: [unknown, number][] = [[value, 0]];
  while (stack.length > 0) {
    const [v, depth] = stack.pop()!;
    if (v === null || typeof v !== "object") continue;
    const d = depth + 1;
    if (d > deepest) deepest = d;
    if (deepest > stopAbove) return deepest;
    for (const child of Array.isArray(v) ? v : Object.values(v)) stack.push([child, d]);
  }
  return deepest;
}

/** Throws invalid_request naming the variable if a template variable's value nests deeper than MAX_JSON_DEPTH. */
export function assertTemplateKwargsDepth(kwargs: Record<string, unknown>, param = "chat_template_kwargs"): void {
  for (const [name, value] of Object.entries(kwargs)) {
    if (jsonDepth(value, MAX_JSON_DEPTH) > MAX_JSON_DEPTH) throw invalidRequest(`${param}.${name}: nested deeper than ${MAX_JSON_DEPTH} levels`, `${param}.${name}`);
  }
}

const nested = (what: string) => z.unknown().refine((v) => jsonDepth(v, MAX_JSON_DEPTH) <= MAX_JSON_DEPTH, { message: `${what} nests deeper than ${MAX_JSON_DEPTH} levels` });

/** A ChatMessage as the runtime stores it (after the HTTP edge mapped OpenAI's shapes onto it). */
export const storedMessageSchema = z.object({
  role: z.enum(["system", "user", "assistant", "tool", "ipython"]),
  content: z.string().nullable(),
  name: z.string().optional(),
  tool_call_id: z.string().optional(),
  tool_calls: z
    .array(
      z.object({
        id: z.string().optional(),
        type: z.literal("function").optional(),
        function: z.object({ name: z.string().min(1), arguments: z.union([z.string(), z.record(z.string(), nested("tool-call arguments"))]) }),
      }),
    )
    .optional(),
});

/** Template variables pinned in a session: none may replace a variable the server sets. */
export const templateKwargsSchema = z
  .record(z.string(), nested("a template variable"))
  .refine((kwargs) => !Object.keys(kwargs).some((k) => RESERVED_TEMPLATE_VARIABLES.has(k)), { message: "a template variable replaces one the server sets" });
