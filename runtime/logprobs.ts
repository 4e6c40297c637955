/**
 * Log-probabilities of tokens, as OpenAI's `logprobs` report them: the log-softmax of the model's raw
 * logits at that step (before logit_bias, penalties, temperature, top-k / top-p / min-p), in float64 over
 * the whole vocabulary row. Sampling settings change which token is drawn, never the values reported.
 */

export interface TopLogprob {
  id: number;
  logprob: number;
}

export interface TokenLogprob {
  /** The token (generated, or read from the prompt). */
  id: number;
  logprob: number;
  /** The `k` most likely tokens at that step, most likely first (ties: lower id first); empty when k is 0. */
  top: TopLogprob[];
}

/** Most alternatives a request may ask for per token (OpenAI's top_logprobs bound). */
export const MAX_TOP_LOGPROBS = 20;

/** log(sum(exp(row))), stable (shifted by the row's maximum), accumulated in float64. */
export function logSumExp(row: Float32Array): number {
  let max = -Infinity;
  for (let i = 0; i < row.length; i++) if (row[i]! > max) max = row[i]!;
  if (max === -Infinity || !Number.isFinite(max)) return max;
  let sum = 0;
  for (let i = 0; i < row.length; i++) sum += Math.exp(row[i]! - max);
  return max + Math.log(sum);
}

/** Ids of the k largest entries of row, largest first (ties: lower id first). */
export function topIds(row: Float32Array, k: number): number[] {
  if (k <= 0) return [];
  const ids: number[] = [];
  const values: number[] = [];
  for (let i = 0; i < row.length; i++) {
    const v = row[i]!;
    if (ids.length === k && !(v > values[k - 1]!)) continue;
    if (ids.length === k) {
      ids.pop();
      values.pop();
    }
    // Insert after every entry >= v (an equal value with a lower id stays ahead).
    let at = ids.length;
    while (at > 0 && values[at - 1]! < v) at--;
    ids.splice(at, 0, i);
    values.splice(at, 0, v);
  }
  return ids;
}

/**
 * What a logits row says about a token: its logprob and the k best alternatives'. Read the row before
 * sampling changes it (sampleToken applies logit_bias and penalties in place).
 */
export class LogprobRow {
  readonly lse: number;
  readonly top: TopLogprob[];
  constructor(
    private readonly row: Float32Array,
    k: number,
  ) {
    this.lse = logSumExp(row);
    this.top = topIds(row, k).map((id) => ({ id, logprob: row[id]! - this.lse }));
  }

  of(id: number): TokenLogprob {
    return { id, logprob: this.row[id]! - this.lse, top: this.top };
  }
}
