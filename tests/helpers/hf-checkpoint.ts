/**
 * Hugging Face-format checkpoints for the import tests: config.json, generation_config.json, the Llama-3
 * tokenizer files, and the weights as `save_pretrained` shards them (model-0000i-of-0000n.safetensors and
 * model.safetensors.index.json), in BF16 by default, as the real checkpoints are published.
 */
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { tokenizerPath } from "../../scripts/lib/model-folder.ts";
import { LLAMA31_GENERATION_CONFIG, llamaWeightSpecs, type LlamaConfig, type LlamaWeights } from "../../scripts/lib/onnx-llama.ts";
import { roundTo, writeShardedSafetensors, type SafetensorsDtype } from "../../scripts/lib/safetensors.ts";

/** The weights as a checkpoint in `dtype` holds them (what the importer will read back). */
export function roundWeights(weights: LlamaWeights, dtype: SafetensorsDtype): LlamaWeights {
  return Object.fromEntries(Object.entries(weights).map(([name, w]) => [name, { dims: w.dims, data: roundTo(w.data, dtype) }]));
}

export interface CheckpointOptions {
  dtype?: SafetensorsDtype;
  /** Data bytes per shard (a tensor is never split). */
  maxShardBytes?: number;
  /** Fields merged into config.json (e.g. another rope_scaling). */
  config?: Record<string, unknown>;
  /** A model folder whose tokenizer.json and tokenizer_config.json (chat template) to ship; default the builder's tokenizer package. */
  tokenizerFrom?: string;
}

/** Writes `weights` (HF names and layout) as a checkpoint folder; returns the shard file names. */
export function writeHfCheckpoint(dir: string, config: LlamaConfig, weights: LlamaWeights, options: CheckpointOptions = {}): string[] {
  mkdirSync(dir, { recursive: true });
  const hfConfig = { ...config, torch_dtype: options.dtype === "F32" ? "float32" : options.dtype === "F16" ? "float16" : "bfloat16", ...options.config };
  writeFileSync(join(dir, "config.json"), `${JSON.stringify(hfConfig, null, 2)}\n`);
  writeFileSync(join(dir, "generation_config.json"), `${JSON.stringify(LLAMA31_GENERATION_CONFIG, null, 2)}\n`);
  for (const file of ["tokenizer.json", "tokenizer_config.json"] as const) {
    copyFileSync(options.tokenizerFrom ? join(options.tokenizerFrom, file) : tokenizerPath(file), join(dir, file));
  }
  const tensors = llamaWeightSpecs(config).map((spec) => {
    const w = weights[spec.name];
    if (!w) throw new Error(`missing weight ${spec.name}`);
    return { name: spec.name, shape: w.dims, data: w.data };
  });
  return writeShardedSafetensors(dir, tensors, options.dtype ?? "BF16", options.maxShardBytes ?? 12 * 2 ** 20);
}
