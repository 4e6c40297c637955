/**
 * The HTTP face: OpenAI's API (chat completions, completions, models), sessions (session-routes.ts) and
 * llama.cpp's extras (/tokenize, /detokenize, /apply-template, /metrics, /health). Each route reads
 * straight through: zod schema -> runtime call -> JSON or SSE. Errors become OpenAI error JSON in one
 * place (onError).
 */
import { Hono, type Context, type Next } from "hono";
import { bodyLimit } from "hono/body-limit";
import { conversationFor, type ChatMessage, type Engine, type SessionManager } from "../runtime/index.ts";
import { authMiddleware, isAuthenticated, tenantOf, type ApiKey } from "./auth.ts";
import { badRequest, toErrorResponse } from "./http-errors.ts";
import { RouteKit, chatChoicesOf, clientAbort, jsonListResponse, respondChat, toChatMessage } from "./http-kit.ts";
import { respondCompletion } from "./completions.ts";
import { applyTemplateSchema, chatCompletionSchema, detokenizeSchema, tokenizeSchema } from "./schemas.ts";
import { registerOpenApi } from "./openapi.ts";
import { isSnapshotUpload, registerSessionRoutes } from "./session-routes.ts";
import { registerPlayground } from "./playground.ts";

export interface AppOptions {
  engine: Engine;
  /** Sessions and snapshots; without it the /v1/sessions routes answer 404. */
  sessions?: SessionManager;
  maxBodyBytes: number;
  /** Largest snapshot upload (PUT /v1/sessions/:id/snapshot), which the JSON body limit does not cover. */
  maxSnapshotBytes?: number;
  /** A key whose caller is tenant "default" (--api-key). */
  apiKey?: string;
  /** Keys of named tenants (--api-keys-file). With neither, every caller is tenant "default". */
  apiKeys?: readonly ApiKey[];
  /** Set once the server is shutting down: requests that arrive after that get 503. */
  draining?: { readonly active: boolean };
  /**
   * Lifts the connection's idle timeout for one request (set by the entry point that owns the listener).
   * Called for routes that may send nothing for a long time while they work (a non-streaming generation,
   * a long prefill), once their whole body has arrived: a slow or silent client is still cut off.
   */
  idle?: { exempt: (c: Context) => void };
  log?: (message: string) => void;
}

export function createApp(options: AppOptions): Hono {
  const { engine, sessions } = options;
  const log = options.log ?? ((m: string) => console.error(m));
  const kit = new RouteKit(engine, log);
  const app = new Hono();

  app.onError((error, c) => {
    const { status, body, headers } = toErrorResponse(error, log);
    return c.json(body, status as 400, headers);
  });
  app.notFound((c) =>
    c.json({ error: { message: `no route for ${c.req.method} ${c.req.path}`, type: "invalid_request_error", param: null, code: "not_found" } }, 404),
  );

  // A request that arrives on a kept-alive connection while the server drains must not start new work.
  app.use("*", async (c, next) => {
    if (!options.draining?.active) return next();
    const error = { message: "the server is shutting down", type: "server_error", param: null, code: "shutting_down" };
    return c.json({ error }, 503, { connection: "close" });
  });
  registerOpenApi(app, { modelId: engine.info.modelId, auth: options.apiKey !== undefined || (options.apiKeys?.length ?? 0) > 0 }); // before auth: no key needed
  app.use("*", authMiddleware({ apiKey: options.apiKey, apiKeys: options.apiKeys }));
  const jsonBodyLimit = bodyLimit({
    maxSize: options.maxBodyBytes,
    onError: (c) =>
      c.json({ error: { message: `request body exceeds ${options.maxBodyBytes} bytes`, type: "invalid_request_error", param: null, code: "request_too_large" } }, 413),
  });
  // Snapshot uploads are streamed to disk under their own limit (SessionManager.upload).
  app.use("*", (c, next) => (isSnapshotUpload(c) ? next() : jsonBodyLimit(c, next)));
  // Routes that generate or read may be silent for long: their body is read first (under the idle timeout), then the timeout is lifted.
  const working = (paths: RegExp) => async (c: Context, next: Next) => {
    if (c.req.method === "POST" && paths.test(c.req.path) && options.idle) {
      await c.req.text(); // Hono keeps it for the handler
      options.idle.exempt(c);
    }
    await next();
  };
  app.use("*", working(/^\/v1\/(chat\/completions|completions|sessions|sessions\/[^/]+\/(messages|append))$/));

  registerPlayground(app); // GET / and its files (src/playground/), public: see auth.ts

  app.get("/health", (c) => {
    // Without a valid key (when keys are configured) it says only that the server is up.
    if (!isAuthenticated(c)) return c.json({ status: "ok" });
    return c.json({
      status: "ok",
      model: engine.info.modelId,
      backend: engine.info.backend,
      backend_detail: engine.info.backendDetail,
      variant: engine.info.variant,
      context_length: engine.info.contextLength,
      queue: engine.queueState,
      kv_memory: { used_bytes: engine.kvMemory.usedBytes, limit_bytes: engine.kvMemory.limitBytes, sessions_bytes: sessions?.residentBytes ?? 0 },
      kv_compaction: engine.compaction ? { policy: engine.compaction.policy, budget: engine.compaction.budget, recall: engine.compaction.recall, placement: engine.compaction.recallPlacement } : { policy: "none" },
      ...(sessions ? { session_store: sessions.store.description } : {}),
    });
  });

  const modelCard = () => ({
    id: engine.info.modelId,
    object: "model" as const,
    created: engine.info.createdAt,
    owned_by: "ultralong-serve",
    meta: {
      backend: engine.info.backend,
      variant: engine.info.variant,
      n_ctx: engine.info.contextLength,
      n_vocab: engine.info.vocabSize,
      kv_dtype: engine.info.kvDtype,
      kv_bytes_per_token: engine.info.kvBytesPerToken,
    },
  });
  app.get("/v1/models", (c) => c.json({ object: "list", data: [modelCard()] }));
  app.get("/v1/models/:model{.+}", (c) => {
    kit.checkModel(c.req.param("model"));
    return c.json(modelCard());
  });

  app.post("/v1/chat/completions", async (c) => {
    const req = await kit.parse(c, chatCompletionSchema);
    kit.checkModel(req.model);
    const tools = req.tool_choice === "none" ? null : (req.tools ?? null);
    const messages = req.messages.map(toChatMessage);
    const abort = clientAbort(c);
    const maxTokens = kit.maxTokensOf(req.max_completion_tokens ?? req.max_tokens);
    const common = {
      abort,
      stream: req.stream === true,
      includeUsage: req.stream_options?.include_usage === true,
      functions: req.tool_choice === "none" ? null : new Set((tools ?? []).map((t) => t.function.name)),
      n: chatChoicesOf(req).n,
    };

    if (req.session_id != null) {
      // Continue a session: the request's messages are the conversation (or, by session_history, new messages
      // or a new start); the session keeps the KV they share. A request that would silently drop the session's
      // history (an OpenAI client sending only its new message) is refused, saying how to continue.
      if (!sessions) throw badRequest("sessions are not enabled on this server", "session_id");
      if (common.n > 1) throw badRequest("n: a session turn has one reply; n > 1 needs a request without session_id", "n");
      const sessionId = req.session_id;
      await sessions.assertReady(tenantOf(c), sessionId);
      const conversation = (current: ChatMessage[]) => conversationFor(sessionId, current, messages, req.session_history);
      // The request's own fields first (logit_bias, ...), then whether it continues the session.
      const turn = { ...kit.generationOf(req, maxTokens, abort.signal), logprobs: chatChoicesOf(req).logprobs, messages: conversation, tools };
      const resident = sessions.residentMessages(tenantOf(c), sessionId);
      if (resident) conversation(resident); // refused before a stream opens, where this process has the session
      return respondChat(kit, c, { ...common, run: (onDelta, onToken) => sessions.turn(tenantOf(c), sessionId, { ...turn, onToken }, onDelta), extra: { session_id: sessionId } });
    }

    engine.checkAdmission(); // a full queue answers 429 before the prompt is tokenized, not after
    const promptIds = await engine.encodeChat(messages, { tools, addGenerationPrompt: true, extra: req.chat_template_kwargs }, abort.signal);
    const job = { ...kit.jobOf(req, promptIds, maxTokens, abort.signal), ...chatChoicesOf(req) };
    // Reuse the KV of an in-memory session of the same tenant that shares this prompt's beginning (a copy: the session is not touched).
    const tenant = tenantOf(c);
    if (sessions) job.prepare = () => sessions.prefixCache(tenant, promptIds) ?? engine.model.newCache();
    return respondChat(kit, c, { ...common, templateKwargs: req.chat_template_kwargs, run: (onDelta, onToken) => engine.complete({ ...job, onToken }, onDelta) });
  });

  app.post("/v1/completions", (c) => respondCompletion(kit, c, sessions));

  if (sessions) registerSessionRoutes(app, kit, sessions, options.maxSnapshotBytes ?? 8 * 2 ** 30);

  app.post("/tokenize", async (c) => {
    const req = await kit.parse(c, tokenizeSchema);
    const ids = await engine.encodeText(req.content, req.add_special ?? false, req.parse_special ?? false, "content", clientAbort(c).signal);
    if (!req.with_pieces) return jsonListResponse("tokens", ids);
    return jsonListResponse("tokens", ids, (slice) => slice.map((id) => ({ id, piece: engine.tokenizer.decode([id]) })));
  });

  app.post("/detokenize", async (c) => {
    const req = await kit.parse(c, detokenizeSchema);
    engine.checkTokenIds(req.tokens, "tokens");
    return c.json({ content: await engine.decodeIds(req.tokens) });
  });

  app.post("/apply-template", async (c) => {
    const req = await kit.parse(c, applyTemplateSchema);
    const prompt = engine.renderChat(req.messages.map(toChatMessage), {
      tools: req.tools ?? null,
      addGenerationPrompt: req.add_generation_prompt ?? true,
      extra: req.chat_template_kwargs,
    });
    return c.json({ prompt });
  });

  app.get("/metrics", (c) => {
    const m = engine.metrics;
    const q = engine.queueState;
    const lines = [
      ["llamacpp:prompt_tokens_total", "counter", "Prompt tokens processed", m.promptTokens],
      ["llamacpp:prompt_seconds_total", "counter", "Prompt processing time", m.prefillMs / 1000],
      ["llamacpp:tokens_predicted_total", "counter", "Generated tokens", m.completionTokens],
      ["llamacpp:tokens_predicted_seconds_total", "counter", "Generation time", m.decodeMs / 1000],
      ["llamacpp:requests_total", "counter", "Generation requests run", m.requests],
      ["llamacpp:requests_cancelled_total", "counter", "Generations stopped because the client went away", m.cancelled],
      ["llamacpp:requests_cancelled_queued_total", "counter", "Requests whose client went away while they waited in the queue (not in requests_total)", m.cancelledQueued],
      ["llamacpp:requests_processing", "gauge", "Requests being processed", q.busy ? 1 : 0],
      ["llamacpp:requests_deferred", "gauge", "Requests waiting in the queue", q.waiting],
      ["ultralong:kv_memory_used_bytes", "gauge", "KV bytes held: sessions in memory, running requests, uploads being read", engine.kvMemory.usedBytes],
      ["ultralong:kv_memory_limit_bytes", "gauge", "KV bytes the process may hold (--kv-memory-bytes)", engine.kvMemory.limitBytes],
      ["ultralong:kv_memory_sessions_bytes", "gauge", "KV bytes held by sessions in memory", sessions?.residentBytes ?? 0],
    ] as const;
    const text = lines.map(([name, type, help, value]) => `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n${name} ${value}`).join("\n");
    return c.text(`${text}\n`, 200, { "content-type": "text/plain; version=0.0.4" });
  });

  return app;
}
