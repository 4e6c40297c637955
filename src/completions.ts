/**
 * POST /v1/completions: OpenAI's legacy completions, as evaluation harnesses use them
 * (lm-evaluation-harness's `local-completions` scores a text with `echo: true, logprobs: k, max_tokens: 0|1`).
 *
 * - `prompt`: a text (BOS added), token ids, or an array of either; each prompt is its own job in the
 *   queue, run one after another, and its `n` choices are indexes prompt * n .. prompt * n + n - 1.
 * - `n`: independent samples from one prefill (runtime: the prompt's KV copied per sample).
 * - `logprobs: k`: `choices[i].logprobs = {tokens, token_logprobs, top_logprobs, text_offset}` for the
 *   generated tokens; `text_offset` is each token's offset into the choice's `text`.
 * - `echo: true`: the prompt comes back before the completion; with logprobs its tokens are reported
 *   too (the first with null), which needs every prompt position's logits: such a request reads the whole
 *   prompt itself (no KV borrowed from a session) and asks the graph for all positions' logits.
 */
import type { Context } from "hono";
import type { CompletionJob, CompletionResult, GenerateResult, SessionManager, TokenLogprob } from "../runtime/index.ts";
import { tenantOf } from "./auth.ts";
import { RouteKit, clientAbort, newId, nowSeconds, timings, usage } from "./http-kit.ts";
import type { TextOffsets } from "./logprobs.ts";
import { completionSchema } from "./schemas.ts";

/** One prompt of a request, encoded: its ids, the text echo returns, and whether the server put a BOS before it. */
interface Prompt {
  ids: number[];
  echo: string;
  addedBos: boolean;
}

export async function respondCompletion(kit: RouteKit, c: Context, sessions?: SessionManager): Promise<Response> {
  const { engine } = kit;
  const req = await kit.parse(c, completionSchema);
  kit.checkModel(req.model);
  const abort = clientAbort(c);
  engine.checkAdmission();

  const raw = req.prompt;
  const texts: (string | number[])[] = typeof raw === "string" ? [raw] : typeof raw[0] === "number" ? [raw as number[]] : (raw as (string | number[])[]);
  const parseSpecial = req.parse_special ?? false;
  const bos = engine.tokenizer.specials.bosTokenId;
  const bosText = engine.tokenizer.specials.bosToken;
  const echo = req.echo === true;
  const prompts: Prompt[] = [];
  for (const p of texts) {
    if (typeof p === "string") {
      const ids = await engine.encodePrompt(p, parseSpecial, abort.signal);
      const addedBos = ids[0] === bos && !(parseSpecial && bosText !== null && p.startsWith(bosText));
      prompts.push({ ids, echo: p, addedBos });
    } else {
      prompts.push({ ids: p, echo: echo ? await engine.decodeIds(p) : "", addedBos: false });
    }
  }

  const n = req.n ?? 1;
  const k = req.logprobs ?? undefined;
  const scorePrompt = echo && k !== undefined;
  const maxTokens = kit.maxTokensOf(req.max_tokens) ?? 16; /* OpenAI's default here */
  const tenant = tenantOf(c);
  const jobOf = (prompt: Prompt): CompletionJob => {
    const job: CompletionJob = { ...kit.jobOf(req, prompt.ids, maxTokens, abort.signal), n, logprobs: k, promptLogprobs: scorePrompt ? k : undefined };
    // Borrowed KV has no logits for the tokens it covers: a prompt to score is read whole.
    if (sessions && !scorePrompt) job.prepare = () => sessions.prefixCache(tenant, prompt.ids) ?? engine.model.newCache();
    return job;
  };
  const jobs = prompts.map(jobOf);

  /** Per choice: where its text's token offsets stand. */
  const legacy = (prompt: Prompt, ids: readonly number[], entries: readonly (TokenLogprob | null)[], offsets: TextOffsets, promptPart: boolean) =>
    kit.tokens.legacy(ids, entries, offsets, promptPart && prompt.addedBos);
  const promptPart = (prompt: Prompt, promptLogprobs: (TokenLogprob | null)[] | undefined) => {
    const offsets = kit.tokens.offsets(0, false);
    const logprobs = promptLogprobs ? legacy(prompt, prompt.ids, promptLogprobs, offsets, true) : null;
    return { offsets, logprobs };
  };

  const id = newId("cmpl");
  const created = nowSeconds();
  const model = engine.info.modelId;
  const head = { id, object: "text_completion", created, model };

  if (req.stream) {
    return kit.sse(async (send) => {
      const results: CompletionResult[] = [];
      for (let p = 0; p < prompts.length; p++) {
        const prompt = prompts[p]!;
        const job = jobs[p]!;
        const offsets: TextOffsets[] = [];
        for (let j = 0; j < n; j++) offsets.push(kit.tokens.offsets(echo ? prompt.echo.length : 0, true));
        const chunk = (j: number, text: string, logprobs: unknown, finish: string | null = null) => ({ ...head, choices: [{ index: p * n + j, text, logprobs, finish_reason: finish }] });
        if (echo) {
          job.onPrefilled = (promptLogprobs) => {
            for (let j = 0; j < n; j++) send(chunk(j, prompt.echo, promptPart(prompt, promptLogprobs).logprobs));
          };
        }
        const result = await engine.complete(job, (text, logprobs, j = 0) => {
          const lp = logprobs ? legacy(prompt, logprobs.map((e) => e.id), logprobs, offsets[j]!, false) : null;
          if (text || lp) send(chunk(j, text, lp));
        });
        results.push(result);
        result.choices.forEach((choice, j) => send(chunk(j, "", null, choice.finishReason)));
        if (result.finishReason === "cancelled") break;
      }
      if (req.stream_options?.include_usage === true) {
        const total = combined(results);
        send({ ...head, choices: [], usage: usage(total), timings: timings(total) });
      }
    }, abort);
  }

  const results: CompletionResult[] = [];
  const choices: unknown[] = [];
  for (let p = 0; p < prompts.length; p++) {
    const prompt = prompts[p]!;
    const result = await engine.complete(jobs[p]!);
    results.push(result);
    result.choices.forEach((choice, j) => {
      let logprobs: ReturnType<typeof kit.tokens.legacy> | null = null;
      if (k !== undefined) {
        const start = promptPart(prompt, result.promptLogprobs);
        const generated = legacy(prompt, choice.tokenIds, choice.logprobs ?? [], kit.tokens.offsets(echo ? prompt.echo.length : 0, true), false);
        logprobs = start.logprobs
          ? {
              tokens: [...start.logprobs.tokens, ...generated.tokens],
              token_logprobs: [...start.logprobs.token_logprobs, ...generated.token_logprobs],
              top_logprobs: [...start.logprobs.top_logprobs, ...generated.top_logprobs],
              text_offset: [...start.logprobs.text_offset, ...generated.text_offset],
            }
          : generated;
      }
      choices.push({ index: p * n + j, text: (echo ? prompt.echo : "") + choice.text, logprobs, finish_reason: choice.finishReason });
    });
  }
  const total = combined(results);
  return c.json({ ...head, choices, usage: usage(total), timings: timings(total) });
}

/** The usage and timings of several prompts' results together (each prompt counted once, every choice's tokens). */
function combined(results: readonly CompletionResult[]): GenerateResult {
  const sum = (f: (r: GenerateResult) => number) => results.reduce((n, r) => n + f(r), 0);
  return {
    ...results[0]!,
    promptTokens: sum((r) => r.promptTokens),
    cachedTokens: sum((r) => r.cachedTokens),
    completionTokens: sum((r) => r.completionTokens),
    prefillMs: sum((r) => r.prefillMs),
    decodeMs: sum((r) => r.decodeMs),
  };
}
