/**
 * Generation speed and memory of our runtime against two peers on the same prompt ids, in the same run:
 * transformers.js on the same model folder and the same ORT backend, and llama.cpp (node-llama-cpp's
 * prebuilt CPU binary) on the same weights written as GGUF by scripts/lib/gguf-llama.ts:
 *
 *   npx bun scripts/bench-generate.ts [--model models/builtin] [--prompt-tokens 512,8192,32768]
 *        [--new-tokens 128] [--runs 3] [--long-runs 3] [--backends wasm,native] [--peers tjs,llama]
 *
 * Backends: wasm = onnxruntime-web (WASM SIMD, 1 thread) for ours and transformers.js; native =
 * onnxruntime-node (CPU, 1 intra-op thread) for both (transformers.js device "cpu"). llama.cpp runs once per
 * prompt size: CPU, 1 thread, f16 KV, flash attention off (the setting in which its tokens equal ours).
 * Each case runs in its own child process (`--case ours:wasm` etc.) so that its peak RSS (VmHWM) is its own.
 * Each case does one warm-up generation (on the first 8,192 prompt tokens at most) and then `--runs`
 * measured ones (`--long-runs` above 8,192 prompt tokens: 3 by default, since one run at 32K moves by 20%
 * on a shared machine; 1 shortens the default run from about 12 to about 6 minutes on two cores); figures
 * are medians. transformers.js runs only up to --tjs-max-tokens (8192): it prefills in one
 * run whose attention scores need ~17 GB at 32K. Greedy, eos ignored, exactly --new-tokens tokens. The last two lines are
 * `decode ratio ours/transformers.js: X.XX` (the lowest per-backend ratio over all sizes, target >= 1.00) and
 * `decode ratio ours/llama.cpp at 32K: X.XX` (the lower of ours' backends at the 32K prompt, or at the largest
 * size run).
 */
import { spawn } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { Engine, type ChatMessage } from "../runtime/index.ts";
import { loadTransformersPeer, type PeerBackend } from "./lib/transformers-peer.ts";
import { loadLlamaCppPeer } from "./lib/llama-cpp-peer.ts";
import { buildBuiltinGguf, DEFAULT_GGUF_PATH } from "./lib/gguf-llama.ts";
import { positiveInt } from "./lib/cli.ts";

type Impl = "ours" | "transformers.js" | "llama.cpp";
/** llama.cpp runs on its own CPU backend, not on an ORT one. */
type CaseBackend = PeerBackend | "cpu";
const IMPL_FLAG: Record<string, Impl> = { ours: "ours", tjs: "transformers.js", "transformers.js": "transformers.js", llama: "llama.cpp", "llama.cpp": "llama.cpp" };
/** The warm-up generation reads at most this many prompt tokens (a full 32K warm-up would double the run). */
const WARMUP_MAX_TOKENS = 8192;
/** Sizes above this use --long-runs measured runs. */
const LONG_PROMPT = 8192;
const RESULT_MARK = "BENCH_RESULT ";
const REPO = fileURLToPath(new URL("../", import.meta.url));
const THREADS = 1;

const { values } = parseArgs({
  options: {
    model: { type: "string", default: "models/builtin" },
    "prompt-tokens": { type: "string", default: "512,8192,32768" },
    "new-tokens": { type: "string", default: "128" },
    runs: { type: "string", default: "3" },
    "long-runs": { type: "string", default: "3" },
    backends: { type: "string", default: "wasm,native" },
    peers: { type: "string", default: "tjs,llama" },
    "tjs-max-tokens": { type: "string", default: "8192" },
    gguf: { type: "string", default: DEFAULT_GGUF_PATH },
    case: { type: "string" },
    "prompt-file": { type: "string" },
    help: { type: "boolean", short: "h", default: false },
  },
  strict: true,
});

if (values.help) {
  console.log("usage: bench-generate.ts [--model models/builtin] [--prompt-tokens 512,8192,32768] [--new-tokens 128] [--runs 3] [--long-runs 3] [--backends wasm,native] [--peers tjs,llama] [--tjs-max-tokens 8192] [--gguf bench-out/gguf/builtin-f32.gguf]");
  process.exit(0);
}

const modelDir = resolve(REPO, values.model);
const newTokens = positiveInt("new-tokens", values["new-tokens"]);
const runs = positiveInt("runs", values.runs);
const longRuns = positiveInt("long-runs", values["long-runs"]);
// transformers.js prefills a prompt in one session.run, whose attention scores are prompt^2 * heads floats:
// at 32K that is ~17 GB (onnxruntime-web stops with an integer overflow; onnxruntime-node grew past 9 GB
// before it was stopped on the 24 GB machine), so by default it runs only up to 8K.
const tjsMaxTokens = positiveInt("tjs-max-tokens", values["tjs-max-tokens"]);

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
  backend: CaseBackend;
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

/** The warm-up's prompt: the measured prompt, cut to WARMUP_MAX_TOKENS. */
const warmupIds = (promptIds: number[]) => promptIds.slice(0, WARMUP_MAX_TOKENS);

async function runOurs(backend: PeerBackend, promptIds: number[]): Promise<Omit<CaseResult, "peakRssMb" | "peakRssSource" | "runtime">> {
  const t0 = performance.now();
  const engine = await Engine.load({ modelDir, variant: "fp32", backend, threads: THREADS, queueLimit: 8, contextLength: 0, prefillChunk: 512 });
  const loadMs = performance.now() - t0;
  if (engine.info.backend !== backend) throw new Error(`asked for ${backend}, got ${engine.info.backend}`);

  // Instrumentation, not behaviour: the ORT time of each forward() (LlamaModel.runStats) splits decode into
  // time inside InferenceSession.run and JS time around it.
  const model = engine.model;
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
    const ids = i === 0 ? warmupIds(promptIds) : promptIds;
    const start = performance.now();
    const r = await engine.complete({ promptIds: ids, maxTokens: newTokens, sampling: { temperature: 0 }, stop: [], ignoreEos: true });
    const totalMs = performance.now() - start;
    sampleRss();
    if (r.tokenIds.length !== newTokens) throw new Error(`ours generated ${r.tokenIds.length} tokens, wanted ${newTokens}`);
    tokenIds = r.tokenIds;
    text = r.text;
    // The decode steps are the last forward() calls (one per generated token but the last); prefill's
    // chunk count is the runtime's business (it sizes chunks by time and by memory).
    const decode = runLog.slice(runLog.length - (newTokens - 1));
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

/** A peer's warm-up generation and then `runs` measured ones: its tokens (all must be newTokens long) and samples. */
async function measurePeer<R extends { tokenIds: number[] }>(
  name: string,
  promptIds: number[],
  generate: (ids: number[]) => Promise<R>,
  toSample: (r: R) => Sample,
): Promise<{ tokenIds: number[]; samples: Sample[] }> {
  const samples: Sample[] = [];
  let tokenIds: number[] = [];
  for (let i = 0; i <= runs; i++) {
    const r = await generate(i === 0 ? warmupIds(promptIds) : promptIds);
    sampleRss();
    if (r.tokenIds.length !== newTokens) throw new Error(`${name} generated ${r.tokenIds.length} tokens, wanted ${newTokens}`);
    tokenIds = r.tokenIds;
    if (i > 0) samples.push(toSample(r)); // run 0 is the warm-up
  }
  return { tokenIds, samples };
}

async function runTransformers(backend: PeerBackend, promptIds: number[]): Promise<Omit<CaseResult, "peakRssMb" | "peakRssSource" | "runtime">> {
  const t0 = performance.now();
  const peer = await loadTransformersPeer({ backend, modelsDir: dirname(modelDir), modelId: basename(modelDir), dtype: "fp32", threads: THREADS, loadTokenizer: true });
  const loadMs = performance.now() - t0;
  const { tokenIds, samples } = await measurePeer("transformers.js", promptIds, (ids) => peer.generate(ids, newTokens), (r) => ({
    prefillMs: r.prefillMs,
    firstTokenMs: r.firstTokenMs,
    totalMs: r.totalMs,
    decodeRunMs: r.decodeRunMs,
    decodeRuns: r.decodeRuns,
  }));
  const text = peer.decode(tokenIds) ?? "";
  await peer.dispose();
  return { impl: "transformers.js", backend, detail: peer.detail, loadMs, promptTokens: promptIds.length, tokenIds, text, samples };
}

async function runLlamaCpp(promptIds: number[]): Promise<Omit<CaseResult, "peakRssMb" | "peakRssSource" | "runtime">> {
  const t0 = performance.now();
  const peer = await loadLlamaCppPeer({ ggufPath: resolve(REPO, values.gguf!), contextTokens: promptIds.length + newTokens, threads: THREADS });
  const loadMs = performance.now() - t0;
  // node-llama-cpp does not say when the prompt's logits are out: prefill runs to the first token id.
  const { tokenIds, samples } = await measurePeer("llama.cpp", promptIds, (ids) => peer.generate(ids, newTokens), (r) => ({
    prefillMs: r.firstTokenMs,
    firstTokenMs: r.firstTokenMs,
    totalMs: r.totalMs,
    decodeRunMs: 0,
    decodeRuns: 0,
  }));
  const detail = peer.detail;
  await peer.dispose();
  // Text by our tokenizer: llama.cpp's own detokenizer is not the point of this comparison.
  return { impl: "llama.cpp", backend: "cpu", detail, loadMs, promptTokens: promptIds.length, tokenIds, text: "", samples };
}

async function childMain(spec: string): Promise<void> {
  const [implFlag, backendFlag] = spec.split(":");
  const impl = IMPL_FLAG[implFlag ?? ""];
  if (!impl || (impl === "llama.cpp" ? backendFlag !== "cpu" : backendFlag !== "wasm" && backendFlag !== "native")) {
    throw new Error(`--case must be ours|tjs : wasm|native, or llama:cpu, got ${spec}`);
  }
  // A file, not an argument: 32K ids are over Linux's 128 KiB limit for one argument (E2BIG).
  const promptIds = values["prompt-file"] ? (JSON.parse(readFileSync(values["prompt-file"], "utf8")) as number[]) : [];
  if (!promptIds.length) throw new Error("--case needs --prompt-file");
  const timer = setInterval(sampleRss, 5);
  const result =
    impl === "ours" ? await runOurs(backendFlag as PeerBackend, promptIds) : impl === "transformers.js" ? await runTransformers(backendFlag as PeerBackend, promptIds) : await runLlamaCpp(promptIds);
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

/** A realistic chat rendered with the model's template: the most log lines whose prompt fits in `target` tokens. */
async function buildPrompt(engine: Engine, target: number): Promise<number[]> {
  const encode = (lines: number) => engine.encodeChat(chatWithLines(lines), { extra: { date_string: "26 Jul 2024" } });
  // The token count grows with the line count: binary search instead of encoding every size on the way.
  let best = await encode(0);
  if (best.length > target) return best;
  let lo = 0;
  let hi = 1;
  while ((await encode(hi)).length <= target) {
    lo = hi;
    hi *= 2;
  }
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if ((await encode(mid)).length <= target) lo = mid;
    else hi = mid;
  }
  best = await encode(lo);
  return best;
}

function runCase(spec: string, promptFile: string, caseRuns: number): Promise<CaseResult> {
  const args = [fileURLToPath(import.meta.url), "--case", spec, "--model", values.model!, "--gguf", values.gguf!, "--new-tokens", String(newTokens), "--runs", String(caseRuns), "--prompt-file", promptFile];
  return new Promise((resolvePromise, reject) => {
    const child = spawn(process.execPath, args, { cwd: REPO, stdio: ["ignore", "pipe", "inherit"], env: process.env });
    let out = "";
    child.stdout.on("data", (chunk: Buffer) => (out += chunk.toString()));
    child.on("error", reject);
    child.on("close", (code, signal) => {
      const line = out.split("\n").find((l) => l.startsWith(RESULT_MARK));
      if (code !== 0 || !line) {
        reject(new Error(`case ${spec} failed (${signal ? `signal ${signal}` : `exit ${code}`})${out.trim() ? `:\n${out.trim()}` : ""}`));
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
  const line = (r: string[]) => r.map((cell, c) => (c < 3 ? cell.padEnd(widths[c]!) : cell.padStart(widths[c]!))).join("  ");
  return [line(rows[0]!), widths.map((w) => "-".repeat(w)).join("  "), ...rows.slice(1).map(line)].join("\n");
}

/** Length of the common prefix of two token lists. */
function samePrefix(a: number[], b: number[]): number {
  let n = 0;
  while (n < a.length && n < b.length && a[n] === b[n]) n++;
  return n;
}

const sizeLabel = (tokens: number) => (tokens >= 1024 && tokens % 1024 === 0 ? `${tokens / 1024}K` : String(tokens));

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
  const peers = values.peers!.split(",").map((p) => p.trim()).filter(Boolean);
  for (const p of peers) {
    if (p !== "tjs" && p !== "llama") {
      console.error(`--peers takes tjs and/or llama, got ${p}`);
      process.exit(2);
    }
  }
  const targets = values["prompt-tokens"]!.split(",").map((t) => positiveInt("prompt-tokens", t.trim()));
  const withLlama = peers.includes("llama");
  if (withLlama) {
    if (basename(modelDir) !== "builtin") {
      console.error("the llama.cpp peer runs the built-in model's GGUF: use --model models/builtin or --peers tjs");
      process.exit(2);
    }
    const gguf = await buildBuiltinGguf(resolve(REPO, values.gguf!), { ifMissing: true });
    console.log(`llama.cpp model: ${gguf.path} (${(gguf.bytes / 2 ** 20).toFixed(1)} MiB, f32 weights, ${gguf.built ? "written now" : "up to date"})`);
  }
  const encoder = await Engine.load({ modelDir, variant: "fp32", backend: "wasm", threads: 1, queueLimit: 1, contextLength: 0, prefillChunk: 512 });
  const prompts: number[][] = [];
  for (const target of targets) prompts.push(await buildPrompt(encoder, target));
  await encoder.close();
  const promptDir = mkdtempSync(join(tmpdir(), "bench-generate-"));

  console.log(`model ${modelDir}, fp32; prompts of ${prompts.map((p) => p.length).join(", ")} tokens (chat template), ${newTokens} new tokens, greedy, eos ignored`);
  console.log(`${THREADS} thread per case; 1 warm-up (first ${WARMUP_MAX_TOKENS} prompt tokens at most) + median of ${runs} runs (${longRuns} above ${LONG_PROMPT} tokens); each case in its own process (${process.execPath})`);

  const rows = [["prompt", "backend", "implementation", "prefill tok/s", "TTFT ms", "decode tok/s", "ORT ms/tok", "JS ms/tok", "peak RSS MB", "load ms"]];
  const details = new Map<string, string>();
  const summary: string[] = [];
  const tjsRatios: number[] = [];
  const llamaRatios = new Map<number, number[]>();
  let allMatch = true;
  for (let s = 0; s < prompts.length; s++) {
    const promptIds = prompts[s]!;
    const caseRuns = targets[s]! > LONG_PROMPT ? longRuns : runs;
    const promptFile = join(promptDir, `prompt-${s}.json`);
    writeFileSync(promptFile, JSON.stringify(promptIds));
    const results: CaseResult[] = [];
    const failures: string[] = [];
    const withTjs = peers.includes("tjs") && promptIds.length <= tjsMaxTokens;
    const specs = backends.flatMap((b) => ["ours", ...(withTjs ? ["tjs"] : [])].map((impl) => `${impl}:${b}`));
    if (withLlama) specs.push("llama:cpu");
    for (const spec of specs) {
      process.stderr.write(`running ${spec} at ${promptIds.length} tokens ...\n`);
      try {
        results.push(await runCase(spec, promptFile, caseRuns));
      } catch (err) {
        // One failing case (e.g. a peer out of memory at 32K) is reported, not the end of the whole run.
        failures.push(`${spec}: ${(err as Error).message.split("\n")[0]}`);
        allMatch = false;
      }
    }
    const byCase = new Map<string, Figures>();
    for (const r of results) {
      const f = figures(r);
      byCase.set(`${r.impl}:${r.backend}`, f);
      details.set(`${r.impl}:${r.backend}`, `${r.detail}; ${r.runtime}; peak RSS from ${r.peakRssSource}`);
      rows.push([
        String(promptIds.length),
        r.backend,
        r.impl,
        f.prefillTokS.toFixed(0),
        f.ttftMs.toFixed(1),
        f.decodeTokS.toFixed(1),
        r.impl === "llama.cpp" ? "-" : f.decodeRunMsPerTok.toFixed(3),
        r.impl === "llama.cpp" ? "-" : f.decodeOutsideMsPerTok.toFixed(3),
        r.peakRssMb.toFixed(0),
        r.loadMs.toFixed(0),
      ]);
    }
    const label = `${sizeLabel(targets[s]!)} (${promptIds.length} tokens)`;
    for (const f of failures) summary.push(`${label}: FAILED ${f}`);
    const llama = results.find((r) => r.impl === "llama.cpp");
    for (const backend of backends) {
      const ours = results.find((r) => r.impl === "ours" && r.backend === backend);
      if (!ours) continue;
      const oursF = byCase.get(`ours:${backend}`)!;
      const tjs = results.find((r) => r.impl === "transformers.js" && r.backend === backend);
      if (tjs) {
        const same = samePrefix(ours.tokenIds, tjs.tokenIds);
        if (same !== newTokens) allMatch = false;
        const t = byCase.get(`transformers.js:${backend}`)!;
        const ratio = oursF.decodeTokS / t.decodeTokS;
        tjsRatios.push(ratio);
        summary.push(
          `${label} ${backend}: token identity ours/transformers.js ${same}/${newTokens} equal${same === newTokens ? "" : ` (first difference at ${same}: ours ${ours.tokenIds[same]}, transformers.js ${tjs.tokenIds[same]})`}; text ${ours.text === tjs.text ? "equal" : "differs"}; ` +
            `decode ratio ${ratio.toFixed(2)}; prefill ratio ${(oursF.prefillTokS / t.prefillTokS).toFixed(2)}; TTFT ratio (lower is better) ${(oursF.ttftMs / t.ttftMs).toFixed(2)}`,
        );
      }
      if (llama) {
        const same = samePrefix(ours.tokenIds, llama.tokenIds);
        if (same !== newTokens) allMatch = false;
        const l = byCase.get("llama.cpp:cpu")!;
        const ratio = oursF.decodeTokS / l.decodeTokS;
        if (!llamaRatios.has(targets[s]!)) llamaRatios.set(targets[s]!, []);
        llamaRatios.get(targets[s]!)!.push(ratio);
        summary.push(
          `${label} ${backend}: token identity ours/llama.cpp ${same}/${newTokens} equal${same === newTokens ? "" : ` (first difference at ${same}: ours ${ours.tokenIds[same]}, llama.cpp ${llama.tokenIds[same]})`}; ` +
            `decode ratio ${ratio.toFixed(2)}; prefill ratio ${(oursF.prefillTokS / l.prefillTokS).toFixed(2)}; peak RSS ratio (lower is better) ${(ours.peakRssMb / llama.peakRssMb).toFixed(2)}`,
        );
      }
    }
  }

  rmSync(promptDir, { recursive: true, force: true });
  console.log("");
  console.log(table(rows));
  console.log("");
  for (const [key, detail] of details) console.log(`  ${key.padEnd(22)} ${detail}`);
  console.log("");
  console.log("definitions (per generation, timed from the call that starts it):");
  console.log("  prefill tok/s  prompt tokens / time until the prompt's logits are out of ORT (ours: GenerateResult.prefillMs;");
  console.log("                 transformers.js: end of the first session.run; llama.cpp: until its first token id, which");
  console.log("                 node-llama-cpp gives with the prompt's evaluation, so it includes one greedy sampling)");
  console.log("  TTFT ms        time until the first generated token id is known (ours: GenerateResult.firstTokenMs, taken right after");
  console.log("                 sampling token 1; transformers.js: streamer.put() of token 1; llama.cpp: the generator's first token)");
  console.log(`  decode tok/s   (${newTokens} - 1) / (time from first token to the call's return / the last token)`);
  console.log("  ORT ms/tok     mean time inside InferenceSession.run per decode step; JS ms/tok = decode time per token outside it");
  console.log("  peak RSS MB    the case process's VmHWM at its end (includes runtime, ORT or llama.cpp, model and the warm-up)");
  console.log("  llama.cpp      the same weights as GGUF (f32), CPU, 1 thread, f16 KV, flash attention off; prompts go in as token ids");
  console.log("");
  for (const line of summary) console.log(line);
  console.log(`token ids match: ${allMatch ? "yes" : "no"} (ours against every peer, every size and backend)`);
  if (tjsRatios.length) console.log(`decode ratio ours/transformers.js: ${Math.min(...tjsRatios).toFixed(2)}`);
  if (llamaRatios.size) {
    const at = llamaRatios.has(32768) ? 32768 : Math.max(...llamaRatios.keys());
    console.log(`decode ratio ours/llama.cpp at ${sizeLabel(at)}: ${Math.min(...llamaRatios.get(at)!).toFixed(2)}`);
  }
  if (!allMatch) process.exitCode = 1;
}

if (values.case) await childMain(values.case);
else await parentMain();
