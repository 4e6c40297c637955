/**
 * What the server answers, as zod schemas: the response half of the OpenAPI document (openapi.ts), whose
 * request half is schemas.ts. The routes build their answers by hand (app.ts, session-routes.ts,
 * http-kit.ts); tests/openapi.test.ts checks real answers against these schemas, so they cannot drift apart.
 */
import { z } from "zod";

const int = () => z.number().int();

export const errorResponseSchema = z
  .object({
    error: z.object({
      message: z.string(),
      type: z.string().meta({ description: "invalid_request_error, authentication_error, rate_limit_error or server_error" }),
      param: z.string().nullable().meta({ description: "The request field at fault (its path, e.g. messages.0.content), when there is one" }),
      code: z.string().nullable().meta({ description: "e.g. invalid_json, invalid_api_key, model_not_found, session_not_found, session_busy, queue_full, kv_memory_full, request_too_large, store_failed, shutting_down, internal_error" }),
    }),
  })
  .meta({ description: "OpenAI's error shape. In a stream that has started, an error arrives as one event of this shape." });

export const usageSchema = z.object({
  prompt_tokens: int(),
  completion_tokens: int(),
  total_tokens: int(),
  prompt_tokens_details: z.object({ cached_tokens: int().meta({ description: "Prompt tokens whose KV was reused (a session or a shared prefix)" }) }),
});

export const timingsSchema = z
  .object({
    cache_n: int(),
    prompt_n: int().meta({ description: "Prompt tokens actually prefilled" }),
    prompt_ms: z.number(),
    prompt_per_second: z.number(),
    predicted_n: int(),
    predicted_ms: z.number(),
    predicted_per_second: z.number(),
  })
  .meta({ description: "llama.cpp's timings block" });

const finishReason = z.string().meta({ description: "stop, length, tool_calls (or cancelled)" });

const toolCallSchema = z.object({
  id: z.string(),
  type: z.literal("function"),
  function: z.object({ name: z.string(), arguments: z.string().meta({ description: "The arguments as a JSON text" }) }),
});

const logprobItem = { token: z.string().meta({ description: "The token's text (\"bytes:\\xNN...\" for a piece of a character)" }), logprob: z.number(), bytes: z.array(int()).meta({ description: "The token's exact bytes" }) };

/** Chat completions' logprobs (with logprobs: true): each generated token's, with top_logprobs alternatives. */
export const chatLogprobsSchema = z
  .object({
    content: z.array(z.object({ ...logprobItem, top_logprobs: z.array(z.object(logprobItem)) })),
    refusal: z.null(),
  })
  .meta({ description: "Log-softmax of the model's raw logits; in a stream, each chunk's are those of the tokens it adds" });

/** The legacy completions' logprobs (with logprobs: k). */
export const completionLogprobsSchema = z
  .object({
    tokens: z.array(z.string()),
    token_logprobs: z.array(z.number().nullable()).meta({ description: "null for a token without one (the prompt's first, with echo)" }),
    top_logprobs: z.array(z.record(z.string(), z.number()).nullable()).meta({ description: "The k most likely tokens per position, and the token itself" }),
    text_offset: z.array(int()).meta({ description: "Each token's offset into the choice's text" }),
  })
  .meta({ description: "OpenAI's legacy logprobs; with echo, the prompt's tokens come first" });

const sessionIdField = z.string().optional().meta({ description: "Present when the request continued a session" });

export const chatCompletionResponseSchema = z.object({
  id: z.string(),
  object: z.literal("chat.completion"),
  created: int(),
  model: z.string(),
  session_id: sessionIdField,
  choices: z.array(
    z.object({
      index: int(),
      message: z.object({ role: z.literal("assistant"), content: z.string().nullable(), tool_calls: z.array(toolCallSchema).optional() }),
      logprobs: chatLogprobsSchema.nullable(),
      finish_reason: finishReason,
    }),
  ),
  usage: usageSchema,
  timings: timingsSchema,
});

export const chatCompletionChunkSchema = z
  .object({
    id: z.string(),
    object: z.literal("chat.completion.chunk"),
    created: int(),
    model: z.string(),
    session_id: sessionIdField,
    choices: z.array(
      z.object({
        index: int(),
        delta: z.object({
          role: z.literal("assistant").optional(),
          content: z.string().optional(),
          tool_calls: z
            .array(
              z.object({
                index: int(),
                id: z.string().optional(),
                type: z.literal("function").optional(),
                function: z.object({ name: z.string().optional(), arguments: z.string() }),
              }),
            )
            .optional(),
        }),
        logprobs: chatLogprobsSchema.nullable(),
        finish_reason: finishReason.nullable(),
      }),
    ),
    usage: usageSchema.optional().meta({ description: "Only on the last chunk (choices empty), with stream_options.include_usage" }),
    timings: timingsSchema.optional(),
  })
  .meta({ description: "One `data:` event of a chat stream: the role first, content deltas, then a chunk with the finish_reason; then the usage chunk if asked; then `data: [DONE]`." });

export const completionResponseSchema = z.object({
  id: z.string(),
  object: z.literal("text_completion"),
  created: int(),
  model: z.string(),
  choices: z.array(z.object({ index: int().meta({ description: "prompt * n + sample" }), text: z.string(), logprobs: completionLogprobsSchema.nullable(), finish_reason: finishReason })),
  usage: usageSchema,
  timings: timingsSchema,
});

export const completionChunkSchema = z
  .object({
    id: z.string(),
    object: z.literal("text_completion"),
    created: int(),
    model: z.string(),
    choices: z.array(z.object({ index: int(), text: z.string(), logprobs: completionLogprobsSchema.nullable(), finish_reason: finishReason.nullable() })),
    usage: usageSchema.optional(),
    timings: timingsSchema.optional(),
  })
  .meta({ description: "One `data:` event of a completion stream; the stream ends with `data: [DONE]`." });

export const modelSchema = z.object({
  id: z.string(),
  object: z.literal("model"),
  created: int(),
  owned_by: z.string(),
  meta: z.object({
    backend: z.string(),
    variant: z.string(),
    n_ctx: int(),
    n_vocab: int(),
    kv_dtype: z.string(),
    kv_bytes_per_token: z.number(),
  }),
});

export const modelListSchema = z.object({ object: z.literal("list"), data: z.array(modelSchema) });

export const tokenizeResponseSchema = z.object({
  tokens: z.union([z.array(int()), z.array(z.object({ id: int(), piece: z.string() }))]).meta({ description: "Token ids, or {id, piece} pairs with with_pieces" }),
});

export const detokenizeResponseSchema = z.object({ content: z.string() });

export const applyTemplateResponseSchema = z.object({ prompt: z.string().meta({ description: "The rendered chat template" }) });

export const healthResponseSchema = z
  .object({
    status: z.literal("ok"),
    model: z.string().optional(),
    backend: z.string().optional(),
    backend_detail: z.string().optional(),
    variant: z.string().optional(),
    context_length: int().optional(),
    queue: z.object({ busy: z.boolean(), waiting: int(), limit: int() }).optional(),
    kv_memory: z.object({ used_bytes: z.number(), limit_bytes: z.number(), sessions_bytes: z.number() }).optional(),
    kv_compaction: z.object({ policy: z.string() }).loose().optional(),
    session_store: z.string().optional(),
  })
  .meta({ description: "With API keys configured and no valid key, only {\"status\": \"ok\"}" });

export const sessionSchema = z.object({
  id: z.string(),
  object: z.literal("session"),
  created_at: z.number(),
  updated_at: z.number(),
  tokens_read: int().meta({ description: "Tokens the session has read (its history)" }),
  tokens_resident: int().meta({ description: "KV slots held (fewer than tokens_read once compaction dropped some)" }),
  kv_bytes: z.number(),
  kv_cold_bytes: z.number(),
  recalled_blocks: int(),
  messages: int(),
  in_memory: z.boolean(),
  busy: z.boolean(),
});

export const sessionListSchema = z.object({ object: z.literal("list"), data: z.array(sessionSchema) });

const ingestSchema = z.object({ cached_tokens: int(), prefilled_tokens: int(), ms: z.number() });

export const sessionIngestSchema = sessionSchema.extend({
  ingest: ingestSchema.nullable().meta({ description: "What reading took: null when nothing was read" }),
});

export const sessionForkSchema = sessionSchema.extend({ forked_from: z.string() });

export const sessionDeletedSchema = z.object({ id: z.string(), object: z.literal("session.deleted"), deleted: z.literal(true) });

export const sessionProgressSchema = z
  .object({
    object: z.literal("session.progress"),
    session_id: z.string().nullable(),
    tokens_done: int(),
    tokens_total: int(),
  })
  .meta({ description: "A prefill progress event; the stream's last event before `data: [DONE]` is the session (SessionIngest), or an error" });

/** The components the document declares for responses, by name. */
export const responseSchemas = {
  ErrorResponse: errorResponseSchema,
  Usage: usageSchema,
  ChatLogprobs: chatLogprobsSchema,
  CompletionLogprobs: completionLogprobsSchema,
  Timings: timingsSchema,
  ChatCompletion: chatCompletionResponseSchema,
  ChatCompletionChunk: chatCompletionChunkSchema,
  Completion: completionResponseSchema,
  CompletionChunk: completionChunkSchema,
  Model: modelSchema,
  ModelList: modelListSchema,
  TokenizeResponse: tokenizeResponseSchema,
  DetokenizeResponse: detokenizeResponseSchema,
  ApplyTemplateResponse: applyTemplateResponseSchema,
  Health: healthResponseSchema,
  Session: sessionSchema,
  SessionList: sessionListSchema,
  SessionIngest: sessionIngestSchema,
  SessionFork: sessionForkSchema,
  SessionDeleted: sessionDeletedSchema,
  SessionProgress: sessionProgressSchema,
} as const;
