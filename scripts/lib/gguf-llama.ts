/**
 * The built-in model as a llama.cpp GGUF file, from the same weights and tokenizer the ONNX builder uses
 * (fixtures/fixture-model.safetensors via loadFixture, tokenizer.json from the tokenizer package), so the
 * benchmark's llama.cpp peer runs exactly our model. What llama.cpp needs, as its HF converter
 * (convert_hf_to_gguf.py, LlamaModel) writes it:
 *   - Q and K projection rows permuted from HF's rotate-half RoPE layout to llama.cpp's interleaved pairs;
 *   - llama3 rope scaling as a `rope_freqs.weight` tensor of per-frequency divisors (no scaling keys);
 *   - `llama.attention.key_length` / `value_length` = head_dim (ours is not hidden / heads);
 *   - the tokenizer as `gpt2` BPE with the `llama-bpe` pre-tokenizer, tokens and merges from tokenizer.json.
 * Written atomically next to a stamp (hash of the inputs and this code), so `--if-missing` rebuilds only when
 * something it depends on changed; the bytes are deterministic.
 */
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { mkdir, open, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { encodeGguf, GGML_TYPE, type GgufTensor, type GgufValue } from "./gguf.ts";
import { FIXTURE_WEIGHTS_FILE, loadFixture } from "./fixture-weights.ts";
import { float32ToFloat16Bits } from "./fp16.ts";
import { tokenizerPath } from "./model-folder.ts";
import type { Llama3RopeScaling, LlamaConfig, LlamaWeights } from "./onnx-llama.ts";

export type GgufDtype = "f32" | "f16";

/** Where the benchmark and tests put the built-in model's GGUF (gitignored, built on demand). */
export const DEFAULT_GGUF_PATH = fileURLToPath(new URL("../../bench-out/gguf/builtin-f32.gguf", import.meta.url));

/** llama_token_type (gguf-py TokenType). */
const TOKEN_NORMAL = 1;
const TOKEN_CONTROL = 3;
const TOKEN_USER_DEFINED = 4;
const TOKEN_UNUSED = 5;

interface TokenizerJson {
  added_tokens: { id: number; content: string; special: boolean }[];
  model: { type: string; vocab: Record<string, number>; merges: (string | [string, string])[] };
}

/** Token strings, types and merges as convert_hf_to_gguf's get_vocab_base / _set_vocab_gpt2 produce them. */
export function ggufVocab(tokenizer: TokenizerJson, vocabSize: number): { tokens: string[]; types: Int32Array; merges: string[] } {
  if (tokenizer.model.type !== "BPE") throw new Error(`tokenizer model ${tokenizer.model.type} is not BPE`);
  const tokens = new Array<string>(vocabSize);
  const types = new Int32Array(vocabSize);
  for (let i = 0; i < vocabSize; i++) {
    tokens[i] = `[PAD${i}]`;
    types[i] = TOKEN_UNUSED;
  }
  for (const [text, id] of Object.entries(tokenizer.model.vocab)) {
    if (id < vocabSize) {
      tokens[id] = text;
      types[id] = TOKEN_NORMAL;
    }
  }
  for (const t of tokenizer.added_tokens) {
    if (t.id >= vocabSize) continue;
    tokens[t.id] = t.content;
    types[t.id] = t.special ? TOKEN_CONTROL : TOKEN_USER_DEFINED;
  }
  const merges = tokenizer.model.merges.map((m) => (typeof m === "string" ? m : `${m[0]} ${m[1]}`));
  return { tokens, types, merges };
}

/**
 * llama3 rope scaling as llama.cpp's per-frequency divisors (theta_i = pos * base^(-2i/d) / f_i), the
 * `rope_factors` of convert_hf_to_gguf.py; null without llama3 scaling.
 */
export function llama3RopeFactors(config: LlamaConfig): Float32Array | null {
  if (!config.rope_scaling || config.rope_scaling.rope_type !== "llama3") return null;
  const s = config.rope_scaling as Llama3RopeScaling;
  const dim = config.head_dim;
  const out = new Float32Array(dim / 2);
  const lowFreqWavelen = s.original_max_position_embeddings / s.low_freq_factor;
  const highFreqWavelen = s.original_max_position_embeddings / s.high_freq_factor;
  for (let i = 0; i < dim / 2; i++) {
    // Rounded to float32 first, as torch computes `freqs` in float32 there.
    const freq = Math.fround(1 / Math.fround(config.rope_theta ** ((2 * i) / dim)));
    const wavelen = (2 * Math.PI) / freq;
    if (wavelen < highFreqWavelen) out[i] = 1;
    else if (wavelen > lowFreqWavelen) out[i] = s.factor;
    else {
      const smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
      out[i] = 1 / ((1 - smooth) / s.factor + smooth);
    }
  }
  return out;
}

/**
 * HF's rotate-half Q/K rows to llama.cpp's interleaved layout, per head (convert_hf_to_gguf's
 * LlamaModel.permute: reshape(heads, 2, head_dim/2, in).swapaxes(1, 2)).
 */
export function permuteQK(data: Float32Array, rows: number, cols: number, heads: number): Float32Array {
  const headDim = rows / heads;
  const half = headDim / 2;
  const out = new Float32Array(data.length);
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < 2; i++) {
      for (let j = 0; j < half; j++) {
        const src = h * headDim + i * half + j;
        const dst = h * headDim + j * 2 + i;
        out.set(data.subarray(src * cols, (src + 1) * cols), dst * cols);
      }
    }
  }
  return out;
}

function f32Bytes(a: Float32Array): Uint8Array {
  // Little-endian on every platform this runs on (x64, arm64), which GGUF requires.
  return new Uint8Array(a.buffer, a.byteOffset, a.byteLength);
}

function f16Bytes(a: Float32Array): Uint8Array {
  const out = new Uint16Array(a.length);
  for (let i = 0; i < a.length; i++) out[i] = float32ToFloat16Bits(a[i]!);
  return new Uint8Array(out.buffer);
}

/** Metadata and tensors of a Llama GGUF for `config` + `weights` (HF names and layout). */
export function llamaGguf(config: LlamaConfig, weights: LlamaWeights, tokenizer: TokenizerJson, dtype: GgufDtype, name = "ultralong-serve builtin"): { metadata: [string, GgufValue][]; tensors: GgufTensor[] } {
  const vocab = ggufVocab(tokenizer, config.vocab_size);
  const eos = Array.isArray(config.eos_token_id) ? config.eos_token_id : [config.eos_token_id];
  const metadata: [string, GgufValue][] = [
    ["general.architecture", { type: "string", value: "llama" }],
    ["general.type", { type: "string", value: "model" }],
    ["general.name", { type: "string", value: name }],
    // LLAMA_FTYPE_ALL_F32 = 0, LLAMA_FTYPE_MOSTLY_F16 = 1
    ["general.file_type", { type: "u32", value: dtype === "f32" ? 0 : 1 }],
    ["llama.vocab_size", { type: "u32", value: config.vocab_size }],
    ["llama.context_length", { type: "u32", value: config.max_position_embeddings }],
    ["llama.embedding_length", { type: "u32", value: config.hidden_size }],
    ["llama.block_count", { type: "u32", value: config.num_hidden_layers }],
    ["llama.feed_forward_length", { type: "u32", value: config.intermediate_size }],
    ["llama.attention.head_count", { type: "u32", value: config.num_attention_heads }],
    ["llama.attention.head_count_kv", { type: "u32", value: config.num_key_value_heads }],
    ["llama.attention.key_length", { type: "u32", value: config.head_dim }],
    ["llama.attention.value_length", { type: "u32", value: config.head_dim }],
    ["llama.rope.dimension_count", { type: "u32", value: config.head_dim }],
    ["llama.rope.freq_base", { type: "f32", value: config.rope_theta }],
    ["llama.attention.layer_norm_rms_epsilon", { type: "f32", value: config.rms_norm_eps }],
    ["tokenizer.ggml.model", { type: "string", value: "gpt2" }],
    ["tokenizer.ggml.pre", { type: "string", value: "llama-bpe" }],
    ["tokenizer.ggml.tokens", { type: "string[]", value: vocab.tokens }],
    ["tokenizer.ggml.token_type", { type: "i32[]", value: vocab.types }],
    ["tokenizer.ggml.merges", { type: "string[]", value: vocab.merges }],
    ["tokenizer.ggml.bos_token_id", { type: "u32", value: config.bos_token_id }],
    // <|eot_id|>, the chat end of turn (the last of generation_config's eos ids), as special_tokens_map says.
    ["tokenizer.ggml.eos_token_id", { type: "u32", value: eos[eos.length - 1]! }],
    ["tokenizer.ggml.add_bos_token", { type: "bool", value: true }],
  ];

  const get = (hf: string) => {
    const w = weights[hf];
    if (!w) throw new Error(`weight ${hf} is missing`);
    return w;
  };
  const tensors: GgufTensor[] = [];
  const matrix = (ggufName: string, data: Float32Array, shape: number[]) =>
    tensors.push(dtype === "f32" ? { name: ggufName, shape, type: GGML_TYPE.F32, data: f32Bytes(data) } : { name: ggufName, shape, type: GGML_TYPE.F16, data: f16Bytes(data) });
  // 1-D tensors stay f32, as the converter keeps them.
  const vector = (ggufName: string, data: Float32Array) => tensors.push({ name: ggufName, shape: [data.length], type: GGML_TYPE.F32, data: f32Bytes(data) });
  const linear = (ggufName: string, hf: string, permuteHeads?: number) => {
    const w = get(hf);
    const [rows, cols] = w.dims as [number, number];
    matrix(ggufName, permuteHeads ? permuteQK(w.data, rows, cols, permuteHeads) : w.data, [rows, cols]);
  };

  const embed = get("model.embed_tokens.weight");
  matrix("token_embd.weight", embed.data, embed.dims);
  const factors = llama3RopeFactors(config);
  if (factors) vector("rope_freqs.weight", factors);
  for (let i = 0; i < config.num_hidden_layers; i++) {
    const p = `model.layers.${i}`;
    vector(`blk.${i}.attn_norm.weight`, get(`${p}.input_layernorm.weight`).data);
    linear(`blk.${i}.attn_q.weight`, `${p}.self_attn.q_proj.weight`, config.num_attention_heads);
    linear(`blk.${i}.attn_k.weight`, `${p}.self_attn.k_proj.weight`, config.num_key_value_heads);
    linear(`blk.${i}.attn_v.weight`, `${p}.self_attn.v_proj.weight`);
    linear(`blk.${i}.attn_output.weight`, `${p}.self_attn.o_proj.weight`);
    vector(`blk.${i}.ffn_norm.weight`, get(`${p}.post_attention_layernorm.weight`).data);
    linear(`blk.${i}.ffn_gate.weight`, `${p}.mlp.gate_proj.weight`);
    linear(`blk.${i}.ffn_up.weight`, `${p}.mlp.up_proj.weight`);
    linear(`blk.${i}.ffn_down.weight`, `${p}.mlp.down_proj.weight`);
  }
  vector("output_norm.weight", get("model.norm.weight").data);
  linear("output.weight", config.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight");
  return { metadata, tensors };
}

const SOURCES = ["gguf.ts", "gguf-llama.ts", "fixture-weights.ts", "fp16.ts"].map((f) => fileURLToPath(new URL(`./${f}`, import.meta.url)));

async function stampOf(dtype: GgufDtype): Promise<string> {
  const h = createHash("sha256");
  for (const file of [...SOURCES, FIXTURE_WEIGHTS_FILE, tokenizerPath("tokenizer.json")]) {
    h.update(`${file.split("/").pop()}\0`);
    h.update(await readFile(file));
  }
  h.update(`dtype:${dtype}`);
  return h.digest("hex");
}

export interface GgufBuild {
  path: string;
  bytes: number;
  /** False when an up-to-date file was already there (`ifMissing`). */
  built: boolean;
}

/** Writes the built-in model (the trained fixture) as GGUF at `path`; with `ifMissing`, keeps an up-to-date file. */
export async function buildBuiltinGguf(path = DEFAULT_GGUF_PATH, options: { dtype?: GgufDtype; ifMissing?: boolean } = {}): Promise<GgufBuild> {
  const dtype = options.dtype ?? "f32";
  const stamp = await stampOf(dtype);
  const stampPath = `${path}.stamp`;
  if (options.ifMissing && existsSync(path) && existsSync(stampPath) && (await readFile(stampPath, "utf8")).trim() === stamp) {
    return { path, bytes: (await stat(path)).size, built: false };
  }
  const { config, weights } = loadFixture();
  const tokenizer = JSON.parse(await readFile(tokenizerPath("tokenizer.json"), "utf8")) as TokenizerJson;
  const { metadata, tensors } = llamaGguf(config, weights, tokenizer, dtype);
  const chunks = encodeGguf(metadata, tensors);
  await mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.tmp-${process.pid}`;
  let bytes = 0;
  const file = await open(tmp, "w");
  try {
    for (const c of chunks) {
      await file.write(c);
      bytes += c.length;
    }
  } finally {
    await file.close();
  }
  try {
    await rename(tmp, path);
    await writeFile(stampPath, `${stamp}\n`);
  } catch (err) {
    await rm(tmp, { force: true });
    throw err;
  }
  return { path, bytes, built: true };
}
