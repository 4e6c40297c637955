/**
 * What a session may hold, checked the same way on the way in (a request, an uploaded snapshot) and on the
 * way out (a snapshot the server writes and later reads back): messages in the runtime's ChatMessage shape
 * and template variables, with a bound on how deeply request-provided JSON may nest.
 */
import { z } from "zod";
import { RESERVED_TEMPLATE_VARIABLES } from "./chat-template.ts";
import { invalidRequest } from "./errors.ts";

/**
 * How deeply a request's free-form JSON field (tool-call arguments, tool parameters, chat_template_kwargs)
 * may nest, the field's own object counting as one level. A snapshot holds such values a few levels below
 * its header's root, and the snapshot reader allows SNAPSHOT_NESTING_DEPTH levels, so anything the API
 * accepts is stored and read back.
 */
export const MAX_JSON_DEPTH = 32;
/** Levels of a snapshot header above a message's tool-call arguments (header > meta > messages > message > tool_calls > call > function), plus one to spare. */
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

const depthMessage = { message: `at most ${MAX_JSON_DEPTH} levels of nesting` };

/** Throws invalid_request naming the field if template variables nest deeper than MAX_JSON_DEPTH (as the API's schema says). */
export function assertTemplateKwargsDepth(kwargs: Record<string, unknown>, param = "chat_template_kwargs"): void {
  if (jsonDepth(kwargs, MAX_JSON_DEPTH) > MAX_JSON_DEPTH) throw invalidRequest(`${param}: ${depthMessage.message}`, param);
}

/** A JSON object field bounded as the API bounds it. */
const boundedObject = () => z.record(z.string(), z.unknown()).refine((v) => jsonDepth(v, MAX_JSON_DEPTH) <= MAX_JSON_DEPTH, depthMessage);

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
        function: z.object({ name: z.string().min(1), arguments: z.union([z.string(), boundedObject()]) }),
      }),
    )
    .optional(),
});

/** Template variables pinned in a session: none may replace a variable the server sets. */
export const templateKwargsSchema = boundedObject().refine((kwargs) => !Object.keys(kwargs).some((k) => RESERVED_TEMPLATE_VARIABLES.has(k)), { message: "a template variable replaces one the server sets" });
