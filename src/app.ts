/**
 * The HTTP face: OpenAI's API (chat completions, completions, models) and llama.cpp's extras
 * (/tokenize, /detokenize, /apply-template, /metrics, /health). Each route reads straight through:
 * zod schema -> runtime call -> JSON or SSE. Errors become OpenAI error JSON in one place (onError).
 */
import { Hono, type Context } from "hono";
import { bodyLimit } from "hono/body-limit";
import type { z } from "zod";
import { parseToolCall, type ChatMessage, type CompletionJob, type Engine, type GenerateResult, type SamplingParams } from "../runtime/index.ts";
import { HttpError, badRequest, fromZod, toErrorResponse } from "./http-errors.ts";
import {
  applyTemplateSchema,
  chatCompletionSchema,
  completionSchema,
  detokenizeSchema,
  tokenizeSchema,
  type ChatCompletionRequest,
  type CompletionRequest,
} from "./schemas.ts";
import { sseResponse } from "./sse.ts";

export interface AppOptions {
  engine: Engine;
  maxBodyBytes: number;
  apiKey?: string;
  log?: (message: string) => void;
}

type Sampled = Pick<ChatCompletionRequest, keyof CompletionRequest & keyof ChatCompletionRequest>;

const nowSeconds = () => Math.floor(Date.now() / 1000);
const newId = (prefix: string) => `${prefix}-${crypto.randomUUID().replaceAll("-", "").slice(0, 24)}`;

function usage(r: GenerateResult) {
  return { prompt_tokens: r.promptTokens, completion_tokens: r.completionTokens, total_tokens: r.promptTokens + r.completionTokens };
}

/** llama.cpp's timings block, which its clients and dashboards read. */
function timings(r: GenerateResult) {
  return {
    prompt_n: r.promptTokens,
    prompt_ms: r.prefillMs,
    prompt_per_second: r.prefillMs > 0 ? (r.promptTokens * 1000) / r.prefillMs : 0,
    predicted_n: r.completionTokens,
    predicted_ms: r.decodeMs,
    predicted_per_second: r.decodeMs > 0 ? (r.completionTokens * 1000) / r.decodeMs : 0,
  };
}

function samplingOf(req: Sampled): Partial<SamplingParams> {
  const v = <T>(x: T | null | undefined): T | undefined => (x === null ? undefined : x);
  return {
    temperature: v(req.temperature),
    topP: v(req.top_p),
    topK: v(req.top_k),
    minP: v(req.min_p),
    seed: v(req.seed) === undefined ? undefined : req.seed! >>> 0,
    frequencyPenalty: v(req.frequency_penalty),
    presencePenalty: v(req.presence_penalty),
    repetitionPenalty: v(req.repetition_penalty) ?? v(req.repeat_penalty),
    penaltyLastN: v(req.repeat_last_n),
    logitBias: req.logit_bias ? new Map(Object.entries(req.logit_bias).map(([id, bias]) => [Number(id), bias])) : undefined,
  };
}

const stopList = (stop: string | string[] | null | undefined): string[] => (stop == null ? [] : typeof stop === "string" ? [stop] : stop);

function toChatMessages(req: { messages: z.infer<typeof chatCompletionSchema>["messages"] }): ChatMessage[] {
  return req.messages.map((m) => ({
    // Llama templates know system/user/assistant/tool/ipython; OpenAI's "developer" is the system role.
    role: m.role === "developer" ? "system" : m.role,
    content: m.content == null ? null : typeof m.content === "string" ? m.content : m.content.map((p) => p.text).join(""),
    ...(m.name !== undefined ? { name: m.name } : {}),
    ...(m.tool_call_id !== undefined ? { tool_call_id: m.tool_call_id } : {}),
    ...(m.tool_calls ? { tool_calls: m.tool_calls.map((c) => ({ ...c, function: { ...c.function } })) } : {}),
  }));
}

export function createApp(options: AppOptions): Hono {
  const { engine } = options;
  const log = options.log ?? ((m: string) => console.error(m));
  const app = new Hono();

  const parseBody = async <S extends z.ZodType>(c: Context, schema: S): Promise<z.infer<S>> => {
    const text = await c.req.text();
    let json: unknown;
    try {
      json = JSON.parse(text);
    } catch {
      throw badRequest("the request body is not valid JSON", null, "invalid_json");
    }
    const parsed = schema.safeParse(json);
    if (!parsed.success) throw fromZod(parsed.error);
    return parsed.data;
  };

  const checkModel = (model: string | undefined) => {
    if (model !== undefined && model !== engine.info.modelId) {
      throw new HttpError(404, `The model '${model}' does not exist; this server serves '${engine.info.modelId}'`, "invalid_request_error", "model_not_found", "model");
    }
  };

  const maxTokensOf = (requested: number | null | undefined): number | undefined => {
    if (requested == null) return undefined;
    if (requested > engine.info.contextLength) {
      throw badRequest(`max_tokens is ${requested} but the context holds ${engine.info.contextLength} tokens`, "max_tokens");
    }
    return requested;
  };

  /** Aborts when the client disconnects, so a queued or running generation stops. */
  const clientAbort = (c: Context): AbortController => {
    const abort = new AbortController();
    const signal = c.req.raw.signal;
    if (signal.aborted) abort.abort();
    else signal.addEventListener("abort", () => abort.abort(), { once: true });
    return abort;
  };

  const errorEvent = (error: unknown) => toErrorResponse(error, log).body;

  const jobOf = (req: Sampled, promptIds: number[], maxTokens: number | undefined, signal: AbortSignal): CompletionJob => ({
    promptIds,
    maxTokens,
    sampling: samplingOf(req),
    stop: stopList(req.stop),
    ignoreEos: req.ignore_eos,
    signal,
  });

  /**
   * Runs a job as an SSE stream of chunks that share `head` (id, object, created, model); `choice` builds
   * each chunk's choice from a text delta, or from null with the finish reason for the closing chunk.
   */
  const streamJob = (
    job: CompletionJob,
    abort: AbortController,
    head: Record<string, unknown>,
    includeUsage: boolean,
    choice: (text: string | null, finish: string | null) => Record<string, unknown>,
    opening?: Record<string, unknown>,
  ): Response => {
    // A full queue must be a 429, not an error event inside a 200 stream: the stream's producer
    // starts synchronously, so nothing can enter the queue between this check and its submission.
    engine.checkAdmission();
    return sseResponse(
      async (send) => {
        if (opening) send({ ...head, choices: [opening] });
        const result = await engine.complete(job, (text) => send({ ...head, choices: [choice(text, null)] }));
        send({ ...head, choices: [choice(null, result.finishReason)] });
        if (includeUsage) send({ ...head, choices: [], usage: usage(result), timings: timings(result) });
      },
      abort,
      errorEvent,
    );
  };

  app.onError((error, c) => {
    const { status, body } = toErrorResponse(error, log);
    return c.json(body, status as 400);
  });
  app.notFound((c) =>
    c.json({ error: { message: `no route for ${c.req.method} ${c.req.path}`, type: "invalid_request_error", param: null, code: "not_found" } }, 404),
  );

  app.use("*", async (c, next) => {
    if (options.apiKey && c.req.path !== "/health") {
      const header = c.req.header("authorization") ?? "";
      if (header !== `Bearer ${options.apiKey}`) {
        return c.json({ error: { message: "invalid or missing API key", type: "authentication_error", param: null, code: "invalid_api_key" } }, 401);
      }
    }
    await next();
  });
  app.use(
    "*",
    bodyLimit({
      maxSize: options.maxBodyBytes,
      onError: (c) =>
        c.json(
          { error: { message: `request body exceeds ${options.maxBodyBytes} bytes`, type: "invalid_request_error", param: null, code: "request_too_large" } },
          413,
        ),
    }),
  );

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
    checkModel(c.req.param("model"));
    return c.json(modelCard());
  });

  app.post("/v1/chat/completions", async (c) => {
    const req = await parseBody(c, chatCompletionSchema);
    checkModel(req.model);
    const tools = req.tool_choice === "none" ? null : (req.tools ?? null);
    const promptIds = engine.encodeChat(toChatMessages(req), { tools, addGenerationPrompt: true, extra: req.chat_template_kwargs });
    const abort = clientAbort(c);
    const job = jobOf(req, promptIds, maxTokensOf(req.max_completion_tokens ?? req.max_tokens), abort.signal);
    const id = newId("chatcmpl");
    const created = nowSeconds();
    const model = engine.info.modelId;

    if (req.stream) {
      const delta = (text: string | null, finish: string | null) => ({ index: 0, delta: text === null ? {} : { content: text }, logprobs: null, finish_reason: finish });
      const opening = { index: 0, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null };
      return streamJob(job, abort, { id, object: "chat.completion.chunk", created, model }, req.stream_options?.include_usage === true, delta, opening);
    }

    const result = await engine.complete(job);
    const toolCall = tools ? parseToolCall(result.text, new Set(tools.map((t) => t.function.name))) : null;
    const message = toolCall
      ? { role: "assistant", content: null, tool_calls: [{ id: newId("call"), type: "function", function: toolCall }] }
      : { role: "assistant", content: result.text };
    return c.json({
      id,
      object: "chat.completion",
      created,
      model,
      choices: [{ index: 0, message, logprobs: null, finish_reason: toolCall ? "tool_calls" : result.finishReason }],
      usage: usage(result),
      timings: timings(result),
    });
  });

  app.post("/v1/completions", async (c) => {
    const req = await parseBody(c, completionSchema);
    checkModel(req.model);
    const promptIds = typeof req.prompt === "string" ? engine.encodePrompt(req.prompt) : req.prompt;
    const abort = clientAbort(c);
    const job = jobOf(req, promptIds, maxTokensOf(req.max_tokens) ?? 16 /* OpenAI's default here */, abort.signal);
    const id = newId("cmpl");
    const created = nowSeconds();
    const model = engine.info.modelId;
    if (req.stream) {
      const choice = (text: string | null, finish: string | null) => ({ index: 0, text: text ?? "", logprobs: null, finish_reason: finish });
      return streamJob(job, abort, { id, object: "text_completion", created, model }, req.stream_options?.include_usage === true, choice);
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

  app.post("/tokenize", async (c) => {
    const req = await parseBody(c, tokenizeSchema);
    const ids = engine.tokenizer.encode(req.content, req.add_special ?? false);
    if (!req.with_pieces) return c.json({ tokens: ids });
    return c.json({ tokens: ids.map((id) => ({ id, piece: engine.tokenizer.decode([id]) })) });
  });

  app.post("/detokenize", async (c) => {
    const req = await parseBody(c, detokenizeSchema);
    const bad = req.tokens.find((id) => id >= engine.info.vocabSize);
    if (bad !== undefined) throw badRequest(`token id ${bad} is outside the vocabulary (0..${engine.info.vocabSize - 1})`, "tokens");
    return c.json({ content: engine.tokenizer.decode(req.tokens) });
  });

  app.post("/apply-template", async (c) => {
    const req = await parseBody(c, applyTemplateSchema);
    const prompt = engine.renderChat(toChatMessages(req), {
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
