/**
 * The decode loop on the real built-in model through onnxruntime-web (WASM): the KV cache gives the same
 * tokens and logits as recomputing everything, sampling is reproducible by seed, and generation ends on
 * every eos id, on stop strings and on max_tokens.
 */
import { describe, expect, test } from "bun:test";
import { argmax } from "../runtime/sampling.ts";
import { sharedEngine } from "./helpers/model.ts";

const engine = await sharedEngine();
const prompt = await engine.encodeChat([{ role: "user", content: "Write a short poem about the sea and the wind." }], {
  extra: { date_string: "26 Jul 2024" },
});

describe("generation", () => {
  test("cached decode equals full recomputation: same greedy tokens for 32 steps, logits within 1e-4", async () => {
    const model = engine.model;
    const cache = model.newCache();
    let cachedLogits = await model.prefill(cache, prompt, 7); // odd chunk size: chunked prefill is exercised too
    const sequence = [...prompt];
    let maxDiff = 0;
    const distinct = new Set<number>();
    for (let step = 0; step < 32; step++) {
      const full = await model.forward(model.newCache(), sequence);
      for (let i = 0; i < full.length; i++) maxDiff = Math.max(maxDiff, Math.abs(full[i]! - cachedLogits[i]!));
      const next = argmax(cachedLogits);
      expect(argmax(full)).toBe(next);
      distinct.add(next);
      sequence.push(next);
      cachedLogits = await model.forward(cache, [next]);
    }
    expect(maxDiff).toBeLessThan(1e-4);
    expect(cache.length).toBe(prompt.length + 32);
    expect(Array.from(cache.positions.subarray(0, cache.length))).toEqual(sequence.map((_, i) => i).slice(0, cache.length));
    // Untied random weights do not collapse onto one token, so the comparison means something.
    expect(distinct.size).toBeGreaterThan(8);
  });

  test("all-position logits agree with last-position logits", async () => {
    const model = engine.model;
    const last = await model.forward(model.newCache(), prompt.slice(0, 12));
    const all = await model.forward(model.newCache(), prompt.slice(0, 12), { allLogits: true });
    expect(all.length).toBe(12 * model.vocabSize);
    const row = all.subarray(11 * model.vocabSize);
    let diff = 0;
    for (let i = 0; i < row.length; i++) diff = Math.max(diff, Math.abs(row[i]! - last[i]!));
    expect(diff).toBeLessThan(1e-5);
  });

  test("the same seed and request give the same output; another seed differs", async () => {
    const run = (seed: number) => engine.complete({ promptIds: prompt, maxTokens: 24, sampling: { temperature: 1, topP: 0.95, seed }, stop: [] });
    const a = await run(1234);
    const b = await run(1234);
    const c = await run(999);
    expect(a.tokenIds.length).toBeGreaterThan(0);
    expect(b.tokenIds).toEqual(a.tokenIds);
    expect(b.text).toBe(a.text);
    expect(c.tokenIds).not.toEqual(a.tokenIds);
  });

  test("every eos id of generation_config.json ends generation", async () => {
    const eos = engine.model.folder.generation.eosTokenIds;
    expect([...eos].sort()).toEqual([128001, 128008, 128009]);
    for (const id of eos) {
      // logit_bias makes the model choose this eos id at once.
      const r = await engine.complete({ promptIds: prompt, maxTokens: 10, sampling: { temperature: 0, logitBias: new Map([[id, 100]]) }, stop: [] });
      expect(r.finishReason).toBe("stop");
      expect(r.stoppedBy).toBe(id);
      expect(r.completionTokens).toBe(0);
      expect(r.text).toBe("");
    }
    // The same bias on an ordinary token runs to max_tokens, and ignore_eos generates past an eos id.
    const plain = await engine.complete({ promptIds: prompt, maxTokens: 5, sampling: { temperature: 0, logitBias: new Map([[9906, 100]]) }, stop: [] });
    expect(plain.finishReason).toBe("length");
    expect(plain.text).toBe("Hello".repeat(5));
    const ignored = await engine.complete({ promptIds: prompt, maxTokens: 3, sampling: { temperature: 0, logitBias: new Map([[128009, 100]]) }, stop: [], ignoreEos: true });
    expect(ignored.tokenIds).toEqual([128009, 128009, 128009]);
    expect(ignored.finishReason).toBe("length");
  });

  test("a stop string ends generation; the text stops before it and it never streams", async () => {
    const free = await engine.complete({ promptIds: prompt, maxTokens: 40, sampling: { temperature: 0 }, stop: [] });
    expect(free.finishReason).toBe("length");
    const stop = free.text.slice(30, 36);
    expect(stop.length).toBe(6);
    const deltas: string[] = [];
    const r = await engine.complete({ promptIds: prompt, maxTokens: 40, sampling: { temperature: 0 }, stop: ["never-appears", stop] }, (d) => {
      deltas.push(d);
    });
    expect(r.finishReason).toBe("stop");
    expect(r.stoppedBy).toBe(stop);
    expect(r.text).toBe(free.text.slice(0, free.text.indexOf(stop)));
    expect(deltas.join("")).toBe(r.text);
    expect(r.completionTokens).toBeLessThan(free.completionTokens);
  });

  test("max_tokens ends generation with finish_reason length and streams everything", async () => {
    const deltas: string[] = [];
    const r = await engine.complete({ promptIds: prompt, maxTokens: 7, sampling: { temperature: 0 }, stop: [] }, (d) => {
      deltas.push(d);
    });
    expect(r.completionTokens).toBe(7);
    expect(r.finishReason).toBe("length");
    expect(deltas.join("")).toBe(r.text);
    expect(r.text).toBe(engine.tokenizer.decode(r.tokenIds, true));
  });

  test("a prompt longer than the context is refused with a clear error", async () => {
    const long = new Array(5000).fill(9906);
    await expect(engine.complete({ promptIds: long, maxTokens: 1, sampling: {}, stop: [] })).rejects.toThrow(/context holds 4096/);
  });
});
