/**
 * logprobs, top_logprobs, echo and n (issue 14, item 3) on the real model through the HTTP app: the values
 * equal a log-softmax computed here from the model's own logits (run directly), top_logprobs are sorted and
 * agree with the logprobs, streaming and not give the same values, echo scores the prompt (its first token
 * null), n > 1 gives n choices from one prefill with usage counting the prompt once, and the `openai` npm
 * client reads all of it over a socket.
 */
import { afterAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import type { ForwardOptions } from "../runtime/llama-model.ts";
import { createApp } from "../src/app.ts";
import { TokenStrings } from "../src/logprobs.ts";
import { argmax } from "../runtime/sampling.ts";
import { sharedEngine } from "./helpers/model.ts";
import { sessionApp } from "./helpers/sessions.ts";
import { readSse, sseJson } from "./helpers/sse.ts";

const engine = await sharedEngine();
const app = createApp({ engine, maxBodyBytes: 1024 * 1024, log: () => {} });
const MODEL = engine.info.modelId;
const vocab = engine.model.vocabSize;
/** Token strings as the server writes them (text, or "bytes:\xNN..." for a piece of a character). */
const strings = new TokenStrings(engine.tokenizer);
const str = (id: number) => strings.text(id);

const post = (path: string, body: unknown) =>
  app.request(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
const json = async (path: string, body: unknown) => {
  const res = await post(path, body);
  const text = await res.text();
  if (res.status !== 200) throw new Error(`${res.status}: ${text}`);
  return JSON.parse(text) as any;
};

const messages = [{ role: "user", content: "Tell me about the ocean." }];

/** log-softmax of one logits row, in float64. */
function logSoftmax(row: Float32Array): Float64Array {
  let max = -Infinity;
  for (const v of row) max = Math.max(max, v);
  let sum = 0;
  for (const v of row) sum += Math.exp(v - max);
  const lse = max + Math.log(sum);
  return Float64Array.from(row, (v) => v - lse);
}

/** The k best ids of a row of logprobs, best first. */
function best(row: Float64Array, k: number): number[] {
  return Array.from(row.keys())
    .sort((a, b) => row[b]! - row[a]! || a - b)
    .slice(0, k);
}

/**
 * Every step's log-softmax for `prompt` followed by `generated` (default: the greedy choice of each step,
 * `steps` of them), from the model run directly on a fresh cache.
 */
async function referenceSteps(prompt: number[], steps: number, generated?: number[]): Promise<{ rows: Float64Array[]; ids: number[] }> {
  const model = engine.model;
  const cache = model.newCache();
  let logits = await model.prefill(cache, prompt, 512);
  const rows: Float64Array[] = [];
  const ids: number[] = [];
  for (let i = 0; i < steps; i++) {
    rows.push(logSoftmax(logits));
    const id = generated ? generated[i]! : argmax(logits);
    ids.push(id);
    if (i < steps - 1) logits = await model.forward(cache, [id]);
  }
  return { rows, ids };
}

const tokenId = (text: string) => {
  const ids = engine.tokenizer.encode(text);
  expect(ids).toHaveLength(1);
  return ids[0]!;
};

describe("chat completions: logprobs and top_logprobs", () => {
  const promptIds = engine.encodeChat(messages, { tools: null, addGenerationPrompt: true });

  test("values are the log-softmax of the model's own logits; top_logprobs sorted, the chosen token among them", async () => {
    const body = await json("/v1/chat/completions", { model: MODEL, messages, max_tokens: 6, temperature: 0, logprobs: true, top_logprobs: 5 });
    const choice = body.choices[0];
    const content = choice.logprobs.content as any[];
    expect(content.length).toBeGreaterThan(0);
    expect(content).toHaveLength(body.usage.completion_tokens);
    // The tokens' bytes, joined, are the reply's text.
    expect(new TextDecoder().decode(Uint8Array.from(content.flatMap((e) => e.bytes)))).toBe(choice.message.content);
    const { rows, ids } = await referenceSteps(await promptIds, content.length);
    content.forEach((entry, i) => {
      const row = rows[i]!;
      expect(entry.token).toBe(str(ids[i]!));
      expect(entry.logprob).toBeCloseTo(row[ids[i]!]!, 4);
      expect(entry.bytes).toEqual(Array.from(engine.tokenizer.tokenBytes(ids[i]!)));
      const top = entry.top_logprobs as any[];
      const five = best(row, 5);
      expect(top).toHaveLength(5);
      expect(top.map((t) => t.token)).toEqual(five.map(str));
      top.forEach((t, j) => {
        expect(t.logprob).toBeCloseTo(row[five[j]!]!, 4);
        if (j > 0) expect(t.logprob).toBeLessThanOrEqual(top[j - 1].logprob);
      });
      // Greedy: the chosen token is the first alternative, with the same logprob.
      expect(top[0].token).toBe(entry.token);
      expect(top[0].logprob).toBe(entry.logprob);
      expect(entry.logprob).toBeLessThan(0);
    });
  });

  test("logprobs are of the raw logits: logit_bias and temperature change the choice, not the values", async () => {
    const hello = tokenId("Hello");
    const body = await json("/v1/chat/completions", {
      model: MODEL,
      messages,
      max_tokens: 3,
      temperature: 0.7,
      seed: 5,
      logit_bias: { [hello]: 100 },
      logprobs: true,
    });
    const content = body.choices[0].logprobs.content as any[];
    expect(body.choices[0].message.content).toBe("Hello".repeat(3));
    const { rows } = await referenceSteps(await promptIds, 3, [hello, hello, hello]);
    content.forEach((entry, i) => {
      expect(entry.token).toBe("Hello");
      expect(entry.logprob).toBeCloseTo(rows[i]![hello]!, 4); // far below 0: the bias is not in it
      expect(entry.top_logprobs).toEqual([]); // top_logprobs defaults to 0
    });
    expect(content[0].logprob).toBeLessThan(-5);
  });

  test("streaming carries the same logprobs, chunk by chunk, as the non-streaming answer", async () => {
    const request = { model: MODEL, messages, max_tokens: 8, temperature: 0, logprobs: true, top_logprobs: 3 };
    const plain = await json("/v1/chat/completions", request);
    const events = sseJson(await readSse(await post("/v1/chat/completions", { ...request, stream: true })));
    const streamed: any[] = [];
    let text = "";
    for (const e of events) {
      const choice = e.choices[0];
      if (!choice) continue;
      text += choice.delta.content ?? "";
      if (choice.logprobs) {
        streamed.push(...choice.logprobs.content);
        // A chunk's logprobs are those of the text it adds.
        if (choice.delta.content) expect(new TextDecoder().decode(Uint8Array.from(choice.logprobs.content.flatMap((x: any) => x.bytes)))).toBe(choice.delta.content);
      }
    }
    expect(text).toBe(plain.choices[0].message.content);
    expect(streamed).toEqual(plain.choices[0].logprobs.content);
  });

  test("without logprobs the answer has logprobs: null", async () => {
    const body = await json("/v1/chat/completions", { model: MODEL, messages, max_tokens: 2, temperature: 0 });
    expect(body.choices[0].logprobs).toBeNull();
  });
});

describe("completions: logprobs and echo (the legacy shape)", () => {
  const prompt = "The quick brown fox jumps over the lazy dog.";

  test("echo + logprobs scores the prompt: tokens, token_logprobs (first null), top_logprobs, text_offset", async () => {
    const body = await json("/v1/completions", { model: MODEL, prompt, max_tokens: 1, temperature: 0, logprobs: 2, echo: true });
    const choice = body.choices[0];
    const lp = choice.logprobs;
    const promptIds = await engine.encodePrompt(prompt);
    expect(lp.tokens).toHaveLength(promptIds.length + 1);
    expect(lp.tokens.slice(0, promptIds.length)).toEqual(promptIds.map(str));
    expect(lp.tokens[0]).toBe("<|begin_of_text|>");
    expect(lp.token_logprobs[0]).toBeNull();
    expect(lp.top_logprobs[0]).toBeNull();
    expect(choice.text.startsWith(prompt)).toBe(true);
    expect(body.usage.prompt_tokens).toBe(promptIds.length);
    expect(body.usage.completion_tokens).toBe(1);

    // Every prompt position's logits, from the model run directly.
    const all = await engine.model.forward(engine.model.newCache(), promptIds, { allLogits: true });
    for (let i = 1; i < promptIds.length; i++) {
      const row = logSoftmax(all.subarray((i - 1) * vocab, i * vocab));
      expect(lp.token_logprobs[i]).toBeCloseTo(row[promptIds[i]!]!, 4);
      const top = lp.top_logprobs[i] as Record<string, number>;
      const two = best(row, 2);
      for (const id of two) expect(top[str(id)]).toBeCloseTo(row[id]!, 4);
      // The token itself is always there (k + 1 entries at most), and no entry beats the best.
      expect(top[lp.tokens[i]]).toBe(lp.token_logprobs[i]);
      expect(Object.keys(top).length).toBeLessThanOrEqual(3);
      expect(Math.max(...Object.values(top))).toBeCloseTo(row[two[0]!]!, 4);
    }
    // The generated token: the greedy choice after the whole prompt.
    const last = logSoftmax(all.subarray((promptIds.length - 1) * vocab));
    expect(lp.token_logprobs[promptIds.length]).toBeCloseTo(last[best(last, 1)[0]!]!, 4);
    // text_offset: where each token's text starts in choice.text (the BOS the server added is no text).
    expect(lp.text_offset[0]).toBe(0);
    for (let i = 1; i < promptIds.length; i++) {
      expect(choice.text.slice(lp.text_offset[i], lp.text_offset[i] + lp.tokens[i].length)).toBe(lp.tokens[i]);
    }
    expect(lp.text_offset[promptIds.length]).toBe(prompt.length);
  });

  test("max_tokens 0 returns the prompt only, with its logprobs", async () => {
    const body = await json("/v1/completions", { model: MODEL, prompt: [prompt], max_tokens: 0, temperature: 0, logprobs: 1, echo: true });
    const lp = body.choices[0].logprobs;
    expect(body.choices[0].text).toBe(prompt);
    expect(body.choices[0].finish_reason).toBe("length");
    expect(body.usage.completion_tokens).toBe(0);
    expect(lp.tokens).toHaveLength((await engine.encodePrompt(prompt)).length);
  });

  test("lm-evaluation-harness's loglikelihood request, as local-completions sends and parses it", async () => {
    // tokenized_requests=True, add_bos_token=True: the context's and continuation's ids, BOS first, as one prompt of a batch.
    const context = "The quick brown fox";
    const contextIds = await engine.encodePrompt(context);
    const ids = await engine.encodePrompt(prompt);
    expect(ids.slice(0, contextIds.length)).toEqual(contextIds);
    const payload = { model: MODEL, prompt: [ids], temperature: 0, max_tokens: 1, logprobs: 1, seed: 1234, echo: true };
    const out = await json("/v1/completions", payload);
    // parse_logprobs: choices sorted by index, token_logprobs[ctxlen:-1] summed, greedy if each equals its top's max.
    const choice = [...out.choices].sort((a: any, b: any) => a.index - b.index)[0];
    const ctxlen = contextIds.length;
    const continuation = choice.logprobs.token_logprobs.slice(ctxlen, -1) as number[];
    const tops = choice.logprobs.top_logprobs.slice(ctxlen, -1) as Record<string, number>[];
    expect(continuation).toHaveLength(ids.length - ctxlen);
    const all = await engine.model.forward(engine.model.newCache(), ids, { allLogits: true });
    let expected = 0;
    let greedy = true;
    for (let i = ctxlen; i < ids.length; i++) {
      const row = logSoftmax(all.subarray((i - 1) * vocab, i * vocab));
      expected += row[ids[i]!]!;
      if (best(row, 1)[0] !== ids[i]) greedy = false;
    }
    expect(continuation.reduce((a, b) => a + b, 0)).toBeCloseTo(expected, 3);
    expect(continuation.every((v, i) => v === Math.max(...Object.values(tops[i]!)))).toBe(greedy);
  });

  test("logprobs without echo: the generated tokens only, offsets into the text", async () => {
    const body = await json("/v1/completions", { model: MODEL, prompt, max_tokens: 5, temperature: 0, logprobs: 3 });
    const { text, logprobs: lp } = body.choices[0];
    expect(lp.tokens).toHaveLength(body.usage.completion_tokens);
    expect(lp.tokens.length).toBeGreaterThan(0);
    if (!lp.tokens.some((t: string) => t.startsWith("bytes:"))) expect(lp.tokens.join("")).toBe(text);
    expect(lp.text_offset[0]).toBe(0);
    lp.text_offset.forEach((offset: number, i: number) => i > 0 && expect(offset).toBeGreaterThanOrEqual(lp.text_offset[i - 1]));
    lp.token_logprobs.forEach((v: number) => expect(v).toBeLessThan(0));
    lp.top_logprobs.forEach((top: Record<string, number>) => expect(Object.keys(top).length).toBeLessThanOrEqual(4));
  });

  test("streaming echo + logprobs gives the same tokens and values", async () => {
    const request = { model: MODEL, prompt, max_tokens: 4, temperature: 0, logprobs: 2, echo: true };
    const plain = (await json("/v1/completions", request)).choices[0];
    const events = sseJson(await readSse(await post("/v1/completions", { ...request, stream: true })));
    const merged = { tokens: [] as string[], token_logprobs: [] as (number | null)[], top_logprobs: [] as unknown[], text_offset: [] as number[] };
    let text = "";
    for (const e of events) {
      const choice = e.choices[0];
      if (!choice) continue;
      text += choice.text;
      if (choice.logprobs) for (const key of Object.keys(merged) as (keyof typeof merged)[]) (merged[key] as unknown[]).push(...choice.logprobs[key]);
    }
    expect(text).toBe(plain.text);
    expect(merged).toEqual(plain.logprobs);
  });

  test("only echo with logprobs asks the graph for every position's logits", async () => {
    const model = engine.model;
    const seen: boolean[] = [];
    const forward = model.forward.bind(model);
    model.forward = (cache, ids, options: ForwardOptions = {}) => {
      seen.push(options.allLogits === true);
      return forward(cache, ids, options);
    };
    try {
      await json("/v1/completions", { model: MODEL, prompt, max_tokens: 2, temperature: 0, logprobs: 2 });
      await json("/v1/completions", { model: MODEL, prompt, max_tokens: 2, temperature: 0, echo: true });
      await json("/v1/chat/completions", { model: MODEL, messages, max_tokens: 2, temperature: 0, logprobs: true });
      expect(seen.length).toBeGreaterThan(0);
      expect(seen).not.toContain(true);
      seen.length = 0;
      await json("/v1/completions", { model: MODEL, prompt, max_tokens: 0, temperature: 0, logprobs: 0, echo: true });
      expect(seen).toEqual([true]); // one prefill run of the 11-token prompt, every position's logits
    } finally {
      model.forward = forward;
    }
  });
});

describe("n > 1: independent samples from one prefill", () => {
  test("chat: n choices with their indexes, usage counts the prompt once and every choice's tokens", async () => {
    const request = { model: MODEL, messages, max_tokens: 6, temperature: 1, seed: 42, logprobs: true };
    const body = await json("/v1/chat/completions", { ...request, n: 3 });
    expect(body.choices.map((c: any) => c.index)).toEqual([0, 1, 2]);
    const promptTokens = (await engine.encodeChat(messages, { tools: null, addGenerationPrompt: true })).length;
    expect(body.usage.prompt_tokens).toBe(promptTokens);
    const counts = body.choices.map((c: any) => c.logprobs.content.length);
    expect(body.usage.completion_tokens).toBe(counts.reduce((a: number, b: number) => a + b, 0));
    expect(body.usage.total_tokens).toBe(promptTokens + body.usage.completion_tokens);
    // Sample i draws with seed + i: each choice is the n=1 answer of its seed.
    for (let i = 0; i < 3; i++) {
      const single = await json("/v1/chat/completions", { ...request, seed: 42 + i });
      expect(body.choices[i].message.content).toBe(single.choices[0].message.content);
      const mine = body.choices[i].logprobs.content as any[];
      const theirs = single.choices[0].logprobs.content as any[];
      expect(mine.map((e) => e.token)).toEqual(theirs.map((e) => e.token));
      mine.forEach((e, j) => expect(e.logprob).toBeCloseTo(theirs[j].logprob, 4));
    }
    expect(new Set(body.choices.map((c: any) => c.message.content)).size).toBeGreaterThan(1);
  });

  test("chat: temperature 0 gives n equal choices; streaming gives each choice's text under its index", async () => {
    const request = { model: MODEL, messages, max_tokens: 5, temperature: 0, n: 2 };
    const body = await json("/v1/chat/completions", request);
    expect(body.choices).toHaveLength(2);
    expect(body.choices[1].message.content).toBe(body.choices[0].message.content);
    const events = sseJson(await readSse(await post("/v1/chat/completions", { ...request, stream: true, stream_options: { include_usage: true } })));
    const texts = ["", ""];
    const finishes: (string | null)[] = [null, null];
    let usage: any = null;
    for (const e of events) {
      for (const choice of e.choices) {
        texts[choice.index] += choice.delta.content ?? "";
        finishes[choice.index] = choice.finish_reason ?? finishes[choice.index]!;
      }
      usage = e.usage ?? usage;
    }
    expect(texts).toEqual(body.choices.map((c: any) => c.message.content));
    expect(finishes).toEqual(body.choices.map((c: any) => c.finish_reason));
    expect(usage.completion_tokens).toBe(body.usage.completion_tokens);
    expect(usage.prompt_tokens).toBe(body.usage.prompt_tokens);
  });

  test("completions: prompts times n choices, indexed prompt by prompt", async () => {
    const body = await json("/v1/completions", { model: MODEL, prompt: ["Once upon a time", "The sea"], max_tokens: 3, n: 2, temperature: 0, logprobs: 1 });
    expect(body.choices.map((c: any) => c.index)).toEqual([0, 1, 2, 3]);
    expect(body.choices[1].text).toBe(body.choices[0].text);
    expect(body.choices[3].text).toBe(body.choices[2].text);
    const promptTokens = (await engine.encodePrompt("Once upon a time")).length + (await engine.encodePrompt("The sea")).length;
    expect(body.usage.prompt_tokens).toBe(promptTokens);
    expect(body.usage.completion_tokens).toBe(body.choices.reduce((n: number, c: any) => n + c.logprobs.tokens.length, 0));
  });
});

describe("validation", () => {
  const refused = async (path: string, body: unknown, param: string, message: string) => {
    const res = await post(path, body);
    expect(res.status).toBe(400);
    const { error } = (await res.json()) as any;
    expect(error.type).toBe("invalid_request_error");
    expect(error.param).toBe(param);
    expect(error.message).toStartWith(message);
  };
  test("n, top_logprobs and logprobs out of range, top_logprobs without logprobs", async () => {
    await refused("/v1/chat/completions", { messages, n: 17 }, "n", "n: at most 16");
    await refused("/v1/chat/completions", { messages, n: 0 }, "n", "n: at least 1");
    await refused("/v1/chat/completions", { messages, logprobs: true, top_logprobs: 21 }, "top_logprobs", "top_logprobs: at most 20");
    await refused("/v1/chat/completions", { messages, top_logprobs: 2 }, "top_logprobs", "top_logprobs: only with logprobs: true");
    await refused("/v1/chat/completions", { messages, logprobs: 3 }, "logprobs", "logprobs: expected a boolean");
    await refused("/v1/completions", { prompt: "x", logprobs: 21 }, "logprobs", "logprobs: at most 20");
    await refused("/v1/completions", { prompt: "x", n: 17 }, "n", "n: at most 16");
    await refused("/v1/completions", { prompt: "x", max_tokens: -1 }, "max_tokens", "max_tokens: at least 0");
    await refused("/v1/completions", { prompt: Array.from({ length: 65 }, () => "x") }, "prompt", "prompt: at most 64 prompts");
    await refused("/v1/completions", { prompt: ["x", 5] }, "prompt", "prompt: one form per request");
    await refused("/v1/completions", { prompt: [] }, "prompt", "prompt: at least 1");
  });
});

describe("the openai npm client", () => {
  const server = Bun.serve({ fetch: app.fetch, hostname: "127.0.0.1", port: 0, idleTimeout: 0 });
  const client = new OpenAI({ baseURL: `http://127.0.0.1:${server.port}/v1`, apiKey: "unused", maxRetries: 0 });
  afterAll(() => server.stop(true));

  test("chat.completions.create({ logprobs: true, top_logprobs: 3 }) and its stream", async () => {
    const request = { model: MODEL, messages: [{ role: "user" as const, content: "Name a colour." }], max_tokens: 5, temperature: 0, logprobs: true, top_logprobs: 3 };
    const completion = await client.chat.completions.create(request);
    const content = completion.choices[0]!.logprobs!.content!;
    expect(content.length).toBe(completion.usage!.completion_tokens);
    for (const entry of content) {
      expect(entry.top_logprobs).toHaveLength(3);
      expect(entry.top_logprobs[0]!.token).toBe(entry.token);
      expect(entry.top_logprobs[0]!.logprob).toBe(entry.logprob);
      expect(entry.bytes!.length).toBeGreaterThan(0);
    }
    const stream = await client.chat.completions.create({ ...request, stream: true });
    const streamed: OpenAI.ChatCompletionTokenLogprob[] = [];
    for await (const chunk of stream) streamed.push(...(chunk.choices[0]?.logprobs?.content ?? []));
    expect(streamed).toEqual(content);
  });

  test("completions.create({ echo: true, logprobs: 2 })", async () => {
    const prompt = "Once upon a time";
    const completion = await client.completions.create({ model: MODEL, prompt, max_tokens: 1, temperature: 0, echo: true, logprobs: 2 });
    const lp = completion.choices[0]!.logprobs!;
    const promptIds = await engine.encodePrompt(prompt);
    expect(lp.tokens).toHaveLength(promptIds.length + 1);
    expect(lp.token_logprobs![0]).toBeNull();
    expect(lp.token_logprobs!.slice(1).every((v) => typeof v === "number" && v < 0)).toBe(true);
    expect(lp.top_logprobs![1]![lp.tokens![1]!]).toBe(lp.token_logprobs![1]!);
    expect(completion.choices[0]!.text.startsWith(prompt)).toBe(true);
  });
});

describe("with sessions and with KV compaction", () => {
  test("a session turn reports logprobs; n > 1 with session_id is refused", async () => {
    const { post: sessionPost } = sessionApp(engine);
    expect((await sessionPost("/v1/sessions", { id: "lp", system: "You keep the harbour log." })).status).toBe(201);
    const turn = { session_id: "lp", session_history: "append", messages, max_tokens: 4, temperature: 0 };
    const res = await sessionPost("/v1/chat/completions", { ...turn, logprobs: true, top_logprobs: 2 });
    expect(res.status).toBe(200);
    const body = (await res.json()) as any;
    expect(body.choices[0].logprobs.content).toHaveLength(body.usage.completion_tokens);
    body.choices[0].logprobs.content.forEach((e: any) => expect(e.top_logprobs).toHaveLength(2));
    const refusedN = await sessionPost("/v1/chat/completions", { ...turn, n: 2 });
    expect(refusedN.status).toBe(400);
    expect(((await refusedN.json()) as any).error.param).toBe("n");
  });

  test("n > 1 on a compacted cache with a recall tier: each sample on its own copy", async () => {
    const compacted = await sharedEngine({ compaction: { policy: "attention", budget: 128 } });
    const compactedApp = createApp({ engine: compacted, maxBodyBytes: 1024 * 1024, log: () => {} });
    const long = [{ role: "user", content: "The harbour log, day by day. ".repeat(40) + "What happened?" }];
    const request = { messages: long, max_tokens: 6, temperature: 0, n: 3, logprobs: true };
    const res = await compactedApp.request("/v1/chat/completions", { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(request) });
    expect(res.status).toBe(200);
    const body = (await res.json()) as any;
    expect(body.choices).toHaveLength(3);
    expect(body.choices[1].message.content).toBe(body.choices[0].message.content);
    expect(body.choices[2].logprobs).toEqual(body.choices[0].logprobs);
    expect(body.usage.prompt_tokens).toBeGreaterThan(128);
  });
});
