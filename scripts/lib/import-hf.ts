/**
 * Imports a Hugging Face Llama-family checkpoint (config.json, safetensors shards, tokenizer files) into a
 * model folder the server loads: the same graphs the built-in builder writes (scripts/lib/onnx-llama.ts),
 * for each requested dtype an Optimum graph (onnx/model_<dtype>.onnx, present = past + new) and the
 * in-place KV graph beside it (onnx/model_<dtype>.kv.onnx), both over one external data file.
 *
 * Streaming: weights are read from the shards a run of rows at a time, converted (transposed, cast to
 * float16 or quantized) and written at their offsets in the data file, so memory stays at a few chunks
 * whatever the model's size. The folder is written beside its destination and renamed into place only
 * when complete.
 */
import { closeSync, existsSync, ftruncateSync, openSync, readFileSync, writeSync } from "node:fs";
import { copyFile, mkdir, rm, stat, writeFile } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { ropeSpec, type RopeConfigFields } from "../../runtime/rope.ts";
import {
  buildLlamaGraph,
  defaultExternalDataName,
  layoutLlamaWeights,
  LLAMA_ONNX_DTYPES,
  llamaWeightSpecs,
  writeLlamaWeights,
  type LlamaConfig,
  type LlamaOnnxDtype,
  type WeightSink,
  type WeightSource,
  type WriteProgress,
} from "./onnx-llama.ts";
import { swapIntoPlace } from "./model-folder.ts";
import { Checkpoint, CheckpointError } from "./safetensors.ts";

export { CheckpointError } from "./safetensors.ts";

/** The graph file of a dtype, as transformers.js and the runtime name them. */
export const graphFileName = (dtype: LlamaOnnxDtype): string => (dtype === "fp32" ? "model.onnx" : `model_${dtype}.onnx`);

const SUPPORTED_ARCHITECTURES = ["LlamaForCausalLM"];

function readJsonFile(file: string, required: true): Record<string, unknown>;
function readJsonFile(file: string, required: false): Record<string, unknown> | null;
function readJsonFile(file: string, required: boolean): Record<string, unknown> | null {
  if (!existsSync(file)) {
    if (!required) return null;
    throw new CheckpointError(`missing ${file}`);
  }
  try {
    const value: unknown = JSON.parse(readFileSync(file, "utf8"));
    if (value === null || typeof value !== "object" || Array.isArray(value)) throw new Error("not a JSON object");
    return value as Record<string, unknown>;
  } catch (e) {
    throw new CheckpointError(`${file} is not a valid JSON object (${(e as Error).message})`);
  }
}

/**
 * The builder's config from a checkpoint's config.json, with transformers' LlamaConfig defaults for
 * absent fields. Refuses, naming the file and field, what the graph cannot express.
 */
export function llamaConfigFromHf(raw: Record<string, unknown>, file = "config.json"): LlamaConfig {
  const archs = Array.isArray(raw.architectures) ? (raw.architectures as unknown[]).map(String) : [];
  const arch = archs[0] ?? (raw.model_type === "llama" ? "LlamaForCausalLM" : undefined);
  if (!arch || !SUPPORTED_ARCHITECTURES.includes(arch) || (raw.model_type !== undefined && raw.model_type !== "llama")) {
    throw new CheckpointError(
      `${file}: architecture ${arch ?? "(none)"} (model_type ${JSON.stringify(raw.model_type)}) is not supported; supported: ${SUPPORTED_ARCHITECTURES.join(", ")} (model_type "llama")`,
    );
  }
  const int = (key: string, fallback?: number): number => {
    const v = raw[key] ?? fallback;
    if (typeof v !== "number" || !Number.isInteger(v) || v <= 0) throw new CheckpointError(`${file}: "${key}" must be a positive integer, got ${JSON.stringify(raw[key])}`);
    return v;
  };
  const num = (key: string, fallback: number): number => {
    const v = raw[key] ?? fallback;
    if (typeof v !== "number" || !Number.isFinite(v) || v <= 0) throw new CheckpointError(`${file}: "${key}" must be a positive number, got ${JSON.stringify(raw[key])}`);
    return v;
  };
  const hidden = int("hidden_size");
  const heads = int("num_attention_heads");
  const kvHeads = int("num_key_value_heads", heads);
  const headDim = raw.head_dim == null ? hidden / heads : int("head_dim");
  if (!Number.isInteger(headDim)) throw new CheckpointError(`${file}: hidden_size ${hidden} is not a multiple of num_attention_heads ${heads} and there is no head_dim`);
  if (heads % kvHeads !== 0) throw new CheckpointError(`${file}: num_attention_heads ${heads} is not a multiple of num_key_value_heads ${kvHeads}`);
  const act = raw.hidden_act ?? "silu";
  if (act !== "silu") throw new CheckpointError(`${file}: hidden_act ${JSON.stringify(act)} is not supported (only silu)`);
  for (const key of ["attention_bias", "mlp_bias"] as const) {
    if (raw[key] === true) throw new CheckpointError(`${file}: ${key} true is not supported (Llama-3.1 has no biases)`);
  }
  const ropeScaling = raw.rope_scaling && typeof raw.rope_scaling === "object" ? (raw.rope_scaling as Record<string, unknown>) : null;
  const config: LlamaConfig = {
    architectures: ["LlamaForCausalLM"],
    model_type: "llama",
    vocab_size: int("vocab_size"),
    hidden_size: hidden,
    intermediate_size: int("intermediate_size"),
    num_hidden_layers: int("num_hidden_layers"),
    num_attention_heads: heads,
    num_key_value_heads: kvHeads,
    head_dim: headDim,
    hidden_act: "silu",
    rms_norm_eps: num("rms_norm_eps", 1e-6),
    rope_theta: num("rope_theta", typeof (raw.rope_parameters as Record<string, unknown> | undefined)?.rope_theta === "number" ? ((raw.rope_parameters as Record<string, unknown>).rope_theta as number) : 10000),
    rope_scaling: ropeScaling,
    max_position_embeddings: int("max_position_embeddings", 2048),
    tie_word_embeddings: raw.tie_word_embeddings === true,
    attention_bias: false,
    mlp_bias: false,
    bos_token_id: typeof raw.bos_token_id === "number" ? raw.bos_token_id : 128000,
    eos_token_id: (raw.eos_token_id as number | number[]) ?? 128001,
    torch_dtype: (raw.torch_dtype as LlamaConfig["torch_dtype"]) ?? "float32",
    use_cache: true,
    ...(raw.partial_rotary_factor != null ? { partial_rotary_factor: raw.partial_rotary_factor as number } : {}),
    ...(raw.rope_parameters && typeof raw.rope_parameters === "object" ? { rope_parameters: raw.rope_parameters as Record<string, unknown> } : {}),
    ...(typeof raw.original_max_position_embeddings === "number" ? { original_max_position_embeddings: raw.original_max_position_embeddings } : {}),
  };
  try {
    ropeSpec(config as unknown as RopeConfigFields);
  } catch (e) {
    throw new CheckpointError(`${file}: ${(e as Error).message}`);
  }
  return config;
}

/** A WeightSource over a checkpoint's shards; checks that every tensor the graph needs is there, shaped right. */
export function checkpointWeightSource(checkpoint: Checkpoint, config: LlamaConfig): WeightSource {
  for (const spec of llamaWeightSpecs(config)) {
    const t = checkpoint.tensors.get(spec.name);
    if (!t) throw new CheckpointError(`checkpoint ${checkpoint.dir} has no tensor ${spec.name}`);
    if (t.shape.length !== spec.dims.length || t.shape.some((d, i) => d !== spec.dims[i])) {
      throw new CheckpointError(`${t.file}: tensor ${spec.name} has shape [${t.shape}], expected [${spec.dims}] from config.json`);
    }
  }
  return {
    dims: (name) => checkpoint.get(name).shape,
    rows: (name, r0, r1) => checkpoint.readRows(checkpoint.get(name), r0, r1),
  };
}

/** Writes at offsets of one file, preallocated (sparse) to the layout's size. */
function fileSink(file: string, size: number): WeightSink & { close(): void } {
  const fd = openSync(file, "w");
  ftruncateSync(fd, size);
  return {
    write(offset, bytes) {
      let done = 0;
      while (done < bytes.length) done += writeSync(fd, bytes, done, bytes.length - done, offset + done);
    },
    close: () => closeSync(fd),
  };
}

export interface ImportProgress extends WriteProgress {
  dtype: LlamaOnnxDtype;
  /** Seconds since this dtype's weights started. */
  elapsed: number;
}

export interface ImportOptions {
  from: string;
  out: string;
  dtypes: LlamaOnnxDtype[];
  /** Replace an existing folder at `out`. */
  force?: boolean;
  /** MatMulNBits accuracy_level of the q4 / q4f16 / int8 graphs (LlamaGraphOptions); default 4, int8 activations. */
  accuracyLevel?: 0 | 4;
  onProgress?: (p: ImportProgress) => void;
}

export interface ImportResult {
  outDir: string;
  files: { path: string; bytes: number }[];
  /** The largest tensor as float32, the unit the memory bound is stated in. */
  largestTensorBytes: number;
  seconds: number;
}

const TOKENIZER_FILES = [
  ["tokenizer.json", true],
  ["tokenizer_config.json", true],
  ["generation_config.json", false],
  ["special_tokens_map.json", false],
] as const;

export async function importHfCheckpoint(options: ImportOptions): Promise<ImportResult> {
  const started = performance.now();
  const from = resolve(options.from);
  const target = resolve(options.out);
  if (options.dtypes.length === 0) throw new CheckpointError("no dtype requested");
  for (const d of options.dtypes) {
    if (!LLAMA_ONNX_DTYPES.includes(d)) throw new CheckpointError(`unknown dtype ${d} (supported: ${LLAMA_ONNX_DTYPES.join(", ")})`);
  }
  if (existsSync(target) && !options.force) throw new CheckpointError(`${target} already exists (pass --force to replace it)`);

  const configFile = join(from, "config.json");
  const rawConfig = readJsonFile(configFile, true);
  const config = llamaConfigFromHf(rawConfig, configFile);
  for (const [name, required] of TOKENIZER_FILES) if (required) readJsonFile(join(from, name), true);
  const checkpoint = new Checkpoint(from);
  try {
    const source = checkpointWeightSource(checkpoint, config);
    const largestTensorBytes = Math.max(...llamaWeightSpecs(config).map((s) => s.dims.reduce((a, b) => a * b, 1) * 4));

    const tag = `${process.pid}-${Date.now()}`;
    const tmp = join(dirname(target), `.${basename(target)}.tmp-${tag}`);
    await mkdir(join(tmp, "onnx"), { recursive: true });
    try {
      // config.json as the checkpoint has it, plus what transformers.js needs to find the external data.
      const outConfig = { ...rawConfig, "transformers.js_config": { ...((rawConfig["transformers.js_config"] as object) ?? {}), use_external_data_format: true } };
      await writeFile(join(tmp, "config.json"), `${JSON.stringify(outConfig, null, 2)}\n`);
      for (const [name, required] of TOKENIZER_FILES) {
        if (required || existsSync(join(from, name))) await copyFile(join(from, name), join(tmp, name));
      }
      const written: string[] = ["config.json", ...TOKENIZER_FILES.filter(([n, r]) => r || existsSync(join(from, n))).map(([n]) => n)];
      for (const dtype of options.dtypes) {
        const layout = layoutLlamaWeights(config, dtype);
        const dataName = defaultExternalDataName(dtype);
        const sink = fileSink(join(tmp, "onnx", dataName), layout.byteLength);
        const t0 = performance.now();
        try {
          writeLlamaWeights(layout, source, sink, (p) => options.onProgress?.({ ...p, dtype, elapsed: (performance.now() - t0) / 1000 }));
        } finally {
          sink.close();
        }
        const graph = graphFileName(dtype);
        const accuracyLevel = options.accuracyLevel ?? 4;
        await writeFile(join(tmp, "onnx", graph), buildLlamaGraph(config, layout, { accuracyLevel, weights: { external: dataName } }));
        await writeFile(join(tmp, "onnx", graph.replace(/\.onnx$/, ".kv.onnx")), buildLlamaGraph(config, layout, { kv: "inplace", accuracyLevel, weights: { external: dataName } }));
        written.push(`onnx/${graph}`, `onnx/${graph.replace(/\.onnx$/, ".kv.onnx")}`, `onnx/${dataName}`);
      }
      const files = await Promise.all(written.map(async (path) => ({ path, bytes: (await stat(join(tmp, path))).size })));

      await swapIntoPlace(tmp, target, tag);
      return { outDir: target, files, largestTensorBytes, seconds: (performance.now() - started) / 1000 };
    } finally {
      await rm(tmp, { recursive: true, force: true });
    }
  } finally {
    checkpoint.close();
  }
}
