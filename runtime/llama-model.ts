/**
 * One ONNX session of a Llama-family decoder in the Optimum layout, and the forward step the generation
 * loop needs: feed new token ids with their position ids, the attention mask and the past KV; read the
 * logits of the last position and the present KV. Input and output names are discovered from the graph;
 * anything the runtime cannot feed is reported at load time, naming the input.
 */
import { readFile, stat } from "node:fs/promises";
import type { InferenceSession, Tensor } from "onnxruntime-web";
import type { Backend } from "./backend.ts";
import { ModelFolderError, RuntimeError } from "./errors.ts";
import { KvCache, capacityFor, type KvArray, type KvDtype, type KvMode } from "./kv-cache.ts";
import { variantUsesFloat16, type ModelFolder } from "./model-folder.ts";
import { yieldToEventLoop } from "./yield.ts";

export interface GraphIo {
  hasPositionIds: boolean;
  hasNumLogitsToKeep: boolean;
  hasUseCacheBranch: boolean;
  kvDtype: KvDtype;
  logitsDtype: KvDtype;
  layers: number;
  /** "inplace": the graph reads runtime-owned KV storage and returns only the new tokens' KV (see kv-cache.ts). */
  kvMode: KvMode;
  /** The graph returns slot_attention (attention each slot received in a run), which attention-informed compaction reads. */
  hasSlotAttention: boolean;
  /** The graph returns query.N (each layer's queries after rotary), which recall scoring reads. */
  hasQueries: boolean;
}

const KNOWN_INPUTS = new Set(["input_ids", "attention_mask", "position_ids", "num_logits_to_keep", "use_cache_branch"]);
const PAST = /^past_key_values\.(\d+)\.(key|value)$/;
const PRESENT = /^present\.(\d+)\.(key|value)$/;
const INPLACE_INPUTS = new Set(["input_ids", "slot_mask", "position_ids", "num_logits_to_keep", "rows_per_matmul"]);
const CACHE = /^cache\.(\d+)\.(key|value)$/;
const NEW = /^new\.(\d+)\.(key|value)$/;

type Metadata = InferenceSession["inputMetadata"][number];
function tensorType(meta: readonly Metadata[], name: string): string | null {
  const m = meta.find((x) => x.name === name);
  return m && m.isTensor ? m.type : null;
}

/** Checks an in-place KV graph (folder.kvOnnxFile) against what the runtime feeds; throws ModelFolderError naming any mismatch. */
function inspectInplaceGraph(session: InferenceSession, folder: ModelFolder, file: string): GraphIo {
  const inputs = session.inputNames;
  const outputs = session.outputNames;
  const layers = folder.config.numLayers;
  const expectedInputs = [...INPLACE_INPUTS];
  const expectedOutputs = ["logits"];
  for (let i = 0; i < layers; i++) {
    for (const kind of ["key", "value"]) {
      expectedInputs.push(`cache.${i}.${kind}`);
      expectedOutputs.push(`new.${i}.${kind}`);
    }
  }
  const missing = [...expectedInputs.filter((n) => !inputs.includes(n)), ...expectedOutputs.filter((n) => !outputs.includes(n))];
  // Compaction's outputs are optional (see scripts/lib/onnx-llama.ts): slot_attention, and query.N for all layers or none.
  const queries = Array.from({ length: layers }, (_, i) => `query.${i}`);
  if (outputs.some((n) => queries.includes(n))) missing.push(...queries.filter((n) => !outputs.includes(n)));
  const extra = [
    ...inputs.filter((n) => !expectedInputs.includes(n)),
    ...outputs.filter((n) => !expectedOutputs.includes(n) && n !== "slot_attention" && !queries.includes(n)),
  ];
  if (missing.length || extra.length || !inputs.every((n) => INPLACE_INPUTS.has(n) || CACHE.test(n))) {
    throw new ModelFolderError(
      `${file}: not an in-place KV graph for ${layers} layers` + (missing.length ? `; missing: ${missing.join(", ")}` : "") + (extra.length ? `; unexpected: ${extra.join(", ")}` : ""),
    );
  }
  const type = (meta: readonly Metadata[], name: string): KvDtype => {
    const t = tensorType(meta, name);
    if (t === "float32" || t === "float16") return t;
    throw new ModelFolderError(`${file}: ${name} has type ${t}; only float32 and float16 are supported`);
  };
  return {
    hasPositionIds: true,
    hasNumLogitsToKeep: true,
    hasUseCacheBranch: false,
    kvDtype: type(session.inputMetadata ?? [], "cache.0.key"),
    logitsDtype: type(session.outputMetadata ?? [], "logits"),
    layers,
    kvMode: "inplace",
    hasSlotAttention: outputs.includes("slot_attention"),
    hasQueries: queries.every((n) => outputs.includes(n)),
  };
}

/** Checks the graph's names and types against what the runtime feeds; throws ModelFolderError naming any mismatch. */
export function inspectGraph(session: InferenceSession, folder: ModelFolder, file = folder.onnxFile): GraphIo {
  if (file === folder.kvOnnxFile) return inspectInplaceGraph(session, folder, file);
  const inputs = session.inputNames;
  const outputs = session.outputNames;
  for (const required of ["input_ids", "attention_mask"]) {
    if (!inputs.includes(required)) throw new ModelFolderError(`${file}: graph has no "${required}" input (inputs: ${inputs.join(", ")})`);
  }
  if (!outputs.includes("logits")) throw new ModelFolderError(`${file}: graph has no "logits" output (outputs: ${outputs.join(", ")})`);
  const unknown = inputs.filter((n) => !KNOWN_INPUTS.has(n) && !PAST.test(n));
  if (unknown.length) {
    throw new ModelFolderError(`${file}: graph has inputs this runtime cannot feed: ${unknown.join(", ")} (is it a Llama-family decoder with past_key_values?)`);
  }
  const layers = folder.config.numLayers;
  for (let i = 0; i < layers; i++) {
    for (const kind of ["key", "value"]) {
      if (!inputs.includes(`past_key_values.${i}.${kind}`)) {
        throw new ModelFolderError(`${file}: graph has no input past_key_values.${i}.${kind} (config.json says num_hidden_layers=${layers}; a graph exported without KV cache cannot be served)`);
      }
      if (!outputs.includes(`present.${i}.${kind}`)) {
        throw new ModelFolderError(`${file}: graph has no output present.${i}.${kind}`);
      }
    }
  }
  const extraLayers = inputs.filter((n) => {
    const m = PAST.exec(n);
    return m && Number(m[1]) >= layers;
  });
  if (extraLayers.length) {
    throw new ModelFolderError(`${file}: graph has ${extraLayers[0]} but config.json says num_hidden_layers=${layers}`);
  }
  const extraOutputs = outputs.filter((n) => n !== "logits" && !PRESENT.test(n));
  if (extraOutputs.length) throw new ModelFolderError(`${file}: graph has unexpected outputs: ${extraOutputs.join(", ")}`);

  const asKvDtype = (t: string | null, what: string, fallback: KvDtype): KvDtype => {
    if (t === null) return fallback;
    if (t === "float32" || t === "float16") return t;
    throw new ModelFolderError(`${file}: ${what} has type ${t}; only float32 and float16 are supported`);
  };
  const guess: KvDtype = variantUsesFloat16(folder.variant) ? "float16" : "float32";
  return {
    hasPositionIds: inputs.includes("position_ids"),
    hasNumLogitsToKeep: inputs.includes("num_logits_to_keep"),
    hasUseCacheBranch: inputs.includes("use_cache_branch"),
    kvDtype: asKvDtype(tensorType(session.inputMetadata ?? [], "past_key_values.0.key"), "past_key_values.0.key", guess),
    logitsDtype: asKvDtype(tensorType(session.outputMetadata ?? [], "logits"), "logits", guess),
    layers,
    kvMode: "present",
    hasSlotAttention: false,
    hasQueries: false,
  };
}

/** IEEE half -> float, via a table of the 65536 values (built once, 256 KiB). */
let halfTable: Float32Array | null = null;
function halfToFloat(src: Uint16Array, out: Float32Array): void {
  if (!halfTable) {
    halfTable = new Float32Array(65536);
    for (let h = 0; h < 65536; h++) {
      const sign = h & 0x8000 ? -1 : 1;
      const exp = (h >> 10) & 0x1f;
      const frac = h & 0x3ff;
      halfTable[h] =
        exp === 0 ? sign * frac * 2 ** -24 : exp === 31 ? (frac ? NaN : sign * Infinity) : sign * (1 + frac / 1024) * 2 ** (exp - 15);
    }
  }
  for (let i = 0; i < src.length; i++) out[i] = halfTable[src[i]!]!;
}

/** A present.* output as the cache keeps it: float32 as is, float16 as its Uint16 bits (a Float16Array is reinterpreted, not converted). */
function kvArray(tensor: Tensor): KvArray {
  const data = tensor.data as Float32Array | Uint16Array | { buffer: ArrayBufferLike; byteOffset: number; length: number };
  if (data instanceof Float32Array || data instanceof Uint16Array) return data;
  return new Uint16Array(data.buffer, data.byteOffset, data.length);
}

/**
 * Sizes prefill chunks so that one forward pass takes about targetMs: onnxruntime's session.run holds the
 * thread (WASM and onnxruntime-node alike), so a 512-token chunk at 20K tokens of context kept every other
 * request, /health included, waiting for half a second. Each chunk is the last one scaled by target /
 * measured time (at most 2x either way). A run costs about a + b * tokens, where a (feeding the KV cache
 * in and out) grows with the context until it alone passes any target; the target is therefore raised to
 * 2a, so that prefill keeps at least half its speed instead of shrinking to a token per run. a is
 * estimated from consecutive runs, whose sizes alternate 25% above and below the aim to make that possible.
 */
export class PrefillChunker {
  size: number;
  private fixedMs = 0;
  private last: { tokens: number; ms: number } | null = null;
  private flip = 1;

  constructor(
    private readonly max: number,
    private readonly targetMs: number,
  ) {
    this.size = targetMs > 0 ? Math.min(max, 32) : max;
  }

  observe(tokens: number, ms: number): void {
    if (this.targetMs <= 0 || ms <= 0) return;
    const last = this.last;
    if (last && Math.abs(last.tokens - tokens) * 5 >= Math.max(last.tokens, tokens)) {
      const perToken = (ms - last.ms) / (tokens - last.tokens);
      const fixed = perToken > 0 ? Math.min(Math.max(ms - perToken * tokens, 0), 0.9 * Math.min(ms, last.ms)) : 0;
      this.fixedMs = this.fixedMs === 0 ? fixed : 0.7 * this.fixedMs + 0.3 * fixed;
    }
    this.last = { tokens, ms };
    const aim = (tokens * Math.max(this.targetMs, 2 * this.fixedMs)) / ms;
    this.flip = -this.flip;
    const next = Math.min(Math.max(aim, tokens / 2), tokens * 2) * (1 + 0.25 * this.flip);
    this.size = Math.max(1, Math.min(this.max, Math.round(next)));
  }
}

/** Bound on one attention score tensor during prefill on the in-place path (see maxChunkFor). */
const SCORE_TENSOR_BYTES = 32 * 2 ** 20;
/** Bound on the logits of one prefill run when every position's are asked for (prompt logprobs): 64 MiB, 130 tokens of a 128K vocabulary. */
const ALL_LOGITS_BYTES = 64 * 2 ** 20;
/** Graph plus weights onnxruntime-web's WASM backend is asked to load at most: its heap is 4 GiB (wasm32), and the KV cache and activations live there too. */
export const WASM_HEAP_WEIGHTS_LIMIT = 3.5 * 2 ** 30;

export interface ForwardOptions {
  /** Logits for the last position only (default) or for every new position. */
  allLogits?: boolean;
  /**
   * A recall probe: the layers' queries come back (ForwardResult.queries), the slots' scores are left
   * alone and the cache is not compacted after the run (its new slots are dropped next).
   */
  probe?: boolean;
}

export interface ForwardResult {
  logits: Float32Array;
  /** With probe: per layer [heads, new tokens, headDim] queries after rotary. */
  queries?: Float32Array[];
}

export class LlamaModel {
  /** Calls to InferenceSession.run and the milliseconds spent inside them (for benchmarks and /metrics). */
  readonly runStats = { runs: 0, runMs: 0 };
  /** Milliseconds one prefill run should take (see PrefillChunker); 0: chunks of the full chunkSize. */
  prefillTargetMs = 0;

  private constructor(
    readonly folder: ModelFolder,
    readonly backend: Backend,
    private readonly session: InferenceSession,
    readonly io: GraphIo,
  ) {
    this.baseOutputs = session.outputNames.filter((n) => n !== "slot_attention" && !n.startsWith("query."));
  }

  /** Opens the folder's in-place KV graph when it has one (folder.kvOnnxFile), else its Optimum graph. */
  static async load(folder: ModelFolder, backend: Backend): Promise<LlamaModel> {
    const { ort } = backend;
    const file = folder.kvOnnxFile ?? folder.onnxFile;
    const options: InferenceSession.SessionOptions = {
      executionProviders: backend.executionProviders,
      graphOptimizationLevel: "all",
      logSeverityLevel: 3, // errors only: node-placement notices are not news to an operator
    };
    let session: InferenceSession;
    try {
      if (backend.name === "native") {
        // onnxruntime-node reads the file and its external data next to it by itself.
        options.intraOpNumThreads = backend.threads;
        options.interOpNumThreads = 1;
        session = await ort.InferenceSession.create(file, options);
      } else {
        // onnxruntime-web holds the graph and its weights in its WebAssembly heap (wasm32: 4 GiB in all, the
        // KV cache included); say so before trying to read what cannot fit.
        const weightBytes = (await stat(file)).size + (await Promise.all(folder.externalData.map(async (f) => (await stat(f.file)).size))).reduce((a, b) => a + b, 0);
        if (backend.name === "wasm" && weightBytes > WASM_HEAP_WEIGHTS_LIMIT) {
          throw new Error(
            `its weights are ${(weightBytes / 2 ** 30).toFixed(2)} GiB, more than onnxruntime-web's 4 GiB WebAssembly heap can hold beside the KV cache ` +
              `(limit here ${(WASM_HEAP_WEIGHTS_LIMIT / 2 ** 30).toFixed(1)} GiB): use --backend native (onnxruntime-node), or a smaller variant (q4)`,
          );
        }
        const bytes = new Uint8Array(await readFile(file));
        if (folder.externalData.length) {
          options.externalData = await Promise.all(
            folder.externalData.map(async (f) => ({ path: f.path, data: new Uint8Array(await readFile(f.file)) })),
          );
        }
        session = await ort.InferenceSession.create(bytes, options);
      }
    } catch (e) {
      throw new ModelFolderError(`${file}: onnxruntime could not open the graph on ${backend.name}: ${(e as Error).message}`);
    }
    return new LlamaModel(folder, backend, session, inspectGraph(session, folder, file));
  }

  newCache(): KvCache {
    const { numKeyValueHeads: heads, headDim } = this.folder.config;
    return new KvCache(this.io.kvDtype, this.io.layers, heads, headDim, this.io.kvMode);
  }

  get vocabSize(): number {
    return this.folder.config.vocabSize;
  }

  /**
   * Runs new tokens through the graph on top of `cache`, appends their KV to it, and returns logits:
   * the last position's row (length vocab), or with allLogits every new position's rows back to back.
   */
  async forward(cache: KvCache, ids: ArrayLike<number>, options: ForwardOptions = {}): Promise<Float32Array> {
    return (await this.forwardWith(cache, ids, options)).logits;
  }

  /** forward(), and what a probe asks for. */
  async forwardWith(cache: KvCache, ids: ArrayLike<number>, options: ForwardOptions = {}): Promise<ForwardResult> {
    const { ort } = this.backend;
    const seq = ids.length;
    const past = cache.length;
    const total = past + seq;
    const inputIds = new BigInt64Array(seq);
    for (let i = 0; i < seq; i++) inputIds[i] = BigInt(ids[i]!);
    const feeds: Record<string, Tensor> = { input_ids: new ort.Tensor("int64", inputIds, [1, seq]) };
    if (this.io.hasPositionIds) {
      const positions = new BigInt64Array(seq);
      for (let i = 0; i < seq; i++) positions[i] = BigInt(cache.nextPosition + i);
      feeds.position_ids = new ort.Tensor("int64", positions, [1, seq]);
    }
    if (this.io.hasNumLogitsToKeep) {
      feeds.num_logits_to_keep = new ort.Tensor("int64", BigInt64Array.of(options.allLogits ? 0n : 1n), []);
    }
    if (this.io.kvMode === "inplace") {
      // Tensors over the storage itself: onnxruntime-node reads them where they are, onnxruntime-web copies
      // them into its heap once per run. Only the new tokens' KV comes back, and is written after the live slots.
      const store = cache.reserveSlots(seq);
      const dims = [1, cache.kvHeads, store.capacity, cache.headDim];
      feeds.slot_mask = new ort.Tensor("bool", store.mask, [1, store.capacity]);
      feeds.rows_per_matmul = new ort.Tensor("int64", BigInt64Array.of(BigInt(this.rowsPerMatmul(seq))), []);
      for (let i = 0; i < this.io.layers; i++) {
        feeds[`cache.${i}.key`] = new ort.Tensor(cache.dtype, store.keys[i]!, dims);
        feeds[`cache.${i}.value`] = new ort.Tensor(cache.dtype, store.values[i]!, dims);
      }
      const compactor = cache.compactor;
      const attention = !options.probe && compactor !== null && compactor.needsAttention && this.io.hasSlotAttention;
      const queries = options.probe === true && this.io.hasQueries;
      const fetches = [...this.baseOutputs];
      if (attention) fetches.push("slot_attention");
      if (queries) for (let i = 0; i < this.io.layers; i++) fetches.push(`query.${i}`);
      const out = await this.run(feeds, fetches);
      for (let i = 0; i < this.io.layers; i++) cache.writeNewSlots(i, kvArray(out[`new.${i}.key`]!), kvArray(out[`new.${i}.value`]!), seq);
      cache.appendPositions(seq, ids);
      if (attention) cache.addAttention(out.slot_attention!.data as Float32Array, store.capacity, seq);
      const logits = this.readLogits(out.logits!, options.allLogits === true);
      if (compactor && !options.probe) compactor.maintain(cache, attention);
      return { logits, queries: queries ? Array.from({ length: this.io.layers }, (_, i) => out[`query.${i}`]!.data as Float32Array) : undefined };
    }
    const mask = new BigInt64Array(total).fill(1n);
    feeds.attention_mask = new ort.Tensor("int64", mask, [1, total]);
    if (this.io.hasUseCacheBranch) feeds.use_cache_branch = new ort.Tensor("bool", Uint8Array.of(past > 0 ? 1 : 0), [1]);
    const pastDims = [1, cache.kvHeads, past, cache.headDim];
    for (let i = 0; i < this.io.layers; i++) {
      const layer = cache.presentLayer(i);
      feeds[`past_key_values.${i}.key`] = new ort.Tensor(cache.dtype, layer.keys, pastDims);
      feeds[`past_key_values.${i}.value`] = new ort.Tensor(cache.dtype, layer.values, pastDims);
    }
    const out = await this.run(feeds, [...this.baseOutputs]);
    for (let i = 0; i < this.io.layers; i++) cache.setPresentLayer(i, kvArray(out[`present.${i}.key`]!), kvArray(out[`present.${i}.value`]!));
    cache.appendPositions(seq, ids);
    const logits = this.readLogits(out.logits!, options.allLogits === true);
    cache.compactor?.maintain(cache, false); // no slot_attention here: the window policy
    return { logits };
  }

  /** The outputs every run fetches (logits and the KV), not the compaction outputs, which cost time at long contexts. */
  private readonly baseOutputs: readonly string[];

  /**
   * How many query rows of a kv head go into one matmul against the cache (the in-place graph's
   * rows_per_matmul). onnxruntime's native CPU kernels read the cache unpacked only for one-row matmuls,
   * which makes the attention products of a one-token step at 32K slots 2-3x faster (the step: 8.5 ->
   * 7.2 ms on the development machine); with more rows (prefill) one matmul per kv
   * head reads the cache once for all of them. onnxruntime-web packs the cache either way, so one matmul
   * per kv head is faster there.
   */
  private rowsPerMatmul(seq: number): number {
    const rows = (this.folder.config.numAttentionHeads / this.folder.config.numKeyValueHeads) * seq;
    return this.backend.name === "native" && seq === 1 ? 1 : rows;
  }

  private async run(feeds: Record<string, Tensor>, fetches: string[]): Promise<InferenceSession.OnnxValueMapType> {
    const started = performance.now();
    const out = await this.session.run(feeds, fetches);
    this.runStats.runs++;
    this.runStats.runMs += performance.now() - started;
    return out;
  }

  private readLogits(logits: Tensor, all: boolean): Float32Array {
    const vocab = this.vocabSize;
    const rows = logits.dims[1]!;
    // float16 arrives as Uint16Array bits, or as Float16Array where the JS runtime has one.
    const data = logits.data as Float32Array | Uint16Array | Float64Array;
    const start = all ? 0 : (rows - 1) * vocab;
    const view = data.subarray(start, rows * vocab);
    if (view instanceof Float32Array) return all ? view : view.slice();
    if (view instanceof Uint16Array) {
      const out = new Float32Array(view.length);
      halfToFloat(view, out);
      return out;
    }
    return Float32Array.from(view);
  }

  /**
   * Reads `ids` into the cache in chunks of at most `chunkSize` tokens, so activations and logits stay
   * bounded whatever the prompt length; with prefillTargetMs, chunks are smaller where that keeps one run
   * near the target. Returns the last position's logits.
   *
   * With onLogits, every position's logits are computed (num_logits_to_keep 0) and handed over chunk by
   * chunk (`rows`: `count` rows of vocab logits, positions start.. of `ids`; valid only during the call),
   * in chunks of at most ALL_LOGITS_BYTES of logits. Without it (the default) only the last position's.
   */
  async prefill(
    cache: KvCache,
    ids: ArrayLike<number>,
    chunkSize: number,
    signal?: AbortSignal,
    onProgress?: (done: number, total: number) => void | Promise<void>,
    onLogits?: (rows: Float32Array, start: number, count: number) => void,
  ): Promise<Float32Array> {
    if (ids.length === 0) throw new Error("prefill needs at least one token");
    let logits: Float32Array | null = null;
    const chunks = new PrefillChunker(onLogits ? Math.min(chunkSize, Math.max(1, Math.floor(ALL_LOGITS_BYTES / (4 * this.vocabSize)))) : chunkSize, this.prefillTargetMs);
    // With a recall tier, the last tokens (the question, the turn) are read once as a probe whose queries
    // bring back the archived blocks they point to, and then read for real; see runtime/kv/compaction.ts.
    const compactor = cache.compactor;
    const probeTokens = compactor?.settings.recall && (this.io.hasQueries || compactor.settings.recallScorer === "lexical") ? Math.min(compactor.settings.probeTokens, ids.length) : 0;
    const probeAt = ids.length - probeTokens;
    for (let start = 0; start < ids.length; ) {
      if (start > 0) await yieldToEventLoop();
      if (signal?.aborted) throw new RuntimeError("cancelled", "the request was cancelled");
      if (start === probeAt && compactor?.canRecall) {
        const tail = Array.prototype.slice.call(ids, probeAt) as number[];
        // The key scorer needs the probe's queries, from a run whose KV is dropped; the lexical one only its tokens.
        let queries: Float32Array[] | undefined;
        if (compactor.settings.recallScorer === "keys") {
          queries = (await this.forwardWith(cache, tail, { probe: true })).queries;
          cache.dropLast(tail.length);
        }
        compactor.recall(cache, tail, queries);
      }
      const end = Math.min(ids.length, start + chunks.size, start + this.maxChunkFor(cache.length), start < probeAt ? probeAt : ids.length);
      const t0 = performance.now();
      if (onLogits) {
        const rows = await this.forward(cache, Array.prototype.slice.call(ids, start, end) as number[], { allLogits: true });
        onLogits(rows, start, end - start);
        logits = rows.slice((end - start - 1) * this.vocabSize, (end - start) * this.vocabSize);
      } else {
        logits = await this.forward(cache, Array.prototype.slice.call(ids, start, end) as number[]);
      }
      chunks.observe(end - start, performance.now() - t0);
      start = end;
      await onProgress?.(end, ids.length);
    }
    return logits!;
  }

  /**
   * On the in-place path, the most tokens one run may read on top of `past` slots so that one
   * [heads, tokens, capacity] float32 score tensor stays within SCORE_TENSOR_BYTES: at long contexts the
   * scores, not the KV, set the peak memory (a 512-token chunk at 32K slots: ~270 MB per tensor, several
   * alive at once). A run's fixed cost there no longer grows with the context, so smaller chunks cost little.
   */
  private maxChunkFor(past: number): number {
    if (this.io.kvMode !== "inplace") return Number.MAX_SAFE_INTEGER;
    const perToken = this.folder.config.numAttentionHeads * 4 * capacityFor(past + 512);
    return Math.max(16, Math.floor(SCORE_TENSOR_BYTES / perToken));
  }

  async release(): Promise<void> {
    await this.session.release();
  }
}
