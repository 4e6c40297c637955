/**
 * Sampling as small pure functions over a Float32Array of logits (one row, vocabulary-sized).
 * Order, as llama.cpp and transformers apply it: penalties -> (greedy | top-k -> temperature -> softmax ->
 * top-p -> min-p -> draw). Nothing here allocates per vocabulary entry except the candidate arrays, which
 * are bounded by top_k (or by CANDIDATE_CAP when top_k is off).
 */

export interface SamplingParams {
  /** 0 means greedy. */
  temperature: number;
  /** 0 or >= vocab means off. */
  topK: number;
  /** 1 means off. */
  topP: number;
  /** 0 means off. */
  minP: number;
  /** 1 means off (transformers / llama.cpp repetition penalty: divide positive logits, multiply negative). */
  repetitionPenalty: number;
  /** OpenAI frequency penalty: subtract count * value. */
  frequencyPenalty: number;
  /** OpenAI presence penalty: subtract value once for every token already seen. */
  presencePenalty: number;
  /** How many of the most recent tokens the penalties look at; -1 means the whole context. */
  penaltyLastN: number;
  /** OpenAI logit_bias: added to the logit of each listed token id before anything else. */
  logitBias: ReadonlyMap<number, number> | null;
  seed: number;
}

export const DEFAULT_SAMPLING: SamplingParams = {
  temperature: 1,
  topK: 0,
  topP: 1,
  minP: 0,
  repetitionPenalty: 1,
  frequencyPenalty: 0,
  presencePenalty: 0,
  penaltyLastN: 64,
  logitBias: null,
  seed: 0,
};

/** Without top_k, only this many best candidates are sorted for top-p / min-p; the rest hold negligible mass. */
const CANDIDATE_CAP = 4096;

/** A small seeded PRNG (mulberry32): identical streams for identical seeds in every JS runtime. */
export function createRng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

export function argmax(logits: Float32Array): number {
  let best = 0;
  let bestValue = -Infinity;
  for (let i = 0; i < logits.length; i++) {
    const v = logits[i]!;
    if (v > bestValue) {
      bestValue = v;
      best = i;
    }
  }
  return best;
}

/** Applies repetition, frequency and presence penalties in place, over the last `lastN` tokens of `history`. */
export function applyPenalties(logits: Float32Array, history: ArrayLike<number>, historyLength: number, p: SamplingParams): void {
  if (p.repetitionPenalty === 1 && p.frequencyPenalty === 0 && p.presencePenalty === 0) return;
  const start = p.penaltyLastN < 0 ? 0 : Math.max(0, historyLength - p.penaltyLastN);
  const counts = new Map<number, number>();
  for (let i = start; i < historyLength; i++) {
    const id = history[i]!;
    counts.set(id, (counts.get(id) ?? 0) + 1);
  }
  for (const [id, count] of counts) {
    if (id < 0 || id >= logits.length) continue;
    let v = logits[id]!;
    if (p.repetitionPenalty !== 1) v = v > 0 ? v / p.repetitionPenalty : v * p.repetitionPenalty;
    v -= count * p.frequencyPenalty + p.presencePenalty;
    logits[id] = v;
  }
}

/** The k largest logits, sorted descending, as parallel typed arrays. A min-heap keeps this O(V log k). */
export function topCandidates(logits: Float32Array, k: number): { ids: Int32Array; values: Float32Array } {
  const n = Math.min(k, logits.length);
  const heapIds = new Int32Array(n);
  const heapValues = new Float32Array(n);
  let size = 0;
  const siftDown = (i: number) => {
    for (;;) {
      const l = 2 * i + 1;
      const r = l + 1;
      let m = i;
      if (l < size && heapValues[l]! < heapValues[m]!) m = l;
      if (r < size && heapValues[r]! < heapValues[m]!) m = r;
      if (m === i) return;
      const tv = heapValues[i]!;
      heapValues[i] = heapValues[m]!;
      heapValues[m] = tv;
      const ti = heapIds[i]!;
      heapIds[i] = heapIds[m]!;
      heapIds[m] = ti;
      i = m;
    }
  };
  for (let id = 0; id < logits.length; id++) {
    const v = logits[id]!;
    if (size < n) {
      // sift up
      let i = size++;
      heapValues[i] = v;
      heapIds[i] = id;
      while (i > 0) {
        const parent = (i - 1) >> 1;
        if (heapValues[parent]! <= heapValues[i]!) break;
        const tv = heapValues[i]!;
        heapValues[i] = heapValues[parent]!;
        heapValues[parent] = tv;
        const ti = heapIds[i]!;
        heapIds[i] = heapIds[parent]!;
        heapIds[parent] = ti;
        i = parent;
      }
    } else if (v > heapValues[0]!) {
      heapValues[0] = v;
      heapIds[0] = id;
      siftDown(0);
    }
  }
  // Pop everything: ascending order, then reverse into descending.
  const ids = new Int32Array(n);
  const values = new Float32Array(n);
  for (let out = n - 1; out >= 0; out--) {
    ids[out] = heapIds[0]!;
    values[out] = heapValues[0]!;
    size--;
    heapValues[0] = heapValues[size]!;
    heapIds[0] = heapIds[size]!;
    siftDown(0);
  }
  return { ids, values };
}

/** Picks the next token from one row of logits. `logits` may be modified (penalties are applied in place). */
export function sampleToken(
  logits: Float32Array,
  history: ArrayLike<number>,
  historyLength: number,
  p: SamplingParams,
  random: () => number,
): number {
  if (p.logitBias) {
    for (const [id, bias] of p.logitBias) if (id >= 0 && id < logits.length) logits[id] += bias;
  }
  applyPenalties(logits, history, historyLength, p);
  if (p.temperature <= 0 || p.topK === 1) return argmax(logits);

  const k = p.topK > 0 ? Math.min(p.topK, logits.length) : Math.min(CANDIDATE_CAP, logits.length);
  const { ids, values } = topCandidates(logits, k);
  // Softmax over the candidates at the requested temperature.
  const probs = new Float64Array(ids.length);
  const max = values[0]!;
  let sum = 0;
  for (let i = 0; i < ids.length; i++) {
    const e = Math.exp((values[i]! - max) / p.temperature);
    probs[i] = e;
    sum += e;
  }
  let keep = ids.length;
  // top-p: the smallest prefix whose mass reaches top_p (always at least one token).
  if (p.topP < 1) {
    let cumulative = 0;
    for (let i = 0; i < keep; i++) {
      cumulative += probs[i]! / sum;
      if (cumulative >= p.topP) {
        keep = i + 1;
        break;
      }
    }
  }
  // min-p: drop candidates below min_p times the most likely one.
  if (p.minP > 0) {
    const floor = probs[0]! * p.minP;
    let i = 1;
    while (i < keep && probs[i]! >= floor) i++;
    keep = i;
  }
  let mass = 0;
  for (let i = 0; i < keep; i++) mass += probs[i]!;
  let r = random() * mass;
  for (let i = 0; i < keep; i++) {
    r -= probs[i]!;
    if (r <= 0) return ids[i]!;
  }
  return ids[keep - 1]!;
}
