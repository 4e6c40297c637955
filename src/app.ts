/**
 * The HTTP face: OpenAI's API (chat completions, completions, models), sessions (session-routes.ts) and
 * llama.cpp's extras (/tokenize, /detokenize, /apply-template, /metrics, /health). Each route reads
 * straight through: zod schema -> runtime call -> JSON or SSE. Errors become OpenAI error JSON in one
 * place (onError).
 */
import { Hono } from "hono";
import { bodyLimit } from "hono/body-limit";
import type { Engine, SessionManager } from "../runtime/index.ts";
import { authMiddleware } from "./auth.ts";
import { badRequest, toErrorResponse } from "./http-errors.ts";
import { RouteKit, clientAbort, jsonListResponse, newId, nowSeconds, respondChat, toChatMessage, usage, timings } from "./http-kit.ts";
import { applyTemplateSchema, chatCompletionSchema, completionSchema, detokenizeSchema, tokenizeSchema } from "./schemas.ts";
import { isSnapshotUpload, registerSessionRoutes } from "./session-routes.ts";

export interface AppOptions {
  engine: Engine;
  /** Sessions and snapshots; without it the /v1/sessions routes answer 404. */
  sessions?: SessionManager;
  maxBodyBytes: number;
  /** Largest snapshot upload (PUT /v1/sessions/:id/snapshot), which the JSON body limit does not cover. */
  maxSnapshotBytes?: number;
  apiKey?: string;
  log?: (message: string) => void;
}

export function createApp(options: AppOptions): Hono {
  const { engine, sessions } = options;
  const log = options.log ?? ((m: string) => console.error(m));
  const kit = new RouteKit(engine, log);
  const app = new Hono();

  app.onError((error, c) => {
    const { status, body } = toErrorResponse(error, log);
    return c.json(body, status as 400);
  });
  app.notFound((c) =>
    c.json({ error: { message: `no route for ${c.req.method} ${c.req.path}`, type: "invalid_request_error", param: null, code: "not_found" } }, 404),
  );

  app.use("*", authMiddleware({ apiKey: options.apiKey }));
  const jsonBodyLimit = bodyLimit({
    maxSize: options.maxBodyBytes,
    onError: (c) =>
      c.json({ error: { message: `request body exceeds ${options.maxBodyBytes} bytes`, type: "invalid_request_error", param: null, code: "request_too_large" } }, 413),
  });
  // Snapshot uploads are streamed to disk under their own limit (SessionManager.upload).
  app.use("*", (c, next) => (isSnapshotUpload(c) ? next() : jsonBodyLimit(c, next)));

  app.get("/health", (c) =>
    c.json({
      status: "ok",
      model: engine.info.modelId,
      backend: engine.info.backend,
      backend_detail: engine.info.backendDetail,
      variant: engine.info.variant,
      context_length: engine.info.contextLength,
      queue: engine.queueState,
    }),
  );

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
      toolNames: tools ? new Set(tools.map((t) => t.function.name)) : null,
    };

    if (req.session_id != null) {
      // Continue a session: the request's messages are the conversation; the session keeps the KV they share.
      if (!sessions) throw badRequest("sessions are not enabled on this server", "session_id");
      const sessionId = req.session_id;
      await sessions.assertReady(sessionId);
      const turn = { ...kit.generationOf(req, maxTokens, abort.signal), messages: () => messages, tools };
      return respondChat(kit, c, { ...common, run: (onDelta) => sessions.turn(sessionId, turn, onDelta), extra: { session_id: sessionId } });
    }

    engine.checkAdmission(); // a full queue answers 429 before the prompt is tokenized, not after
    const promptIds = await engine.encodeChat(messages, { tools, addGenerationPrompt: true, extra: req.chat_template_kwargs }, abort.signal);
    const job = kit.jobOf(req, promptIds, maxTokens, abort.signal);
    // Reuse the KV of an in-memory session that shares this prompt's beginning (a copy: the session is not touched).
    if (sessions) job.prepare = () => sessions.prefixCache(promptIds) ?? engine.model.newCache();
    return respondChat(kit, c, { ...common, run: (onDelta) => engine.complete(job, onDelta) });
  });

  app.post("/v1/completions", async (c) => {
    const req = await kit.parse(c, completionSchema);
    kit.checkModel(req.model);
    const abort = clientAbort(c);
    engine.checkAdmission();
    const promptIds = typeof req.prompt === "string" ? await engine.encodePrompt(req.prompt, abort.signal) : req.prompt;
    const job = kit.jobOf(req, promptIds, kit.maxTokensOf(req.max_tokens) ?? 16 /* OpenAI's default here */, abort.signal);
    if (sessions) job.prepare = () => sessions.prefixCache(promptIds) ?? engine.model.newCache();
    const id = newId("cmpl");
    const created = nowSeconds();
    const model = engine.info.modelId;
    if (req.stream) {
      const choice = (text: string | null, finish: string | null) => ({ index: 0, text: text ?? "", logprobs: null, finish_reason: finish });
      const head = { id, object: "text_completion", created, model };
      return kit.stream((onDelta) => engine.complete(job, onDelta), abort, head, req.stream_options?.include_usage === true, choice);
    }
    const result = await engine.complete(job);
    return c.json({
      id,
      object: "text_completion",
      created,
      model,
      choices: [{ index: 0, text: result.text, logprobs: null, finish_reason: result.finishReason }],
      usage: usage(result),
      timings: timings(result),
    });
  });

  if (sessions) registerSessionRoutes(app, kit, sessions, options.maxSnapshotBytes ?? 8 * 2 ** 30);

  app.post("/tokenize", async (c) => {
    const req = await kit.parse(c, tokenizeSchema);
    const ids = await engine.encodeText(req.content, req.add_special ?? false, "content", clientAbort(c).signal);
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
      ["llamacpp:requests_processing", "gauge", "Requests being processed", q.busy ? 1 : 0],
      ["llamacpp:requests_deferred", "gauge", "Requests waiting in the queue", q.waiting],
    ] as const;
    const text = lines.map(([name, type, help, value]) => `# HELP ${name} ${help}\n# TYPE ${name} ${type}\n${name} ${value}`).join("\n");
    return c.text(`${text}\n`, 200, { "content-type": "text/plain; version=0.0.4" });
  });

  return app;
}
