/**
 * transformers.js (@huggingface/transformers) as an independent reference peer on a chosen ORT backend,
 * loading the same model folder our runtime serves. Used by tests/transformers-reference.test.ts (token
 * equality) and scripts/bench-generate.ts (speed and memory on the same backend).
 *
 *   wasm    the project's onnxruntime-web (the same module our runtime imports), handed to transformers.js
 *           through globalThis[Symbol.for("onnxruntime")] BEFORE transformers.js is first imported, with
 *           the wasm files read from its local dist/ folder and 1 thread.
 *   native  transformers.js's own default in Node-like runtimes: onnxruntime-node, device "cpu".
 *
 * transformers.js picks its ORT once, when its module is first evaluated, so one process can host only one
 * peer backend; loadTransformersPeer throws if asked for the other.
 */
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

export type PeerBackend = "wasm" | "native";
export type PeerDtype = "fp32" | "fp16";

export interface PeerOptions {
  backend: PeerBackend;
  /** The folder that holds the model folder (transformers.js's env.localModelPath). */
  modelsDir: string;
  /** The model folder's name inside modelsDir. */
  modelId: string;
  dtype: PeerDtype;
  threads: number;
  /** Also load transformers.js's tokenizer (as a server would), so memory figures compare like with like. */
  loadTokenizer?: boolean;
}

export interface PeerRun {
  /** Generated ids only (the prompt excluded). */
  tokenIds: number[];
  /** ms from the generate() call to the end of the prompt's session.run (the prompt's logits are out of ORT). */
  prefillMs: number;
  /** ms from the generate() call to the streamer receiving the first generated token (prefill + first sampling). */
  firstTokenMs: number;
  /** ms from the generate() call to its return. */
  totalMs: number;
  /** session.run calls after the prompt's, and the ms spent inside them (the rest of decode is JS around ORT). */
  decodeRuns: number;
  decodeRunMs: number;
}

export interface TransformersPeer {
  backend: PeerBackend;
  /** ORT build and version the peer runs on, for reports. */
  detail: string;
  /** Greedy generation of exactly maxNewTokens tokens after promptIds (eos does not stop it and is not suppressed). */
  generate(promptIds: readonly number[], maxNewTokens: number): Promise<PeerRun>;
  /** Text of token ids by transformers.js's tokenizer (special tokens skipped); null unless loadTokenizer was set. */
  decode(ids: readonly number[]): string | null;
  dispose(): Promise<void>;
}

const ORT_SYMBOL = Symbol.for("onnxruntime");
let loadedFor: PeerBackend | null = null;

// Minimal structural types for the parts of transformers.js used here (its .d.ts pulls in a large surface).
interface TjsTensorCtor {
  new (type: string, data: BigInt64Array, dims: number[]): unknown;
}
interface TjsSession {
  run(feeds: unknown, ...rest: unknown[]): Promise<unknown>;
}
interface TjsModel {
  sessions: Record<string, TjsSession>;
  generate(args: Record<string, unknown>): Promise<{ dims: number[]; data: BigInt64Array; tolist(): bigint[][] }>;
  dispose(): Promise<unknown>;
}
interface TjsModule {
  env: {
    allowRemoteModels: boolean;
    allowLocalModels: boolean;
    localModelPath: string;
    useWasmCache: boolean;
    useFSCache?: boolean;
    backends?: { onnx?: { versions?: Record<string, string> } };
  };
  AutoTokenizer: { from_pretrained(id: string): Promise<{ decode(ids: number[], options: Record<string, unknown>): string }> };
  AutoModelForCausalLM: { from_pretrained(id: string, options: Record<string, unknown>): Promise<TjsModel> };
  Tensor: TjsTensorCtor;
  BaseStreamer: new () => { put(value: bigint[][]): void; end(): void };
}

interface OrtWebLike {
  env: { wasm: { numThreads?: number; wasmPaths?: unknown; proxy?: boolean }; logLevel?: string; versions?: Record<string, string> };
}

/** Points globalThis's ORT at the project's onnxruntime-web (WASM, local files, `threads` threads). */
async function installOrtWeb(threads: number): Promise<string> {
  const ort = (await import("onnxruntime-web")) as unknown as OrtWebLike;
  const require = createRequire(import.meta.url);
  // The package's "exports" hide package.json; resolve the node entry and take its folder (dist/).
  const dist = dirname(require.resolve("onnxruntime-web"));
  ort.env.wasm.numThreads = threads;
  // transformers.js would otherwise point wasmPaths at a CDN; a string prefix keeps the files local.
  ort.env.wasm.wasmPaths = join(dist, "/");
  (globalThis as Record<symbol, unknown>)[ORT_SYMBOL] = ort;
  return `onnxruntime-web ${ort.env.versions?.web ?? "?"} wasm, ${threads} thread(s)`;
}

export async function loadTransformersPeer(options: PeerOptions): Promise<TransformersPeer> {
  if (loadedFor && loadedFor !== options.backend) {
    throw new Error(`transformers.js is already bound to ${loadedFor} in this process; run the ${options.backend} peer in another process`);
  }
  let detail: string;
  if (options.backend === "wasm") {
    detail = await installOrtWeb(options.threads);
  } else {
    if (ORT_SYMBOL in globalThis && !loadedFor) throw new Error("globalThis already holds an ORT; the native peer needs transformers.js's own onnxruntime-node");
    detail = `onnxruntime-node cpu, ${options.threads} thread(s)`;
  }
  loadedFor = options.backend;
  const tjs = (await import("@huggingface/transformers")) as unknown as TjsModule;
  if (options.backend === "native") {
    const version = tjs.env.backends?.onnx?.versions?.node;
    detail = `onnxruntime-node ${version ?? "?"} cpu, ${options.threads} thread(s)`;
  }
  tjs.env.allowRemoteModels = false;
  tjs.env.allowLocalModels = true;
  tjs.env.localModelPath = options.modelsDir.endsWith("/") ? options.modelsDir : `${options.modelsDir}/`;
  tjs.env.useWasmCache = false;
  if ("useFSCache" in tjs.env) tjs.env.useFSCache = false;

  const sessionOptions: Record<string, unknown> =
    options.backend === "wasm"
      ? { executionProviders: ["wasm"] }
      : { intraOpNumThreads: options.threads, interOpNumThreads: 1 };
  if (options.backend === "wasm") {
    // In Node-like runtimes transformers.js hands ORT the graph's path and leaves external data for ORT to find
    // next to it, which onnxruntime-node does and onnxruntime-web cannot; give the bytes explicitly.
    const base = `model${options.dtype === "fp32" ? "" : `_${options.dtype}`}.onnx_data`;
    const file = join(options.modelsDir, options.modelId, "onnx", base);
    if (existsSync(file)) sessionOptions.externalData = [{ path: base, data: new Uint8Array(await readFile(file)) }];
  }
  const model = await tjs.AutoModelForCausalLM.from_pretrained(options.modelId, {
    dtype: options.dtype,
    device: options.backend === "wasm" ? "auto" : "cpu",
    session_options: sessionOptions,
  });

  const tokenizer = options.loadTokenizer ? await tjs.AutoTokenizer.from_pretrained(options.modelId) : null;

  // Times every session.run of the decoder (transformers.js calls it as a method, so an own property wins).
  const session = model.sessions.model ?? model.sessions.decoder_model_merged;
  if (!session) throw new Error(`transformers.js loaded no decoder session (sessions: ${Object.keys(model.sessions).join(", ")})`);
  const runLog: { start: number; end: number }[] = [];
  const run = session.run.bind(session);
  session.run = async (feeds: unknown, ...rest: unknown[]) => {
    const start = performance.now();
    const out = await run(feeds, ...rest);
    runLog.push({ start, end: performance.now() });
    return out;
  };

  class FirstTokenClock extends tjs.BaseStreamer {
    calls = 0;
    firstTokenAt = 0;
    override put(): void {
      // The first put() carries the prompt; the second, the first generated token.
      if (++this.calls === 2) this.firstTokenAt = performance.now();
    }
    override end(): void {}
  }

  return {
    backend: options.backend,
    detail,
    async generate(promptIds, maxNewTokens) {
      const n = promptIds.length;
      const ids = new BigInt64Array(n);
      for (let i = 0; i < n; i++) ids[i] = BigInt(promptIds[i]!);
      const mask = new BigInt64Array(n).fill(1n);
      const streamer = new FirstTokenClock();
      runLog.length = 0;
      const t0 = performance.now();
      const out = await model.generate({
        input_ids: new tjs.Tensor("int64", ids, [1, n]),
        attention_mask: new tjs.Tensor("int64", mask, [1, n]),
        max_new_tokens: maxNewTokens,
        do_sample: false,
        // No eos stopping criterion and no eos suppression: exactly maxNewTokens greedy tokens, like ignore_eos.
        eos_token_id: null,
        repetition_penalty: 1,
        streamer,
      });
      const totalMs = performance.now() - t0;
      const row = out.tolist()[0]!;
      const decode = runLog.slice(1);
      return {
        tokenIds: row.slice(n).map(Number),
        prefillMs: runLog[0]!.end - t0,
        firstTokenMs: streamer.firstTokenAt - t0,
        totalMs,
        decodeRuns: decode.length,
        decodeRunMs: decode.reduce((sum, r) => sum + (r.end - r.start), 0),
      };
    },
    decode(ids) {
      return tokenizer ? tokenizer.decode([...ids], { skip_special_tokens: true }) : null;
    },
    async dispose() {
      await model.dispose();
    },
  };
}
