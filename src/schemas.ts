/**
 * One zod schema per request payload: the single source of validation and request types.
 * Unknown fields are ignored (OpenAI clients send many); fields we cannot honour are refused by name.
 */
import { z } from "zod";
import { MAX_JSON_DEPTH, MAX_TOP_LOGPROBS, NAME_PATTERN, RESERVED_TEMPLATE_VARIABLES, jsonDepth } from "../runtime/index.ts";

const MAX_TOKENS_LIMIT = 1 << 30;
/** Most choices (`n`) one request may ask for: each is a decode of its own after the one prefill. */
export const MAX_CHOICES = 16;
/** Most prompts one /v1/completions request may carry (an array of texts or of token-id arrays). */
export const MAX_PROMPTS = 64;
const choicesField = z.number().int().min(1).max(MAX_CHOICES).nullable().optional();

/**
 * Free-form JSON fields (chat_template_kwargs, tool parameters, tool-call arguments) nest at most
 * MAX_JSON_DEPTH levels ({} and [] are one level each): the template engine and the snapshot encoder
 * recurse into them, and what a session stores must read back under the snapshot reader's own bound.
 * The limit and the walk are the runtime's (message-schema.ts), so the API and the snapshot agree.
 */
export { MAX_JSON_DEPTH };

/** Whether `value` nests arrays or objects more than `limit` levels deep; stops one level past the limit. */
export const nestedDeeperThan = (value: unknown, limit: number): boolean => jsonDepth(value, limit) > limit;

const depthMessage = { message: `at most ${MAX_JSON_DEPTH} levels of nesting` };
/** A JSON object field whose nesting is bounded. */
const boundedObject = () => z.record(z.string(), z.unknown()).refine((v) => !nestedDeeperThan(v, MAX_JSON_DEPTH), depthMessage);
/** Tool-call arguments as OpenAI sends them (a JSON string, which the template parses) are bounded as parsed. */
const boundedJsonText = z.string().refine((text) => {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch {
    return true; // not JSON: the template renders it as the string it is
  }
  return !nestedDeeperThan(parsed, MAX_JSON_DEPTH);
}, depthMessage);

const textPart = z.object({ type: z.literal("text"), text: z.string() });
/** OpenAI content: a string, or an array of parts of which we serve the text ones. */
const content = z.union([z.string(), z.array(textPart).min(1)]).nullable();

const toolCall = z.object({
  id: z.string().optional(),
  type: z.literal("function").optional(),
  function: z.object({ name: z.string().min(1), arguments: z.union([boundedJsonText, boundedObject()]) }),
});

export const chatMessageSchema = z
  .object({
    role: z.enum(["system", "developer", "user", "assistant", "tool", "ipython"]),
    content: content.optional(),
    name: z.string().optional(),
    tool_calls: z.array(toolCall).optional(),
    tool_call_id: z.string().optional(),
  })
  .refine((m) => (m.content !== undefined && m.content !== null) || (m.role === "assistant" && m.tool_calls?.length), {
    message: "content is required (it may be null only on an assistant message with tool_calls)",
    path: ["content"],
  });

const toolSchema = z.object({
  type: z.literal("function"),
  function: z.object({
    name: z.string().min(1),
    description: z.string().optional(),
    parameters: boundedObject().optional(),
  }),
});

/**
 * Extra chat-template variables, as transformers' apply_chat_template kwargs (e.g. date_string). The
 * variables the server sets itself (messages, tools, add_generation_prompt, bos_token, ...) are refused.
 */
const chatTemplateKwargs = boundedObject().superRefine((kwargs, ctx) => {
  for (const key of Object.keys(kwargs)) {
    if (RESERVED_TEMPLATE_VARIABLES.has(key)) ctx.addIssue({ code: "custom", message: `"${key}" is set by the server and cannot be a template kwarg` });
  }
});

const stop = z.union([z.string(), z.array(z.string()).max(16)]).nullable().optional();

/** Sampling fields shared by /v1/chat/completions and /v1/completions (OpenAI names plus llama.cpp's extras). */
const samplingFields = {
  model: z.string().optional(),
  max_tokens: z.number().int().min(1).max(MAX_TOKENS_LIMIT).nullable().optional(),
  temperature: z.number().min(0).max(2).nullable().optional(),
  top_p: z.number().gt(0).max(1).nullable().optional(),
  top_k: z.number().int().min(0).nullable().optional(),
  min_p: z.number().min(0).max(1).nullable().optional(),
  seed: z.number().int().nullable().optional(),
  frequency_penalty: z.number().min(-2).max(2).nullable().optional(),
  presence_penalty: z.number().min(-2).max(2).nullable().optional(),
  repetition_penalty: z.number().gt(0).max(10).nullable().optional(),
  repeat_penalty: z.number().gt(0).max(10).nullable().optional(),
  repeat_last_n: z.number().int().min(-1).nullable().optional(),
  stop,
  n: z.literal(1, { message: "only n=1 is supported" }).nullable().optional(),
  stream: z.boolean().nullable().optional(),
  stream_options: z.object({ include_usage: z.boolean().optional() }).nullable().optional(),
  ignore_eos: z.boolean().optional(),
  user: z.string().optional(),
  logit_bias: z
    .record(z.string().regex(/^\d+$/, { message: "logit_bias keys are token ids" }), z.number().min(-100).max(100))
    .nullable()
    .optional(),
  logprobs: z.literal(false, { message: "logprobs are not supported" }).nullable().optional(),
};

export const chatCompletionSchema = z.object({
  ...samplingFields,
  messages: z.array(chatMessageSchema).min(1),
  max_completion_tokens: z.number().int().min(1).max(MAX_TOKENS_LIMIT).nullable().optional(),
  tools: z.array(toolSchema).nullable().optional(),
  tool_choice: z.union([z.enum(["none", "auto", "required"]), z.object({ type: z.literal("function") }).loose()]).optional(),
  response_format: z
    .object({ type: z.literal("text", { message: "only response_format type 'text' is supported" }) })
    .nullable()
    .optional(),
  chat_template_kwargs: chatTemplateKwargs.optional(),
  /** Continue this session: the messages are the whole conversation, the session keeps the KV they share. */
  session_id: z.string().nullable().optional(),
  /** With session_id: extend (default: the messages are the whole conversation and must begin with the session's), append (they are new messages), replace (they become the conversation). */
  session_history: z.enum(["extend", "append", "replace"]).optional(),
  /** Independent samples from one prefill, each a choice (sample i draws with seed + i). */
  n: choicesField,
  /** Each generated token's logprob (log-softmax of the raw logits) in choices[i].logprobs.content. */
  logprobs: z.boolean().nullable().optional(),
  /** With logprobs: this many most likely tokens per position too. */
  top_logprobs: z.number().int().min(0).max(MAX_TOP_LOGPROBS).nullable().optional(),
}).refine((r) => r.top_logprobs == null || r.logprobs === true, { message: "only with logprobs: true", path: ["top_logprobs"] });
export type ChatCompletionRequest = z.infer<typeof chatCompletionSchema>;

/**
 * A completion prompt: a text, token ids, or an array of texts or of token-id arrays (at most MAX_PROMPTS),
 * one form per request.
 */
const promptField = z.union([
  z.string(),
  z
    .array(z.union([z.string(), z.number().int().min(0), z.array(z.number().int().min(0)).min(1)]))
    .min(1)
    .superRefine((items, ctx) => {
      const kinds = new Set(items.map((x) => typeof x));
      if (kinds.size > 1) ctx.addIssue({ code: "custom", message: "one form per request: a text, token ids, an array of texts or an array of token-id arrays" });
      else if (!kinds.has("number") && items.length > MAX_PROMPTS) ctx.addIssue({ code: "custom", message: `at most ${MAX_PROMPTS} prompts` });
    }),
]);

export const completionSchema = z.object({
  ...samplingFields,
  /** 0 reads the prompt only (with echo and logprobs: scores it). */
  max_tokens: z.number().int().min(0).max(MAX_TOKENS_LIMIT).nullable().optional(),
  /** A text, token ids, or several of either (each prompt's choices follow the previous prompt's). */
  prompt: promptField,
  n: choicesField,
  /** The legacy API's logprobs: each token's logprob and this many most likely tokens per position. */
  logprobs: z.number().int().min(0).max(MAX_TOP_LOGPROBS).nullable().optional(),
  /** The prompt comes back before the completion (with logprobs: the prompt's tokens with theirs, the first null). */
  echo: z.boolean().nullable().optional(),
  /** llama.cpp's parse_special: special-token strings in a text prompt become special tokens (default: plain text). */
  parse_special: z.boolean().optional(),
});
export type CompletionRequest = z.infer<typeof completionSchema>;

export const tokenizeSchema = z.object({
  content: z.string(),
  add_special: z.boolean().optional(),
  /** As on /v1/completions: special-token strings become special tokens only when true. */
  parse_special: z.boolean().optional(),
  with_pieces: z.boolean().optional(),
});

export const detokenizeSchema = z.object({ tokens: z.array(z.number().int().min(0)) });

export const applyTemplateSchema = z.object({
  messages: z.array(chatMessageSchema).min(1),
  tools: z.array(toolSchema).nullable().optional(),
  add_generation_prompt: z.boolean().optional(),
  chat_template_kwargs: chatTemplateKwargs.optional(),
});

const sessionIdSchema = z.string().regex(NAME_PATTERN, { message: "a session id is 1-64 letters, digits, '_' or '-'" });

export const createSessionSchema = z.object({
  id: sessionIdSchema.optional(),
  system: z.string().optional(),
  messages: z.array(chatMessageSchema).optional(),
  /** A document to read into the session now (a user message), so later questions prefill only themselves. */
  document: z.string().optional(),
  /** Template variables pinned for the session's life (default: today's date_string when the template dates prompts by the clock). */
  chat_template_kwargs: chatTemplateKwargs.optional(),
  /** Stream prefill progress as server-sent events. */
  stream: z.boolean().optional(),
});

export const forkSessionSchema = z.object({
  /** The new session's id (default: a generated one). */
  id: sessionIdSchema.optional(),
});

export const sessionMessageSchema = z.object({
  ...samplingFields,
  role: z.enum(["user", "system", "developer", "tool", "ipython"]).default("user"),
  content: content.refine((c) => c !== null, { message: "content is required" }),
  max_completion_tokens: z.number().int().min(1).max(MAX_TOKENS_LIMIT).nullable().optional(),
  tools: z.array(toolSchema).nullable().optional(),
});

export const appendSchema = z
  .object({
    text: z.string().optional(),
    tokens: z.array(z.number().int().min(0)).min(1).optional(),
    role: z.enum(["user", "system", "developer", "assistant", "tool", "ipython"]).default("user"),
    stream: z.boolean().optional(),
  })
  .refine((a) => (a.text === undefined) !== (a.tokens === undefined), { message: "give exactly one of text or tokens", path: ["text"] });
