/**
 * The generation loop, top to bottom: prefill the prompt (chunked, last-position logits only), then
 * sample / decode one token at a time with the KV cache until an eos id, a stop string, max_tokens or the
 * context end. Text reaches the caller as deltas that never split a UTF-8 character and never show a
 * stop string or the start of one that may still complete.
 */
import type { KvCache } from "./kv-cache.ts";
import type { LlamaModel } from "./llama-model.ts";
import { createRng, sampleToken, type SamplingParams } from "./sampling.ts";
import type { TextTokenizer } from "./tokenizer.ts";
import { yieldToEventLoop } from "./yield.ts";

/** "cancelled": the request's signal aborted (the client went away) before generation ended. */
export type FinishReason = "stop" | "length" | "cancelled";

export interface GenerateRequest {
  /** The whole prompt; the cache passed to generate() holds KV for a prefix of it (maybe none). */
  promptIds: number[];
  maxTokens: number;
  sampling: SamplingParams;
  stop: string[];
  /** Token ids that end generation (every eos id of the model, plus any the caller adds). */
  eosIds: ReadonlySet<number>;
  signal?: AbortSignal;
  /**
   * Each generated token id (eos ids excepted), before its text reaches onDelta: a special token such as
   * <|python_tag|> has no text, and a caller that reads tool calls needs to know it came.
   */
  onToken?: (id: number) => void;
}

export interface GenerateResult {
  text: string;
  tokenIds: number[];
  finishReason: FinishReason;
  /** Which stop string or eos id ended generation, for clients that ask (llama.cpp's stopping_word). */
  stoppedBy: string | number | null;
  promptTokens: number;
  /** Prompt tokens whose KV was already in the cache (not prefilled again). */
  cachedTokens: number;
  completionTokens: number;
  /** Milliseconds from the start: prompt read (its last logits out), first token chosen; then the decode phase. */
  prefillMs: number;
  firstTokenMs: number;
  decodeMs: number;
}

export interface GenerateContext {
  model: LlamaModel;
  tokenizer: TextTokenizer;
  prefillChunk: number;
}

/** Length of the longest suffix of `text` that is a proper prefix of some stop string. */
function pendingStopPrefix(text: string, stops: string[]): number {
  let longest = 0;
  for (const stop of stops) {
    for (let n = Math.min(stop.length - 1, text.length); n > longest; n--) {
      if (text.endsWith(stop.slice(0, n))) {
        longest = n;
        break;
      }
    }
  }
  return longest;
}

export async function generate(
  ctx: GenerateContext,
  cache: KvCache,
  req: GenerateRequest,
  onDelta: (text: string) => void | Promise<void>,
): Promise<GenerateResult> {
  const { model, tokenizer } = ctx;
  const t0 = performance.now();
  const random = createRng(req.sampling.seed);
  const stops = req.stop.filter((s) => s.length > 0);
  const decoder = tokenizer.streamDecoder(true);
  const history = new Int32Array(req.promptIds.length + req.maxTokens);
  history.set(req.promptIds);
  let historyLength = req.promptIds.length;

  const tokenIds: number[] = [];
  let text = "";
  let emitted = 0;
  let finishReason: FinishReason = "length";
  let stoppedBy: string | number | null = null;
  let firstTokenMs = 0;

  // The cache may already hold a prefix of the prompt (a session's earlier turns, a reused prefix).
  const cachedTokens = cache.tokensRead; // not cache.length: a compacted cache holds fewer slots than it read
  if (cachedTokens >= req.promptIds.length) throw new Error("generate needs at least one prompt token beyond the cache");
  // The prompt's tokens from the history (a view: a million-token prompt is not copied again).
  let logits = await model.prefill(cache, history.subarray(cachedTokens, req.promptIds.length), ctx.prefillChunk, req.signal);
  const prefillMs = performance.now() - t0;
  while (tokenIds.length < req.maxTokens) {
    if (req.signal?.aborted) {
      // The client is gone: stop here and report what was done (the caller still counts it).
      finishReason = "cancelled";
      break;
    }
    const id = sampleToken(logits, history, historyLength, req.sampling, random);
    if (tokenIds.length === 0) firstTokenMs = performance.now() - t0;
    if (req.eosIds.has(id)) {
      finishReason = "stop";
      stoppedBy = id;
      break;
    }
    tokenIds.push(id);
    history[historyLength++] = id;
    req.onToken?.(id);
    text += decoder.push(id);

    let stopAt = -1;
    if (stops.length) {
      // Text that could begin a stop string is never emitted, so a stop can only start at or after `emitted`.
      for (const stop of stops) {
        const at = text.indexOf(stop, emitted);
        if (at !== -1 && (stopAt === -1 || at < stopAt)) {
          stopAt = at;
          stoppedBy = stop;
        }
      }
    }
    if (stopAt !== -1) {
      text = text.slice(0, stopAt);
      finishReason = "stop";
      break;
    }
    const safeEnd = text.length - pendingStopPrefix(text, stops);
    if (safeEnd > emitted) {
      await onDelta(text.slice(emitted, safeEnd));
      emitted = safeEnd;
    }
    if (tokenIds.length >= req.maxTokens) break;
    await yieldToEventLoop();
    logits = await model.forward(cache, [id]);
  }
  if (finishReason !== "stop") text += decoder.flush();
  if (text.length > emitted) await onDelta(text.slice(emitted));

  return {
    text,
    tokenIds,
    finishReason,
    stoppedBy,
    promptTokens: req.promptIds.length,
    cachedTokens,
    completionTokens: tokenIds.length,
    prefillMs,
    firstTokenMs: firstTokenMs || performance.now() - t0,
    decodeMs: performance.now() - t0 - prefillMs,
  };
}
