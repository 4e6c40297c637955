// The model builder: graph I/O, cached decode == recomputation, num_logits_to_keep, a non-degenerate
// random model, the slot-index causal mask (KV compaction), determinism, and an independent float64
// reference forward pass. Runs the built files on onnxruntime-web (WASM, one thread).

import { afterAll, beforeAll, expect, test } from "bun:test";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as ort from "onnxruntime-web";
import { fromFloat16Array } from "../scripts/lib/fp16.ts";
import { buildModelFolder, DEFAULT_SEED, STAMP_FILE } from "../scripts/lib/model-folder.ts";
import { TINY_LLAMA_CONFIG as config, type Llama3RopeScaling, type LlamaWeights } from "../scripts/lib/onnx-llama.ts";
import { randomLlamaWeights } from "../scripts/lib/random-weights.ts";

ort.env.wasm.numThreads = 1;

const V = config.vocab_size;
const KV = config.num_key_value_heads;
const D = config.head_dim;
const LAYERS = config.num_hidden_layers;

// "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nTell me a story about a small red fox.
// <|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n" in the Llama-3 tokenizer: 20 tokens.
const CHAT_PROMPT = [
  128000, 128006, 882, 128007, 271, 41551, 757, 264, 3446, 922, 264, 2678, 2579, 39935, 13, 128009, 128006, 78191, 128007, 271,
];
const DECODE_STEPS = 16;

type Dtype = "fp32" | "fp16";
const tmpDirs: string[] = [];
let modelDir = "";
const sessions = {} as Record<Dtype, ort.InferenceSession>;

async function tempDir(): Promise<string> {
  const dir = await mkdtemp(join(tmpdir(), "model-builder-"));
  tmpDirs.push(dir);
  return dir;
}

beforeAll(async () => {
  modelDir = join(await tempDir(), "builtin");
  await buildModelFolder(modelDir, config, undefined, { seed: DEFAULT_SEED });
  sessions.fp32 = await ort.InferenceSession.create(await readFile(join(modelDir, "onnx/model.onnx")));
  sessions.fp16 = await ort.InferenceSession.create(await readFile(join(modelDir, "onnx/model_fp16.onnx")), {
    externalData: [{ path: "model_fp16.onnx_data", data: await readFile(join(modelDir, "onnx/model_fp16.onnx_data")) }],
  });
}, 60_000);

afterAll(async () => {
  await Promise.all(Object.values(sessions).map((s) => s.release()));
  await Promise.all(tmpDirs.map((d) => rm(d, { recursive: true, force: true })));
});

// ---- helpers ----

const i64 = (values: number[], dims: number[]) => new ort.Tensor("int64", BigInt64Array.from(values, BigInt), dims);
const range = (from: number, n: number) => Array.from({ length: n }, (_, i) => from + i);

function floats(t: ort.Tensor): Float32Array {
  const data = t.data;
  if (data instanceof Float32Array) return data;
  if (data instanceof Uint16Array) return fromFloat16Array(data);
  return Float32Array.from(data as ArrayLike<number>); // Float16Array where the runtime has it
}

function emptyPast(dtype: Dtype): ort.Tensor[] {
  return range(0, 2 * LAYERS).map(() =>
    dtype === "fp16"
      ? new ort.Tensor("float16", new Uint16Array(0), [1, KV, 0, D])
      : new ort.Tensor("float32", new Float32Array(0), [1, KV, 0, D]),
  );
}

interface StepOut {
  logits: Float32Array;
  logitsDims: readonly number[];
  /** present.0.key, present.0.value, present.1.key, ... */
  present: ort.Tensor[];
}

async function runStep(
  dtype: Dtype,
  ids: number[],
  positions: number[],
  mask: number[],
  past: ort.Tensor[] | null,
  keep: number,
): Promise<StepOut> {
  const kv = past ?? emptyPast(dtype);
  const feeds: Record<string, ort.Tensor> = {
    input_ids: i64(ids, [1, ids.length]),
    attention_mask: i64(mask, [1, mask.length]),
    position_ids: i64(positions, [1, positions.length]),
    num_logits_to_keep: i64([keep], []),
  };
  for (let i = 0; i < LAYERS; i++) {
    feeds[`past_key_values.${i}.key`] = kv[2 * i]!;
    feeds[`past_key_values.${i}.value`] = kv[2 * i + 1]!;
  }
  const out = await sessions[dtype].run(feeds);
  const present = range(0, LAYERS).flatMap((i) => [out[`present.${i}.key`]!, out[`present.${i}.value`]!]);
  return { logits: floats(out.logits!), logitsDims: out.logits!.dims, present };
}

const lastRow = (logits: Float32Array) => logits.subarray(logits.length - V);

function argmax(row: Float32Array): number {
  let best = 0;
  for (let i = 1; i < row.length; i++) if (row[i]! > row[best]!) best = i;
  return best;
}

function maxAbsDiff(a: Float32Array, b: Float32Array): number {
  expect(a.length).toBe(b.length);
  let m = 0;
  for (let i = 0; i < a.length; i++) m = Math.max(m, Math.abs(a[i]! - b[i]!));
  return m;
}

/** Greedy decoding with the KV cache; `forced` replaces the chosen tokens (teacher forcing). */
async function cachedDecode(dtype: Dtype, steps: number, forced?: number[]) {
  const tokens: number[] = [];
  const logits: Float32Array[] = [];
  let out = await runStep(dtype, CHAT_PROMPT, range(0, CHAT_PROMPT.length), CHAT_PROMPT.map(() => 1), null, 0);
  for (let s = 0; s < steps; s++) {
    const row = lastRow(out.logits).slice();
    logits.push(row);
    const next = forced?.[s] ?? argmax(row);
    tokens.push(next);
    const total = CHAT_PROMPT.length + s + 1;
    out = await runStep(dtype, [next], [total - 1], Array(total).fill(1), out.present, 1);
  }
  return { tokens, logits };
}

let greedyFp32: Promise<{ tokens: number[]; logits: Float32Array[] }> | undefined;
const greedy = () => (greedyFp32 ??= cachedDecode("fp32", DECODE_STEPS));

/** Slices KV slots (axis 2) out of [1, KV, T, D] tensors. */
function keepSlots(t: ort.Tensor, slots: number[]): ort.Tensor {
  const T = t.dims[2]!;
  const src = t.data as Float32Array;
  const dst = new Float32Array(KV * slots.length * D);
  for (let h = 0; h < KV; h++) {
    slots.forEach((slot, j) => dst.set(src.subarray((h * T + slot) * D, (h * T + slot + 1) * D), (h * slots.length + j) * D));
  }
  return new ort.Tensor("float32", dst, [1, KV, slots.length, D]);
}

// ---- tests ----

test("graph inputs and outputs are named and typed as in onnx-community exports", async () => {
  const kvIn = range(0, LAYERS).flatMap((i) => [`past_key_values.${i}.key`, `past_key_values.${i}.value`]);
  const kvOut = range(0, LAYERS).flatMap((i) => [`present.${i}.key`, `present.${i}.value`]);
  for (const dtype of ["fp32", "fp16"] as const) {
    const s = sessions[dtype];
    const float = dtype === "fp16" ? "float16" : "float32";
    expect([...s.inputNames].sort()).toEqual(
      ["input_ids", "attention_mask", "position_ids", ...kvIn, "num_logits_to_keep"].sort(),
    );
    expect([...s.outputNames]).toEqual(["logits", ...kvOut]);
    const meta = (list: readonly ort.InferenceSession.ValueMetadata[], name: string) => {
      const m = list.find((x) => x.name === name)!;
      if (!m.isTensor) throw new Error(`${name} is not a tensor`);
      return { type: m.type, shape: m.shape };
    };
    expect(meta(s.inputMetadata, "input_ids")).toEqual({ type: "int64", shape: ["batch_size", "sequence_length"] });
    expect(meta(s.inputMetadata, "attention_mask")).toEqual({ type: "int64", shape: ["batch_size", "total_sequence_length"] });
    expect(meta(s.inputMetadata, "position_ids")).toEqual({ type: "int64", shape: ["batch_size", "sequence_length"] });
    expect(meta(s.inputMetadata, "num_logits_to_keep")).toEqual({ type: "int64", shape: [] });
    for (const name of kvIn) {
      expect(meta(s.inputMetadata, name)).toEqual({ type: float, shape: ["batch_size", KV, "past_sequence_length", D] });
    }
    for (const name of kvOut) {
      expect(meta(s.outputMetadata, name)).toEqual({ type: float, shape: ["batch_size", KV, "total_sequence_length", D] });
    }
    expect(meta(s.outputMetadata, "logits")).toEqual({ type: float, shape: ["batch_size", "kept_length", V] });
  }

  const fp16Model = await readFile(join(modelDir, "onnx/model_fp16.onnx"));
  expect(fp16Model.byteLength).toBeLessThan(100_000); // weights live in the external data file
  const written = JSON.parse(await readFile(join(modelDir, "config.json"), "utf8"));
  expect(written).toMatchObject({ model_type: "llama", vocab_size: V, rope_scaling: { rope_type: "llama3" } });
  const gen = JSON.parse(await readFile(join(modelDir, "generation_config.json"), "utf8"));
  expect(gen).toEqual({ bos_token_id: 128000, do_sample: true, eos_token_id: [128001, 128008, 128009], temperature: 0.6, top_p: 0.9 });
});

test("fp32: cached greedy decode equals full recomputation", async () => {
  const { tokens, logits } = await greedy();
  for (let s = 0; s < DECODE_STEPS; s++) {
    const seq = [...CHAT_PROMPT, ...tokens.slice(0, s)];
    const full = await runStep("fp32", seq, range(0, seq.length), seq.map(() => 1), null, 0);
    expect(full.logitsDims).toEqual([1, seq.length, V]);
    const row = lastRow(full.logits);
    expect(argmax(row)).toBe(tokens[s]!);
    expect(maxAbsDiff(row, logits[s]!)).toBeLessThan(1e-4);
  }
});

test("fp16: cached decode equals full recomputation; close to fp32", async () => {
  const ref = await greedy();
  const steps = 8;
  const { logits } = await cachedDecode("fp16", steps, ref.tokens);
  for (let s = 0; s < steps; s++) {
    const seq = [...CHAT_PROMPT, ...ref.tokens.slice(0, s)];
    const full = await runStep("fp16", seq, range(0, seq.length), seq.map(() => 1), null, 1);
    expect(full.logitsDims).toEqual([1, 1, V]);
    expect(maxAbsDiff(full.logits, logits[s]!)).toBeLessThan(2e-2);
    expect(maxAbsDiff(logits[s]!, ref.logits[s]!)).toBeLessThan(0.1);
  }
});

test("num_logits_to_keep=1 returns the last row of num_logits_to_keep=0", async () => {
  const ids = CHAT_PROMPT.slice(0, 12);
  const all = await runStep("fp32", ids, range(0, ids.length), ids.map(() => 1), null, 0);
  const one = await runStep("fp32", ids, range(0, ids.length), ids.map(() => 1), null, 1);
  const three = await runStep("fp32", ids, range(0, ids.length), ids.map(() => 1), null, 3);
  expect(all.logitsDims).toEqual([1, ids.length, V]);
  expect(one.logitsDims).toEqual([1, 1, V]);
  expect(three.logitsDims).toEqual([1, 3, V]);
  expect(maxAbsDiff(one.logits, lastRow(all.logits))).toBeLessThan(1e-5);
  expect(maxAbsDiff(three.logits, all.logits.subarray((ids.length - 3) * V))).toBeLessThan(1e-5);
  // The KV cache covers every position whatever the number of logits kept.
  expect(one.present[0]!.dims).toEqual([1, KV, ids.length, D]);
});

test("random model is not degenerate: greedy decoding varies and logits are spread", async () => {
  const { tokens, logits } = await greedy();
  expect(new Set(tokens).size).toBeGreaterThanOrEqual(4);
  expect(new Set(tokens.slice(-8)).size).toBeGreaterThan(1);
  const row = logits[0]!;
  const mean = row.reduce((a, b) => a + b, 0) / row.length;
  const std = Math.sqrt(row.reduce((a, b) => a + (b - mean) ** 2, 0) / row.length);
  expect(std).toBeGreaterThan(1);
  expect(std).toBeLessThan(20);
});

test("mask is on cache slot: dropped slots equal masked slots, with original position_ids", async () => {
  const prompt = CHAT_PROMPT;
  const T = prompt.length;
  const prefill = await runStep("fp32", prompt, range(0, T), prompt.map(() => 1), null, 0);
  const dropped = new Set([5, 6, 7, 8, 9, 12]);
  const kept = range(0, T).filter((k) => !dropped.has(k));
  const newIds = [3446, 922]; // two new tokens, so the causal part among new slots is checked too
  const newPos = [T, T + 1];

  // Compacted: slots removed from the cache and the mask; new tokens keep their original positions.
  const compacted = await runStep(
    "fp32",
    newIds,
    newPos,
    [...kept.map(() => 1), 1, 1],
    prefill.present.map((t) => keepSlots(t, kept)),
    0,
  );
  expect(compacted.logitsDims).toEqual([1, 2, V]);
  expect(compacted.present[0]!.dims).toEqual([1, KV, kept.length + 2, D]);
  expect(compacted.logits.every(Number.isFinite)).toBe(true);

  // Same cache, slots masked out with attention_mask zeros instead.
  const masked = await runStep(
    "fp32",
    newIds,
    newPos,
    [...range(0, T).map((k) => (dropped.has(k) ? 0 : 1)), 1, 1],
    prefill.present,
    0,
  );
  expect(maxAbsDiff(compacted.logits, masked.logits)).toBeLessThan(1e-4);

  // And the masked slots really mattered.
  const full = await runStep("fp32", newIds, newPos, Array(T + 2).fill(1), prefill.present, 0);
  expect(maxAbsDiff(full.logits, masked.logits)).toBeGreaterThan(1e-2);
});

test("batch of two with left padding matches the unpadded runs", async () => {
  const long = CHAT_PROMPT.slice(0, 8);
  const short = CHAT_PROMPT.slice(0, 5);
  const pad = long.length - short.length;
  const feeds: Record<string, ort.Tensor> = {
    input_ids: i64([...long, ...Array(pad).fill(128009), ...short], [2, long.length]),
    attention_mask: i64([...long.map(() => 1), ...Array(pad).fill(0), ...short.map(() => 1)], [2, long.length]),
    position_ids: i64([...range(0, long.length), ...Array(pad).fill(1), ...range(0, short.length)], [2, long.length]),
    num_logits_to_keep: i64([1], []),
  };
  for (let i = 0; i < LAYERS; i++) {
    for (const kind of ["key", "value"]) {
      feeds[`past_key_values.${i}.${kind}`] = new ort.Tensor("float32", new Float32Array(0), [2, KV, 0, D]);
    }
  }
  const out = await sessions.fp32.run(feeds);
  expect(out.logits!.dims).toEqual([2, 1, V]);
  const both = floats(out.logits!);
  for (const [row, ids] of [long, short].entries()) {
    const single = await runStep("fp32", ids, range(0, ids.length), ids.map(() => 1), null, 1);
    expect(maxAbsDiff(both.subarray(row * V, (row + 1) * V), single.logits)).toBeLessThan(1e-4);
  }
});

test("graph matches an independent float64 forward pass", async () => {
  const weights = randomLlamaWeights(config, DEFAULT_SEED);
  const ids = [128000, 9906, 1917, 13, 358, 1097];
  const positions = range(100_000, ids.length); // far positions exercise the llama3-scaled RoPE
  const out = await runStep("fp32", ids, positions, ids.map(() => 1), null, 0);
  const expected = referenceForward(weights, ids, positions);
  expect(maxAbsDiff(out.logits, expected)).toBeLessThan(1e-3);
});

test("builds are byte-identical; --if-missing skips an up-to-date folder and rebuilds a stale one", async () => {
  const again = join(await tempDir(), "builtin");
  await buildModelFolder(again, config, undefined, { seed: DEFAULT_SEED });
  for (const f of ["onnx/model.onnx", "onnx/model_fp16.onnx", "onnx/model_fp16.onnx_data", STAMP_FILE]) {
    expect(Buffer.compare(await readFile(join(modelDir, f)), await readFile(join(again, f)))).toBe(0);
  }

  const cli = (dir: string) => {
    const p = Bun.spawnSync([process.execPath, join(import.meta.dir, "../scripts/build-model.ts"), "--out", dir, "--if-missing"]);
    expect(p.exitCode).toBe(0);
    return p.stdout.toString();
  };
  expect(cli(again)).toContain("up to date");
  await writeFile(join(again, STAMP_FILE), "stale\n");
  expect(cli(again)).toContain("built");
  expect(await readFile(join(again, STAMP_FILE), "utf8")).toBe(await readFile(join(modelDir, STAMP_FILE), "utf8"));
}, 30_000);

// ---- float64 reference (HF LlamaForCausalLM semantics, written independently of the graph) ----

function referenceInvFreq(): number[] {
  // As transformers computes them: torch float32 ops (`1.0 / base ** (arange(0, dim, 2).float() / dim)`, then
  // _compute_llama3_parameters elementwise), each step rounded to float32. The rest of the forward is float64.
  // (Frequencies in float64 are a few ulps off: at position 100,000 that moved logits by ~1e-2.)
  const f32 = Math.fround;
  const s = config.rope_scaling as Llama3RopeScaling;
  const factor = f32(s.factor);
  const lowWavelen = f32(s.original_max_position_embeddings / s.low_freq_factor);
  const highWavelen = f32(s.original_max_position_embeddings / s.high_freq_factor);
  const out: number[] = [];
  for (let i = 0; i < D / 2; i++) {
    const f = f32(1 / f32(f32(config.rope_theta) ** f32((2 * i) / D)));
    const wavelen = f32(f32(1 / f) * f32(2 * Math.PI));
    const scaled = wavelen > lowWavelen ? f32(f / factor) : f;
    if (wavelen < highWavelen || wavelen > lowWavelen) out.push(scaled);
    else {
      const smooth = f32(f32(f32(f32(1 / wavelen) * f32(s.original_max_position_embeddings)) - f32(s.low_freq_factor)) / f32(s.high_freq_factor - s.low_freq_factor));
      out.push(f32(f32(f32(f32(1 - smooth) * scaled) / factor) + f32(smooth * scaled)));
    }
  }
  return out;
}

function referenceForward(w: LlamaWeights, ids: number[], positions: number[]): Float32Array {
  const H = config.hidden_size;
  const NH = config.num_attention_heads;
  const I = config.intermediate_size;
  const S = ids.length;
  const get = (name: string) => w[name]!.data;
  // y[out] = sum_in W[out, in] x[in]  (HF layout)
  const linear = (W: Float32Array, x: number[], outDim: number) =>
    range(0, outDim).map((o) => x.reduce((acc, xi, j) => acc + W[o * x.length + j]! * xi, 0));
  const rms = (x: number[], weight: Float32Array) => {
    const inv = 1 / Math.sqrt(x.reduce((a, v) => a + v * v, 0) / x.length + config.rms_norm_eps);
    return x.map((v, j) => v * inv * weight[j]!);
  };
  const invFreq = referenceInvFreq();
  const rope = (vec: number[], pos: number) => {
    const out = vec.slice();
    for (let j = 0; j < D / 2; j++) {
      // The graph computes the angle in float32, as transformers does; everything else here is float64.
      const angle = Math.fround(Math.fround(pos) * Math.fround(invFreq[j]!));
      const c = Math.cos(angle);
      const s = Math.sin(angle);
      out[j] = vec[j]! * c - vec[j + D / 2]! * s;
      out[j + D / 2] = vec[j + D / 2]! * c + vec[j]! * s;
    }
    return out;
  };

  const emb = get("model.embed_tokens.weight");
  let hs = ids.map((id) => Array.from(emb.subarray(id * H, (id + 1) * H)));
  for (let l = 0; l < LAYERS; l++) {
    const p = `model.layers.${l}`;
    const xs = hs.map((h) => rms(h, get(`${p}.input_layernorm.weight`)));
    const qs = xs.map((x) => linear(get(`${p}.self_attn.q_proj.weight`), x, NH * D));
    const ks = xs.map((x) => linear(get(`${p}.self_attn.k_proj.weight`), x, KV * D));
    const vs = xs.map((x) => linear(get(`${p}.self_attn.v_proj.weight`), x, KV * D));
    const head = (vec: number[], h: number) => vec.slice(h * D, (h + 1) * D);
    const ctx = range(0, S).map(() => [] as number[]);
    for (let h = 0; h < NH; h++) {
      const kvh = Math.floor(h / (NH / KV));
      const keys = ks.map((k, t) => rope(head(k, kvh), positions[t]!));
      for (let t = 0; t < S; t++) {
        const q = rope(head(qs[t]!, h), positions[t]!);
        const scores = range(0, t + 1).map((u) => q.reduce((a, qi, j) => a + qi * keys[u]![j]!, 0) / Math.sqrt(D));
        const m = Math.max(...scores);
        const e = scores.map((x) => Math.exp(x - m));
        const z = e.reduce((a, b) => a + b, 0);
        const o = range(0, D).map((j) => e.reduce((a, ei, u) => a + (ei / z) * head(vs[u]!, kvh)[j]!, 0));
        ctx[t]!.push(...o);
      }
    }
    hs = hs.map((h, t) => {
      const attn = linear(get(`${p}.self_attn.o_proj.weight`), ctx[t]!, H);
      const r = h.map((v, j) => v + attn[j]!);
      const y = rms(r, get(`${p}.post_attention_layernorm.weight`));
      const gate = linear(get(`${p}.mlp.gate_proj.weight`), y, I);
      const up = linear(get(`${p}.mlp.up_proj.weight`), y, I);
      const act = gate.map((g, j) => (g / (1 + Math.exp(-g))) * up[j]!);
      const down = linear(get(`${p}.mlp.down_proj.weight`), act, H);
      return r.map((v, j) => v + down[j]!);
    });
  }
  const lm = get("lm_head.weight");
  const out = new Float32Array(S * V);
  hs.forEach((h, t) => {
    const x = rms(h, get("model.norm.weight"));
    for (let v = 0; v < V; v++) {
      let acc = 0;
      for (let j = 0; j < H; j++) acc += lm[v * H + j]! * x[j]!;
      out[t * V + v] = acc;
    }
  });
  return out;
}
