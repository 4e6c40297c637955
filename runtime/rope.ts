/**
 * Rotary position embedding (RoPE) as a Llama-family config.json describes it: the inverse frequency of each
 * rotary plane, and the attention factor that multiplies cos and sin, for every rope type Hugging Face
 * transformers gives Llama: default, linear, dynamic (NTK), llama3, yarn and longrope. The graph builder turns
 * ropeSpec() into the graph's rotary embedding; the runtime uses ropeInvFreq() to move cached keys to other
 * positions (recalled KV placed beside the question: runtime/kv/compaction.ts).
 *
 * Source of truth: transformers 5.18.0 (PyPI wheel), src/transformers/modeling_rope_utils.py
 * (`_compute_{linear_scaling,dynamic_ntk,yarn,longrope,llama3}_parameters`, `dynamic_rope_update` with
 * `dynamic_frequency_update` / `longrope_frequency_update`, `RotaryEmbeddingConfigMixin.standardize_rope_params`
 * and `validate_rope`) and models/llama/modeling_llama.py (`LlamaRotaryEmbedding`: its own
 * `compute_default_rope_parameters`; forward: freqs = inv_freq (x) position_ids in float32, emb = cat(freqs,
 * freqs), cos = emb.cos() * attention_scaling, sin = emb.sin() * attention_scaling, applied to q and k alike by
 * rotate_half). Checked against 4.57.6, the last 4.x: identical results for every case in tests/rope.test.ts
 * except longrope where noted below. scripts/rope_reference.py transcribes the same code in PyTorch (checked
 * bit-identical to the real 5.18.0 file running on torch) and is what the tests compare against.
 *
 * Per-run frequencies (dynamic, longrope). transformers picks them in each forward from
 * seq_len = max(position_ids) + 1:
 *   - longrope: long factors iff seq_len > original_max_position_embeddings, else short ones. No memory, so a
 *     graph computing this from each run's position_ids is exactly transformers, whatever the chunking.
 *   - dynamic: stateful. The module remembers max_seq_len_cached (initially max_position_embeddings); a forward
 *     with seq_len > max_seq_len_cached recomputes the base at that seq_len and remembers it; a forward with
 *     seq_len < max_position_embeddings after growth goes back to the original frequencies. A graph computing
 *     base(seq_len) from each run's position_ids (seq_len > max_position_embeddings, else the original) equals
 *     transformers for one full forward, and for any sequence of runs whose max position never decreases while
 *     above max_position_embeddings: prefill then decode, and chunked prefill too (each chunk reaches further,
 *     so transformers recomputes at each chunk exactly as the graph does; the keys cached by earlier chunks keep
 *     their earlier base in both). It differs where transformers carries state across forwards: a run whose
 *     max position is lower than an earlier run's but still >= max_position_embeddings (a session rewound or
 *     reused for a shorter prompt, another request served by the same model object) keeps the larger cached
 *     base in transformers and gets base(its own seq_len) here. Note also
 *     that chunked prefill is not the same as one full forward over the prompt, in transformers as here: with
 *     one forward every prompt key uses base(prompt length); chunked, each chunk's keys use base(its end).
 *
 * Float32. transformers computes inv_freq with float32 torch ops on python-float scalars (`base ** (arange(0,
 * dim, 2).float() / dim)`, `scalar / tensor` evaluated as tensor.reciprocal() * scalar). yarn, dynamic and
 * longrope emulate those ops step by step with Math.fround (pow: float64 pow rounded once, i.e. a correctly
 * rounded powf; torch's vectorized CPU pow is within 1-2 ulps of that): measured against torch 1.13 (CPU),
 * at most 2 ulps; default, linear and llama3 within 1 ulp. (Until issue 13 they were computed in float64 and
 * rounded once: off from torch by up to 6 ulps for head_dim 128 and 50 for head_dim 96, which moved logits by
 * ~2e-2 at position 500,000 against a PyTorch forward.) The graph builder and ropeInvFreq (which moves cached
 * keys) both take their frequencies from ropeSpec, so they always agree.
 */

/** The rope types transformers gives Llama, in the order error messages list them. */
export const ROPE_TYPES = ["default", "linear", "dynamic", "llama3", "yarn", "longrope"] as const;
export type RopeType = (typeof ROPE_TYPES)[number];

/**
 * The config.json fields RoPE reads (snake case, as Hugging Face writes them). Pass the whole config.json
 * object: dynamic, yarn and longrope need max_position_embeddings (and longrope / yarn a top-level
 * original_max_position_embeddings where Phi-3-style configs put it).
 */
export interface RopeConfigFields {
  head_dim: number;
  rope_theta?: number;
  /** transformers 4.x name of the scaling dict; 5.x writes rope_parameters (which may also hold rope_theta). */
  rope_scaling?: Record<string, unknown> | null;
  rope_parameters?: Record<string, unknown> | null;
  max_position_embeddings?: number;
  /** Top-level (Phi-3 style); transformers 5.x gives it priority over the dict's own for llama3 / yarn / longrope. */
  original_max_position_embeddings?: number;
  partial_rotary_factor?: number | null;
}

/**
 * default, linear, llama3, yarn: fixed frequencies. cos and sin are multiplied by attentionFactor (transformers
 * does it to cos and sin, so both q and k carry it and the scores carry its square); doing the same in the graph
 * keeps the cached keys equal to transformers' keys, m * R(p) k, which compaction can still move by a delta.
 */
export interface StaticRopeSpec {
  kind: "static";
  type: "default" | "linear" | "llama3" | "yarn";
  /** head_dim / 2 values. */
  invFreq: Float32Array;
  /** 1 except for yarn. transformers multiplies cos and sin by it in float32 (Math.fround of this). */
  attentionFactor: number;
}

/**
 * Dynamic NTK. Per run, with seq_len = max(position_ids) + 1 (over the batch):
 *   seq_len <= maxPositions: invFreq (the original frequencies);
 *   else: c = f32(factor) * f32(seq_len) / f32(maxPositions) - f32(factor - 1)   (float32 ops, in that order)
 *         base' = f32(base) * float32(pow(double(c), ntkExponent))              (see below)
 *         inv_freq[i] = 1 / pow(base', exponents[i])                            (float32)
 * dynamicInvFreq() computes the same in JS. The one pow that is not float32: torch (CPU) evaluates a float32
 * tensor ** python float in double, exponent unrounded; in ONNX that is Cast(c, DOUBLE), Pow by a double
 * constant ntkExponent, Cast back to FLOAT. A float32 Pow by float32(ntkExponent) moves base' by up to ~2
 * ulps (and inv_freq by as much) for seq_len a few times maxPositions.
 */
export interface DynamicRopeSpec {
  kind: "dynamic";
  type: "dynamic";
  /** The original frequencies (seq_len <= maxPositions); transformers' original_inv_freq. */
  invFreq: Float32Array;
  /** config.max_position_embeddings: transformers' threshold and divisor (not rope_scaling.original_max_position_embeddings, which it ignores for dynamic). */
  maxPositions: number;
  /** rope_theta. */
  base: number;
  factor: number;
  /** dim / (dim - 2), dim = head_dim. */
  ntkExponent: number;
  /** float32(2i / dim), i < dim / 2: the powers of the base. */
  exponents: Float32Array;
  attentionFactor: 1;
}

/** LongRoPE. Per run: longInvFreq iff max(position_ids) + 1 > originalMaxPositions, else shortInvFreq; the attention factor is the same for both. */
export interface LongRopeSpec {
  kind: "longrope";
  type: "longrope";
  shortInvFreq: Float32Array;
  longInvFreq: Float32Array;
  originalMaxPositions: number;
  /** rope_scaling.factor, or max_position_embeddings / originalMaxPositions when absent. */
  factor: number;
  attentionFactor: number;
}

export type RopeSpec = StaticRopeSpec | DynamicRopeSpec | LongRopeSpec;

/** A rope configuration transformers would refuse, or that this runtime does not run; the message names the field. */
export class RopeConfigError extends RangeError {
  override name = "RopeConfigError";
}

const f32 = Math.fround;
/** powf as a correctly rounded float32 pow of float32 arguments. */
const pow32 = (base: number, exponent: number): number => f32(f32(base) ** f32(exponent));

interface Resolved {
  type: RopeType;
  params: Record<string, unknown>;
  /** Where the fields came from, for messages: "rope_scaling" or "rope_parameters". */
  where: string;
  headDim: number;
  theta: number;
  config: RopeConfigFields;
}

/**
 * The rope parameters as transformers 5.x standardizes them (standardize_rope_params), validated like
 * validate_rope (required keys) plus what would otherwise give NaN or crash later (types and ranges).
 */
function resolve(config: RopeConfigFields): Resolved {
  const headDim = config.head_dim;
  if (!Number.isInteger(headDim) || headDim <= 0 || headDim % 2 !== 0) throw new RopeConfigError(`head_dim must be a positive even integer, got ${JSON.stringify(headDim)}`);
  const fromParameters = config.rope_parameters !== undefined && config.rope_parameters !== null;
  const where = fromParameters ? "rope_parameters" : "rope_scaling";
  const raw = (fromParameters ? config.rope_parameters : config.rope_scaling) ?? {};
  if (typeof raw !== "object" || Array.isArray(raw)) throw new RopeConfigError(`${where} must be an object or null, got ${JSON.stringify(raw)}`);
  const params: Record<string, unknown> = { ...raw };
  const nested = Object.entries(params).filter(([, v]) => v !== null && typeof v === "object" && !Array.isArray(v));
  if (nested.length > 0) throw new RopeConfigError(`${where} per layer type (${nested.map(([k]) => k).join(", ")}) is not supported: Llama has one rope for every layer`);
  // rope_type, or its legacy name `type` (transformers 5.x: rope_type wins when both are set).
  const typeValue = params.rope_type ?? params.type ?? "default";
  if (typeof typeValue !== "string" || !(ROPE_TYPES as readonly string[]).includes(typeValue)) {
    throw new RopeConfigError(`${where}.rope_type ${JSON.stringify(typeValue)} is not supported (supported: ${ROPE_TYPES.join(", ")})`);
  }
  const type = typeValue as RopeType;
  const partial = params.partial_rotary_factor ?? config.partial_rotary_factor;
  if (partial !== undefined && partial !== null && partial !== 1) {
    // transformers' Llama rotates the whole head: 5.x ignores the factor for "default" and, for the other
    // types, builds cos/sin of head_dim * factor that apply_rotary_pos_emb cannot broadcast; 4.x fails for all.
    throw new RopeConfigError(`partial_rotary_factor ${JSON.stringify(partial)} is not supported: Llama applies rotary embeddings to the whole head (transformers cannot run it either)`);
  }
  const theta = params.rope_theta ?? config.rope_theta ?? 10000;
  if (typeof theta !== "number" || !Number.isFinite(theta) || theta <= 1) throw new RopeConfigError(`rope_theta must be a number above 1, got ${JSON.stringify(theta)}`);
  // Top-level original_max_position_embeddings (Phi-3 style) wins for the types that read it; the dict's own
  // value otherwise; max_position_embeddings when neither is set.
  if (type === "llama3" || type === "yarn" || type === "longrope") {
    if (config.original_max_position_embeddings !== undefined && config.original_max_position_embeddings !== null) {
      params.original_max_position_embeddings = config.original_max_position_embeddings;
    } else if (params.original_max_position_embeddings === undefined) {
      if (config.max_position_embeddings === undefined) {
        throw new RopeConfigError(`${where}.original_max_position_embeddings is missing, and so is max_position_embeddings, which transformers uses in its place (rope type ${type})`);
      }
      params.original_max_position_embeddings = config.max_position_embeddings;
    }
  }
  const required: Record<RopeType, string[]> = {
    default: [],
    linear: ["factor"],
    dynamic: ["factor"],
    llama3: ["factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"],
    yarn: ["factor", "original_max_position_embeddings"],
    longrope: ["short_factor", "long_factor", "original_max_position_embeddings"],
  };
  const missing = required[type].filter((k) => !(k in params));
  if (missing.length > 0) throw new RopeConfigError(`${where} for rope type "${type}" is missing ${missing.join(", ")}`);
  return { type, params, where, headDim, theta, config };
}

function positive(r: Resolved, key: string): number {
  const v = r.params[key];
  if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) throw new RopeConfigError(`${r.where}.${key} must be a positive number, got ${JSON.stringify(v)}`);
  return v;
}

/** A field transformers reads with `.get(key)`: absent or null is undefined. */
function optionalNumber(r: Resolved, key: string): number | undefined {
  const v = r.params[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== "number" || !Number.isFinite(v)) throw new RopeConfigError(`${r.where}.${key} must be a number, got ${JSON.stringify(v)}`);
  return v;
}

function maxPositions(r: Resolved): number {
  const v = r.config.max_position_embeddings;
  if (typeof v !== "number" || !Number.isInteger(v) || v <= 0) throw new RopeConfigError(`max_position_embeddings must be a positive integer for rope type "${r.type}", got ${JSON.stringify(v)}`);
  return v;
}

function integerField(r: Resolved, key: string): number {
  const v = positive(r, key);
  if (!Number.isInteger(v)) throw new RopeConfigError(`${r.where}.${key} must be an integer, got ${v}`);
  return v;
}

/** float32(2i / dim) for i < dim / 2: transformers' `torch.arange(0, dim, 2).float() / dim`. */
function exponentsOf(dim: number): Float32Array {
  const out = new Float32Array(dim / 2);
  for (let i = 0; i < dim / 2; i++) out[i] = (2 * i) / dim;
  return out;
}

/** 1 / base ** exponents in float32 steps: transformers' default inv_freq, for a python-float (or float32 tensor) base. */
function invFreqFloat32(base: number, exponents: Float32Array, scale?: ArrayLike<number>): Float32Array {
  const out = new Float32Array(exponents.length);
  for (let i = 0; i < out.length; i++) {
    const p = pow32(base, exponents[i]!);
    out[i] = f32(1 / (scale ? f32(f32(scale[i]!) * p) : p));
  }
  return out;
}

function llama3Fields(r: Resolved): { low: number; high: number; original: number } {
  return { low: positive(r, "low_freq_factor"), high: positive(r, "high_freq_factor"), original: positive(r, "original_max_position_embeddings") };
}

/**
 * default, linear, llama3 as transformers' torch ops compute them: every op in float32, python scalars cast to
 * float32, `scalar / tensor` as reciprocal * scalar. Within an ulp of torch (CPU): see tests/rope.test.ts.
 */
function float32InvFreq(r: Resolved): Float32Array {
  const dim = r.headDim;
  const inv = invFreqFloat32(r.theta, exponentsOf(dim));
  if (r.type === "default") return inv;
  const factor = f32(positive(r, "factor"));
  if (r.type === "linear") return inv.map((x) => f32(x / factor));
  const { low, high, original } = llama3Fields(r);
  const lowFreqWavelen = f32(original / low);
  const highFreqWavelen = f32(original / high);
  const twoPi = f32(2 * Math.PI);
  return inv.map((x) => {
    const wavelen = f32(f32(1 / x) * twoPi);
    const scaled = wavelen > lowFreqWavelen ? f32(x / factor) : x;
    if (wavelen < highFreqWavelen || wavelen > lowFreqWavelen) return scaled;
    const smooth = f32(f32(f32(f32(1 / wavelen) * f32(original)) - f32(low)) / f32(high - low));
    return f32(f32(f32(f32(1 - smooth) * scaled) / factor) + f32(smooth * scaled));
  });
}

/** _compute_yarn_parameters. */
function yarn(r: Resolved): StaticRopeSpec {
  const dim = r.headDim;
  const base = r.theta;
  const original = integerField(r, "original_max_position_embeddings");
  // 5.x: an explicit null factor means max_position_embeddings / original (4.x requires the factor).
  const factor = r.params.factor === null ? maxPositions(r) / original : positive(r, "factor");
  const mscale = optionalNumber(r, "mscale");
  const mscaleAllDim = optionalNumber(r, "mscale_all_dim");
  const getMscale = (scale: number, m = 1) => (scale <= 1 ? 1.0 : 0.1 * m * Math.log(scale) + 1.0);
  let attentionFactor = optionalNumber(r, "attention_factor");
  if (attentionFactor === undefined) {
    // `if mscale and mscale_all_dim`: python truthiness, so 0 counts as unset.
    attentionFactor = mscale && mscaleAllDim ? getMscale(factor, mscale) / getMscale(factor, mscaleAllDim) : getMscale(factor);
  }
  if (attentionFactor < 0) throw new RopeConfigError(`${r.where}.attention_factor must not be negative, got ${attentionFactor}`);
  const betaFast = optionalNumber(r, "beta_fast") || 32; // `.get("beta_fast") or 32`
  const betaSlow = optionalNumber(r, "beta_slow") || 1;
  const truncateValue = r.params.truncate ?? true;
  if (typeof truncateValue !== "boolean") throw new RopeConfigError(`${r.where}.truncate must be a boolean, got ${JSON.stringify(truncateValue)}`);
  const correctionDim = (rotations: number) => (dim * Math.log(original / (rotations * 2 * Math.PI))) / (2 * Math.log(base));
  let low = correctionDim(betaFast);
  let high = correctionDim(betaSlow);
  if (truncateValue) {
    low = Math.floor(low);
    high = Math.ceil(high);
  }
  low = Math.max(low, 0);
  high = Math.min(high, dim - 1);
  if (low === high) high += 0.001; // linear_ramp_factor: "prevent singularity"
  const exponents = exponentsOf(dim);
  const invFreq = new Float32Array(dim / 2);
  for (let i = 0; i < dim / 2; i++) {
    const posFreq = pow32(base, exponents[i]!);
    const extrapolation = f32(1 / posFreq);
    const interpolation = f32(1 / f32(f32(factor) * posFreq));
    const ramp = Math.min(Math.max(f32(f32(i - f32(low)) / f32(high - low)), 0), 1);
    const extrapolationFactor = f32(1 - ramp);
    invFreq[i] = f32(f32(interpolation * f32(1 - extrapolationFactor)) + f32(extrapolation * extrapolationFactor));
  }
  return { kind: "static", type: "yarn", invFreq, attentionFactor };
}

function factorList(r: Resolved, key: string, dim: number): number[] {
  const v = r.params[key];
  if (!Array.isArray(v) || v.length !== dim / 2 || !v.every((x) => typeof x === "number" && Number.isFinite(x) && x > 0)) {
    throw new RopeConfigError(`${r.where}.${key} must be a list of ${dim / 2} positive numbers (head_dim / 2), got ${Array.isArray(v) ? `${v.length} values` : JSON.stringify(v)}`);
  }
  return v as number[];
}

/** _compute_longrope_parameters (5.x). */
function longrope(r: Resolved): LongRopeSpec {
  // transformers 4.57 differs here: it reads only a top-level original_max_position_embeddings (and then sets
  // factor = max_position_embeddings / original, whatever rope_scaling.factor says); without one it uses
  // max_position_embeddings and ignores rope_scaling.original_max_position_embeddings (and fails if factor is
  // also absent). 5.x, followed here, takes the top-level value, else rope_scaling's, else max_position_embeddings.
  const dim = r.headDim;
  const original = integerField(r, "original_max_position_embeddings");
  const shortFactor = factorList(r, "short_factor", dim);
  const longFactor = factorList(r, "long_factor", dim);
  const factor = r.params.factor === undefined || r.params.factor === null ? maxPositions(r) / original : positive(r, "factor");
  let attentionFactor = optionalNumber(r, "attention_factor");
  if (attentionFactor === undefined) attentionFactor = factor <= 1 ? 1.0 : Math.sqrt(1 + Math.log(factor) / Math.log(original));
  if (attentionFactor < 0) throw new RopeConfigError(`${r.where}.attention_factor must not be negative, got ${attentionFactor}`);
  const exponents = exponentsOf(dim);
  return {
    kind: "longrope",
    type: "longrope",
    shortInvFreq: invFreqFloat32(r.theta, exponents, shortFactor),
    longInvFreq: invFreqFloat32(r.theta, exponents, longFactor),
    originalMaxPositions: original,
    factor,
    attentionFactor,
  };
}

/** _compute_dynamic_ntk_parameters, at init (seq_len = max_position_embeddings: python floats). */
function dynamic(r: Resolved): DynamicRopeSpec {
  const dim = r.headDim;
  const factor = positive(r, "factor");
  const max = maxPositions(r);
  const ntkExponent = dim / (dim - 2);
  const exponents = exponentsOf(dim);
  // At init transformers evaluates the formula with seq_len = max_position_embeddings in python floats; the
  // result is rope_theta up to float64 rounding (then cast to float32 by the pow).
  const initBase = r.theta * ((factor * max) / max - (factor - 1)) ** ntkExponent;
  return { kind: "dynamic", type: "dynamic", invFreq: invFreqFloat32(initBase, exponents), maxPositions: max, base: r.theta, factor, ntkExponent, exponents, attentionFactor: 1 };
}

/**
 * The rotary embedding of a Llama-family config, as transformers computes it, for the graph builder. Throws
 * RopeConfigError (a RangeError) naming the field for an unknown rope type, a missing required key, a value
 * that cannot work, or partial_rotary_factor != 1.
 */
export function ropeSpec(config: RopeConfigFields): RopeSpec {
  const r = resolve(config);
  switch (r.type) {
    case "default":
    case "linear":
    case "llama3":
      return { kind: "static", type: r.type, invFreq: float32InvFreq(r), attentionFactor: 1 };
    case "yarn":
      return yarn(r);
    case "dynamic":
      return dynamic(r);
    case "longrope":
      return longrope(r);
  }
}

/**
 * Dynamic NTK frequencies of a run whose max(position_ids) + 1 is seqLen, in float32 steps as transformers'
 * torch ops (what the graph computes with ONNX float32 ops).
 */
export function dynamicInvFreq(spec: DynamicRopeSpec, seqLen: number): Float32Array {
  if (!Number.isInteger(seqLen) || seqLen < 1) throw new RangeError(`seqLen must be a positive integer, got ${seqLen}`);
  if (seqLen <= spec.maxPositions) return spec.invFreq;
  const a = f32(f32(spec.factor) * f32(seqLen));
  const b = f32(a / f32(spec.maxPositions));
  const c = f32(b - f32(spec.factor - 1));
  // torch's CPU pow of a float32 tensor by a python-float exponent computes in double: no rounding of the
  // exponent (dim / (dim - 2)) to float32.
  const newBase = f32(f32(spec.base) * f32(c ** spec.ntkExponent));
  return invFreqFloat32(newBase, spec.exponents);
}

/**
 * The frequencies a run uses, given seqLen = max(position_ids) + 1 over the run (per run, stateless: see the
 * header for where that equals transformers' stateful dynamic NTK).
 */
export function ropeInvFreqAt(spec: RopeSpec, seqLen: number): Float32Array {
  if (spec.kind === "static") return spec.invFreq;
  if (spec.kind === "dynamic") return dynamicInvFreq(spec, seqLen);
  return seqLen > spec.originalMaxPositions ? spec.longInvFreq : spec.shortInvFreq;
}

/**
 * Inverse frequencies (head_dim / 2 values) for moving cached keys, for the rope types whose frequencies do not
 * depend on the sequence: none ("default"), "linear", "llama3" and "yarn", exactly as ropeSpec gives them to the
 * graph. (yarn's attention factor scales cos and sin alike, so a cached key is m * R(p) k and turning it by
 * R(d) gives m * R(p + d) k: moving it is valid.) Null for dynamic and longrope (their frequencies change with
 * the run, so a cached key's rotation cannot be shifted by a delta) and for an invalid head_dim. Throws
 * RopeConfigError (a RangeError) for an unknown rope type or malformed scaling fields.
 */
export function ropeInvFreq(config: RopeConfigFields): Float32Array | null {
  const dim = config.head_dim;
  if (!Number.isInteger(dim) || dim <= 0 || dim % 2 !== 0) return null;
  const spec = ropeSpec(config);
  return spec.kind === "static" ? spec.invFreq : null;
}
