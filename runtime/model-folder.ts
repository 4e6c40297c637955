/**
 * Reads a model folder in the onnx-community / Optimum layout:
 *
 *   config.json, generation_config.json (optional), tokenizer.json, tokenizer_config.json,
 *   onnx/model{,_fp16,_q4,_q4f16,...}.onnx with optional external data (model.onnx_data, model.onnx_data_1, ...)
 *
 * Everything that can be checked before the graph is opened is checked here, and every failure names the
 * file and the problem, so a broken folder stops the server at start-up rather than at the first request.
 */
import { readFile, readdir, stat } from "node:fs/promises";
import { join } from "node:path";
import { ModelFolderError } from "./errors.ts";
import { ropeInvFreq } from "./rope.ts";

/** The subset of a Llama-family config.json the runtime needs. */
export interface LlamaConfig {
  modelType: string;
  vocabSize: number;
  hiddenSize: number;
  numLayers: number;
  numAttentionHeads: number;
  numKeyValueHeads: number;
  headDim: number;
  maxPositionEmbeddings: number;
  /** RoPE inverse frequencies (runtime/rope.ts); null for rope types whose keys cannot be moved (or a malformed rope_scaling). */
  ropeInvFreq: Float32Array | null;
  bosTokenId: number | null;
  eosTokenIds: number[];
}

/** Sampling defaults the model ships in generation_config.json. */
export interface GenerationDefaults {
  eosTokenIds: number[];
  temperature?: number;
  topP?: number;
  topK?: number;
  repetitionPenalty?: number;
  doSample?: boolean;
}

/** Quantization / precision variants, named as transformers.js names them. */
export const MODEL_VARIANTS = {
  fp32: "model.onnx",
  fp16: "model_fp16.onnx",
  q4f16: "model_q4f16.onnx",
  q4: "model_q4.onnx",
  int8: "model_int8.onnx",
  uint8: "model_uint8.onnx",
  quantized: "model_quantized.onnx",
  bnb4: "model_bnb4.onnx",
} as const;
export type ModelVariant = keyof typeof MODEL_VARIANTS;
export const MODEL_VARIANT_NAMES = Object.keys(MODEL_VARIANTS) as ModelVariant[];

/** Variants whose graphs take and return float16 tensors (KV and logits), by Optimum's naming. */
export const variantUsesFloat16 = (variant: ModelVariant): boolean => variant === "fp16" || variant === "q4f16";

export interface ExternalDataFile {
  /** The file name as the graph refers to it (relative to the .onnx file). */
  path: string;
  /** Absolute path on disk. */
  file: string;
}

export interface ModelFolder {
  dir: string;
  /** Short id for /v1/models: the folder's base name. */
  id: string;
  config: LlamaConfig;
  rawConfig: Record<string, unknown>;
  generation: GenerationDefaults;
  tokenizerJson: Record<string, unknown>;
  tokenizerConfig: Record<string, unknown>;
  variant: ModelVariant;
  onnxFile: string;
  externalData: ExternalDataFile[];
  /**
   * The same model as a graph for the in-place KV path (onnx/<variant>.kv.onnx, written by this repo's
   * builder: inputs cache.N.key/value + slot_mask, outputs new.N.key/value), or null: the Optimum graph
   * (present = past + new) is then used as it is. Reads the variant's external data files.
   */
  kvOnnxFile: string | null;
}

async function readJson(dir: string, name: string, required: true): Promise<Record<string, unknown>>;
async function readJson(dir: string, name: string, required: false): Promise<Record<string, unknown> | null>;
async function readJson(dir: string, name: string, required: boolean): Promise<Record<string, unknown> | null> {
  const file = join(dir, name);
  let text: string;
  try {
    text = await readFile(file, "utf8");
  } catch {
    if (!required) return null;
    throw new ModelFolderError(`model folder ${dir} has no ${name}`);
  }
  try {
    const value: unknown = JSON.parse(text);
    if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error("not an object");
    return value as Record<string, unknown>;
  } catch (e) {
    throw new ModelFolderError(`${file} is not a valid JSON object (${(e as Error).message})`);
  }
}

function intField(obj: Record<string, unknown>, key: string, file: string): number {
  const v = obj[key];
  if (typeof v !== "number" || !Number.isInteger(v) || v <= 0) {
    throw new ModelFolderError(`${file}: "${key}" must be a positive integer, got ${JSON.stringify(v)}`);
  }
  return v;
}

function idList(v: unknown): number[] {
  if (typeof v === "number") return [v];
  if (Array.isArray(v)) return v.filter((x): x is number => typeof x === "number");
  return [];
}

export function parseLlamaConfig(raw: Record<string, unknown>, file = "config.json"): LlamaConfig {
  const modelType = String(raw.model_type ?? "");
  if (!modelType) throw new ModelFolderError(`${file}: "model_type" is missing`);
  const hiddenSize = intField(raw, "hidden_size", file);
  const numAttentionHeads = intField(raw, "num_attention_heads", file);
  const numKeyValueHeads = raw.num_key_value_heads === undefined ? numAttentionHeads : intField(raw, "num_key_value_heads", file);
  const headDim = raw.head_dim === undefined || raw.head_dim === null ? hiddenSize / numAttentionHeads : intField(raw, "head_dim", file);
  if (!Number.isInteger(headDim)) throw new ModelFolderError(`${file}: hidden_size is not a multiple of num_attention_heads`);
  return {
    modelType,
    vocabSize: intField(raw, "vocab_size", file),
    hiddenSize,
    numLayers: intField(raw, "num_hidden_layers", file),
    numAttentionHeads,
    numKeyValueHeads,
    headDim,
    maxPositionEmbeddings: typeof raw.max_position_embeddings === "number" ? raw.max_position_embeddings : 131072,
    ropeInvFreq: invFreqOf(raw, headDim),
    bosTokenId: typeof raw.bos_token_id === "number" ? raw.bos_token_id : null,
    eosTokenIds: idList(raw.eos_token_id),
  };
}

function invFreqOf(raw: Record<string, unknown>, headDim: number): Float32Array | null {
  const obj = (v: unknown) => (v && typeof v === "object" ? (v as Record<string, unknown>) : null);
  const num = (v: unknown) => (typeof v === "number" ? v : undefined);
  try {
    return ropeInvFreq({
      head_dim: headDim,
      rope_theta: num(raw.rope_theta),
      rope_scaling: obj(raw.rope_scaling),
      rope_parameters: obj(raw.rope_parameters),
      max_position_embeddings: num(raw.max_position_embeddings),
      original_max_position_embeddings: num(raw.original_max_position_embeddings),
      partial_rotary_factor: num(raw.partial_rotary_factor),
    });
  } catch {
    return null;
  }
}

async function exists(file: string): Promise<boolean> {
  try {
    return (await stat(file)).isFile();
  } catch {
    return false;
  }
}

/** Picks the .onnx file: the configured variant, or for "auto" the first present in preference order. */
async function chooseVariant(onnxDir: string, requested: ModelVariant | "auto"): Promise<ModelVariant> {
  let present: string[];
  try {
    present = await readdir(onnxDir);
  } catch {
    throw new ModelFolderError(`model folder has no onnx/ directory (looked in ${onnxDir})`);
  }
  if (requested !== "auto") {
    if (!present.includes(MODEL_VARIANTS[requested])) {
      const found = MODEL_VARIANT_NAMES.filter((v) => present.includes(MODEL_VARIANTS[v]));
      throw new ModelFolderError(
        `variant "${requested}" needs onnx/${MODEL_VARIANTS[requested]}, which is missing` +
          (found.length ? `; this folder has: ${found.join(", ")}` : "; this folder has no known .onnx variant"),
      );
    }
    return requested;
  }
  const first = MODEL_VARIANT_NAMES.find((v) => present.includes(MODEL_VARIANTS[v]));
  if (!first) {
    throw new ModelFolderError(
      `${onnxDir} holds none of ${Object.values(MODEL_VARIANTS).join(", ")}`,
    );
  }
  return first;
}

/** The in-place KV graph's file name beside a variant's: model.onnx -> model.kv.onnx. */
export const kvGraphName = (onnxName: string): string => onnxName.replace(/\.onnx$/, ".kv.onnx");

/** External data files, named as Optimum / transformers.js name them: X.onnx_data, X.onnx_data_1, ... */
async function findExternalData(onnxDir: string, onnxName: string): Promise<ExternalDataFile[]> {
  const out: ExternalDataFile[] = [];
  const base = `${onnxName}_data`;
  if (await exists(join(onnxDir, base))) out.push({ path: base, file: join(onnxDir, base) });
  for (let i = 1; ; i++) {
    const name = `${base}_${i}`;
    if (!(await exists(join(onnxDir, name)))) break;
    out.push({ path: name, file: join(onnxDir, name) });
  }
  return out;
}

export async function loadModelFolder(dir: string, variant: ModelVariant | "auto" = "auto"): Promise<ModelFolder> {
  try {
    if (!(await stat(dir)).isDirectory()) throw new Error();
  } catch {
    throw new ModelFolderError(`model folder ${dir} does not exist or is not a directory`);
  }
  const rawConfig = await readJson(dir, "config.json", true);
  const config = parseLlamaConfig(rawConfig, join(dir, "config.json"));
  const gen = (await readJson(dir, "generation_config.json", false)) ?? {};
  const tokenizerJson = await readJson(dir, "tokenizer.json", true);
  const tokenizerConfig = await readJson(dir, "tokenizer_config.json", true);
  if (typeof tokenizerJson.model !== "object" || tokenizerJson.model === null) {
    throw new ModelFolderError(`${join(dir, "tokenizer.json")} has no "model" section`);
  }

  const eos = [...new Set([...idList(gen.eos_token_id), ...config.eosTokenIds])];
  if (eos.length === 0) {
    throw new ModelFolderError(`neither generation_config.json nor config.json names an eos_token_id in ${dir}`);
  }
  const num = (v: unknown) => (typeof v === "number" ? v : undefined);
  const generation: GenerationDefaults = {
    eosTokenIds: eos,
    temperature: num(gen.temperature),
    topP: num(gen.top_p),
    topK: num(gen.top_k),
    repetitionPenalty: num(gen.repetition_penalty),
    doSample: typeof gen.do_sample === "boolean" ? gen.do_sample : undefined,
  };

  const onnxDir = join(dir, "onnx");
  const chosen = await chooseVariant(onnxDir, variant);
  const onnxName = MODEL_VARIANTS[chosen];
  const id = dir.replace(/[\\/]+$/, "").split(/[\\/]/).pop() || "model";
  return {
    dir,
    id,
    config,
    rawConfig,
    generation,
    tokenizerJson,
    tokenizerConfig,
    variant: chosen,
    onnxFile: join(onnxDir, onnxName),
    externalData: await findExternalData(onnxDir, onnxName),
    kvOnnxFile: (await exists(join(onnxDir, kvGraphName(onnxName)))) ? join(onnxDir, kvGraphName(onnxName)) : null,
  };
}
