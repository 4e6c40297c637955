/**
 * `npm run import` (scripts/import-hf.ts): a Hugging Face checkpoint (sharded BF16 safetensors with its
 * index, GQA, untied lm_head, llama3 rope scaling) made from the trained fixture's weights and from seeded
 * random weights of another shape, imported into a model folder:
 *
 * - fp32: the same logits (within 1e-4) as the built-in builder's folder for the same (BF16-rounded)
 *   weights, and the same greedy tokens through the running server;
 * - fp16 / int8 / q4 / q4f16: logits within stated tolerances of fp32, greedy tokens mostly the same,
 *   and the imported fixture still passes its pass-key subset (q4 within 5 points of fp32);
 * - transformers.js on the imported fp32 folder gives our greedy tokens;
 * - errors name the file: a missing shard, a wrongly shaped tensor, an unsupported architecture, tensor
 *   dtype or rope type; and the writer reads weights a bounded run of rows at a time.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import { readFileSync, rmSync, unlinkSync, writeFileSync } from "node:fs";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-web";
import type { ChatMessage } from "../runtime/index.ts";
import { templateDate } from "../runtime/index.ts";
import { loadFixture } from "../scripts/lib/fixture-weights.ts";
import { fromFloat16Array } from "../scripts/lib/fp16.ts";
import { CheckpointError, importHfCheckpoint } from "../scripts/lib/import-hf.ts";
import { FixtureTasks } from "../scripts/lib/fixture-tasks.ts";
import { buildModelFolder } from "../scripts/lib/model-folder.ts";
import {
  buildLlamaOnnx,
  dequantizeRows,
  layoutLlamaWeights,
  quantizeRows,
  memoryWeightSource,
  TINY_LLAMA_CONFIG,
  writeLlamaWeights,
  type LlamaConfig,
  type LlamaOnnxDtype,
  type LlamaWeights,
} from "../scripts/lib/onnx-llama.ts";
import { runCell } from "../scripts/lib/passkey-eval.ts";
import { randomLlamaWeights } from "../scripts/lib/random-weights.ts";
import { loadTransformersPeer } from "../scripts/lib/transformers-peer.ts";
import { roundTo } from "../scripts/lib/safetensors.ts";
import { roundWeights, writeHfCheckpoint } from "./helpers/hf-checkpoint.ts";
import { engineOptions, REPO } from "./helpers/model.ts";
import { bin, startBunServer, type ServerProcess } from "./helpers/server.ts";
import { Engine } from "../runtime/index.ts";

ort.env.wasm.numThreads = 1;

const DTYPES: LlamaOnnxDtype[] = ["fp32", "fp16", "q4", "q4f16", "int8"];
const GRAPH: Record<LlamaOnnxDtype, string> = { fp32: "model", fp16: "model_fp16", q4: "model_q4", q4f16: "model_q4f16", int8: "model_int8" };

/** Another shape than the fixture's: 3 layers, 6 query heads over 2 KV heads, head_dim 16, Llama-3.1's own rope scaling, and an intermediate size that is not a multiple of the quantization block. */
const RANDOM_CONFIG: LlamaConfig = {
  ...TINY_LLAMA_CONFIG,
  hidden_size: 96,
  intermediate_size: 176,
  num_hidden_layers: 3,
  num_attention_heads: 6,
  num_key_value_heads: 2,
  head_dim: 16,
  rope_scaling: { rope_type: "llama3", factor: 8, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 },
  max_position_embeddings: 131072,
};

interface Case {
  name: string;
  config: LlamaConfig;
  /** BF16-rounded: what the checkpoint holds. */
  weights: LlamaWeights;
  hfDir: string;
  refDir: string;
  importedDir: string;
}

let root = "";
const cases: Record<"fixture" | "random", Case> = {} as never;

beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), "import-hf-"));
  const fixture = loadFixture();
  const sources = { fixture: fixture, random: { config: RANDOM_CONFIG, weights: randomLlamaWeights(RANDOM_CONFIG, 77) } };
  for (const [name, { config, weights }] of Object.entries(sources) as [keyof typeof cases, { config: LlamaConfig; weights: LlamaWeights }][]) {
    const rounded = roundWeights(weights, "BF16");
    const c: Case = { name, config, weights: rounded, hfDir: join(root, `${name}-hf`), refDir: join(root, `${name}-ref`), importedDir: join(root, `${name}-imported`) };
    // The builder's folder first: the checkpoint ships its tokenizer files (and so its chat template).
    await buildModelFolder(c.refDir, config, rounded);
    const shards = writeHfCheckpoint(c.hfDir, config, rounded, { maxShardBytes: 12 * 2 ** 20, tokenizerFrom: c.refDir });
    expect(shards.length).toBeGreaterThanOrEqual(3);
    await importHfCheckpoint({ from: c.hfDir, out: c.importedDir, dtypes: DTYPES });
    cases[name] = c;
  }
  // The quantized matmuls with float32 activations (accuracy_level 0), for the exactness check.
  await importHfCheckpoint({ from: cases.random.hfDir, out: join(root, "random-level0"), dtypes: ["q4", "int8"], accuracyLevel: 0 });
}, 300_000);

afterAll(async () => {
  if (root) await rm(root, { recursive: true, force: true });
});

// ---- a full forward over the Optimum graph (no cache), as a reference-free logits probe ----

/** onnxruntime-node (the native backend), where the int8-activation kernels of accuracy_level 4 run. */
const ortNode = createRequire(import.meta.url)("onnxruntime-node") as typeof ort;
type Ort = typeof ort;
const sessionsOf = new WeakMap<ort.InferenceSession, Ort>();

async function openGraph(dir: string, dtype: LlamaOnnxDtype, backend: "wasm" | "native" = "wasm"): Promise<ort.InferenceSession> {
  const onnxDir = join(dir, "onnx");
  const name = GRAPH[dtype];
  if (backend === "native") {
    // From the file: onnxruntime-node finds the external data beside it.
    const session = await ortNode.InferenceSession.create(join(onnxDir, `${name}.onnx`), { intraOpNumThreads: 1 });
    sessionsOf.set(session, ortNode);
    return session;
  }
  const dataName = dtype === "fp32" ? "model.onnx_data" : `${name}.onnx_data`;
  let externalData: { path: string; data: Uint8Array }[] | undefined;
  try {
    externalData = [{ path: dataName, data: new Uint8Array(await readFile(join(onnxDir, dataName))) }];
  } catch {
    externalData = undefined; // the builder's fp32 graph has its weights inline
  }
  const session = await ort.InferenceSession.create(await readFile(join(onnxDir, `${name}.onnx`)), externalData ? { externalData } : {});
  sessionsOf.set(session, ort);
  return session;
}

/** Logits [S, vocab] of one forward pass over `ids` from an empty cache. */
async function forward(session: ort.InferenceSession, config: LlamaConfig, dtype: LlamaOnnxDtype, ids: number[]): Promise<Float32Array> {
  const o = sessionsOf.get(session) ?? ort;
  const i64 = (values: number[], dims: number[]) => new o.Tensor("int64", BigInt64Array.from(values, BigInt), dims);
  const half = dtype === "fp16" || dtype === "q4f16";
  const feeds: Record<string, ort.Tensor> = {
    input_ids: i64(ids, [1, ids.length]),
    attention_mask: i64(ids.map(() => 1), [1, ids.length]),
    position_ids: i64(ids.map((_, i) => i), [1, ids.length]),
    num_logits_to_keep: i64([0], []),
  };
  for (let i = 0; i < config.num_hidden_layers; i++) {
    for (const kind of ["key", "value"]) {
      const dims = [1, config.num_key_value_heads, 0, config.head_dim];
      feeds[`past_key_values.${i}.${kind}`] = half ? new o.Tensor("float16", new Uint16Array(0), dims) : new o.Tensor("float32", new Float32Array(0), dims);
    }
  }
  const data = (await session.run(feeds)).logits!.data;
  if (data instanceof Float32Array) return data;
  if (data instanceof Uint16Array) return fromFloat16Array(data);
  return Float32Array.from(data as ArrayLike<number>); // Float16Array where the runtime has one
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

function argmaxRows(logits: Float32Array, vocab: number): number[] {
  const out: number[] = [];
  for (let r = 0; r < logits.length / vocab; r++) {
    let best = 0;
    for (let i = 1; i < vocab; i++) if (logits[r * vocab + i]! > logits[r * vocab + best]!) best = i;
    out.push(best);
  }
  return out;
}

/** A prompt of real token ids: the chat template's header and a sentence, as the server would see them. */
const PROBE_MESSAGES: ChatMessage[] = [
  { role: "system", content: "You keep the harbour log." },
  { role: "user", content: "The tide came in at 04:17 and went out at 10:42; the pass key is 58213. What is the pass key?" },
];

async function probeIds(dir: string): Promise<number[]> {
  const engine = await Engine.load(engineOptions({ modelDir: dir, variant: "fp32" }));
  try {
    return await engine.encodeChat(PROBE_MESSAGES, { extra: { date_string: "26 Jul 2024" } });
  } finally {
    await engine.close();
  }
}

describe("fp32 import equals the built-in builder on the same weights", () => {
  for (const name of ["fixture", "random"] as const) {
    test(`${name}: logits within 1e-4 over a ${"chat"} prompt, argmax identical at every position`, async () => {
      const c = cases[name];
      const ids = await probeIds(c.refDir);
      expect(ids.length).toBeGreaterThan(40);
      const [ref, imp] = [await openGraph(c.refDir, "fp32"), await openGraph(c.importedDir, "fp32")];
      const a = await forward(ref, c.config, "fp32", ids);
      const b = await forward(imp, c.config, "fp32", ids);
      const diff = maxAbsDiff(a, b);
      console.log(`${name} fp32: max |logit diff| imported vs builder = ${diff}`);
      expect(diff).toBeLessThanOrEqual(1e-4);
      expect(argmaxRows(b, c.config.vocab_size)).toEqual(argmaxRows(a, c.config.vocab_size));
      await Promise.all([ref.release(), imp.release()]);
    });
  }

  test("the server's greedy tokens on the imported folder equal the builder's folder's (real HTTP)", async () => {
    const c = cases.random;
    const replies: string[] = [];
    for (const dir of [c.refDir, c.importedDir]) {
      const server: ServerProcess = await startBunServer(["--port", "0", "--backend", "wasm", "--model", dir, "--variant", "fp32"]);
      try {
        const res = await fetch(`${server.url}/v1/chat/completions`, {
          method: "POST",
          headers: { "content-type": "application/json" },
          body: JSON.stringify({ messages: PROBE_MESSAGES, max_tokens: 32, temperature: 0, ignore_eos: true }),
        });
        expect(res.status).toBe(200);
        const body = (await res.json()) as { choices: { message: { content: string } }[]; usage: { completion_tokens: number } };
        expect(body.usage.completion_tokens).toBe(32);
        replies.push(body.choices[0]!.message.content);
      } finally {
        server.child.kill("SIGTERM");
      }
    }
    expect(replies[0]!.length).toBeGreaterThan(20);
    expect(replies[1]).toBe(replies[0]!);
  }, 180_000);
});

/**
 * Tolerances against the imported fp32 over the probe prompt's 73 positions: max |logit difference|,
 * relative RMS error of all logits, and the share of positions whose argmax stays the same. Measured on
 * these two models (fixture / random): fp16 0.017 / 0.010 max, 0.04% / 0.03% RMS, 100% / 98.6% argmax;
 * int8 0.39 / 0.24, 1.0% / 1.0%, 98.6% / 95.9% (native, int8 activations: 0.88 / 0.38, 1.5% / 1.6%,
 * 97.3% / 91.8%); q4 (and q4f16, either backend) 8.9 / 4.8, 22.6% / 17%, 72.6% / 60.3%.
 * q4's error is large on models this narrow (hidden 64 and 96: 2-3 blocks of 32 per row, and random or
 * barely-trained weights whose logits sit close together); what it must keep is the behaviour (the
 * pass-key test below), and its arithmetic is checked exactly against its dequantized weights.
 */
const TOLERANCE: Record<Exclude<LlamaOnnxDtype, "fp32">, { maxDiff: number; relRms: number; argmaxAgree: number }> = {
  fp16: { maxDiff: 0.05, relRms: 0.002, argmaxAgree: 0.95 },
  int8: { maxDiff: 1.25, relRms: 0.025, argmaxAgree: 0.85 },
  q4: { maxDiff: 15, relRms: 0.33, argmaxAgree: 0.5 },
  q4f16: { maxDiff: 15, relRms: 0.33, argmaxAgree: 0.5 },
};

describe("fp16, int8, q4 and q4f16 imports stay near fp32", () => {
  // WASM multiplies the q4 / int8 weights with float32 activations; onnxruntime-node takes accuracy_level 4
  // (int8 activations) as the import writes it.
  const runs: [Exclude<LlamaOnnxDtype, "fp32">, "wasm" | "native"][] = [["fp16", "wasm"], ["int8", "wasm"], ["int8", "native"], ["q4", "wasm"], ["q4", "native"], ["q4f16", "wasm"], ["q4f16", "native"]];
  for (const name of ["fixture", "random"] as const) {
    for (const [dtype, backend] of runs) {
      test(`${name} ${dtype} (${backend})`, async () => {
        const c = cases[name];
        const ids = await probeIds(c.importedDir);
        const [full, low] = [await openGraph(c.importedDir, "fp32"), await openGraph(c.importedDir, dtype, backend)];
        const a = await forward(full, c.config, "fp32", ids);
        const b = await forward(low, c.config, dtype, ids);
        const diff = maxAbsDiff(a, b);
        const am = argmaxRows(a, c.config.vocab_size);
        const bm = argmaxRows(b, c.config.vocab_size);
        const agree = am.filter((t, i) => t === bm[i]).length / am.length;
        let se = 0;
        let ss = 0;
        for (let i = 0; i < a.length; i++) {
          se += (a[i]! - b[i]!) ** 2;
          ss += a[i]! ** 2;
        }
        const relRms = Math.sqrt(se / ss);
        console.log(`${name} ${dtype} (${backend}): max |logit diff| vs fp32 = ${diff.toFixed(4)}, relative RMS error ${relRms.toFixed(4)}, argmax agreement ${(agree * 100).toFixed(1)}% over ${am.length} positions`);
        expect(relRms).toBeLessThanOrEqual(TOLERANCE[dtype].relRms);
        expect(diff).toBeLessThanOrEqual(TOLERANCE[dtype].maxDiff);
        expect(agree).toBeGreaterThanOrEqual(TOLERANCE[dtype].argmaxAgree);
        await Promise.all([full.release(), low.release()]);
      });
    }
  }
});

describe("quantized graphs compute exactly with the dequantized weights", () => {
  // Separates the two sources of difference from fp32: quantization noise (the tolerances above) and how
  // the graph uses the 4- and 8-bit blocks (packing, zero points, scales), which must be exact: an fp32
  // graph over the dequantized weights (and the float16-rounded embedding) gives the same logits.
  for (const dtype of ["q4", "int8"] as const) {
    test(`random ${dtype} (accuracy_level 0): logits equal those of fp32 over (q - zero_point) * scale within 1e-3`, async () => {
      const c = cases.random;
      const bits = dtype === "q4" ? 4 : 8;
      const dequantized: LlamaWeights = {};
      for (const [name, w] of Object.entries(c.weights)) {
        if (name === "model.embed_tokens.weight") dequantized[name] = { dims: w.dims, data: roundTo(w.data, "F16") };
        else if (w.dims.length === 2) {
          const [rows, k] = w.dims as [number, number];
          dequantized[name] = { dims: w.dims, data: dequantizeRows(quantizeRows(w.data, rows, k, bits), rows, k, bits) };
        } else dequantized[name] = w;
      }
      const plain = await ort.InferenceSession.create(buildLlamaOnnx(c.config, dequantized, { dtype: "fp32" }).model);
      const quantized = await openGraph(join(root, "random-level0"), dtype);
      const ids = await probeIds(c.importedDir);
      const diff = maxAbsDiff(await forward(plain, c.config, "fp32", ids), await forward(quantized, c.config, dtype, ids));
      console.log(`random ${dtype}: max |logit diff| vs fp32 over dequantized weights = ${diff}`);
      expect(diff).toBeLessThanOrEqual(1e-3);
      await Promise.all([plain.release(), quantized.release()]);
    });
  }
});

describe("the imported fixture still retrieves", () => {
  test("pass key at 256 and 1024 tokens of filler, depths 0 / 0.5 / 1: q4 within 5 points of fp32", async () => {
    const scores: Record<string, number> = {};
    for (const variant of ["fp32", "q4"] as const) {
      const engine = await Engine.load(engineOptions({ modelDir: cases.fixture.importedDir, variant, contextLength: 0 }));
      const tasks = new FixtureTasks(engine.tokenizer, engine.template, "eval");
      let correct = 0;
      let trials = 0;
      let seed = 100;
      for (const fillerTokens of [256, 1024]) {
        for (const depth of [0, 0.5, 1]) {
          const r = await runCell(engine, tasks, { kind: "passkey", fillerTokens, depth, trials: 10, seed: seed++ }, "26 Jul 2024");
          correct += r.correct;
          trials += r.trials;
        }
      }
      scores[variant] = correct / trials;
      await engine.close();
    }
    console.log(`imported fixture pass key (60 trials): fp32 ${(scores.fp32! * 100).toFixed(1)}%, q4 ${(scores.q4! * 100).toFixed(1)}%`);
    expect(scores.fp32!).toBeGreaterThanOrEqual(0.9);
    expect(scores.q4!).toBeGreaterThanOrEqual(scores.fp32! - 0.05);
  }, 300_000);
});

describe("a reference outside our code", () => {
  test("transformers.js on the imported fp32 folder gives our greedy tokens", async () => {
    const c = cases.random;
    const engine = await Engine.load(engineOptions({ modelDir: c.importedDir, variant: "fp32" }));
    const peer = await loadTransformersPeer({ backend: "wasm", modelsDir: root, modelId: "random-imported", dtype: "fp32", threads: 1 });
    try {
      const promptIds = await engine.encodeChat(PROBE_MESSAGES, { extra: { date_string: "26 Jul 2024" } });
      const ours = await engine.complete({ promptIds, maxTokens: 24, sampling: { temperature: 0 }, stop: [], ignoreEos: true });
      const theirs = await peer.generate(promptIds, 24);
      expect(new Set(ours.tokenIds).size).toBeGreaterThan(6);
      expect(ours.tokenIds).toEqual(theirs.tokenIds);
    } finally {
      await peer.dispose();
      await engine.close();
    }
  }, 180_000);
});

describe("streaming and errors", () => {
  test("the writer reads each weight a bounded run of rows at a time (never a whole large tensor)", () => {
    // A tall embedding (the 8B's is 128256 x 4096): the writer must ask for slices, not the tensor.
    const config: LlamaConfig = { ...RANDOM_CONFIG, hidden_size: 1024, num_attention_heads: 8, num_key_value_heads: 2, head_dim: 128, intermediate_size: 64, num_hidden_layers: 1 };
    const weights = randomLlamaWeights(config, 3);
    const inner = memoryWeightSource(weights);
    let largest = 0;
    const source = { dims: inner.dims, rows: (name: string, r0: number, r1: number) => {
      const rows = inner.rows(name, r0, r1);
      largest = Math.max(largest, rows.byteLength);
      return rows;
    } };
    for (const dtype of ["fp32", "q4"] as const) {
      const layout = layoutLlamaWeights(config, dtype);
      writeLlamaWeights(layout, source, { write: () => {} });
    }
    const embeddingBytes = config.vocab_size * config.hidden_size * 4; // 525 MB
    console.log(`largest read ${(largest / 2 ** 20).toFixed(1)} MiB of a ${(embeddingBytes / 2 ** 20).toFixed(0)} MiB embedding`);
    expect(largest).toBeLessThanOrEqual(64 * 2 ** 20);
  }, 120_000);

  /** A copy of the random checkpoint's folder to break, by hard links (the shards are read only). */
  async function brokenCopy(tag: string): Promise<string> {
    const dir = join(root, `broken-${tag}`);
    spawnSync("cp", ["-al", cases.random.hfDir, dir]);
    // config.json is rewritten by the tests: a file of its own, not a link to the original.
    const config = readFileSync(join(dir, "config.json"));
    rmSync(join(dir, "config.json"));
    writeFileSync(join(dir, "config.json"), config);
    return dir;
  }
  const importError = async (from: string): Promise<string> => {
    try {
      await importHfCheckpoint({ from, out: join(root, "never"), dtypes: ["q4"] });
    } catch (e) {
      expect(e).toBeInstanceOf(CheckpointError);
      return (e as Error).message;
    }
    throw new Error("the import did not fail");
  };

  test("a missing shard is named", async () => {
    const dir = await brokenCopy("shard");
    unlinkSync(join(dir, "model-00002-of-00003.safetensors"));
    expect(await importError(dir)).toContain("model-00002-of-00003.safetensors");
  });

  test("a tensor of the wrong shape is named with its file", async () => {
    const dir = await brokenCopy("shape");
    const config = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
    writeFileSync(join(dir, "config.json"), JSON.stringify({ ...config, intermediate_size: 192 }));
    const message = await importError(dir);
    expect(message).toContain("model.layers.0.mlp.gate_proj.weight");
    expect(message).toContain("[176,96]");
    expect(message).toMatch(/model-0000\d-of-00003\.safetensors/);
  });

  test("an unsupported architecture, tensor dtype or rope type is refused by name", async () => {
    const dir = await brokenCopy("arch");
    const config = JSON.parse(readFileSync(join(dir, "config.json"), "utf8"));
    writeFileSync(join(dir, "config.json"), JSON.stringify({ ...config, architectures: ["MistralForCausalLM"], model_type: "mistral" }));
    expect(await importError(dir)).toContain("MistralForCausalLM");
    writeFileSync(join(dir, "config.json"), JSON.stringify({ ...config, rope_scaling: { rope_type: "su-per", factor: 2 } }));
    expect(await importError(dir)).toContain("su-per");

    const i8 = await brokenCopy("dtype");
    const shard = join(i8, "model-00003-of-00003.safetensors");
    const bytes = readFileSync(shard);
    rmSync(shard); // a new file, not the hard-linked one
    const len = Number(bytes.readBigUInt64LE(0));
    const header = bytes.subarray(8, 8 + len).toString("utf8").replace(/"BF16"/, '"F8_E4M3"');
    writeFileSync(shard, Buffer.concat([bytes.subarray(0, 8), Buffer.from(header), bytes.subarray(8 + len)]));
    expect(await importError(i8)).toMatch(/F8_E4M3.*supported: BF16, F16, F32/);
  });

  test("a model too big for the WASM heap is refused at load with the way out named, before reading it", async () => {
    // An 8B model's q4 weights are 5.5 GiB; onnxruntime-web's heap is 4 GiB. A sparse data file of that size
    // stands in for them (nothing is read: the size alone decides).
    const dir = join(root, "too-big");
    spawnSync("cp", ["-r", cases.random.importedDir, dir]);
    spawnSync("truncate", ["-s", String(Math.round(5.46 * 2 ** 30)), join(dir, "onnx", "model_q4.onnx_data")]);
    const load = Engine.load(engineOptions({ modelDir: dir, variant: "q4", backend: "wasm" }));
    await expect(load).rejects.toThrow(/5\.46 GiB, more than onnxruntime-web's 4 GiB WebAssembly heap.*--backend native/);
    rmSync(dir, { recursive: true, force: true });
  });

  test("the command prints progress, the files, the time and the peak RSS; a bad folder exits 1 naming it", () => {
    const out = join(root, "cli-out");
    const ok = spawnSync(bin("bun"), ["scripts/import-hf.ts", "--from", cases.random.hfDir, "--out", out, "--dtype", "int8"], { cwd: REPO, encoding: "utf8", timeout: 120_000 });
    expect(ok.status).toBe(0);
    expect(ok.stderr).toMatch(/\[import int8\] \d+\/\d+ tensors, [\d.]+ GiB of [\d.]+ GiB written, ETA \d+ s/);
    expect(ok.stdout).toContain("onnx/model_int8.onnx_data");
    expect(ok.stdout).toMatch(/peak RSS [\d.]+ MiB; largest tensor [\d.]+ MiB as float32/);
    const bad = spawnSync(bin("bun"), ["scripts/import-hf.ts", "--from", join(root, "no-such-folder"), "--out", join(root, "cli-bad")], { cwd: REPO, encoding: "utf8", timeout: 60_000 });
    expect(bad.status).toBe(1);
    expect(bad.stderr).toContain("no-such-folder");
    expect(bad.stderr).toContain("config.json");
  }, 180_000);
});

// Keeps imports used when a describe block is filtered out.
void templateDate;
