/** Sampling functions on hand-made logits, where the right answer is known. */
import { describe, expect, test } from "bun:test";
import { applyPenalties, argmax, createRng, DEFAULT_SAMPLING, sampleToken, topCandidates, type SamplingParams } from "../runtime/sampling.ts";

const params = (p: Partial<SamplingParams>): SamplingParams => ({ ...DEFAULT_SAMPLING, ...p });
const logitsOf = (values: number[]) => Float32Array.from(values);

function histogram(logits: number[], p: Partial<SamplingParams>, draws = 4000): Map<number, number> {
  const random = createRng(7);
  const counts = new Map<number, number>();
  for (let i = 0; i < draws; i++) {
    const id = sampleToken(logitsOf(logits), [], 0, params(p), random);
    counts.set(id, (counts.get(id) ?? 0) + 1);
  }
  return counts;
}

describe("sampling", () => {
  test("argmax and greedy (temperature 0)", () => {
    expect(argmax(logitsOf([0, 3, 2, 3.5, -1]))).toBe(3);
    expect(sampleToken(logitsOf([0, 3, 2, 3.5]), [], 0, params({ temperature: 0 }), createRng(1))).toBe(3);
  });

  test("topCandidates returns the k best, sorted", () => {
    const values = Array.from({ length: 1000 }, (_, i) => Math.sin(i * 12.9898) * 43758.5453 % 1);
    const { ids, values: top } = topCandidates(logitsOf(values), 10);
    const expected = values.map((v, i) => [Math.fround(v), i] as const).sort((a, b) => b[0] - a[0]).slice(0, 10);
    expect(Array.from(ids)).toEqual(expected.map((e) => e[1]));
    expect(Array.from(top)).toEqual(expected.map((e) => e[0]));
  });

  test("top_k=2 draws only the two best tokens, in proportion", () => {
    const counts = histogram([1, 5, 4, 0, 3], { temperature: 1, topK: 2 });
    expect([...counts.keys()].sort()).toEqual([1, 2]);
    const ratio = counts.get(1)! / counts.get(2)!;
    expect(ratio).toBeGreaterThan(Math.E * 0.8);
    expect(ratio).toBeLessThan(Math.E * 1.25);
  });

  test("top_p keeps the smallest set reaching the mass", () => {
    // probabilities ~ [0.665, 0.245, 0.09]
    const counts = histogram([2, 1, 0], { temperature: 1, topP: 0.8 });
    expect([...counts.keys()].sort()).toEqual([0, 1]);
    const only = histogram([2, 1, 0], { temperature: 1, topP: 0.5 });
    expect([...only.keys()]).toEqual([0]);
  });

  test("min_p drops tokens below min_p x the best", () => {
    const counts = histogram([2, 1.9, 0], { temperature: 1, minP: 0.5 });
    expect([...counts.keys()].sort()).toEqual([0, 1]);
  });

  test("penalties: repetition divides positive and multiplies negative logits; frequency and presence subtract", () => {
    const logits = logitsOf([2, -2, 1, 1]);
    applyPenalties(logits, [0, 1, 2, 2], 4, params({ repetitionPenalty: 2 }));
    expect(Array.from(logits)).toEqual([1, -4, 0.5, 1]);
    const l2 = logitsOf([0, 0, 0]);
    applyPenalties(l2, [0, 0, 1], 3, params({ frequencyPenalty: 0.5, presencePenalty: 0.25 }));
    expect(Array.from(l2)).toEqual([-1.25, -0.75, 0]);
  });

  test("penalties look only at the last N tokens", () => {
    const logits = logitsOf([1, 1, 1]);
    applyPenalties(logits, [0, 1, 2], 3, params({ presencePenalty: 1, penaltyLastN: 1 }));
    expect(Array.from(logits)).toEqual([1, 1, 0]);
  });

  test("the same seed gives the same draws; another seed differs", () => {
    const logits = Array.from({ length: 500 }, (_, i) => Math.cos(i));
    const draw = (seed: number) => {
      const random = createRng(seed);
      return Array.from({ length: 50 }, () => sampleToken(logitsOf(logits), [], 0, params({ temperature: 1.5 }), random));
    };
    expect(draw(42)).toEqual(draw(42));
    expect(draw(42)).not.toEqual(draw(43));
  });
});
