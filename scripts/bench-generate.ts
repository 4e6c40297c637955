/**
 * Generation speed and memory of our runtime against transformers.js, on the same model folder, the same
 * prompt ids and the same ORT backend, in the same run:
 *
 *   npx bun scripts/bench-generate.ts [--model models/builtin] [--prompt-tokens 512] [--new-tokens 128]
 *                                     [--runs 3] [--backends wasm,native]
 *
 * Backends: wasm = onnxruntime-web (WASM SIMD, 1 thread) for both; native = onnxruntime-node (CPU, 1 intra-op
 * thread) for both (transformers.js device "cpu"). Each (implementation, backend) case runs in its own child
 * process (`--case ours:wasm` etc.) so that its peak RSS (VmHWM) is its own. Each case does one warm-up
 * generation and then `--runs` measured ones; figures are medians. Greedy, eos ignored, exactly
 * --new-tokens tokens. The last line is `decode ratio ours/transformers.js: X.XX`, the lower of the
 * per-backend ratios (target >= 1.00).
 */
import { spawn } from "node:child_process";
import { existsSync, readFileSync } from "node:fs";
import { basename, dirname, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { Engine, type ChatMessage } from "../runtime/index.ts";
import { loadTransformersPeer, type PeerBackend } from "./lib/transformers-peer.ts";
import { positiveInt } from "./lib/cli.ts";

type Impl = "ours" | "transformers.js";
const IMPL_FLAG: Record<string, Impl> = { ours: "ours", tjs: "transformers.js", "transformers.js": "transformers.js" };
const RESULT_MARK = "BENCH_RESULT ";
const REPO = fileURLToPath(new URL("../", import.meta.url));
const THREADS = 1;

const { values } = parseArgs({
  options: {
    model: { type: "string", default: "models/builtin" },
    "prompt-tokens": { type: "string", default: "512" },
    "new-tokens": { type: "string", default: "128" },
    runs: { type: "string", default: "3" },
    backends: { type: "string", default: "wasm,native" },
    case: { type: "string" },
    "prompt-ids": { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  },
  strict: true,
});

if (values.help) {
  console.log("usage: bench-generate.ts [--model models/builtin] [--prompt-tokens 512] [--new-tokens 128] [--runs 3] [--backends wasm,native]");
  process.exit(0);
}

const modelDir = resolve(REPO, values.model);
const newTokens = positiveInt("new-tokens", values["new-tokens"]);
const runs = positiveInt("runs", values.runs);

/** One measured generation, in the definitions printed under the table. */
interface Sample {
  prefillMs: number;
  firstTokenMs: number;
  totalMs: number;
  /** ms inside session.run for the decode steps, and how many there were. */
  decodeRunMs: number;
  decodeRuns: number;
}

interface CaseResult {
  impl: Impl;
  backend: PeerBackend;
  detail: string;
  runtime: string;
  loadMs: number;
  promptTokens: number;
  tokenIds: number[];
  /** Text of the generated ids by this implementation's own tokenizer. */
  text: string;
  samples: Sample[];
  peakRssMb: number;
  peakRssSource: string;
}

/** Peak resident set of this process: VmHWM where /proc has it, else the largest rss sampled. */
let sampledPeak = 0;
function sampleRss(): void {
  sampledPeak = Math.max(sampledPeak, process.memoryUsage().rss);
}
function peakRss(): { mb: number; source: string } {
  try {
    const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(readFileSync("/proc/self/status", "utf8"));
    if (m) return { mb: Number(m[1]) / 1024, source: "VmHWM" };
  } catch {
    // not Linux
  }
  sampleRss();
  return { mb: sampledPeak / 2 ** 20, source: "sampled rss" };
}

// ---------------------------------------------------------------------------------------------------------
// Child: one (implementation, backend) case.

async function runOurs(backend: PeerBackend, promptIds: number[]): Promise<Omit<CaseResult, "peakRssMb" | "peakRssSource" | "runtime">> {
  const t0 = performance.now();
  const engine = await Engine.load({ modelDir, variant: "fp32", backend, threads: THREADS, queueLimit: 8, contextLength: 0, prefillChunk: 512 });
  const loadMs = performance.now() - t0;
  if (engine.info.backend !== backend) throw new Error(`asked for ${backend}, got ${engine.info.backend}`);

  // Instrumentation, not behaviour: the ORT time of each forward() (LlamaModel.runStats) splits decode into
  // time inside InferenceSession.run and JS time around it.
  const model = engine.model;
  const prefillCalls = Math.ceil(promptIds.length / 512);
  const runLog: number[] = [];
  const forward = model.forward.bind(model);
  model.forward = async (cache, ids, options) => {
    const before = model.runStats.runMs;
    const out = await forward(cache, ids, options);
    runLog.push(model.runStats.runMs - before);
    return out;
  };

  const samples: Sample[] = [];
  let tokenIds: number[] = [];
  let text = "";
  for (let i = 0; i <= runs; i++) {
    runLog.length = 0;
    const start = performance.now();
    const r = await engine.complete({ promptIds, maxTokens: newTokens, sampling: { temperature: 0 }, stop: [], ignoreEos: true });
    const totalMs = performance.now() - start;
    sampleRss();
    if (r.tokenIds.length !== newTokens) throw new Error(`ours generated ${r.tokenIds.length} tokens, wanted ${newTokens}`);
    tokenIds = r.tokenIds;
    text = r.text;
    const decode = runLog.slice(prefillCalls);
    const sample: Sample = {
      // r.prefillMs and r.firstTokenMs run from generate()'s start; the queue in front of it is empty here.
      prefillMs: r.prefillMs,
      firstTokenMs: r.firstTokenMs,
      totalMs,
      decodeRunMs: decode.reduce((sum, ms) => sum + ms, 0),
      decodeRuns: decode.length,
    };
    if (i > 0) samples.push(sample); // run 0 is the warm-up
  }
  const detail = engine.info.backendDetail;
  await engine.close();
  return { impl: "ours", backend, detail, loadMs, promptTokens: promptIds.length, tokenIds, text, samples };
}

async function runTransformers(backend: PeerBackend, promptIds: number[]): Promise<Omit<CaseResult, "peakRssMb" | "peakRssSource" | "runtime">> {
  const t0 = performance.now();
  const peer = await loadTransformersPeer({ backend, modelsDir: dirname(modelDir), modelId: basename(modelDir), dtype: "fp32", threads: THREADS, loadTokenizer: true });
  const loadMs = performance.now() - t0;
  const samples: Sample[] = [];
  let tokenIds: number[] = [];
  for (let i = 0; i <= runs; i++) {
    const r = await peer.generate(promptIds, newTokens);
    sampleRss();
    if (r.tokenIds.length !== newTokens) throw new Error(`transformers.js generated ${r.tokenIds.length} tokens, wanted ${newTokens}`);
    tokenIds = r.tokenIds;
    if (i > 0) samples.push({ prefillMs: r.prefillMs, firstTokenMs: r.firstTokenMs, totalMs: r.totalMs, decodeRunMs: r.decodeRunMs, decodeRuns: r.decodeRuns });
  }
  const text = peer.decode(tokenIds) ?? "";
  await peer.dispose();
  return { impl: "transformers.js", backend, detail: peer.detail, loadMs, promptTokens: promptIds.length, tokenIds, text, samples };
}

async function childMain(spec: string): Promise<void> {
  const [implFlag, backendFlag] = spec.split(":");
  const impl = IMPL_FLAG[implFlag ?? ""];
  if (!impl || (backendFlag !== "wasm" && backendFlag !== "native")) {
    throw new Error(`--case must be ours|tjs : wasm|native, got ${spec}`);
  }
  const promptIds = (values["prompt-ids"] ?? "").split(",").filter(Boolean).map(Number);
  if (!promptIds.length) throw new Error("--case needs --prompt-ids");
  const timer = setInterval(sampleRss, 5);
  const result = impl === "ours" ? await runOurs(backendFlag, promptIds) : await runTransformers(backendFlag, promptIds);
  clearInterval(timer);
  const peak = peakRss();
  const runtime = typeof Bun !== "undefined" ? `bun ${Bun.version}` : `node ${process.versions.node}`;
  const full: CaseResult = { ...result, runtime, peakRssMb: peak.mb, peakRssSource: peak.source };
  process.stdout.write(`${RESULT_MARK}${JSON.stringify(full)}\n`);
}

// ---------------------------------------------------------------------------------------------------------
// Parent: builds the prompt, runs the cases, prints the table.

const FILLER_TOPICS = ["the harbour", "the lighthouse", "the fishing fleet", "the tide tables", "the weather station", "the ferry timetable"];

function chatWithLines(lines: number): ChatMessage[] {
  const body = Array.from({ length: lines }, (_, i) => {
    const topic = FILLER_TOPICS[i % FILLER_TOPICS.length]!;
    return `${i + 1}. On day ${i + 3}, ${topic} reported ${(i * 37) % 101} visitors, wind ${(i * 11) % 40} knots from the ${["north", "east", "south", "west"][i % 4]}.`;
  }).join("\n");
  return [
    { role: "system", content: "You are a careful assistant who summarises logs accurately and briefly." },
    { role: "user", content: `Here is the harbour log for this month:\n${body}\n\nSummarise the busiest days and the windiest days, then suggest a schedule for next month.` },
  ];
}

/** A realistic chat rendered with the model's template, grown line by line to the largest size within `target` tokens. */
async function buildPrompt(engine: Engine, target: number): Promise<number[]> {
  const encode = (lines: number) => engine.encodeChat(chatWithLines(lines), { extra: { date_string: "26 Jul 2024" } });
  let best = await encode(0);
  if (best.length > target) return best;
  for (let lines = 1; lines < 10_000; lines++) {
    const ids = await encode(lines);
    if (ids.length > target) break;
    best = ids;
  }
  return best;
}

function runCase(spec: string, promptIds: number[]): Promise<CaseResult> {
  const args = [fileURLToPath(import.meta.url), "--case", spec, "--model", values.model!, "--new-tokens", String(newTokens), "--runs", String(runs), "--prompt-ids", promptIds.join(",")];
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, args, { cwd: REPO, stdio: ["ignore", "pipe", "inherit"], env: process.env });
    let out = "";
    child.stdout.on("data", (chunk: Buffer) => (out += chunk.toString()));
    child.on("error", reject);
    child.on("close", (code) => {
      const line = out.split("\n").find((l) => l.startsWith(RESULT_MARK));
      if (code !== 0 || !line) {
        reject(new Error(`case ${spec} failed (exit ${code})${out.trim() ? `:\n${out.trim()}` : ""}`));
        return;
      }
      resolvePromise(JSON.parse(line.slice(RESULT_MARK.length)) as CaseResult);
    });
  });
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const mid = s.length >> 1;
  return s.length % 2 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

interface Figures {
  prefillTokS: number;
  ttftMs: number;
  decodeTokS: number;
  decodeRunMsPerTok: number;
  decodeOutsideMsPerTok: number;
}

function figures(r: CaseResult): Figures {
  const n = r.tokenIds.length;
  const decodeMs = (s: Sample) => s.totalMs - s.firstTokenMs;
  return {
    prefillTokS: median(r.samples.map((s) => r.promptTokens / (s.prefillMs / 1000))),
    ttftMs: median(r.samples.map((s) => s.firstTokenMs)),
    decodeTokS: median(r.samples.map((s) => (n - 1) / (decodeMs(s) / 1000))),
    decodeRunMsPerTok: median(r.samples.map((s) => s.decodeRunMs / Math.max(1, s.decodeRuns))),
    decodeOutsideMsPerTok: median(r.samples.map((s) => (decodeMs(s) - s.decodeRunMs) / Math.max(1, n - 1))),
  };
}

function table(rows: string[][]): string {
  const widths = rows[0]!.map((_, c) => Math.max(...rows.map((r) => r[c]!.length)));
  const line = (r: string[]) => r.map((cell, c) => (c < 2 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join("  ");
  return [line(rows[0]!), widths.map((w) => "-".repeat(w)).join("  "), ...rows.slice(1).map(line)].join("\n");
}

async function parentMain(): Promise<void> {
  if (!existsSync(resolve(modelDir, "config.json"))) {
    console.error(`no model folder at ${modelDir}: run \`npm run build:model\` first`);
    process.exit(2);
  }
  const backends = values.backends!.split(",").map((b) => b.trim()).filter(Boolean) as PeerBackend[];
  for (const b of backends) {
    if (b !== "wasm" && b !== "native") {
      console.error(`--backends takes wasm and/or native, got ${b}`);
      process.exit(2);
    }
  }
  const target = positiveInt("prompt-tokens", values["prompt-tokens"]);
  const encoder = await Engine.load({ modelDir, variant: "fp32", backend: "wasm", threads: 1, queueLimit: 1, contextLength: 0, prefillChunk: 512 });
  const promptIds = await buildPrompt(encoder, target);
  await encoder.close();

  console.log(`model ${modelDir}, fp32; prompt ${promptIds.length} tokens (chat template), ${newTokens} new tokens, greedy, eos ignored`);
  console.log(`${THREADS} thread per case; 1 warm-up + median of ${runs} runs; each case in its own process (${process.execPath})`);
  const results: CaseResult[] = [];
  for (const backend of backends) {
    for (const impl of ["ours", "tjs"]) {
      process.stderr.write(`running ${impl}:${backend} ...\n`);
      results.push(await runCase(`${impl}:${backend}`, promptIds));
    }
  }

  const rows = [["backend", "implementation", "prefill tok/s", "TTFT ms", "decode tok/s", "ORT ms/tok", "JS ms/tok", "peak RSS MB", "load ms"]];
  const byCase = new Map<string, Figures>();
  for (const r of results) {
    const f = figures(r);
    byCase.set(`${r.impl}:${r.backend}`, f);
    rows.push([
      r.backend,
      r.impl,
      f.prefillTokS.toFixed(0),
      f.ttftMs.toFixed(1),
      f.decodeTokS.toFixed(1),
      f.decodeRunMsPerTok.toFixed(3),
      f.decodeOutsideMsPerTok.toFixed(3),
      r.peakRssMb.toFixed(0),
      r.loadMs.toFixed(0),
    ]);
  }
  console.log("");
  console.log(table(rows));
  console.log("");
  for (const r of results) console.log(`  ${r.impl.padEnd(15)} ${r.backend.padEnd(6)} ${r.detail}; ${r.runtime}; peak RSS from ${r.peakRssSource}`);
  console.log("");
  console.log("definitions (per generation, timed from the call that starts it):");
  console.log("  prefill tok/s  prompt tokens / time until the prompt's logits are out of ORT (ours: GenerateResult.prefillMs;");
  console.log("                 transformers.js: end of the first session.run)");
  console.log("  TTFT ms        time until the first generated token id is known (ours: GenerateResult.firstTokenMs, taken right after");
  console.log("                 sampling token 1; transformers.js: streamer.put() of token 1)");
  console.log(`  decode tok/s   (${newTokens} - 1) / (time from first token to the call's return)`);
  console.log("  ORT ms/tok     mean time inside InferenceSession.run per decode step; JS ms/tok = decode time per token outside it");
  console.log("  peak RSS MB    the case process's VmHWM at its end (includes runtime, ORT, model and the warm-up)");
  console.log("");

  let allMatch = true;
  const ratios: number[] = [];
  for (const backend of backends) {
    const ours = results.find((r) => r.impl === "ours" && r.backend === backend)!;
    const theirs = results.find((r) => r.impl === "transformers.js" && r.backend === backend)!;
    const same = ours.tokenIds.length === theirs.tokenIds.length && ours.tokenIds.every((id, i) => id === theirs.tokenIds[i]);
    if (!same) {
      allMatch = false;
      const at = ours.tokenIds.findIndex((id, i) => id !== theirs.tokenIds[i]);
      console.log(`  ${backend}: token ids differ from position ${at} (ours ${ours.tokenIds[at]}, transformers.js ${theirs.tokenIds[at]})`);
    }
    const ratio = byCase.get(`ours:${backend}`)!.decodeTokS / byCase.get(`transformers.js:${backend}`)!.decodeTokS;
    ratios.push(ratio);
    console.log(`${backend}: decode ratio ours/transformers.js ${ratio.toFixed(2)}; prefill ratio ${(byCase.get(`ours:${backend}`)!.prefillTokS / byCase.get(`transformers.js:${backend}`)!.prefillTokS).toFixed(2)}; TTFT ratio (lower is better) ${(byCase.get(`ours:${backend}`)!.ttftMs / byCase.get(`transformers.js:${backend}`)!.ttftMs).toFixed(2)}`);
  }
  const textsMatch = backends.every((b) => new Set(results.filter((r) => r.backend === b).map((r) => r.text)).size === 1);
  console.log(`text match: ${textsMatch ? "yes" : "no"} (each implementation's own detokenizer, special tokens skipped)`);
  const first = results[0]!.tokenIds;
  const acrossBackends = results.every((r) => r.tokenIds.join(",") === first.join(","));
  console.log(`token ids match: ${allMatch ? "yes" : "no"} (ours vs transformers.js per backend; across backends: ${acrossBackends ? "same" : "different"})`);
  console.log(`decode ratio ours/transformers.js: ${Math.min(...ratios).toFixed(2)}`);
  if (!allMatch) process.exitCode = 1;
}

if (values.case) await childMain(values.case);
else await parentMain();
