/**
 * What the route files share: body parsing through a zod schema, OpenAI response pieces (usage, timings,
 * chat messages, sampling fields), client-abort wiring, and streaming a generation as SSE chunks.
 */
import type { Context } from "hono";
import type { z } from "zod";
import {
  PYTHON_TAG,
  ToolCallStream,
  builtinToolsOf,
  parseToolCall,
  yieldToEventLoop,
  type ChatMessage,
  type CompletionDelta,
  type CompletionJob,
  type Engine,
  type GenerateResult,
  type ParsedToolCall,
  type SamplingParams,
  type TokenLogprob,
  type ToolOffer,
} from "../runtime/index.ts";
import { HttpError, badRequest, fromZod, toErrorResponse, zodIssueMessage } from "./http-errors.ts";
import type { ChatCompletionRequest, CompletionRequest, chatMessageSchema } from "./schemas.ts";
import { TokenStrings } from "./logprobs.ts";
import { sseResponse } from "./sse.ts";

/** The sampling fields every generating route accepts (n and logprobs differ per route: see chatChoicesOf and completions.ts). */
export type Sampled = Pick<ChatCompletionRequest, Exclude<keyof CompletionRequest & keyof ChatCompletionRequest, "n" | "logprobs" | "max_tokens">> & { max_tokens?: number | null };

export const nowSeconds = () => Math.floor(Date.now() / 1000);
export const newId = (prefix: string) => `${prefix}-${crypto.randomUUID().replaceAll("-", "").slice(0, 24)}`;

export function usage(r: GenerateResult) {
  return {
    prompt_tokens: r.promptTokens,
    completion_tokens: r.completionTokens,
    total_tokens: r.promptTokens + r.completionTokens,
    prompt_tokens_details: { cached_tokens: r.cachedTokens },
  };
}

/** llama.cpp's timings block, which its clients and dashboards read. prompt_n counts the tokens actually prefilled. */
export function timings(r: GenerateResult) {
  const prefilled = r.promptTokens - r.cachedTokens;
  return {
    cache_n: r.cachedTokens,
    prompt_n: prefilled,
    prompt_ms: r.prefillMs,
    prompt_per_second: r.prefillMs > 0 ? (prefilled * 1000) / r.prefillMs : 0,
    predicted_n: r.completionTokens,
    predicted_ms: r.decodeMs,
    predicted_per_second: r.decodeMs > 0 ? (r.completionTokens * 1000) / r.decodeMs : 0,
  };
}

export function samplingOf(req: Sampled): Partial<SamplingParams> {
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

export const stopList = (stop: string | string[] | null | undefined): string[] => (stop == null ? [] : typeof stop === "string" ? [stop] : stop);

export function toChatMessage(m: z.infer<typeof chatMessageSchema>): ChatMessage {
  return {
    // Llama templates know system/user/assistant/tool/ipython; OpenAI's "developer" is the system role.
    role: m.role === "developer" ? "system" : m.role,
    content: m.content == null ? null : typeof m.content === "string" ? m.content : m.content.map((p) => p.text).join(""),
    ...(m.name !== undefined ? { name: m.name } : {}),
    ...(m.tool_call_id !== undefined ? { tool_call_id: m.tool_call_id } : {}),
    ...(m.tool_calls ? { tool_calls: m.tool_calls.map((c) => ({ ...c, function: { ...c.function } })) } : {}),
  };
}

export async function parseBody<S extends z.ZodType>(c: Context, schema: S): Promise<z.infer<S>> {
  const text = await c.req.text();
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    throw badRequest("the request body is not valid JSON", null, "invalid_json");
  }
  const parsed = schema.safeParse(json, { error: zodIssueMessage });
  if (!parsed.success) throw fromZod(parsed.error);
  return parsed.data;
}

/** Calls `check` on every string in a parsed body with its path (e.g. messages.0.content), in order. */
export async function eachString(value: unknown, check: (text: string, path: string) => Promise<void>): Promise<void> {
  // An explicit stack: a body may nest deeper than the call stack allows (free-form tool parameters).
  const stack: [unknown, string][] = [[value, ""]];
  const keyName = (k: string) => (k.length > 40 ? `${k.slice(0, 40)}...` : k);
  const nested = (v: unknown) => typeof v === "string" || (typeof v === "object" && v !== null);
  while (stack.length) {
    const [v, path] = stack.pop()!;
    if (typeof v === "string") {
      await check(v, path || "body");
    } else if (Array.isArray(v)) {
      for (let i = v.length - 1; i >= 0; i--) if (nested(v[i])) stack.push([v[i], path ? `${path}.${i}` : String(i)]);
    } else if (typeof v === "object" && v !== null) {
      const entries = Object.entries(v);
      for (let i = entries.length - 1; i >= 0; i--) {
        const [k, x] = entries[i]!;
        if (nested(x)) stack.push([x, path ? `${path}.${keyName(k)}` : keyName(k)]);
      }
    }
  }
}

/**
 * A JSON object `{ [key]: list }` as a response, stringified a slice of the list at a time with turns for
 * the event loop between slices: one JSON.stringify of millions of items holds the thread for a while.
 */
export async function jsonListResponse<T>(key: string, list: readonly T[], map: (slice: T[]) => unknown[] = (s) => s): Promise<Response> {
  const SLICE = 1 << 16;
  const parts: string[] = [];
  for (let start = 0; start < list.length; start += SLICE) {
    if (start > 0) await yieldToEventLoop();
    parts.push(JSON.stringify(map(list.slice(start, start + SLICE))).slice(1, -1));
  }
  return new Response(`{${JSON.stringify(key)}:[${parts.join(",")}]}`, { headers: { "content-type": "application/json" } });
}

/** Aborts when the client disconnects, so a queued or running generation stops. */
export function clientAbort(c: Context): AbortController {
  const abort = new AbortController();
  const signal = c.req.raw.signal;
  if (signal.aborted) abort.abort();
  else signal.addEventListener("abort", () => abort.abort(), { once: true });
  return abort;
}

/** The engine-bound helpers of one app. */
export class RouteKit {
  /** The model's token strings and bytes, as logprobs report them. */
  readonly tokens: TokenStrings;

  constructor(
    readonly engine: Engine,
    readonly log: (message: string) => void,
  ) {
    this.tokens = new TokenStrings(engine.tokenizer);
  }

  errorEvent = (error: unknown) => toErrorResponse(error, this.log).body;

  /**
   * parseBody, then every string of the request held to the engine's per-field text limits before any
   * tokenizing (a 400 names the field and the limit).
   */
  async parse<S extends z.ZodType>(c: Context, schema: S): Promise<z.infer<S>> {
    const body = await parseBody(c, schema);
    await eachString(body, (text, path) => this.engine.checkField(text, path));
    return body;
  }

  checkModel(model: string | undefined): void {
    if (model !== undefined && model !== this.engine.info.modelId) {
      throw new HttpError(404, `The model '${model}' does not exist; this server serves '${this.engine.info.modelId}'`, "invalid_request_error", "model_not_found", "model");
    }
  }

  maxTokensOf(requested: number | null | undefined): number | undefined {
    if (requested == null) return undefined;
    const context = this.engine.info.contextLength;
    if (requested > context) throw badRequest(`max_tokens is ${requested} but the context holds ${context} tokens`, "max_tokens");
    return requested;
  }

  /** What a request asks of generation, apart from its prompt. */
  generationOf(req: Sampled, maxTokens: number | undefined, signal: AbortSignal): Omit<CompletionJob, "promptIds" | "prepare"> {
    // Sampling would silently ignore a bias on a token the model does not have: refuse it by name instead.
    if (req.logit_bias) this.engine.checkTokenIds(Object.keys(req.logit_bias).map(Number), "logit_bias");
    return { maxTokens, sampling: samplingOf(req), stop: stopList(req.stop), ignoreEos: req.ignore_eos, signal };
  }

  jobOf(req: Sampled, promptIds: number[], maxTokens: number | undefined, signal: AbortSignal): CompletionJob {
    return { promptIds, ...this.generationOf(req, maxTokens, signal) };
  }

  /**
   * An SSE response whose producer starts a generation; it must submit to the engine synchronously (before
   * its first await): a full queue must be a 429, not an error event inside a 200 stream, and the stream's
   * producer starts synchronously, so nothing can enter the queue between this check and its submission.
   */
  sse(produce: (send: (data: unknown) => void) => Promise<void>, abort: AbortController): Response {
    this.engine.checkAdmission();
    return sseResponse(produce, abort, this.errorEvent);
  }
}

export interface ChatRun {
  /**
   * Starts the generation: text deltas (with their tokens' logprobs when asked for, and the choice's index)
   * to onDelta, each token id (before its text) with its choice's index to onToken.
   */
  run: (onDelta?: CompletionDelta, onToken?: (id: number, index: number) => void) => Promise<GenerateResult & { templateKwargs?: Record<string, unknown>; choices?: GenerateResult[] }>;
  abort: AbortController;
  stream: boolean;
  includeUsage: boolean;
  /** Choices asked for (n; default 1). */
  n?: number;
  /**
   * Names of the custom tools offered (the request's `tools`, maybe none); null turns tool-call reading
   * off (tool_choice "none"). A reply in one of Llama-3.1's tool-call forms becomes tool_calls.
   */
  functions: ReadonlySet<string> | null;
  /**
   * The template variables the prompt is rendered with (their builtin_tools are offered too), when the route
   * knows them up front; a session's come with its turn's result.
   */
  templateKwargs?: Record<string, unknown>;
  /** Extra top-level fields of every response object (e.g. session_id). */
  extra?: Record<string, unknown>;
}

/** What a chat request asks of sampling beyond generationOf: n choices, logprobs with top_logprobs alternatives. */
export function chatChoicesOf(req: { n?: number | null; logprobs?: boolean | null; top_logprobs?: number | null }): { n: number; logprobs?: number } {
  return { n: req.n ?? 1, ...(req.logprobs === true ? { logprobs: req.top_logprobs ?? 0 } : {}) };
}

/**
 * Answers a chat generation as OpenAI's chat.completion, or as a stream of chat.completion.chunk. A reply
 * that is a tool call (runtime/tool-calls.ts) comes back as `tool_calls` with finish_reason "tool_calls": in
 * a stream, as OpenAI streams one (the call's id, type and name, then its arguments), never as content first.
 * With n > 1 every choice is read the same way; streamed, each chunk's choice carries its index (the
 * samples run one after another, so choice 0's chunks come first). With logprobs, each choice's
 * `logprobs.content` holds its tokens' (streamed: each chunk those of the tokens it adds; tokens whose text
 * is held back, like a tool call's, go with the next chunk that is sent for that choice).
 */
export async function respondChat(kit: RouteKit, c: Context, chat: ChatRun): Promise<Response> {
  const id = newId("chatcmpl");
  const created = nowSeconds();
  const model = kit.engine.info.modelId;
  const n = chat.n ?? 1;
  const pythonTagId = kit.engine.tokenizer.specialTokenId(PYTHON_TAG);
  const offerOf = (kwargs: Record<string, unknown> | undefined): ToolOffer | null => (chat.functions ? { functions: chat.functions, builtin: builtinToolsOf(kwargs) } : null);
  const toolCallOf = (call: ParsedToolCall) => ({ id: newId("call"), type: "function", function: call });
  const choicesOf = (result: GenerateResult & { choices?: GenerateResult[] }) => result.choices ?? [result];

  if (chat.stream) {
    const head = { id, object: "chat.completion.chunk", created, model, ...chat.extra };
    const calls = Array.from({ length: n }, () => new ToolCallStream(offerOf(chat.templateKwargs), pythonTagId));
    const pending: TokenLogprob[][] = Array.from({ length: n }, () => []);
    let logprobsAsked = false;
    const logprobsOf = (index: number) => {
      if (!logprobsAsked) return null;
      const batch = pending[index]!;
      pending[index] = [];
      return kit.tokens.chat(batch);
    };
    const chunk = (index: number, delta: Record<string, unknown>, finish: string | null = null, logprobs: unknown = null) => ({
      ...head,
      choices: [{ index, delta, logprobs, finish_reason: finish }],
    });
    return kit.sse(async (send) => {
      for (let index = 0; index < n; index++) send(chunk(index, { role: "assistant", content: "" }));
      const result = await chat.run(
        (text, logprobs, index = 0) => {
          if (logprobs) {
            logprobsAsked = true;
            pending[index]!.push(...logprobs);
          }
          const content = calls[index]!.text(text);
          if (content) send(chunk(index, { content }, null, logprobsOf(index)));
        },
        (token, index = 0) => calls[index]!.token(token),
      );
      choicesOf(result).forEach((choice, index) => {
        const { toolCall, content } = calls[index]!.finish(choice.finishReason, offerOf(result.templateKwargs ?? chat.templateKwargs));
        if (content) send(chunk(index, { content }, null, logprobsOf(index)));
        if (toolCall) {
          // As OpenAI streams a call: id, type and name with empty arguments, then the arguments.
          const call = toolCallOf(toolCall);
          send(chunk(index, { tool_calls: [{ index: 0, id: call.id, type: call.type, function: { name: toolCall.name, arguments: "" } }] }, null, logprobsOf(index)));
          send(chunk(index, { tool_calls: [{ index: 0, function: { arguments: toolCall.arguments } }] }));
        }
        const rest = pending[index]!.length > 0 ? logprobsOf(index) : null;
        send(chunk(index, {}, toolCall ? "tool_calls" : choice.finishReason, rest));
      });
      if (chat.includeUsage) send({ ...head, choices: [], usage: usage(result), timings: timings(result) });
    }, chat.abort);
  }
  const result = await chat.run();
  const offer = offerOf(result.templateKwargs ?? chat.templateKwargs);
  const choices = choicesOf(result).map((choice, index) => {
    const pythonTag = pythonTagId !== null && choice.tokenIds[0] === pythonTagId;
    const toolCall = offer ? parseToolCall({ text: choice.text, pythonTag, finishReason: choice.finishReason }, offer) : null;
    const message = toolCall ? { role: "assistant", content: null, tool_calls: [toolCallOf(toolCall)] } : { role: "assistant", content: choice.text };
    const logprobs = choice.logprobs ? kit.tokens.chat(choice.logprobs) : null;
    return { index, message, logprobs, finish_reason: toolCall ? "tool_calls" : choice.finishReason };
  });
  return c.json({
    id,
    object: "chat.completion",
    created,
    model,
    ...chat.extra,
    choices,
    usage: usage(result),
    timings: timings(result),
  });
}
