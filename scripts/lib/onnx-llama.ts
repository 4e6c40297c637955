// Writes a Llama-3.1-architecture decoder as an ONNX graph in the onnx-community / Optimum layout
// (inputs input_ids, attention_mask, position_ids, past_key_values.N.key/value, num_logits_to_keep;
// outputs logits, present.N.key/value), from a config and HF-named weights.
//
// Only default-domain ops at opset 17, so the same file runs on onnxruntime's wasm, webgpu and native
// CPU execution providers. The causal mask is built on KV-cache slot index (not on position_ids), so a
// cache with dropped slots keeps working while tokens keep their original positions.

import { createRequire } from "node:module";
import type { onnx as OnnxNamespace } from "onnx-proto";
import { ropeInvFreq } from "../../runtime/rope.ts";
import { toFloat16Array } from "./fp16.ts";

const { onnx } = createRequire(import.meta.url)("onnx-proto") as { onnx: typeof OnnxNamespace };
type TensorProto = OnnxNamespace.ITensorProto;
type NodeProto = OnnxNamespace.INodeProto;
type AttributeProto = OnnxNamespace.IAttributeProto;
type ValueInfoProto = OnnxNamespace.IValueInfoProto;

export interface Llama3RopeScaling {
  rope_type: "llama3";
  factor: number;
  low_freq_factor: number;
  high_freq_factor: number;
  original_max_position_embeddings: number;
}

/** The fields of a HF `config.json` for LlamaForCausalLM that this writer reads or ships. */
export interface LlamaConfig {
  architectures: ["LlamaForCausalLM"];
  model_type: "llama";
  vocab_size: number;
  hidden_size: number;
  intermediate_size: number;
  num_hidden_layers: number;
  num_attention_heads: number;
  num_key_value_heads: number;
  head_dim: number;
  hidden_act: "silu";
  rms_norm_eps: number;
  rope_theta: number;
  rope_scaling: Llama3RopeScaling | null;
  max_position_embeddings: number;
  tie_word_embeddings: boolean;
  attention_bias: false;
  mlp_bias: false;
  bos_token_id: number;
  eos_token_id: number | number[];
  torch_dtype: "float32" | "float16" | "bfloat16";
  use_cache: boolean;
}

/** The built-in model: Llama-3.1 shapes scaled down to hidden 64, 2 layers, with the full Llama-3 vocab. */
export const TINY_LLAMA_CONFIG: LlamaConfig = {
  architectures: ["LlamaForCausalLM"],
  model_type: "llama",
  vocab_size: 128256,
  hidden_size: 64,
  intermediate_size: 256,
  num_hidden_layers: 2,
  num_attention_heads: 4,
  num_key_value_heads: 2,
  head_dim: 32,
  hidden_act: "silu",
  rms_norm_eps: 1e-5,
  rope_theta: 500000,
  rope_scaling: {
    rope_type: "llama3",
    // Llama-3.1 ships 8 (8192 -> 131,072 positions); 128 stretches the same scheme to 1,048,576. The
    // low-frequency planes then turn by under about a radian across a million positions, which is what
    // lets the trained fixture match a needle at any distance.
    factor: 128.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192,
  },
  max_position_embeddings: 1048576,
  tie_word_embeddings: false,
  attention_bias: false,
  mlp_bias: false,
  bos_token_id: 128000,
  eos_token_id: [128001, 128008, 128009],
  torch_dtype: "float32",
  use_cache: true,
};

/** generation_config.json as Llama-3.1-Instruct ships it. */
export const LLAMA31_GENERATION_CONFIG = {
  bos_token_id: 128000,
  do_sample: true,
  eos_token_id: [128001, 128008, 128009],
  temperature: 0.6,
  top_p: 0.9,
} as const;

/** A weight in HF (PyTorch state_dict) layout: nn.Linear weights are [out_features, in_features]. */
export interface NamedTensor {
  dims: number[];
  data: Float32Array;
}

/** HF parameter name -> tensor, e.g. "model.layers.0.self_attn.q_proj.weight". */
export type LlamaWeights = Record<string, NamedTensor>;

export type WeightKind = "embedding" | "linear" | "norm";

export interface WeightSpec {
  name: string;
  /** HF layout. */
  dims: number[];
  kind: WeightKind;
  /** Input features of a linear layer (for init scales); hidden size otherwise. */
  fanIn: number;
}

/** Every parameter the graph needs, in a fixed order, with HF names and HF-layout shapes. */
export function llamaWeightSpecs(config: LlamaConfig): WeightSpec[] {
  const H = config.hidden_size;
  const I = config.intermediate_size;
  const q = config.num_attention_heads * config.head_dim;
  const kv = config.num_key_value_heads * config.head_dim;
  const specs: WeightSpec[] = [
    { name: "model.embed_tokens.weight", dims: [config.vocab_size, H], kind: "embedding", fanIn: H },
  ];
  const linear = (name: string, out: number, inp: number): WeightSpec => ({
    name,
    dims: [out, inp],
    kind: "linear",
    fanIn: inp,
  });
  for (let i = 0; i < config.num_hidden_layers; i++) {
    const p = `model.layers.${i}`;
    specs.push(
      { name: `${p}.input_layernorm.weight`, dims: [H], kind: "norm", fanIn: H },
      linear(`${p}.self_attn.q_proj.weight`, q, H),
      linear(`${p}.self_attn.k_proj.weight`, kv, H),
      linear(`${p}.self_attn.v_proj.weight`, kv, H),
      linear(`${p}.self_attn.o_proj.weight`, H, q),
      { name: `${p}.post_attention_layernorm.weight`, dims: [H], kind: "norm", fanIn: H },
      linear(`${p}.mlp.gate_proj.weight`, I, H),
      linear(`${p}.mlp.up_proj.weight`, I, H),
      linear(`${p}.mlp.down_proj.weight`, H, I),
    );
  }
  specs.push({ name: "model.norm.weight", dims: [H], kind: "norm", fanIn: H });
  if (!config.tie_word_embeddings) specs.push(linear("lm_head.weight", config.vocab_size, H));
  return specs;
}

/** RoPE inverse frequencies (head_dim / 2 values), llama3 scaling applied (runtime/rope.ts). */
export function llamaInvFreq(config: LlamaConfig): Float32Array {
  return ropeInvFreq({ head_dim: config.head_dim, rope_theta: config.rope_theta, rope_scaling: config.rope_scaling as unknown as Record<string, unknown> | null })!;
}

export type LlamaOnnxDtype = "fp32" | "fp16";

export interface LlamaOnnxOptions {
  /**
   * fp32: float32 weights inline, float32 KV and logits.
   * fp16: float16 weights in an external data file, float16 KV and logits (compute stays float32).
   */
  dtype: LlamaOnnxDtype;
  /** File name of the external data, relative to the .onnx file (fp16 only). */
  externalDataName?: string;
  /** Alignment of each tensor's offset in the external data file. */
  externalDataAlignment?: number;
  /**
   * present (default): the Optimum contract, present.N.* = Concat(past, new), what transformers.js and
   * other runtimes expect. inplace: the runtime owns the KV storage; the graph reads it as
   * cache.N.key/value [B, kvHeads, capacity, headDim] with slot_mask [B, capacity] (bool: which slots
   * hold a live token) and returns only the new tokens' new.N.key/value [B, kvHeads, S, headDim], so a
   * step moves O(new tokens) out of the graph and never concatenates, tiles or copies the cache. Its
   * scalar input rows_per_matmul (a divisor of G * S, G = heads per kv head) says how the query rows
   * of each kv head are batched against the cache (see the attention below). Two more outputs serve
   * KV compaction: slot_attention [B, capacity + S], the attention each cache slot and each new token
   * received in the run, summed over layers, heads and query rows; and query.N [B, heads, S, headDim],
   * layer N's queries after rotary (float32 in both variants).
   */
  kv?: "present" | "inplace";
}

export interface LlamaOnnxFiles {
  /** Serialized ModelProto. */
  model: Uint8Array;
  /** External data file contents (fp16 only). */
  externalData?: Uint8Array;
  externalDataName?: string;
}

const OPSET = 17;
const IR_VERSION = 8; // the IR version that goes with opset 17
const DT = onnx.TensorProto.DataType;
const AT = onnx.AttributeProto.AttributeType;
const INT64_MAX = 0x7fffffffffffffffn;
/** Additive mask value: large enough that exp() underflows to 0, small enough to never reach -inf. */
const MASK_VALUE = -1e9;

type AttrValue = number | number[] | { float: number };

function attribute(name: string, value: AttrValue): AttributeProto {
  if (typeof value === "number") return { name, type: AT.INT, i: value };
  if (Array.isArray(value)) return { name, type: AT.INTS, ints: value };
  return { name, type: AT.FLOAT, f: value.float };
}

function bytesOf(view: ArrayBufferView): Uint8Array {
  // Always little-endian on the platforms we run (x86, ARM); ONNX raw_data is little-endian.
  return new Uint8Array(view.buffer, view.byteOffset, view.byteLength);
}

function valueInfo(name: string, elemType: number, dims: (number | string)[]): ValueInfoProto {
  return {
    name,
    type: {
      tensorType: {
        elemType,
        shape: { dim: dims.map((d) => (typeof d === "number" ? { dimValue: d } : { dimParam: d })) },
      },
    },
  };
}

/** Transpose a row-major [rows, cols] matrix to [cols, rows]. */
function transpose2d(data: Float32Array, rows: number, cols: number): Float32Array {
  const out = new Float32Array(data.length);
  for (let r = 0; r < rows; r++) {
    const row = r * cols;
    for (let c = 0; c < cols; c++) out[c * rows + r] = data[row + c]!;
  }
  return out;
}

/** Collects nodes and initializers; every node output gets a deterministic, readable name. */
class GraphBuilder {
  readonly nodes: NodeProto[] = [];
  readonly initializers: TensorProto[] = [];
  private readonly constants = new Map<string, string>();
  private count = 0;

  op(opType: string, inputs: string[], attrs: Record<string, AttrValue> = {}, output?: string): string {
    const id = this.count++;
    const out = output ?? `/${opType}_${id}_output_0`;
    this.nodes.push({
      name: `/${opType}_${id}`,
      opType,
      input: inputs,
      output: [out],
      attribute: Object.entries(attrs).map(([k, v]) => attribute(k, v)),
    });
    return out;
  }

  /** An int64 constant initializer, shared by value. Pass dims [] for a scalar. */
  int64(values: readonly (number | bigint)[], dims: number[] = [values.length]): string {
    const key = `i64:${dims.join("x")}:${values.join(",")}`;
    const known = this.constants.get(key);
    if (known) return known;
    const name = `const_i64_${this.constants.size}`;
    const data = BigInt64Array.from(values, (v) => BigInt(v));
    this.initializers.push({ name, dims, dataType: DT.INT64, rawData: bytesOf(data) });
    this.constants.set(key, name);
    return name;
  }

  /** A float32 constant initializer, shared by value. Pass dims [] for a scalar. */
  float(values: readonly number[] | Float32Array, dims: number[] = [values.length]): string {
    const data = Float32Array.from(values);
    const key = `f32:${dims.join("x")}:${data.join(",")}`;
    const known = this.constants.get(key);
    if (known) return known;
    const name = `const_f32_${this.constants.size}`;
    this.initializers.push({ name, dims, dataType: DT.FLOAT, rawData: bytesOf(data) });
    this.constants.set(key, name);
    return name;
  }
}

/**
 * Writes the decoder graph for `config` with `weights` (HF names, HF layout). Linear weights are
 * stored pre-transposed ([in, out]) under their HF names; the embedding stays [vocab, hidden].
 * Output bytes depend only on the arguments.
 */
export function buildLlamaOnnx(config: LlamaConfig, weights: LlamaWeights, options: LlamaOnnxOptions): LlamaOnnxFiles {
  const fp16 = options.dtype === "fp16";
  const externalDataName = options.externalDataName ?? "model_fp16.onnx_data";
  const alignment = options.externalDataAlignment ?? 4096;
  const H = config.hidden_size;
  const NH = config.num_attention_heads;
  const KV = config.num_key_value_heads;
  const D = config.head_dim;
  const groups = NH / KV;
  if (!Number.isInteger(groups)) throw new Error("num_attention_heads must be a multiple of num_key_value_heads");
  if (D % 2 !== 0) throw new Error("head_dim must be even");
  const ioType = fp16 ? DT.FLOAT16 : DT.FLOAT;
  const inplace = options.kv === "inplace";

  const g = new GraphBuilder();

  // Weights: collected first, then written inline (fp32) or into the external data file (fp16).
  const weightInits: { name: string; dims: number[]; data: Float32Array }[] = [];
  for (const spec of llamaWeightSpecs(config)) {
    const w = weights[spec.name];
    if (!w) throw new Error(`missing weight ${spec.name}`);
    if (w.dims.length !== spec.dims.length || w.dims.some((d, i) => d !== spec.dims[i])) {
      throw new Error(`weight ${spec.name} has dims [${w.dims}], expected [${spec.dims}]`);
    }
    if (w.data.length !== spec.dims.reduce((a, b) => a * b, 1)) throw new Error(`weight ${spec.name}: wrong data length`);
    if (spec.kind === "linear") {
      const [out, inp] = spec.dims as [number, number];
      weightInits.push({ name: spec.name, dims: [inp, out], data: transpose2d(w.data, out, inp) });
    } else {
      weightInits.push({ name: spec.name, dims: spec.dims, data: w.data });
    }
  }
  if (config.tie_word_embeddings) {
    const emb = weights["model.embed_tokens.weight"]!;
    weightInits.push({ name: "lm_head.weight", dims: [H, config.vocab_size], data: transpose2d(emb.data, config.vocab_size, H) });
  }
  // A weight as a float32 value in the graph (fp16 weights are cast once; ORT folds the casts).
  const weight = (name: string): string => (fp16 ? g.op("Cast", [name], { to: DT.FLOAT }) : name);

  // ---- shapes and the attention mask, shared by all layers ----
  const zero = g.int64([0], []);
  const one = g.int64([1], []);
  const axis0 = g.int64([0]);
  const seqLen = g.op("Shape", ["input_ids"], { start: 1, end: 2 }); // [S]
  const queryIdx = g.op("Range", [zero, g.op("Squeeze", [seqLen, axis0]), one]); // [S]
  let mask = "";
  let pastBias = "";
  let newBias = "";
  let rowSplit = "";
  if (!inplace) {
    const totalLen = g.op("Shape", ["attention_mask"], { start: 1, end: 2 }); // [T]
    const pastLen = g.op("Sub", [totalLen, seqLen]); // [P] = T - S
    const slotIdx = g.op("Range", [zero, g.op("Squeeze", [totalLen, axis0]), one]); // [T]
    // Query row q may see key slot k iff k <= P + q (slot index, not position id) and the slot is unmasked.
    const lastVisible = g.op("Unsqueeze", [g.op("Add", [queryIdx, pastLen]), g.int64([1])]); // [S, 1]
    const future = g.op("Greater", [g.op("Unsqueeze", [slotIdx, axis0]), lastVisible]); // [S, T]
    const causal = g.op("Not", [future]);
    const slotKept = g.op("Unsqueeze", [g.op("Cast", ["attention_mask"], { to: DT.BOOL }), g.int64([1, 2])]); // [B,1,1,T]
    const allowed = g.op("And", [causal, slotKept]); // [B, 1, S, T]
    mask = g.op("Where", [allowed, g.float([0], []), g.float([MASK_VALUE], [])], {}, "/attention_mask_bias");
  } else {
    // Every new token sees every live cached slot (slot_mask) and the new tokens up to itself. Rows are
    // the grouped query rows g * S + s (see below), so the [S, S] causal bias is tiled G times.
    // Rows are then split into matmuls of rows_per_matmul rows each (see the attention below): [B, KV, R, M, *].
    pastBias = g.op("Unsqueeze", [g.op("Where", ["slot_mask", g.float([0], []), g.float([MASK_VALUE], [])]), g.int64([1, 2, 3])], {}, "/slot_mask_bias"); // [B,1,1,1,C]
    const future = g.op("Greater", [g.op("Unsqueeze", [queryIdx, axis0]), g.op("Unsqueeze", [queryIdx, g.int64([1])])]); // [S, S]
    const causalBias = g.op("Where", [future, g.float([MASK_VALUE], []), g.float([0], [])]);
    const tiled = g.op("Tile", [causalBias, g.int64([groups, 1])]); // [G*S, S]
    rowSplit = g.op("Reshape", ["rows_per_matmul", g.int64([1])]); // [M]
    newBias = g.op("Reshape", [tiled, g.op("Concat", [g.int64([-1]), rowSplit, seqLen], { axis: 0 })], {}, "/new_tokens_bias"); // [R, M, S]
  }

  // ---- rotary embedding: cos/sin of position_ids * inv_freq (rotate_half convention) ----
  const invFreq = g.float(llamaInvFreq(config), [D / 2]);
  const pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], { to: DT.FLOAT }), g.int64([2])]); // [B,S,1]
  const freqs = g.op("Mul", [pos, invFreq]); // [B, S, D/2]
  const emb = g.op("Concat", [freqs, freqs], { axis: -1 }); // [B, S, D]
  const cos = g.op("Unsqueeze", [g.op("Cos", [emb]), g.int64([1])], {}, "/rotary/cos"); // [B,1,S,D]
  const sin = g.op("Unsqueeze", [g.op("Sin", [emb]), g.int64([1])], {}, "/rotary/sin");
  const halfStart = g.int64([0]);
  const halfMid = g.int64([D / 2]);
  const halfEnd = g.int64([D]);
  const lastAxis = g.int64([3]);
  const applyRope = (x: string): string => {
    // x: [B, heads, S, D] -> x * cos + rotate_half(x) * sin, rotate_half(x) = concat(-x2, x1)
    const x1 = g.op("Slice", [x, halfStart, halfMid, lastAxis]);
    const x2 = g.op("Slice", [x, halfMid, halfEnd, lastAxis]);
    const rotated = g.op("Concat", [g.op("Neg", [x2]), x1], { axis: -1 });
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rotated, sin])]);
  };

  const eps = g.float([config.rms_norm_eps], []);
  const rmsNorm = (x: string, weightName: string): string => {
    const meanSquare = g.op("ReduceMean", [g.op("Mul", [x, x])], { axes: [-1], keepdims: 1 });
    const invRms = g.op("Reciprocal", [g.op("Sqrt", [g.op("Add", [meanSquare, eps])])]);
    return g.op("Mul", [g.op("Mul", [x, invRms]), weight(weightName)]);
  };

  const headsShape = (heads: number) => g.int64([0, 0, heads, D]); // [B, S, heads*D] -> [B, S, heads, D]
  const toHeads = [0, 2, 1, 3];
  const scale = g.float([1 / Math.sqrt(D)], []);
  const repeatKv = g.int64([1, 1, groups, 1, 1]);
  const kvFlatShape = g.int64([0, NH, -1, D]);
  const mergedShape = g.int64([0, 0, NH * D]);
  const axis2 = g.int64([2]);
  const groupedShape = g.int64([0, KV, -1, D]);

  // ---- decoder layers ----
  const inputs: ValueInfoProto[] = [
    valueInfo("input_ids", DT.INT64, ["batch_size", "sequence_length"]),
    inplace
      ? valueInfo("slot_mask", DT.BOOL, ["batch_size", "cache_capacity"])
      : valueInfo("attention_mask", DT.INT64, ["batch_size", "total_sequence_length"]),
    valueInfo("position_ids", DT.INT64, ["batch_size", "sequence_length"]),
    ...(inplace ? [valueInfo("rows_per_matmul", DT.INT64, [])] : []),
  ];
  const outputs: ValueInfoProto[] = [];
  const kvDims = (len: string) => ["batch_size", KV, len, D];

  let hidden = g.op("Gather", ["model.embed_tokens.weight", "input_ids"], { axis: 0 }); // [B, S, H]
  let slotAttention = "";
  if (fp16) hidden = g.op("Cast", [hidden], { to: DT.FLOAT });

  for (let i = 0; i < config.num_hidden_layers; i++) {
    const p = `model.layers.${i}`;
    const pastKey = inplace ? `cache.${i}.key` : `past_key_values.${i}.key`;
    const pastValue = inplace ? `cache.${i}.value` : `past_key_values.${i}.value`;
    const presentKey = inplace ? `new.${i}.key` : `present.${i}.key`;
    const presentValue = inplace ? `new.${i}.value` : `present.${i}.value`;
    inputs.push(valueInfo(pastKey, ioType, kvDims(inplace ? "cache_capacity" : "past_sequence_length")));
    inputs.push(valueInfo(pastValue, ioType, kvDims(inplace ? "cache_capacity" : "past_sequence_length")));
    outputs.push(valueInfo(presentKey, ioType, kvDims(inplace ? "sequence_length" : "total_sequence_length")));
    outputs.push(valueInfo(presentValue, ioType, kvDims(inplace ? "sequence_length" : "total_sequence_length")));

    // Self-attention.
    const x = rmsNorm(hidden, `${p}.input_layernorm.weight`);
    const project = (name: string, heads: number) =>
      g.op("Transpose", [g.op("Reshape", [g.op("MatMul", [x, weight(`${p}.self_attn.${name}.weight`)]), headsShape(heads)])], {
        perm: toHeads,
      }); // [B, heads, S, D]
    const q = applyRope(project("q_proj", NH));
    let k = applyRope(project("k_proj", KV)); // keys are cached after rotary
    let v = project("v_proj", KV);
    let context: string;
    if (inplace) {
      // Grouped-query attention without repeating the cache: query heads kv * G + g, as [B, KV, G * S, D]
      // rows, read kv head kv's slots directly. Scores against the cache and against the new tokens are
      // computed apart and joined (small: rows x slots), so the cache itself is never concatenated.
      // The G * S rows of kv head kv are multiplied in matmuls of rows_per_matmul (M) rows each, R = G * S / M
      // of them: [B, KV, R, M, D] against the cache as [B, KV, 1, C, D]. M = G * S (one matmul per kv head)
      // suits prefill and onnxruntime-web; M = 1 lets onnxruntime's native CPU kernels read the cache
      // without packing it first (its attention products 2-3x faster in a 32K-slot decode step). The
      // runtime picks M per run.
      const rowsShape = g.op("Concat", [g.int64([0, KV, -1]), rowSplit, g.int64([D])], { axis: 0 });
      const qg = g.op("Reshape", [g.op("Mul", [q, scale]), rowsShape]); // [B, KV, R, M, D]
      let cacheKeys = pastKey;
      let cacheValues = pastValue;
      if (fp16) {
        g.op("Cast", [k], { to: DT.FLOAT16 }, presentKey);
        g.op("Cast", [v], { to: DT.FLOAT16 }, presentValue);
        cacheKeys = g.op("Cast", [pastKey], { to: DT.FLOAT });
        cacheValues = g.op("Cast", [pastValue], { to: DT.FLOAT });
      } else {
        k = g.op("Identity", [k], {}, presentKey);
        v = g.op("Identity", [v], {}, presentValue);
      }
      const rowsAxis = g.int64([2]);
      const asRows = (t: string) => g.op("Unsqueeze", [t, rowsAxis]); // [B, KV, T, D] -> [B, KV, 1, T, D]
      const transposeLast = (t: string) => g.op("Transpose", [asRows(t)], { perm: [0, 1, 2, 4, 3] });
      const cacheScores = g.op("Add", [g.op("MatMul", [qg, transposeLast(cacheKeys)]), pastBias]); // [B, KV, R, M, C]
      const newScores = g.op("Add", [g.op("MatMul", [qg, transposeLast(k)]), newBias]); // [B, KV, R, M, S]
      // Softmax over [cache slots, new tokens] without joining the scores (at 32K slots a prefill chunk's
      // are tens of MB): onnxruntime's Softmax (vectorized, where a separate Exp is not) over the cache part,
      // whose sum of exp(score - max) is 1 / its largest probability, then the few new-token scores joined
      // in by their max and sum. Slots all masked (an empty cache) get weight exp(-1e9 - max) = 0.
      const lastAxes = g.int64([-1]);
      const cacheMax = g.op("ReduceMax", [cacheScores], { axes: [-1], keepdims: 1 }); // [B, KV, R, M, 1]
      const cacheProbs = g.op("Softmax", [cacheScores], { axis: -1 });
      const cacheSum = g.op("Reciprocal", [g.op("ReduceMax", [cacheProbs], { axes: [-1], keepdims: 1 })]);
      const rowMax = g.op("Max", [cacheMax, g.op("ReduceMax", [newScores], { axes: [-1], keepdims: 1 })]);
      const cacheWeight = g.op("Mul", [cacheSum, g.op("Exp", [g.op("Sub", [cacheMax, rowMax])])]);
      const newExp = g.op("Exp", [g.op("Sub", [newScores, rowMax])]); // [B, KV, R, M, S]
      const rowSum = g.op("Add", [cacheWeight, g.op("ReduceSum", [newExp, lastAxes], { keepdims: 1 })]);
      const weighted = g.op("Add", [
        g.op("Mul", [g.op("MatMul", [cacheProbs, asRows(cacheValues)]), cacheWeight]),
        g.op("MatMul", [newExp, asRows(v)]),
      ]);
      const grouped = g.op("Reshape", [g.op("Div", [weighted, rowSum]), groupedShape]); // [B, KV, G*S, D]
      // What compaction policies read: the attention each slot received in this run, summed over the query
      // rows and heads (a cache slot's probability is cacheProbs * cacheWeight / rowSum). The row sum is one
      // matmul per kv head ([1, M] x [M, C]) rather than an elementwise pass over the scores.
      const rowScale = g.op("Div", [cacheWeight, rowSum]); // [B, KV, R, M, 1]
      const cacheMass = g.op("ReduceSum", [g.op("MatMul", [g.op("Transpose", [rowScale], { perm: [0, 1, 2, 4, 3] }), cacheProbs]), g.int64([1, 2, 3])], { keepdims: 0 }); // [B, C]
      const newMass = g.op("ReduceSum", [g.op("Div", [newExp, rowSum]), g.int64([1, 2, 3])], { keepdims: 0 }); // [B, S]
      const layerMass = g.op("Concat", [cacheMass, newMass], { axis: 1 }); // [B, C + S]
      slotAttention = slotAttention ? g.op("Add", [slotAttention, layerMass]) : layerMass;
      g.op("Identity", [q], {}, `query.${i}`); // [B, NH, S, D] after rotary, for scoring recall blocks
      outputs.push(valueInfo(`query.${i}`, DT.FLOAT, ["batch_size", NH, "sequence_length", D]));
      context = g.op("Reshape", [g.op("Transpose", [g.op("Reshape", [grouped, kvFlatShape])], { perm: toHeads }), mergedShape]);
    } else {
      if (fp16) {
        k = g.op("Cast", [k], { to: DT.FLOAT16 });
        v = g.op("Cast", [v], { to: DT.FLOAT16 });
      }
      let keys = g.op("Concat", [pastKey, k], { axis: 2 }, presentKey); // [B, KV, T, D]
      let values = g.op("Concat", [pastValue, v], { axis: 2 }, presentValue);
      if (fp16) {
        keys = g.op("Cast", [keys], { to: DT.FLOAT });
        values = g.op("Cast", [values], { to: DT.FLOAT });
      }
      // GQA: query head h reads kv head floor(h / groups), as transformers' repeat_kv.
      const repeat = (t: string) => g.op("Reshape", [g.op("Tile", [g.op("Unsqueeze", [t, axis2]), repeatKv]), kvFlatShape]);
      const keysRep = repeat(keys); // [B, NH, T, D]
      const valuesRep = repeat(values);
      const scores = g.op("Add", [
        g.op("Mul", [g.op("MatMul", [q, g.op("Transpose", [keysRep], { perm: [0, 1, 3, 2] })]), scale]),
        mask,
      ]); // [B, NH, S, T]
      const probs = g.op("Softmax", [scores], { axis: -1 });
      context = g.op("Reshape", [g.op("Transpose", [g.op("MatMul", [probs, valuesRep])], { perm: toHeads }), mergedShape]);
    }
    hidden = g.op("Add", [hidden, g.op("MatMul", [context, weight(`${p}.self_attn.o_proj.weight`)])]);

    // SwiGLU MLP: down(silu(gate(x)) * up(x)).
    const y = rmsNorm(hidden, `${p}.post_attention_layernorm.weight`);
    const gate = g.op("MatMul", [y, weight(`${p}.mlp.gate_proj.weight`)]);
    const up = g.op("MatMul", [y, weight(`${p}.mlp.up_proj.weight`)]);
    const act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up]);
    hidden = g.op("Add", [hidden, g.op("MatMul", [act, weight(`${p}.mlp.down_proj.weight`)])]);
  }

  // Keep only the last num_logits_to_keep positions (0 keeps all: Slice from -0 = 0).
  inputs.push(valueInfo("num_logits_to_keep", DT.INT64, []));
  const keepFrom = g.op("Unsqueeze", [g.op("Neg", ["num_logits_to_keep"]), axis0]);
  const kept = g.op("Slice", [hidden, keepFrom, g.int64([INT64_MAX]), g.int64([1])]);
  const normed = rmsNorm(kept, "model.norm.weight");
  if (fp16) {
    g.op("Cast", [g.op("MatMul", [normed, weight("lm_head.weight")])], { to: DT.FLOAT16 }, "logits");
  } else {
    g.op("MatMul", [normed, weight("lm_head.weight")], {}, "logits");
  }
  outputs.unshift(valueInfo("logits", ioType, ["batch_size", "kept_length", config.vocab_size]));
  if (inplace) {
    g.op("Identity", [slotAttention], {}, "slot_attention");
    outputs.push(valueInfo("slot_attention", DT.FLOAT, ["batch_size", "cache_capacity_plus_sequence_length"]));
  }

  // Weight initializers.
  let externalData: Uint8Array | undefined;
  const weightTensors: TensorProto[] = [];
  if (!fp16) {
    for (const w of weightInits) {
      weightTensors.push({ name: w.name, dims: w.dims, dataType: DT.FLOAT, rawData: bytesOf(w.data) });
    }
  } else {
    const halves = weightInits.map((w) => toFloat16Array(w.data));
    let size = 0;
    const offsets = halves.map((h) => {
      const offset = Math.ceil(size / alignment) * alignment;
      size = offset + h.byteLength;
      return offset;
    });
    externalData = new Uint8Array(size);
    weightInits.forEach((w, j) => {
      const h = halves[j]!;
      externalData!.set(bytesOf(h), offsets[j]!);
      weightTensors.push({
        name: w.name,
        dims: w.dims,
        dataType: DT.FLOAT16,
        dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
        externalData: [
          { key: "location", value: externalDataName },
          { key: "offset", value: String(offsets[j]) },
          { key: "length", value: String(h.byteLength) },
        ],
      });
    });
  }

  const model: OnnxNamespace.IModelProto = {
    irVersion: IR_VERSION,
    producerName: "ultralong-serve scripts/build-model.ts",
    opsetImport: [{ domain: "", version: OPSET }],
    graph: {
      name: "main_graph",
      node: g.nodes,
      initializer: [...weightTensors, ...g.initializers],
      input: inputs,
      output: outputs,
    },
  };
  const bytes = onnx.ModelProto.encode(model).finish();
  return fp16 ? { model: bytes, externalData, externalDataName } : { model: bytes };
}
