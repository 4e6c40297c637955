/**
 * The generation loop, top to bottom: prefill the prompt (chunked, last-position logits only unless the
 * prompt's logprobs are asked for), then
 * sample / decode one token at a time with the KV cache until an eos id, a stop string, max_tokens or the
 * context end. Text reaches the caller as deltas that never split a UTF-8 character and never show a
 * stop string or the start of one that may still complete.
 */
import type { KvCache } from "./kv-cache.ts";
import type { LlamaModel } from "./llama-model.ts";
import { LogprobRow, type TokenLogprob } from "./logprobs.ts";
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
  /**
   * Report each generated token's logprob (runtime/logprobs.ts) with this many most likely alternatives
   * (0: the token's own only); undefined: none. They reach onDelta with the text they belong to.
   */
  logprobs?: number;
}

/** Text deltas; with GenerateRequest.logprobs, the logprobs of the tokens generated since the last call (maybe with empty text). */
export type DeltaCallback = (text: string, logprobs?: TokenLogprob[]) => void | Promise<void>;

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
  /** With GenerateRequest.logprobs: one per token of tokenIds. */
  logprobs?: TokenLogprob[];
}

/** A prompt read into a cache: the logits that choose the first token, and when it started. */
export interface Prefilled {
  logits: Float32Array;
  cachedTokens: number;
  /** performance.now() when the request started, and the milliseconds the prompt took. */
  started: number;
  prefillMs: number;
  /**
   * With promptLogprobs: one per prompt token, each the token's logprob given the tokens before it
   * (null for the first, which nothing predicts).
   */
  promptLogprobs?: (TokenLogprob | null)[];
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

/** Reads the prompt (what the cache does not hold yet) and generates: prefillPrompt, then decode. */
export async function generate(ctx: GenerateContext, cache: KvCache, req: GenerateRequest, onDelta: DeltaCallback): Promise<GenerateResult> {
  return decode(ctx, cache, req, await prefillPrompt(ctx, cache, req.promptIds, { signal: req.signal }), onDelta);
}

/**
 * Reads the prompt tokens the cache does not hold yet. With promptLogprobs (the cache must hold none of
 * the prompt), every position's logits are computed and each prompt token's logprob is kept, with that
 * many alternatives.
 */
export async function prefillPrompt(
  ctx: GenerateContext,
  cache: KvCache,
  promptIds: ArrayLike<number>,
  options: { signal?: AbortSignal; promptLogprobs?: number } = {},
): Promise<Prefilled> {
  const started = performance.now();
  // The cache may already hold a prefix of the prompt (a session's earlier turns, a reused prefix).
  const cachedTokens = cache.tokensRead; // not cache.length: a compacted cache holds fewer slots than it read
  if (cachedTokens >= promptIds.length) throw new Error("generate needs at least one prompt token beyond the cache");
  let rest: Int32Array;
  if (promptIds instanceof Int32Array) rest = promptIds.subarray(cachedTokens);
  else {
    rest = new Int32Array(promptIds.length - cachedTokens);
    for (let i = 0; i < rest.length; i++) rest[i] = promptIds[cachedTokens + i]!;
  }
  const k = options.promptLogprobs;
  if (k === undefined) {
    const logits = await ctx.model.prefill(cache, rest, ctx.prefillChunk, options.signal);
    return { logits, cachedTokens, started, prefillMs: performance.now() - started };
  }
  if (cachedTokens > 0) throw new Error("prompt logprobs need a cache that holds none of the prompt");
  const vocab = ctx.model.vocabSize;
  const promptLogprobs: (TokenLogprob | null)[] = new Array<TokenLogprob | null>(rest.length).fill(null);
  const logits = await ctx.model.prefill(cache, rest, ctx.prefillChunk, options.signal, undefined, (rows, start, count) => {
    // Row r (position start + r) predicts the token after it; the last row chooses the first generated token.
    for (let r = 0; r < count && start + r + 1 < rest.length; r++) {
      promptLogprobs[start + r + 1] = new LogprobRow(rows.subarray(r * vocab, (r + 1) * vocab), k).of(rest[start + r + 1]!);
    }
  });
  return { logits, cachedTokens, started, prefillMs: performance.now() - started, promptLogprobs };
}

/**
 * Samples and decodes from a read prompt until an eos id, a stop string, maxTokens or the context end.
 * `prefilled.logits` is consumed (sampling changes it in place): pass a copy to decode twice from one prompt.
 */
export async function decode(ctx: GenerateContext, cache: KvCache, req: GenerateRequest, prefilled: Prefilled, onDelta: DeltaCallback): Promise<GenerateResult> {
  const { model, tokenizer } = ctx;
  const t0 = prefilled.started;
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
  const topK = req.logprobs;
  const logprobs: TokenLogprob[] | undefined = topK === undefined ? undefined : [];
  /** Logprobs of the tokens whose text has not gone to onDelta yet. */
  let pending: TokenLogprob[] = [];
  const deliver = async (delta: string) => {
    if (!logprobs) return onDelta(delta);
    const batch = pending;
    pending = [];
    return onDelta(delta, batch);
  };

  const { cachedTokens, prefillMs } = prefilled;
  let logits = prefilled.logits;
  while (tokenIds.length < req.maxTokens) {
    if (req.signal?.aborted) {
      // The client is gone: stop here and report what was done (the caller still counts it).
      finishReason = "cancelled";
      break;
    }
    // Logprobs read the raw row; sampling (which applies logit_bias and penalties in place) gets a copy.
    const row = topK === undefined ? null : new LogprobRow(logits, topK);
    const id = sampleToken(row ? logits.slice() : logits, history, historyLength, req.sampling, random);
    if (tokenIds.length === 0) firstTokenMs = performance.now() - t0;
    if (req.eosIds.has(id)) {
      finishReason = "stop";
      stoppedBy = id;
      break;
    }
    tokenIds.push(id);
    if (row) {
      const entry = row.of(id);
      logprobs!.push(entry);
      pending.push(entry);
    }
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
      await deliver(text.slice(emitted, safeEnd));
      emitted = safeEnd;
    }
    if (tokenIds.length >= req.maxTokens) break;
    await yieldToEventLoop();
    logits = await model.forward(cache, [id]);
  }
  if (finishReason !== "stop") text += decoder.flush();
  if (text.length > emitted || pending.length > 0) await deliver(text.slice(emitted));

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
    ...(logprobs ? { logprobs } : {}),
  };
}
