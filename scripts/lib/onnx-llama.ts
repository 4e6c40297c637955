// Writes a Llama-3.1-architecture decoder as an ONNX graph in the onnx-community / Optimum layout
// (inputs input_ids, attention_mask, position_ids, past_key_values.N.key/value, num_logits_to_keep;
// outputs logits, present.N.key/value), from a config and HF-named weights.
//
// Only default-domain ops at opset 17, so the same file runs on onnxruntime's wasm, webgpu and native
// CPU execution providers. The causal mask is built on KV-cache slot index (not on position_ids), so a
// cache with dropped slots keeps working while tokens keep their original positions.

import { createRequire } from "node:module";
import type { onnx as OnnxNamespace } from "onnx-proto";
import { ropeInvFreq, ropeSpec, type RopeConfigFields } from "../../runtime/rope.ts";
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
  /** llama3 for the built-in model; an imported checkpoint may declare any type runtime/rope.ts knows. */
  rope_scaling: Llama3RopeScaling | Record<string, unknown> | null;
  max_position_embeddings: number;
  tie_word_embeddings: boolean;
  attention_bias: false;
  mlp_bias: false;
  bos_token_id: number;
  eos_token_id: number | number[];
  torch_dtype: "float32" | "float16" | "bfloat16";
  partial_rotary_factor?: number;
  /** transformers 5.x's name for rope_scaling (may also hold rope_theta). */
  rope_parameters?: Record<string, unknown> | null;
  /** Top level in some configs (longrope, yarn); transformers reads it before rope_scaling's own. */
  original_max_position_embeddings?: number;
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

/**
 * Weight formats, named as transformers.js names its files (model.onnx, model_fp16.onnx, model_q4.onnx,
 * model_q4f16.onnx, model_int8.onnx). Compute is float32 in every one of them (ORT's CPU kernels have no
 * float16 MatMul on x86); they differ in what is stored and in the KV / logits type:
 *
 * | dtype | linear weights                       | embedding | norms | KV and logits |
 * | fp32  | float32                              | float32   | fp32  | float32       |
 * | fp16  | float16 (cast to float32 at load)    | float16   | fp16  | float16       |
 * | q4    | 4-bit MatMulNBits, block 32 (uint8 zero points, float32 scales) | float16 | fp32 | float32 |
 * | q4f16 | as q4                                | float16   | fp32  | float16       |
 * | int8  | 8-bit MatMulNBits, block 32          | float16   | fp32  | float32       |
 *
 * The float16 embedding is gathered and then cast, so only the looked-up rows are widened.
 */
export type LlamaOnnxDtype = "fp32" | "fp16" | "q4" | "q4f16" | "int8";
export const LLAMA_ONNX_DTYPES: readonly LlamaOnnxDtype[] = ["fp32", "fp16", "q4", "q4f16", "int8"];

/** Block size of the weight-only quantized formats (as onnxruntime's and transformers.js' q4 exports use). */
export const QUANT_BLOCK = 32;

interface DtypeFormat {
  /** KV cache and logits in float16. */
  io16: boolean;
  linear: "f32" | "f16" | 4 | 8;
  embedding: "f32" | "f16";
  norm: "f32" | "f16";
}

const FORMATS: Record<LlamaOnnxDtype, DtypeFormat> = {
  fp32: { io16: false, linear: "f32", embedding: "f32", norm: "f32" },
  fp16: { io16: true, linear: "f16", embedding: "f16", norm: "f16" },
  q4: { io16: false, linear: 4, embedding: "f16", norm: "f32" },
  q4f16: { io16: true, linear: 4, embedding: "f16", norm: "f32" },
  int8: { io16: false, linear: 8, embedding: "f16", norm: "f32" },
};

export interface LlamaOnnxOptions {
  dtype: LlamaOnnxDtype;
  /**
   * File name of the external data, relative to the .onnx file. fp32 weights are inline by default
   * (small models only: a protobuf holds at most 2 GiB); every other dtype, and fp32 when this is set,
   * stores them in this file.
   */
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
  /** External data file contents (every dtype but inline fp32). */
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

  op(opType: string, inputs: string[], attrs: Record<string, AttrValue> = {}, output?: string, domain?: string): string {
    const id = this.count++;
    const out = output ?? `/${opType}_${id}_output_0`;
    this.nodes.push({
      name: `/${opType}_${id}`,
      opType,
      ...(domain ? { domain } : {}),
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

  /** A float64 scalar constant initializer. */
  double(value: number): string {
    const key = `f64:${value}`;
    const known = this.constants.get(key);
    if (known) return known;
    const name = `const_f64_${this.constants.size}`;
    this.initializers.push({ name, dims: [], dataType: DT.DOUBLE, rawData: bytesOf(Float64Array.of(value)) });
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

// ---- weights: a layout computed from the config alone, then filled a run of rows at a time ----

/** One initializer of the weight data: where its bytes are in the data file (or inline buffer). */
export interface WeightTensor {
  name: string;
  dims: number[];
  dataType: number;
  offset: number;
  byteLength: number;
}

/** How one HF weight is stored. */
interface StoredWeight {
  spec: WeightSpec;
  /** The HF tensor the rows come from (lm_head of a tied model reads the embedding). */
  source: string;
  format: "f32" | "f16" | 4 | 8;
  /** Linear weights stored as float are transposed to [in, out] (MatMul's B); quantized ones stay [out, in]. */
  transpose: boolean;
  tensors: WeightTensor[];
}

export interface LlamaWeightLayout {
  dtype: LlamaOnnxDtype;
  stored: StoredWeight[];
  /** Every initializer, in file order. */
  tensors: WeightTensor[];
  byteLength: number;
}

/** Bytes of one row of N-bit blocks, its scales and its zero points, for `k` input features. */
function quantRow(k: number, bits: 4 | 8) {
  const blocks = Math.ceil(k / QUANT_BLOCK);
  const blob = (QUANT_BLOCK * bits) / 8;
  return { blocks, blob, zeroBytes: bits === 4 ? Math.ceil(blocks / 2) : blocks };
}

/** Where every weight of `config` goes for `dtype`, offsets aligned to `alignment`. Needs no weights. */
export function layoutLlamaWeights(config: LlamaConfig, dtype: LlamaOnnxDtype, alignment = 4096): LlamaWeightLayout {
  const f = FORMATS[dtype];
  if (!f) throw new Error(`unknown dtype ${dtype} (supported: ${LLAMA_ONNX_DTYPES.join(", ")})`);
  const specs = llamaWeightSpecs(config);
  if (config.tie_word_embeddings) specs.push({ name: "lm_head.weight", dims: [config.vocab_size, config.hidden_size], kind: "linear", fanIn: config.hidden_size });
  let size = 0;
  const tensors: WeightTensor[] = [];
  const place = (name: string, dims: number[], dataType: number, byteLength: number): WeightTensor => {
    const offset = Math.ceil(size / alignment) * alignment;
    size = offset + byteLength;
    const t = { name, dims, dataType, offset, byteLength };
    tensors.push(t);
    return t;
  };
  const stored = specs.map((spec): StoredWeight => {
    const source = spec.name === "lm_head.weight" && config.tie_word_embeddings ? "model.embed_tokens.weight" : spec.name;
    const count = spec.dims.reduce((a, b) => a * b, 1);
    const format = spec.kind === "linear" ? f.linear : spec.kind === "embedding" ? f.embedding : f.norm;
    if (format === "f32" || format === "f16") {
      const transpose = spec.kind === "linear";
      const dims = transpose ? [spec.dims[1]!, spec.dims[0]!] : spec.dims;
      const t = place(spec.name, dims, format === "f32" ? DT.FLOAT : DT.FLOAT16, count * (format === "f32" ? 4 : 2));
      return { spec, source, format, transpose, tensors: [t] };
    }
    const [n, k] = spec.dims as [number, number];
    const { blocks, blob, zeroBytes } = quantRow(k, format);
    return {
      spec,
      source,
      format,
      transpose: false,
      tensors: [
        place(`${spec.name}.q${format}`, [n, blocks, blob], DT.UINT8, n * blocks * blob),
        place(`${spec.name}.scales`, [n * blocks], DT.FLOAT, n * blocks * 4),
        place(`${spec.name}.zero_points`, [n * zeroBytes], DT.UINT8, n * zeroBytes),
      ],
    };
  });
  return { dtype, stored, tensors, byteLength: size };
}

/**
 * Asymmetric N-bit quantization of `rows` rows of `k` values, per block of 32 along k, as onnxruntime's
 * MatMulNBits reads it: value = (q - zero_point) * scale, q and zero_point in [0, 2^bits). A block's
 * range always includes 0, so zero is exact; the last block of a row is padded with zeros.
 */
export function quantizeRows(values: Float32Array, rows: number, k: number, bits: 4 | 8): { q: Uint8Array; scales: Float32Array; zeros: Uint8Array } {
  const { blocks, blob, zeroBytes } = quantRow(k, bits);
  const maxQ = (1 << bits) - 1;
  const q = new Uint8Array(rows * blocks * blob);
  const scales = new Float32Array(rows * blocks);
  const zeros = new Uint8Array(rows * zeroBytes);
  for (let r = 0; r < rows; r++) {
    const row = r * k;
    for (let b = 0; b < blocks; b++) {
      const start = b * QUANT_BLOCK;
      const end = Math.min(start + QUANT_BLOCK, k);
      let lo = 0;
      let hi = 0;
      for (let i = start; i < end; i++) {
        const v = values[row + i]!;
        if (v < lo) lo = v;
        if (v > hi) hi = v;
      }
      const scale = hi > lo ? (hi - lo) / maxQ : 1;
      const zp = Math.min(maxQ, Math.max(0, Math.round(-lo / scale)));
      const inv = 1 / scale;
      scales[r * blocks + b] = scale;
      if (bits === 4) zeros[r * zeroBytes + (b >> 1)]! |= zp << ((b & 1) * 4);
      else zeros[r * zeroBytes + b] = zp;
      const base = (r * blocks + b) * blob;
      for (let i = start; i < start + QUANT_BLOCK; i++) {
        const v = i < end ? values[row + i]! : 0;
        const x = Math.min(maxQ, Math.max(0, Math.round(v * inv) + zp));
        const j = i - start;
        if (bits === 4) q[base + (j >> 1)]! |= x << ((j & 1) * 4);
        else q[base + j] = x;
      }
    }
  }
  return { q, scales, zeros };
}

/** The values MatMulNBits computes with for quantizeRows' output: (q - zero_point) * scale, [rows, k]. */
export function dequantizeRows(quant: { q: Uint8Array; scales: Float32Array; zeros: Uint8Array }, rows: number, k: number, bits: 4 | 8): Float32Array {
  const { blocks, blob, zeroBytes } = quantRow(k, bits);
  const out = new Float32Array(rows * k);
  for (let r = 0; r < rows; r++) {
    for (let i = 0; i < k; i++) {
      const b = Math.floor(i / QUANT_BLOCK);
      const j = i % QUANT_BLOCK;
      const byte = quant.q[(r * blocks + b) * blob + (bits === 4 ? j >> 1 : j)]!;
      const x = bits === 4 ? (byte >> ((j & 1) * 4)) & 15 : byte;
      const zb = quant.zeros[r * zeroBytes + (bits === 4 ? b >> 1 : b)]!;
      const zp = bits === 4 ? (zb >> ((b & 1) * 4)) & 15 : zb;
      out[r * k + i] = (x - zp) * quant.scales[r * blocks + b]!;
    }
  }
  return out;
}

/** HF-layout weights read a run of rows at a time (rows of [dims[0], rest]; a 1-D tensor's rows are its values). */
export interface WeightSource {
  dims(name: string): number[];
  rows(name: string, r0: number, r1: number): Float32Array;
}

/** A WeightSource over weights in memory. */
export function memoryWeightSource(weights: LlamaWeights): WeightSource {
  const get = (name: string) => {
    const w = weights[name];
    if (!w) throw new Error(`missing weight ${name}`);
    return w;
  };
  return {
    dims: (name) => get(name).dims,
    rows(name, r0, r1) {
      const w = get(name);
      const cols = w.dims.length > 1 ? w.data.length / w.dims[0]! : 1;
      return w.data.subarray(r0 * cols, r1 * cols);
    },
  };
}

/** Where weight bytes go: a buffer, or a file written at offsets. */
export interface WeightSink {
  write(offset: number, bytes: Uint8Array): void;
}

export interface WriteProgress {
  weight: string;
  weightsDone: number;
  weightsTotal: number;
  bytesWritten: number;
  bytesTotal: number;
  /** Source values converted so far and in all (the work: what an ETA should be based on). */
  valuesDone: number;
  valuesTotal: number;
}

/** Rows handled at once: about this many float32 bytes of source, so memory stays far below a large tensor. */
const CHUNK_BYTES = 64 * 2 ** 20;

/**
 * Fills `layout` from `source` into `sink`, one weight and one run of rows at a time: the memory used is a
 * few chunks of CHUNK_BYTES, whatever the size of the model. Checks every weight's shape first.
 */
export function writeLlamaWeights(layout: LlamaWeightLayout, source: WeightSource, sink: WeightSink, onProgress?: (p: WriteProgress) => void): void {
  for (const s of layout.stored) {
    const dims = source.dims(s.source);
    const want = s.source === s.spec.name ? s.spec.dims : [s.spec.dims[0]!, s.spec.dims[1]!];
    if (dims.length !== want.length || dims.some((d, i) => d !== want[i])) {
      throw new Error(`weight ${s.source} has shape [${dims}], expected [${want}]`);
    }
  }
  let bytesWritten = 0;
  let valuesDone = 0;
  const valuesTotal = layout.stored.reduce((a, s) => a + s.spec.dims.reduce((x, y) => x * y, 1), 0);
  layout.stored.forEach((s, index) => {
    const rows = s.spec.dims[0]!;
    const cols = s.spec.dims.length > 1 ? s.spec.dims[1]! : 1;
    const step = Math.max(1, Math.floor(CHUNK_BYTES / (cols * 4)));
    for (let r0 = 0; r0 < rows; r0 += step) {
      const r1 = Math.min(rows, r0 + step);
      const values = source.rows(s.source, r0, r1);
      if (s.format === 4 || s.format === 8) {
        const [qt, st, zt] = s.tensors as [WeightTensor, WeightTensor, WeightTensor];
        const { q, scales, zeros } = quantizeRows(values, r1 - r0, cols, s.format);
        sink.write(qt.offset + r0 * (qt.byteLength / rows), q);
        sink.write(st.offset + r0 * (st.byteLength / rows), bytesOf(scales));
        sink.write(zt.offset + r0 * (zt.byteLength / rows), zeros);
        bytesWritten += q.byteLength + scales.byteLength + zeros.byteLength;
        continue;
      }
      const t = s.tensors[0]!;
      const width = s.format === "f32" ? 4 : 2;
      const encode = (v: Float32Array): Uint8Array => (s.format === "f32" ? bytesOf(v) : bytesOf(toFloat16Array(v)));
      if (!s.transpose) {
        sink.write(t.offset + r0 * cols * width, encode(values));
      } else {
        // Stored [in, out]: this run of `out` rows is a column block; write it row by row of the result.
        const block = encode(transpose2d(values, r1 - r0, cols)); // [cols, r1 - r0]
        const run = (r1 - r0) * width;
        if (r0 === 0 && r1 === rows) sink.write(t.offset, block);
        else for (let c = 0; c < cols; c++) sink.write(t.offset + (c * rows + r0) * width, block.subarray(c * run, (c + 1) * run));
      }
      bytesWritten += (r1 - r0) * cols * width;
    }
    valuesDone += rows * cols;
    onProgress?.({ weight: s.spec.name, weightsDone: index + 1, weightsTotal: layout.stored.length, bytesWritten, bytesTotal: layout.byteLength, valuesDone, valuesTotal });
  });
}

/** A WeightSink over one buffer of the layout's size. */
export function memoryWeightSink(layout: LlamaWeightLayout): WeightSink & { data: Uint8Array } {
  const data = new Uint8Array(layout.byteLength);
  return { data, write: (offset, bytes) => data.set(bytes, offset) };
}

/**
 * Writes the decoder graph for `config` with `weights` (HF names, HF layout), weights and graph in memory:
 * the built-in builder's path. Float linear weights are stored pre-transposed ([in, out]) under their HF
 * names; the embedding stays [vocab, hidden]. Output bytes depend only on the arguments.
 */
export function buildLlamaOnnx(config: LlamaConfig, weights: LlamaWeights, options: LlamaOnnxOptions): LlamaOnnxFiles {
  const external = options.dtype === "fp32" && !options.externalDataName ? null : (options.externalDataName ?? defaultExternalDataName(options.dtype));
  const layout = layoutLlamaWeights(config, options.dtype, external ? (options.externalDataAlignment ?? 4096) : 1);
  const sink = memoryWeightSink(layout);
  writeLlamaWeights(layout, memoryWeightSource(weights), sink);
  const model = buildLlamaGraph(config, layout, { kv: options.kv, weights: external ? { external } : { inline: sink.data } });
  return external ? { model, externalData: sink.data, externalDataName: external } : { model };
}

/** The external data file's name for a dtype, as transformers.js names them (model_fp16.onnx_data, ...). */
export const defaultExternalDataName = (dtype: LlamaOnnxDtype): string => (dtype === "fp32" ? "model.onnx_data" : `model_${dtype}.onnx_data`);

export interface LlamaGraphOptions {
  kv?: "present" | "inplace";
  /**
   * MatMulNBits' accuracy_level for q4 / int8 weights: 0 (default) multiplies float32 activations by the
   * dequantized weights; 4 quantizes the activations to int8 per block and uses integer dot products (as
   * llama.cpp's q4_0 x q8_0), about twice as fast on x86 CPUs (measured: 8B q4 decode 0.93 -> 1.8 tok/s on 2
   * cores), with a small extra error. Backends without int8 kernels fall back to float32.
   */
  accuracyLevel?: 0 | 1 | 2 | 3 | 4;
  /** The layout's bytes inline in the model, or the name of the external data file that holds them. */
  weights: { inline: Uint8Array } | { external: string };
}

/** The decoder graph over weights already laid out by layoutLlamaWeights (and written by writeLlamaWeights). */
export function buildLlamaGraph(config: LlamaConfig, layout: LlamaWeightLayout, options: LlamaGraphOptions): Uint8Array {
  const format = FORMATS[layout.dtype];
  const io16 = format.io16;
  const H = config.hidden_size;
  const NH = config.num_attention_heads;
  const KV = config.num_key_value_heads;
  const D = config.head_dim;
  const groups = NH / KV;
  if (!Number.isInteger(groups)) throw new Error("num_attention_heads must be a multiple of num_key_value_heads");
  if (D % 2 !== 0) throw new Error("head_dim must be even");
  const ioType = io16 ? DT.FLOAT16 : DT.FLOAT;
  const inplace = options.kv === "inplace";

  const g = new GraphBuilder();
  const stored = new Map(layout.stored.map((s) => [s.spec.name, s]));
  const storedAs = (name: string): StoredWeight => {
    const s = stored.get(name);
    if (!s) throw new Error(`weight ${name} is not in the layout`);
    return s;
  };
  // A float weight as a float32 value in the graph (float16 weights are cast once; ORT folds the casts).
  const weight = (name: string): string => (storedAs(name).format === "f16" ? g.op("Cast", [name], { to: DT.FLOAT }) : name);
  let quantized = false;
  // x @ W^T for HF linear weight `name` ([out, in]): MatMul with the stored [in, out], or MatMulNBits.
  const linear = (x: string, name: string, output?: string): string => {
    const s = storedAs(name);
    if (s.format !== 4 && s.format !== 8) return g.op("MatMul", [x, weight(name)], {}, output);
    quantized = true;
    const [n, k] = s.spec.dims as [number, number];
    const [q, scales, zeros] = s.tensors.map((t) => t.name) as [string, string, string];
    const attrs: Record<string, AttrValue> = { K: k, N: n, bits: s.format, block_size: QUANT_BLOCK };
    if (options.accuracyLevel) attrs.accuracy_level = options.accuracyLevel;
    return g.op("MatMulNBits", [x, q, scales, zeros], attrs, output, "com.microsoft");
  };

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

  // ---- rotary embedding: cos/sin of position_ids * inv_freq (rotate_half convention), as transformers'
  // LlamaRotaryEmbedding computes it for the config's rope type (runtime/rope.ts) ----
  const rope = ropeSpec(config as unknown as RopeConfigFields);
  let invFreq: string;
  if (rope.kind === "static") {
    invFreq = g.float(rope.invFreq, [D / 2]);
  } else {
    // dynamic and longrope pick their frequencies per run from seq_len = max(position_ids) + 1.
    const runLength = g.op("Add", [g.op("ReduceMax", ["position_ids"], { keepdims: 0 }), one]); // int64 scalar
    if (rope.kind === "longrope") {
      const long = g.op("Greater", [runLength, g.int64([rope.originalMaxPositions], [])]);
      invFreq = g.op("Where", [long, g.float(rope.longInvFreq, [D / 2]), g.float(rope.shortInvFreq, [D / 2])]);
    } else {
      // c = factor * seq_len / max_positions - (factor - 1); base' = base * c ** (dim / (dim - 2)) (the power in
      // double, as torch evaluates a float32 tensor to a python-float power); inv_freq = 1 / base' ** (2i / dim).
      const seqLenF = g.op("Cast", [runLength], { to: DT.FLOAT });
      const c = g.op("Sub", [g.op("Div", [g.op("Mul", [g.float([rope.factor], []), seqLenF]), g.float([rope.maxPositions], [])]), g.float([rope.factor - 1], [])]);
      const powered = g.op("Cast", [g.op("Pow", [g.op("Cast", [c], { to: DT.DOUBLE }), g.double(rope.ntkExponent)])], { to: DT.FLOAT });
      const base = g.op("Mul", [g.float([rope.base], []), powered]);
      const grownFreq = g.op("Reciprocal", [g.op("Pow", [base, g.float(rope.exponents, [D / 2])])]);
      const grown = g.op("Greater", [runLength, g.int64([rope.maxPositions], [])]);
      invFreq = g.op("Where", [grown, grownFreq, g.float(rope.invFreq, [D / 2])]);
    }
  }
  const pos = g.op("Unsqueeze", [g.op("Cast", ["position_ids"], { to: DT.FLOAT }), g.int64([2])]); // [B,S,1]
  const freqs = g.op("Mul", [pos, invFreq]); // [B, S, D/2]
  const emb = g.op("Concat", [freqs, freqs], { axis: -1 }); // [B, S, D]
  // yarn and longrope scale cos and sin (and so q and k) by the attention factor.
  const attentionFactor = rope.attentionFactor !== 1 ? g.float([rope.attentionFactor], []) : null;
  const scaled = (x: string) => (attentionFactor ? g.op("Mul", [x, attentionFactor]) : x);
  const cos = g.op("Unsqueeze", [scaled(g.op("Cos", [emb])), g.int64([1])], {}, "/rotary/cos"); // [B,1,S,D]
  const sin = g.op("Unsqueeze", [scaled(g.op("Sin", [emb])), g.int64([1])], {}, "/rotary/sin");
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
  if (storedAs("model.embed_tokens.weight").format === "f16") hidden = g.op("Cast", [hidden], { to: DT.FLOAT });

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
      g.op("Transpose", [g.op("Reshape", [linear(x, `${p}.self_attn.${name}.weight`), headsShape(heads)])], {
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
      if (io16) {
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
      if (io16) {
        k = g.op("Cast", [k], { to: DT.FLOAT16 });
        v = g.op("Cast", [v], { to: DT.FLOAT16 });
      }
      let keys = g.op("Concat", [pastKey, k], { axis: 2 }, presentKey); // [B, KV, T, D]
      let values = g.op("Concat", [pastValue, v], { axis: 2 }, presentValue);
      if (io16) {
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
    hidden = g.op("Add", [hidden, linear(context, `${p}.self_attn.o_proj.weight`)]);

    // SwiGLU MLP: down(silu(gate(x)) * up(x)).
    const y = rmsNorm(hidden, `${p}.post_attention_layernorm.weight`);
    const gate = linear(y, `${p}.mlp.gate_proj.weight`);
    const up = linear(y, `${p}.mlp.up_proj.weight`);
    const act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up]);
    hidden = g.op("Add", [hidden, linear(act, `${p}.mlp.down_proj.weight`)]);
  }

  // Keep only the last num_logits_to_keep positions (0 keeps all: Slice from -0 = 0).
  inputs.push(valueInfo("num_logits_to_keep", DT.INT64, []));
  const keepFrom = g.op("Unsqueeze", [g.op("Neg", ["num_logits_to_keep"]), axis0]);
  const kept = g.op("Slice", [hidden, keepFrom, g.int64([INT64_MAX]), g.int64([1])]);
  const normed = rmsNorm(kept, "model.norm.weight");
  if (io16) {
    g.op("Cast", [linear(normed, "lm_head.weight")], { to: DT.FLOAT16 }, "logits");
  } else {
    linear(normed, "lm_head.weight", "logits");
  }
  outputs.unshift(valueInfo("logits", ioType, ["batch_size", "kept_length", config.vocab_size]));
  if (inplace) {
    g.op("Identity", [slotAttention], {}, "slot_attention");
    outputs.push(valueInfo("slot_attention", DT.FLOAT, ["batch_size", "cache_capacity_plus_sequence_length"]));
  }

  // Weight initializers: inline bytes, or references into the external data file.
  const weightTensors: TensorProto[] = layout.tensors.map((t) =>
    "inline" in options.weights
      ? { name: t.name, dims: t.dims, dataType: t.dataType, rawData: options.weights.inline.subarray(t.offset, t.offset + t.byteLength) }
      : {
          name: t.name,
          dims: t.dims,
          dataType: t.dataType,
          dataLocation: onnx.TensorProto.DataLocation.EXTERNAL,
          externalData: [
            { key: "location", value: options.weights.external },
            { key: "offset", value: String(t.offset) },
            { key: "length", value: String(t.byteLength) },
          ],
        },
  );

  const model: OnnxNamespace.IModelProto = {
    irVersion: IR_VERSION,
    producerName: "ultralong-serve scripts/build-model.ts",
    opsetImport: [{ domain: "", version: OPSET }, ...(quantized ? [{ domain: "com.microsoft", version: 1 }] : [])],
    graph: {
      name: "main_graph",
      node: g.nodes,
      initializer: [...weightTensors, ...g.initializers],
      input: inputs,
      output: outputs,
    },
  };
  return onnx.ModelProto.encode(model).finish();
}
