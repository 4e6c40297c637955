/**
 * llama.cpp (through the npm package node-llama-cpp, a devDependency, which ships llama.cpp's prebuilt CPU
 * binaries) as a peer for the benchmarks and tests/gguf.test.ts, on the GGUF that gguf-llama.ts writes from
 * our own weights.
 *
 * The like-for-like setting (see shared platform notes): CPU only, `threads` threads, f16 KV, flash
 * attention OFF (node-llama-cpp's default "auto" turns it on for CPU, which changes greedy tokens and slows
 * long-context decode), greedy sampling, eos not stopping generation. Prompts go in as token ids, so
 * llama.cpp's tokenizer is never used for input. Nothing is built or downloaded: `build: "never"`.
 */
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import type { Llama, LlamaContext, LlamaContextSequence, LlamaModel, Token } from "node-llama-cpp";

export interface LlamaCppRun {
  /** Generated ids only. */
  tokenIds: number[];
  /** ms from the call to the first generated token id (prompt evaluation + one greedy sampling). */
  firstTokenMs: number;
  /** ms from the call to the last generated token id. */
  totalMs: number;
}

export interface LlamaCppPeer {
  detail: string;
  /** Greedy generation of exactly maxNewTokens tokens after promptIds, from an empty sequence. */
  generate(promptIds: readonly number[], maxNewTokens: number): Promise<LlamaCppRun>;
  /** Evaluates promptIds from an empty sequence without generating (to save a state after it). */
  ingest(promptIds: readonly number[]): Promise<void>;
  /** The sequence's state (its KV and tokens) to `file`; returns the file's bytes. */
  saveState(file: string): Promise<number>;
  /** Replaces the sequence's state by `file`, then evaluates `moreIds` and returns the first greedy token. */
  resume(file: string, moreIds: readonly number[]): Promise<{ token: number; loadMs: number; firstTokenMs: number }>;
  dispose(): Promise<void>;
}

export interface LlamaCppPeerOptions {
  ggufPath: string;
  /** Tokens the context must hold (prompt + new tokens); rounded up by llama.cpp. */
  contextTokens: number;
  threads: number;
}

/** Loads node-llama-cpp's prebuilt CPU binary; throws (with the reason) where it cannot load on this machine. */
export async function loadLlamaCppRuntime(threads: number): Promise<Llama> {
  const { getLlama, LlamaLogLevel } = await import("node-llama-cpp");
  return getLlama({ gpu: false, build: "never", usePrebuiltBinaries: true, skipDownload: true, progressLogs: false, maxThreads: threads, logLevel: LlamaLogLevel.error });
}

/** node-llama-cpp's package version (its "exports" hide package.json: found from its entry point). */
function nodeLlamaCppVersion(): string {
  const entry = createRequire(import.meta.url).resolve("node-llama-cpp");
  let dir = entry;
  for (let i = 0; i < 4; i++) {
    dir = join(dir, "..");
    try {
      const pkg = JSON.parse(readFileSync(join(dir, "package.json"), "utf8")) as { name?: string; version?: string };
      if (pkg.name === "node-llama-cpp") return pkg.version ?? "?";
    } catch {
      // not this folder
    }
  }
  return "?";
}

export async function loadLlamaCppPeer(options: LlamaCppPeerOptions): Promise<LlamaCppPeer> {
  const llama = await loadLlamaCppRuntime(options.threads);
  let model: LlamaModel | null = null;
  let context: LlamaContext | null = null;
  try {
    model = await llama.loadModel({ modelPath: options.ggufPath, gpuLayers: 0 });
    context = await model.createContext({
      contextSize: options.contextTokens,
      sequences: 1,
      threads: { ideal: options.threads, min: options.threads },
      flashAttention: false,
      experimentalKvCacheKeyType: "F16",
      experimentalKvCacheValueType: "F16",
      ignoreMemorySafetyChecks: true,
    });
  } catch (err) {
    await context?.dispose();
    await model?.dispose();
    await llama.dispose();
    throw err;
  }
  const sequence: LlamaContextSequence = context.getSequence();
  const detail = `node-llama-cpp ${nodeLlamaCppVersion()} (llama.cpp ${llama.llamaCppRelease.release}) cpu ${llama.buildType}, ${options.threads} thread(s), f16 KV, flash attention off, context ${context.contextSize}`;

  /** Greedy tokens from the current sequence state after evaluating `ids`, until `count` are out. */
  async function greedy(ids: readonly number[], count: number, t0: number): Promise<LlamaCppRun> {
    const tokenIds: number[] = [];
    let firstTokenMs = 0;
    for await (const token of sequence.evaluate([...ids] as Token[], { temperature: 0, yieldEogToken: true })) {
      tokenIds.push(token);
      if (tokenIds.length === 1) firstTokenMs = performance.now() - t0;
      if (tokenIds.length >= count) break;
    }
    return { tokenIds, firstTokenMs, totalMs: performance.now() - t0 };
  }

  return {
    detail,
    async generate(promptIds, maxNewTokens) {
      await sequence.clearHistory();
      return greedy(promptIds, maxNewTokens, performance.now());
    },
    async ingest(promptIds) {
      await sequence.clearHistory();
      await sequence.evaluateWithoutGeneratingNewTokens([...promptIds] as Token[]);
    },
    async saveState(file) {
      return (await sequence.saveStateToFile(file)).fileSize;
    },
    async resume(file, moreIds) {
      await sequence.clearHistory();
      const t0 = performance.now();
      await sequence.loadStateFromFile(file, { acceptRisk: true });
      const loadMs = performance.now() - t0;
      const run = await greedy(moreIds, 1, t0);
      return { token: run.tokenIds[0]!, loadMs, firstTokenMs: run.firstTokenMs };
    },
    async dispose() {
      await context.dispose();
      await model.dispose();
      await llama.dispose();
    },
  };
}
