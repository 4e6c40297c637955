/**
 * Rotary position embedding (RoPE) as a Llama-family config.json describes it: the inverse frequency of
 * each rotary plane. The graph builder bakes them into the built-in graph; the runtime uses them to move
 * cached keys to other positions (recalled KV placed beside the question: runtime/kv/compaction.ts).
 */

/** The config.json fields RoPE reads (snake case, as Hugging Face writes them). */
export interface RopeConfigFields {
  head_dim: number;
  rope_theta?: number;
  rope_scaling?: Record<string, unknown> | null;
}

/**
 * Inverse frequencies (head_dim / 2 values) for the rope types whose frequencies do not depend on the
 * sequence: none ("default"), "linear" and "llama3" (exactly as transformers' `_compute_llama3_parameters`),
 * computed in float64 and rounded to float32. Null for other types (dynamic, yarn, longrope, ...), whose
 * keys the runtime then never moves.
 */
export function ropeInvFreq(config: RopeConfigFields): Float32Array | null {
  const dim = config.head_dim;
  if (!Number.isInteger(dim) || dim <= 0 || dim % 2 !== 0) return null;
  const theta = config.rope_theta ?? 10000;
  const s = config.rope_scaling ?? null;
  const type = s ? String(s.rope_type ?? s.type ?? "default") : "default";
  const num = (key: string): number => {
    const v = s?.[key];
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) throw new RangeError(`rope_scaling.${key} must be a positive number, got ${JSON.stringify(v)}`);
    return v;
  };
  if (type !== "default" && type !== "linear" && type !== "llama3") return null;
  const out = new Float32Array(dim / 2);
  for (let i = 0; i < dim / 2; i++) {
    const base = 1 / theta ** ((2 * i) / dim);
    if (type === "default") out[i] = base;
    else if (type === "linear") out[i] = base / num("factor");
    else {
      const factor = num("factor");
      const low = num("low_freq_factor");
      const high = num("high_freq_factor");
      const original = num("original_max_position_embeddings");
      const lowFreqWavelen = original / low;
      const highFreqWavelen = original / high;
      const wavelen = (2 * Math.PI) / base;
      let f = wavelen > lowFreqWavelen ? base / factor : base;
      if (!(wavelen < highFreqWavelen) && !(wavelen > lowFreqWavelen)) {
        const smooth = (original / wavelen - low) / (high - low);
        f = ((1 - smooth) * f) / factor + smooth * f;
      }
      out[i] = f;
    }
  }
  return out;
}
