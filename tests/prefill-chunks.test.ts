/**
 * Prefill chunks sized to a time target (PrefillChunker): on a simulated cost model it keeps runs near
 * the target while that is reachable and never lets the fixed per-run cost take more than about half a
 * run where it is not; on the real model, prefilling in such chunks leaves greedy output unchanged.
 */
import { describe, expect, test } from "bun:test";
import { PrefillChunker } from "../runtime/llama-model.ts";
import { argmax } from "../runtime/sampling.ts";
import { sharedEngine } from "./helpers/model.ts";

/** Simulated milliseconds of one run: fixed cost and per-token cost both grow with the context, as measured on WASM. */
const cost = (tokens: number, past: number) => {
  const a = 2 + past * 0.002; // feeding the KV cache in and out
  const b = 0.05 + past * 0.00006; // attention over the context, MLP
  return { ms: a + b * tokens, a };
};

function simulate(max: number, targetMs: number, total: number, noise = () => 1) {
  const chunks = new PrefillChunker(max, targetMs);
  const runs: { tokens: number; past: number; ms: number; a: number }[] = [];
  for (let past = 0; past < total; ) {
    const tokens = Math.min(chunks.size, total - past);
    const { ms, a } = cost(tokens, past);
    const measured = ms * noise();
    runs.push({ tokens, past, ms: measured, a });
    chunks.observe(tokens, measured);
    past += tokens;
  }
  return runs;
}

describe("prefill chunks", () => {
  test("without a target every chunk is the configured size", () => {
    const runs = simulate(512, 0, 5000);
    expect(runs.slice(0, -1).every((r) => r.tokens === 512)).toBe(true);
  });

  test("runs stay near the target while it is reachable, and overhead stays under about half a run beyond", () => {
    const runs = simulate(512, 50, 60_000);
    expect(runs.every((r) => r.tokens >= 1 && r.tokens <= 512)).toBe(true);
    const settled = runs.slice(8, -1);
    const reachable = settled.filter((r) => r.a < 15);
    const beyond = settled.filter((r) => r.a > 40);
    expect(reachable.length).toBeGreaterThan(20);
    expect(beyond.length).toBeGreaterThan(20);
    for (const r of reachable) {
      expect(r.ms).toBeLessThan(50 * 1.5);
      expect(r.ms).toBeGreaterThan(50 * 0.5);
    }
    // Past the point where the fixed cost alone approaches the target, runs are about twice that cost:
    // prefill keeps at least about half its speed instead of shrinking to one token per run.
    for (const r of beyond) expect(r.a / r.ms).toBeLessThan(0.65);
    // Compared with full chunks, far fewer tokens per run while reachable.
    expect(Math.max(...reachable.map((r) => r.tokens))).toBeLessThan(512);
  });

  test("noisy timings (+-40%) keep the chunk within bounds and the runs near the target", () => {
    let seed = 99;
    const noise = () => 0.6 + 0.8 * ((seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff);
    const runs = simulate(512, 50, 30_000, noise);
    expect(runs.every((r) => r.tokens >= 1 && r.tokens <= 512)).toBe(true);
    const settled = runs.slice(8, -1).filter((r) => r.a < 15);
    const mean = settled.reduce((s, r) => s + r.ms, 0) / settled.length;
    expect(mean).toBeGreaterThan(25);
    expect(mean).toBeLessThan(90);
  });

  test("on the real model, prefill in time-sized chunks gives the same greedy tokens and logits as full chunks", async () => {
    const engine = await sharedEngine();
    const model = engine.model;
    const words = "The tide rose and fell along the old stone quay while gulls circled the masts. ";
    const prompt = await engine.encodeChat([{ role: "user", content: words.repeat(80) }], { extra: { date_string: "26 Jul 2024" } });
    expect(prompt.length).toBeGreaterThan(1200);
    const greedy = async (targetMs: number) => {
      model.prefillTargetMs = targetMs;
      const runsBefore = model.runStats.runs;
      try {
        const cache = model.newCache();
        let logits = await model.prefill(cache, prompt, 512);
        const prefillRuns = model.runStats.runs - runsBefore;
        const first = logits.slice();
        const ids: number[] = [];
        for (let i = 0; i < 16; i++) {
          ids.push(argmax(logits));
          logits = await model.forward(cache, [ids.at(-1)!]);
        }
        return { ids, first, prefillRuns };
      } finally {
        model.prefillTargetMs = 0;
      }
    };
    const full = await greedy(0);
    const timed = await greedy(1); // a 1 ms target: the smallest chunks the overhead rule allows
    expect(full.prefillRuns).toBe(Math.ceil(prompt.length / 512));
    expect(timed.prefillRuns).toBeGreaterThan(full.prefillRuns);
    expect(timed.ids).toEqual(full.ids);
    let maxDiff = 0;
    for (let i = 0; i < full.first.length; i++) maxDiff = Math.max(maxDiff, Math.abs(full.first[i]! - timed.first[i]!));
    expect(maxDiff).toBeLessThan(1e-4);
  }, 120_000);
});
