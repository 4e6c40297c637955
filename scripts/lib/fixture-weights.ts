/**
 * The trained fixture model's weights, committed compactly as safetensors (fixtures/fixture-model.safetensors,
 * written by scripts/train-fixture.py): the layers in full, and for embed_tokens and lm_head only the rows
 * of the task vocabulary (tensor `vocab` lists their token ids) plus one last row shared by every other
 * token id. expandFixtureWeights() turns that into full-vocabulary HF-layout weights for the builder.
 */
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import type { LlamaConfig, LlamaWeights } from "./onnx-llama.ts";

export const FIXTURE_WEIGHTS_FILE = fileURLToPath(new URL("../../fixtures/fixture-model.safetensors", import.meta.url));

export interface SafeTensor {
  dtype: "F32" | "I32";
  shape: number[];
  data: Float32Array | Int32Array;
}

/** Reads a safetensors file (F32 and I32 tensors; little-endian, as the format specifies). */
export function readSafetensors(bytes: Uint8Array): { tensors: Map<string, SafeTensor>; metadata: Record<string, string> } {
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  const headerLength = Number(view.getBigUint64(0, true));
  if (headerLength > bytes.length - 8) throw new Error("safetensors header runs past the end of the file");
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(8, 8 + headerLength))) as Record<string, unknown>;
  const base = 8 + headerLength;
  const tensors = new Map<string, SafeTensor>();
  let metadata: Record<string, string> = {};
  for (const [name, entry] of Object.entries(header)) {
    if (name === "__metadata__") {
      metadata = entry as Record<string, string>;
      continue;
    }
    const { dtype, shape, data_offsets: [start, end] } = entry as { dtype: string; shape: number[]; data_offsets: [number, number] };
    if (dtype !== "F32" && dtype !== "I32") throw new Error(`tensor ${name}: dtype ${dtype} is not supported`);
    const count = shape.reduce((a, b) => a * b, 1);
    if (end - start !== count * 4 || base + end > bytes.length) throw new Error(`tensor ${name}: data does not match its shape`);
    const copy = bytes.slice(base + start, base + end);
    tensors.set(name, { dtype, shape, data: dtype === "F32" ? new Float32Array(copy.buffer) : new Int32Array(copy.buffer) });
  }
  return { tensors, metadata };
}

/** Full-vocabulary weights from the compact fixture file: unlisted token ids get the shared last row. */
export function expandFixtureWeights(bytes: Uint8Array, config: LlamaConfig): LlamaWeights {
  const { tensors } = readSafetensors(bytes);
  const vocab = tensors.get("vocab");
  if (!vocab) throw new Error("fixture weights have no `vocab` tensor");
  const weights: LlamaWeights = {};
  for (const [name, t] of tensors) {
    if (name === "vocab") continue;
    if (t.dtype !== "F32") throw new Error(`tensor ${name} should be F32`);
    if (name === "model.embed_tokens.weight" || name === "lm_head.weight") {
      const [rows, hidden] = t.shape as [number, number];
      if (rows !== vocab.data.length + 1 || hidden !== config.hidden_size) throw new Error(`${name} has shape ${t.shape}, expected [${vocab.data.length + 1}, ${config.hidden_size}]`);
      const full = new Float32Array(config.vocab_size * hidden);
      const shared = t.data.subarray((rows - 1) * hidden, rows * hidden);
      for (let id = 0; id < config.vocab_size; id++) full.set(shared, id * hidden);
      vocab.data.forEach((id, row) => full.set(t.data.subarray(row * hidden, (row + 1) * hidden), id * hidden));
      weights[name] = { dims: [config.vocab_size, hidden], data: full };
    } else {
      weights[name] = { dims: t.shape, data: t.data as Float32Array };
    }
  }
  return weights;
}

/** The fixture's weights and its architecture (config.json fields, from the file's metadata). */
export function loadFixture(file = FIXTURE_WEIGHTS_FILE): { config: LlamaConfig; weights: LlamaWeights } {
  const bytes = new Uint8Array(readFileSync(file));
  const raw = readSafetensors(bytes).metadata.config;
  if (!raw) throw new Error(`${file} has no config in its metadata`);
  const config = JSON.parse(raw) as LlamaConfig;
  return { config, weights: expandFixtureWeights(bytes, config) };
}
