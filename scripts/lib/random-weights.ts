// Seeded random weights for a Llama graph. Only integer ops, +, *, / and sqrt are used (all exactly
// rounded in IEEE 754), so every JS engine produces the same bits; Math.log/cos (Box-Muller) are not
// guaranteed to agree between V8 and JavaScriptCore.

import { llamaWeightSpecs, type LlamaConfig, type LlamaWeights } from "./onnx-llama.ts";

/** mulberry32: a small 32-bit PRNG; returns uniform integers in [0, 2^32). */
function mulberry32(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return (t ^ (t >>> 14)) >>> 0;
  };
}

/** FNV-1a of a string, so each tensor gets its own stream regardless of generation order. */
function hashName(name: string): number {
  let h = 0x811c9dc5;
  for (let i = 0; i < name.length; i++) h = Math.imul(h ^ name.charCodeAt(i), 0x01000193);
  return h >>> 0;
}

/**
 * Approximately standard normal values: the sum of four uniforms (Irwin-Hall), centred and scaled
 * to unit variance. Bounded at about +-3.5 sigma, which suits weight init.
 */
function fillNormal(out: Float32Array, seed: number, std: number): void {
  const next = mulberry32(seed);
  const scale = (Math.sqrt(3) * std) / 2 ** 32;
  for (let i = 0; i < out.length; i++) {
    const sum = next() + next() + next() + next(); // exact: < 2^34
    out[i] = (sum - 2 * 2 ** 32) * scale;
  }
}

export interface RandomInitScales {
  /** Std of the embedding rows (hidden states enter the first norm at about this RMS). */
  embeddingStd: number;
  /** Target std of the logits: lm_head std = logitStd / sqrt(hidden_size), as the final norm gives unit RMS. */
  logitStd: number;
}

export const DEFAULT_INIT_SCALES: RandomInitScales = { embeddingStd: 1, logitStd: 4 };

/**
 * Untied, non-degenerate random weights: embeddings N(0, embeddingStd), projections
 * N(0, 1/fan_in), lm_head scaled for logits of std about `logitStd`, norm weights 1.
 */
export function randomLlamaWeights(config: LlamaConfig, seed: number, scales: RandomInitScales = DEFAULT_INIT_SCALES): LlamaWeights {
  const weights: LlamaWeights = {};
  for (const spec of llamaWeightSpecs(config)) {
    const data = new Float32Array(spec.dims.reduce((a, b) => a * b, 1));
    if (spec.kind === "norm") {
      data.fill(1);
    } else {
      const std =
        spec.kind === "embedding"
          ? scales.embeddingStd
          : spec.name === "lm_head.weight"
            ? scales.logitStd / Math.sqrt(spec.fanIn)
            : 1 / Math.sqrt(spec.fanIn);
      fillNormal(data, (hashName(spec.name) ^ Math.imul(seed >>> 0, 0x9e3779b1)) >>> 0, std);
    }
    weights[spec.name] = { dims: spec.dims, data };
  }
  return weights;
}
