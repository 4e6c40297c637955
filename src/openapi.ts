/**
 * The OpenAPI 3.1 document, served at /openapi.json, and an API reference page at /docs (docs-page.ts).
 *
 * One source of truth: request bodies are the zod schemas the routes parse with (schemas.ts), responses the
 * zod schemas of response-schemas.ts, both turned into JSON Schema 2020-12 (OpenAPI 3.1's dialect) by zod's
 * own z.toJSONSchema. The routes are the app's own (`app.routes`, read when the document is first asked
 * for, so every route registered after registerOpenApi is in it); OPERATIONS below says what each one takes
 * and answers. tests/openapi.test.ts checks that every route the app registers is documented here and that
 * every example request validates against its schema.
 *
 * Both routes answer without an API key (they hold no data): registerOpenApi is called before the auth
 * middleware, so its handlers answer first.
 */
import type { Hono } from "hono";
import { z } from "zod";
import { DOCS_PAGE } from "./docs-page.ts";
import { responseSchemas } from "./response-schemas.ts";
import {
  appendSchema,
  applyTemplateSchema,
  chatCompletionSchema,
  chatMessageSchema,
  completionSchema,
  createSessionSchema,
  detokenizeSchema,
  forkSessionSchema,
  sessionMessageSchema,
  tokenizeSchema,
} from "./schemas.ts";

/** The version of this API, as the document's info.version. */
export const API_VERSION = "0.1.0";

/** The request-body components, by name: the same zod schemas the routes parse with. */
export const requestSchemas = {
  ChatCompletionRequest: chatCompletionSchema,
  ChatMessage: chatMessageSchema,
  CompletionRequest: completionSchema,
  TokenizeRequest: tokenizeSchema,
  DetokenizeRequest: detokenizeSchema,
  ApplyTemplateRequest: applyTemplateSchema,
  CreateSessionRequest: createSessionSchema,
  ForkSessionRequest: forkSessionSchema,
  SessionMessageRequest: sessionMessageSchema,
  AppendRequest: appendSchema,
} as const satisfies Record<string, z.ZodType>;

type RequestName = keyof typeof requestSchemas;
type ResponseName = keyof typeof responseSchemas;

/** Descriptions of request fields (the zod schemas carry their rules; these say what the fields mean). */
const FIELD_NOTES: Record<string, string> = {
  model: "The served model's id (optional; another id is a 404 model_not_found)",
  messages: "The conversation",
  max_tokens: "Most tokens to generate (at most the context length)",
  max_completion_tokens: "OpenAI's newer name for max_tokens (wins over it)",
  temperature: "0 is greedy",
  top_p: "Nucleus sampling",
  top_k: "Keep the k most likely tokens (0: all)",
  min_p: "Drop tokens below min_p times the most likely one's probability",
  seed: "The same seed and request give the same output",
  frequency_penalty: "OpenAI's frequency penalty",
  presence_penalty: "OpenAI's presence penalty",
  repetition_penalty: "llama.cpp's repetition penalty (1: off)",
  repeat_penalty: "llama.cpp's name for repetition_penalty",
  repeat_last_n: "How many last tokens the penalties look at (-1: the whole context)",
  stop: "Up to 16 stop strings",
  n: "How many choices",
  stream: "Answer as server-sent events",
  stream_options: "include_usage: a last chunk with usage and timings",
  ignore_eos: "Keep generating past end-of-sequence tokens",
  user: "Ignored (OpenAI's end-user id)",
  logit_bias: "Token id (as a string) to a bias from -100 to 100",
  "ChatCompletionRequest.logprobs": "Each generated token's logprob in choices[i].logprobs.content",
  "CompletionRequest.logprobs": "Each token's logprob and this many most likely tokens per position (OpenAI's legacy form)",
  "ChatCompletionRequest.n": "Independent samples from one prefill, each a choice (sample i draws with seed + i)",
  "CompletionRequest.n": "Independent samples per prompt from one prefill",
  "CompletionRequest.max_tokens": "Most tokens to generate (default 16; 0 reads the prompt only: with echo and logprobs, scores it)",
  top_logprobs: "With logprobs: this many most likely tokens per position too",
  echo: "The prompt comes back before the completion (with logprobs: its tokens too, the first with null)",
  tools: "OpenAI function definitions, rendered by the model's chat template",
  tool_choice: "none turns tool-call reading off",
  response_format: "Only {type: text}",
  chat_template_kwargs: "Extra chat-template variables (e.g. date_string, builtin_tools); the server's own are refused",
  session_id: "Continue this session (see /v1/sessions)",
  session_history: "How the messages relate to the session's history: extend (the whole conversation), append (only new messages) or replace",
  prompt: "A text (BOS added), token ids, or an array of either (each prompt's choices follow the previous prompt's)",
  parse_special: "Special-token strings in a text become special tokens (default: plain text)",
  content: "The text",
  add_special: "Add BOS",
  with_pieces: "Return {id, piece} pairs",
  tokens: "Token ids",
  add_generation_prompt: "End with the assistant header (default true)",
  id: "A session id: 1-64 letters, digits, '_' or '-' (default: generated)",
  system: "A system message",
  document: "A document read into the session now (as a user message)",
  role: "The message's role (default user)",
  text: "Text to read (exactly one of text or tokens)",
  name: "The sender's name",
  tool_calls: "An assistant message's tool calls",
  tool_call_id: "The call a tool message answers",
};

type JsonObject = Record<string, unknown>;

interface Body {
  schema: RequestName;
  examples: Record<string, { summary: string; value: unknown }>;
  /** False when the body may be left out (fork). */
  required?: boolean;
}

interface Operation {
  summary: string;
  description?: string;
  tag: "OpenAI" | "Sessions" | "llama.cpp extras" | "Server";
  body?: Body;
  /** A binary request body (snapshot upload). */
  binaryBody?: { mediaType: string; description: string };
  /** Success responses by status. */
  responses: Record<string, JsonObject>;
  /** Error statuses this route answers, with what they mean here (500 and 503 are added to every route). */
  errors?: Record<number, string>;
  /** "public": no key needed; "optional": a key gives more (/health). */
  auth?: "public" | "optional";
}

const ref = (name: RequestName | ResponseName) => ({ $ref: `#/components/schemas/${name}` });
const json = (name: ResponseName, description: string) => ({ description, content: { "application/json": { schema: ref(name) } } });

/** Server-sent events (with `stream: true`) whose `data:` lines hold one of `events` (or an error). */
const sseContent = (events: ResponseName[], streamNote: string) => ({
  "text/event-stream": {
    schema: {
      type: "string",
      description: `With stream: true. ${streamNote} Each event is a line \`data: <JSON>\` and a blank line; each JSON is one of x-sse-data's schemas (an error after the stream began comes as an ErrorResponse event); the last is \`data: [DONE]\`.`,
    },
    "x-sse-data": { oneOf: [...events.map(ref), ref("ErrorResponse")] },
  },
});

/** A response that is JSON, or with `stream: true` server-sent events whose `data:` lines hold `events`. */
function jsonOrSse(name: ResponseName, events: ResponseName[], description: string, streamNote: string) {
  return { description, content: { "application/json": { schema: ref(name) }, ...sseContent(events, streamNote) } };
}

const BAD_BODY = "invalid_request_error: malformed JSON, a field of the wrong type or over its limit (param names the field)";
const TOO_LARGE = "request_too_large: the body exceeds --max-body-bytes";
const QUEUE_FULL = "queue_full (the request queue is full) or kv_memory_full (the KV memory is in use)";
const MODEL_404 = "model_not_found: model is not the served model";
const SESSION_404 = "session_not_found";
const BUSY_409 = "session_busy: another change of the session is running (--session-busy reject), or the session's lease passed to another worker";
const STORE_503 = "store_failed: the change could not be written to the session store (the session is left as it was)";

const chatExample = (model: string) => ({
  basic: { summary: "A question", value: { model, messages: [{ role: "system", content: "You are terse." }, { role: "user", content: "What is the capital of France?" }], max_tokens: 32, temperature: 0 } },
  stream: { summary: "Streamed, with usage", value: { messages: [{ role: "user", content: "Count to five." }], stream: true, stream_options: { include_usage: true }, max_tokens: 32 } },
  tools: {
    summary: "With a tool",
    value: {
      messages: [{ role: "user", content: "What is the weather in Paris?" }],
      tools: [{ type: "function", function: { name: "get_weather", description: "Current weather", parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] } } }],
      chat_template_kwargs: { date_string: "26 Jul 2024" },
      max_tokens: 32,
    },
  },
  logprobs: { summary: "Two samples with logprobs", value: { messages: [{ role: "user", content: "Say hi." }], n: 2, logprobs: true, top_logprobs: 3, max_tokens: 8, seed: 7 } },
  session: { summary: "Continue a session with a new message", value: { session_id: "report", session_history: "append", messages: [{ role: "user", content: "What was the total?" }], max_tokens: 32 } },
});

/** What every documented route takes and answers, by Hono's method and path. */
function operations(model: string): Record<string, Operation> {
  return {
    "POST /v1/chat/completions": {
      tag: "OpenAI",
      summary: "Chat completion",
      description: "OpenAI's chat completions, with llama.cpp's sampling extras. A reply that is a Llama-3.1 tool call comes back as tool_calls (finish_reason tool_calls). With session_id, the session's KV is reused.",
      body: { schema: "ChatCompletionRequest", examples: chatExample(model) },
      responses: { "200": jsonOrSse("ChatCompletion", ["ChatCompletionChunk"], "The completion", "Chunks: the role, content deltas (or a tool call as delta.tool_calls), the finish_reason, then usage if asked.") },
      errors: { 400: BAD_BODY, 404: `${MODEL_404}; ${SESSION_404} (session_id)`, 409: BUSY_409, 413: TOO_LARGE, 429: QUEUE_FULL },
    },
    "POST /v1/completions": {
      tag: "OpenAI",
      summary: "Text completion",
      description: "OpenAI's (legacy) completions: a raw prompt, as text or token ids.",
      body: {
        schema: "CompletionRequest",
        examples: {
          text: { summary: "A text prompt", value: { model, prompt: "Once upon a time", max_tokens: 16, temperature: 0.7, seed: 1 } },
          ids: { summary: "Token ids, streamed", value: { prompt: [128000, 9906, 1917], max_tokens: 8, stream: true } },
          score: { summary: "Score a text (as lm-evaluation-harness does)", value: { prompt: "The capital of France is Paris", max_tokens: 0, echo: true, logprobs: 5 } },
          batch: { summary: "Several prompts, two samples each", value: { prompt: ["Once upon a time", "In a galaxy"], n: 2, max_tokens: 8, logprobs: 2 } },
        },
      },
      responses: { "200": jsonOrSse("Completion", ["CompletionChunk"], "The completion", "Chunks of text, the finish_reason, then usage if asked.") },
      errors: { 400: BAD_BODY, 404: MODEL_404, 413: TOO_LARGE, 429: QUEUE_FULL },
    },
    "GET /v1/models": { tag: "OpenAI", summary: "List models", description: "The one served model.", responses: { "200": json("ModelList", "The models") } },
    "GET /v1/models/:model{.+}": {
      tag: "OpenAI",
      summary: "Retrieve a model",
      responses: { "200": json("Model", "The model") },
      errors: { 404: MODEL_404 },
    },

    "POST /v1/sessions": {
      tag: "Sessions",
      summary: "Create a session",
      description: "A session keeps a conversation's KV: a document read once, then only each question is prefilled. With stream: true, prefill progress arrives as events.",
      body: {
        schema: "CreateSessionRequest",
        examples: {
          document: { summary: "Read a document", value: { id: "report", system: "Answer from the report.", document: "The total was 42 euros." } },
          stream: { summary: "With progress events", value: { id: "book", document: "Chapter 1. ...", stream: true } },
        },
      },
      responses: {
        "200": { description: "With stream: true, the progress of reading as events (the status is sent before the session exists)", content: sseContent(["SessionProgress", "SessionIngest"], "Progress events (tokens_done of tokens_total), then the session.") },
        "201": json("SessionIngest", "The session (without stream)"),
      },
      errors: { 400: `${BAD_BODY}; a session with that id already exists (param id)`, 409: BUSY_409, 413: TOO_LARGE, 429: QUEUE_FULL, 503: STORE_503 },
    },
    "GET /v1/sessions": { tag: "Sessions", summary: "List sessions", description: "The caller's sessions, in memory and in the store.", responses: { "200": json("SessionList", "The sessions") } },
    "GET /v1/sessions/:id": { tag: "Sessions", summary: "Retrieve a session", responses: { "200": json("Session", "The session") }, errors: { 404: SESSION_404 } },
    "DELETE /v1/sessions/:id": {
      tag: "Sessions",
      summary: "Delete a session",
      responses: { "200": json("SessionDeleted", "Deleted") },
      errors: { 404: SESSION_404, 409: BUSY_409 },
    },
    "POST /v1/sessions/:id/messages": {
      tag: "Sessions",
      summary: "Add a message and generate the reply",
      description: "Appends one message to the session and answers it as a chat completion (only the new message is prefilled).",
      body: {
        schema: "SessionMessageRequest",
        examples: {
          question: { summary: "A question", value: { content: "What was the total?", max_tokens: 32 } },
          stream: { summary: "Streamed", value: { role: "user", content: "Summarize it.", stream: true, temperature: 0, max_tokens: 32 } },
        },
      },
      responses: { "200": jsonOrSse("ChatCompletion", ["ChatCompletionChunk"], "The reply (session_id set)", "Chunks as on /v1/chat/completions.") },
      errors: { 400: BAD_BODY, 404: `${SESSION_404}; ${MODEL_404}`, 409: BUSY_409, 413: TOO_LARGE, 429: QUEUE_FULL, 503: STORE_503 },
    },
    "POST /v1/sessions/:id/append": {
      tag: "Sessions",
      summary: "Read more into a session",
      description: "Reads text or token ids in as a message, without generating.",
      body: {
        schema: "AppendRequest",
        examples: {
          text: { summary: "Text", value: { text: "Appendix B: the tax was 8 euros." } },
          tokens: { summary: "Token ids, with progress", value: { tokens: [9906, 1917], role: "user", stream: true } },
        },
      },
      responses: { "200": jsonOrSse("SessionIngest", ["SessionProgress", "SessionIngest"], "The session", "Progress events, then the session.") },
      errors: { 400: BAD_BODY, 404: SESSION_404, 409: BUSY_409, 413: TOO_LARGE, 429: QUEUE_FULL, 503: STORE_503 },
    },
    "POST /v1/sessions/:id/fork": {
      tag: "Sessions",
      summary: "Fork a session",
      description: "A new session starting from this one's last committed state, sharing its stored KV (copy on write). The body is optional.",
      body: { schema: "ForkSessionRequest", required: false, examples: { named: { summary: "A named fork", value: { id: "branch" } }, generated: { summary: "A generated id", value: {} } } },
      responses: { "201": json("SessionFork", "The new session") },
      errors: { 400: `${BAD_BODY}; the new id is taken (param id)`, 404: SESSION_404, 413: TOO_LARGE, 503: STORE_503 },
    },
    "GET /v1/sessions/:id/snapshot": {
      tag: "Sessions",
      summary: "Download a snapshot",
      description: "The session as a snapshot file (msgpack frames; see README's snapshot format), streamed.",
      responses: {
        "200": {
          description: "The snapshot (content-disposition: attachment; filename=<id>.ulsnap)",
          content: { "application/vnd.ultralong.snapshot+msgpack": { schema: { type: "string", contentMediaType: "application/vnd.ultralong.snapshot+msgpack" } } },
        },
      },
      errors: { 404: SESSION_404 },
    },
    "PUT /v1/sessions/:id/snapshot": {
      tag: "Sessions",
      summary: "Upload a snapshot and resume from it",
      description: "The body is a snapshot file as downloaded (any content type; curl --data-binary @file). It replaces a session of that id, or creates one. Limited by --max-snapshot-bytes, not --max-body-bytes.",
      binaryBody: { mediaType: "application/vnd.ultralong.snapshot+msgpack", description: "The snapshot file" },
      responses: { "200": json("Session", "The session replaced one of the same id"), "201": json("Session", "A new session") },
      errors: { 400: "invalid snapshot (code names the reason: bad magic, CRC, another model, ...) or missing_body", 409: BUSY_409, 413: "too_large: the snapshot exceeds --max-snapshot-bytes", 429: "kv_memory_full", 503: STORE_503 },
    },

    "POST /tokenize": {
      tag: "llama.cpp extras",
      summary: "Tokenize text",
      body: {
        schema: "TokenizeRequest",
        examples: { plain: { summary: "Text", value: { content: "Hello world" } }, pieces: { summary: "With BOS and pieces", value: { content: "Hi", add_special: true, with_pieces: true } } },
      },
      responses: { "200": json("TokenizeResponse", "The token ids") },
      errors: { 400: BAD_BODY, 413: TOO_LARGE },
    },
    "POST /detokenize": {
      tag: "llama.cpp extras",
      summary: "Token ids to text",
      body: { schema: "DetokenizeRequest", examples: { ids: { summary: "Ids", value: { tokens: [9906, 1917] } } } },
      responses: { "200": json("DetokenizeResponse", "The text") },
      errors: { 400: `${BAD_BODY}; an id outside the vocabulary`, 413: TOO_LARGE },
    },
    "POST /apply-template": {
      tag: "llama.cpp extras",
      summary: "Render the chat template",
      body: {
        schema: "ApplyTemplateRequest",
        examples: { basic: { summary: "A message", value: { messages: [{ role: "user", content: "Hi" }], chat_template_kwargs: { date_string: "26 Jul 2024" } } } },
      },
      responses: { "200": json("ApplyTemplateResponse", "The prompt") },
      errors: { 400: BAD_BODY, 413: TOO_LARGE },
    },
    "GET /metrics": {
      tag: "llama.cpp extras",
      summary: "Prometheus metrics",
      description: "llamacpp:* counters and gauges (tokens, times, requests, queue) and ultralong:kv_memory_*.",
      responses: { "200": { description: "Prometheus text format", content: { "text/plain": { schema: { type: "string" } } } } },
    },
    "GET /health": {
      tag: "Server",
      summary: "Health",
      description: "Answers without a key; with a valid key (or when no keys are configured) it adds the model, backend, queue and KV memory.",
      auth: "optional",
      responses: { "200": json("Health", "The server is up") },
    },
    "GET /openapi.json": {
      tag: "Server",
      summary: "This OpenAPI document",
      auth: "public",
      responses: { "200": { description: "OpenAPI 3.1", content: { "application/json": { schema: { type: "object", description: "An OpenAPI 3.1 document", additionalProperties: {} } } } } },
    },
    "GET /docs": {
      tag: "Server",
      summary: "API reference page",
      description: "An HTML page that renders this document (no external resources).",
      auth: "public",
      responses: { "200": { description: "HTML", content: { "text/html": { schema: { type: "string" } } } } },
    },
    "GET /": {
      tag: "Server",
      summary: "Playground",
      description: "A page to chat with the model and work with sessions in the browser.",
      auth: "public",
      responses: { "200": { description: "HTML", content: { "text/html": { schema: { type: "string" } } } } },
    },
  };
}

/** One of the playground page's files (src/playground/), public like the page. */
const playgroundFile = (path: string): Operation => {
  const type = path.endsWith(".js") ? "text/javascript" : path.endsWith(".css") ? "text/css" : path.endsWith(".html") ? "text/html" : "application/octet-stream";
  return { tag: "Server", summary: "A file of the playground page", auth: "public", responses: { "200": { description: "The file", content: { [type]: { schema: { type: "string" } } } } } };
};

const ERROR_DEFAULTS: Record<number, string> = {
  401: "authentication_error, invalid_api_key: a missing, unknown or malformed API key",
  500: "server_error, internal_error: without detail (the server logs it)",
  503: "shutting_down: the server is draining",
};

/** Hono's path (`/v1/sessions/:id`, `/v1/models/:model{.+}`) as OpenAPI's (`/v1/sessions/{id}`). */
export const openApiPath = (honoPath: string) => honoPath.replace(/:([A-Za-z0-9_]+)(\{(?:[^{}]|\{[^{}]*\})*\})?/g, "{$1}");

/** The routes an app registers (method and Hono path), without middleware. */
export function appRoutes(app: Hono): { method: string; path: string }[] {
  const seen = new Set<string>();
  const routes: { method: string; path: string }[] = [];
  for (const r of app.routes) {
    if (r.method === "ALL") continue; // app.use middleware
    const key = `${r.method} ${r.path}`;
    if (seen.has(key)) continue;
    seen.add(key);
    routes.push({ method: r.method, path: r.path });
  }
  return routes;
}

/** Components from zod schemas, with refs between them; the per-schema $schema and $id go. */
function componentsOf(schemas: Record<string, z.ZodType>, io: "input" | "output"): Record<string, JsonObject> {
  const registry = z.registry<{ id: string }>();
  for (const [id, schema] of Object.entries(schemas)) registry.add(schema, { id });
  const out = z.toJSONSchema(registry, { io, unrepresentable: "any", uri: (id) => `#/components/schemas/${id}` });
  const components: Record<string, JsonObject> = {};
  for (const [id, schema] of Object.entries(out.schemas)) {
    const { $schema: _s, $id: _i, ...rest } = schema as JsonObject;
    components[id] = rest;
  }
  return components;
}

/**
 * Adds FIELD_NOTES to the properties of a request component (`component`) and of the objects inside it that
 * have no description: "Component.field" first, then "field".
 */
function describeFields(schema: unknown, component?: string): void {
  if (Array.isArray(schema)) return schema.forEach((s) => describeFields(s));
  if (typeof schema !== "object" || schema === null) return;
  const s = schema as JsonObject;
  const properties = s.properties as Record<string, JsonObject> | undefined;
  if (properties) {
    for (const [name, property] of Object.entries(properties)) {
      const note = (component !== undefined ? FIELD_NOTES[`${component}.${name}`] : undefined) ?? FIELD_NOTES[name];
      if (property.description === undefined && note !== undefined) property.description = note;
    }
  }
  for (const value of Object.values(s)) describeFields(value);
}

export interface OpenApiOptions {
  /** The served model's id, used in examples. */
  modelId: string;
  /** Whether API keys are configured: the routes then need `Authorization: Bearer <key>`. */
  auth: boolean;
}

/** The OpenAPI 3.1 document for the routes `app` registers. */
export function buildOpenApiDocument(app: Hono, options: OpenApiOptions): JsonObject {
  const ops = operations(options.modelId);
  const paths: Record<string, Record<string, JsonObject>> = {};
  const undocumented: string[] = [];
  for (const { method, path } of appRoutes(app)) {
    const op = ops[`${method} ${path}`] ?? (method === "GET" && path.startsWith("/playground/") ? playgroundFile(path) : undefined);
    if (!op) {
      undocumented.push(`${method} ${path}`);
      continue;
    }
    const apiPath = openApiPath(path);
    const parameters = [...apiPath.matchAll(/\{([^}]+)\}/g)].map(([, name]) => ({
      name,
      in: "path",
      required: true,
      schema: { type: "string" },
      description: name === "id" ? "The session id" : name === "model" ? "The model id (may contain /)" : undefined,
    }));
    const errors: Record<number, string> = { ...op.errors };
    if (options.auth && op.auth === undefined) errors[401] = ERROR_DEFAULTS[401]!;
    errors[500] ??= ERROR_DEFAULTS[500]!;
    errors[503] = errors[503] ? `${ERROR_DEFAULTS[503]}; ${errors[503]}` : ERROR_DEFAULTS[503]!;
    const responses: Record<string, JsonObject> = { ...op.responses };
    for (const [status, description] of Object.entries(errors)) responses[status] = json("ErrorResponse", description);
    const operation: JsonObject = {
      operationId: operationId(method, path),
      summary: op.summary,
      ...(op.description ? { description: op.description } : {}),
      tags: [op.tag],
      ...(parameters.length ? { parameters } : {}),
      responses,
    };
    if (op.body) {
      operation.requestBody = {
        required: op.body.required ?? true,
        content: { "application/json": { schema: ref(op.body.schema), examples: op.body.examples } },
      };
    } else if (op.binaryBody) {
      operation.requestBody = {
        required: true,
        description: op.binaryBody.description,
        content: { [op.binaryBody.mediaType]: { schema: { type: "string", contentMediaType: op.binaryBody.mediaType } }, "application/octet-stream": { schema: { type: "string", contentMediaType: "application/octet-stream" } } },
      };
    }
    if (op.auth === "public") operation.security = [];
    else if (op.auth === "optional") operation.security = [{}, { bearerAuth: [] }];
    (paths[apiPath] ??= {})[method.toLowerCase()] = operation;
  }
  const requests = componentsOf(requestSchemas, "input");
  for (const [name, schema] of Object.entries(requests)) describeFields(schema, name);
  return {
    openapi: "3.1.1",
    info: {
      title: "ultralong-serve",
      version: API_VERSION,
      description:
        "An OpenAI-compatible inference server for ultra-long-context Llama-3.1 models, with llama.cpp's extras and sessions (a conversation's KV kept, downloaded, uploaded and forked). Errors are OpenAI's error JSON." +
        (options.auth ? " API keys are configured: send `Authorization: Bearer <key>`." : " No API keys are configured on this server: no Authorization header is needed."),
    },
    ...(options.auth ? { security: [{ bearerAuth: [] }] } : {}),
    tags: [
      { name: "OpenAI", description: "OpenAI's API" },
      { name: "Sessions", description: "Conversations whose KV the server keeps" },
      { name: "llama.cpp extras", description: "llama.cpp server's extra routes" },
      { name: "Server", description: "Health and documentation" },
    ],
    paths,
    components: {
      schemas: { ...requests, ...componentsOf(responseSchemas, "output") },
      securitySchemes: { bearerAuth: { type: "http", scheme: "bearer", description: "--api-key, or a key of --api-keys-file (which names the caller's tenant)" } },
    },
    ...(undocumented.length ? { "x-undocumented-routes": undocumented } : {}),
  };
}

function operationId(method: string, path: string): string {
  const words = openApiPath(path).split(/[^A-Za-z0-9]+/).filter(Boolean);
  return method.toLowerCase() + (words.length ? words.map((w) => w[0]!.toUpperCase() + w.slice(1)).join("") : "Root");
}

/**
 * Serves GET /openapi.json and GET /docs. Call it before the auth middleware (they need no key); the
 * document is built on the first request, from every route the app has by then.
 */
export function registerOpenApi(app: Hono, options: OpenApiOptions): void {
  let doc: string | undefined;
  app.get("/openapi.json", (c) => {
    doc ??= JSON.stringify(buildOpenApiDocument(app, options));
    return c.body(doc, 200, { "content-type": "application/json; charset=utf-8" });
  });
  app.get("/docs", (c) => c.html(DOCS_PAGE));
}
