/**
 * Resuming a session from its snapshot against reading its context again, on the built-in model:
 *
 *   npx bun scripts/bench-resume.ts [--sizes 8192,32768] [--backend wasm|native] [--runs 3] [--chunk-tokens 4096] [--variant fp32|fp16]
 *
 * For each size, a session reads a document of that many tokens and is written to a snapshot store. Then:
 *   cold    a fresh request carrying the document and a question: prefill everything, first token
 *   resume  a new SessionManager on the same store (as after a restart): the question is asked in the
 *           session, which reads the snapshot, keeps its KV, prefills the question, first token
 * Both must give the same first token. Also printed: snapshot bytes per token against raw KV bytes per
 * token, and encode / decode throughput of the snapshot format.
 *
 * Beside ours, llama.cpp (node-llama-cpp, on the GGUF that scripts/lib/gguf-llama.ts writes from the same
 * weights; 1 thread, f16 KV, flash attention off) does the same with its own state file: it reads the same
 * session tokens, saves its sequence state (saveStateToFile), then loads it into a cleared sequence
 * (loadStateFromFile), evaluates the same question tokens and gives its first token, which must equal ours.
 * `--no-llama` leaves it out. The last line is `resume speedup at 32K: NNNx` (cold / resume, medians;
 * target >= 100x).
 */
import { copyFile, rm, stat } from "node:fs/promises";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { Engine, SessionManager, SnapshotStore, DEFAULT_TENANT, decodeSnapshot, encodeSnapshot, type ChatMessage } from "../runtime/index.ts";
import { createRng } from "../runtime/sampling.ts";
import { buildBuiltinGguf, DEFAULT_GGUF_PATH } from "./lib/gguf-llama.ts";
import { loadLlamaCppPeer } from "./lib/llama-cpp-peer.ts";

const { values } = parseArgs({
  options: {
    sizes: { type: "string", default: "8192,32768" },
    backend: { type: "string", default: "wasm" },
    variant: { type: "string", default: "fp32" },
    runs: { type: "string", default: "3" },
    "chunk-tokens": { type: "string", default: "4096" },
    model: { type: "string", default: fileURLToPath(new URL("../models/builtin/", import.meta.url)) },
    "no-llama": { type: "boolean", default: false },
    gguf: { type: "string", default: DEFAULT_GGUF_PATH },
  },
});
const withLlama = !values["no-llama"];
const sizes = values.sizes!.split(",").map(Number);
const runs = Number(values.runs);
const chunkTokens = Number(values["chunk-tokens"]);
const backend = values.backend as "wasm" | "native";
const DATE = { date_string: "26 Jul 2024" };
const QUESTION: ChatMessage = { role: "user", content: "What was the passenger count on the third ferry?" };

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
const mb = (bytes: number) => bytes / 2 ** 20;

/** A varied log-like document of about `tokens` tokens (seeded, so every run reads the same text). */
async function documentOf(engine: Engine, tokens: number): Promise<string> {
  const random = createRng(7);
  const pick = <T>(xs: T[]) => xs[Math.floor(random() * xs.length)]!;
  const ships = ["Aurora", "Petrel", "Kittiwake", "Marram", "Solway", "Brae", "Tern", "Skerry"];
  const events = ["left the harbour", "returned to the quay", "waited for the pilot", "turned back in fog", "took on fuel", "anchored off the point"];
  const weather = ["calm", "a north-west wind, force 5", "heavy rain", "thick fog", "a swell from the south", "clear skies"];
  const ids: number[] = [];
  while (ids.length < tokens) {
    const line = `At ${String(Math.floor(random() * 24)).padStart(2, "0")}:${String(Math.floor(random() * 60)).padStart(2, "0")} the ${pick(ships)} ${pick(events)} with ${Math.floor(random() * 400)} passengers in ${pick(weather)}.\n`;
    ids.push(...engine.tokenizer.encode(line));
  }
  // The chat template adds its headers around the document: size the document so the session holds `tokens`.
  let n = tokens;
  for (let attempt = 0; attempt < 8; attempt++) {
    const text = engine.tokenizer.decode(ids.slice(0, n));
    const total = (await engine.encodeChat([{ role: "user", content: text }], { addGenerationPrompt: false, extra: DATE })).length;
    if (total === tokens) return text;
    n += tokens - total;
  }
  throw new Error(`could not size a document to ${tokens} tokens`);
}

if (!["fp32", "fp16"].includes(values.variant!)) throw new Error(`--variant must be fp32 or fp16 (fp16: float16 KV), got ${values.variant}`);
const engine = await Engine.load({ modelDir: values.model!, variant: values.variant as "fp32" | "fp16", backend, threads: 1, queueLimit: 4, contextLength: 0, prefillChunk: 512 });
console.log(`model ${engine.info.modelId} (${engine.info.variant}, kv ${engine.info.kvDtype}, ${engine.info.kvBytesPerToken} KV bytes/token); backend ${engine.info.backendDetail}`);
console.log(`snapshot chunks of ${chunkTokens} tokens; ${runs} runs per figure, medians\n`);

if (withLlama) {
  const gguf = await buildBuiltinGguf(values.gguf!, { ifMissing: true });
  console.log(`llama.cpp peer on ${gguf.path} (${(gguf.bytes / 2 ** 20).toFixed(1)} MiB, f32 weights, ${gguf.built ? "written now" : "up to date"})`);
}
const rows: string[][] = [];
const llamaRows: string[][] = [];
let speedup32k: number | null = null;
let resumeRatio32k: number | null = null;
let llamaDetail = "";
for (const size of sizes) {
  const dir = mkdtempSync(join(tmpdir(), "bench-resume-"));
  const store = new SnapshotStore(dir);
  const options = { memoryBudgetBytes: 2 ** 40, busy: "wait" as const, chunkTokens };
  const document: ChatMessage = { role: "user", content: await documentOf(engine, size) };

  const writer = new SessionManager(engine, store, options);
  const created = await writer.create({ tenant: DEFAULT_TENANT, id: "doc", messages: [document], templateKwargs: DATE });
  const snapshotBytes = (await stat(store.path("doc"))).size;

  // Cold: the whole conversation from nothing.
  const promptIds = await engine.encodeChat([document, QUESTION], { extra: DATE });
  const cold: number[] = [];
  let coldToken = -1;
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    const r = await engine.complete({ promptIds, maxTokens: 1, sampling: { temperature: 0 }, stop: [], ignoreEos: true });
    cold.push(performance.now() - t0);
    coldToken = r.tokenIds[0]!;
  }

  // Resume: a new manager on the same store, as after a restart; the turn reads the snapshot.
  const resume: number[] = [];
  let resumeToken = -1;
  let prefilled = 0;
  for (let i = 0; i < runs; i++) {
    // Every run resumes the same snapshot (a turn saves the session again, with the question in it).
    const id = `run${i}`;
    await copyFile(store.path("doc"), store.path(id));
    const reader = new SessionManager(engine, store, options);
    const t0 = performance.now();
    let firstToken = 0;
    const r = await reader.turn(
      DEFAULT_TENANT,
      id,
      { messages: (current) => [...current.slice(0, 1), QUESTION], maxTokens: 1, sampling: { temperature: 0 }, stop: [], ignoreEos: true },
      () => {
        firstToken ||= performance.now();
      },
    );
    resume.push((firstToken || performance.now()) - t0);
    resumeToken = r.tokenIds[0]!;
    prefilled = r.promptTokens - r.cachedTokens;
  }
  if (resumeToken !== coldToken) throw new Error(`first tokens differ: cold ${coldToken}, resumed ${resumeToken}`);

  // Codec throughput on this snapshot: decode from the file, encode back to a file.
  const expectation = writer.snapshotExpectation();
  const decodeMs: number[] = [];
  const encodeMs: number[] = [];
  for (let i = 0; i < runs; i++) {
    let t0 = performance.now();
    const data = await store.read("doc", (source) => decodeSnapshot(source, expectation));
    decodeMs.push(performance.now() - t0);
    t0 = performance.now();
    await store.save("copy", encodeSnapshot(data, chunkTokens));
    encodeMs.push(performance.now() - t0);
  }

  if (withLlama) {
    // The same session tokens and question tokens as ours: the session holds the document rendered without
    // a generation prompt, which is a prefix of the question's prompt.
    const sessionIds = await engine.encodeChat([document], { addGenerationPrompt: false, extra: DATE });
    if (sessionIds.some((id, i) => id !== promptIds[i])) throw new Error("the session's tokens are not a prefix of the question's prompt");
    const questionIds = promptIds.slice(sessionIds.length);
    const peer = await loadLlamaCppPeer({ ggufPath: values.gguf!, contextTokens: promptIds.length + 8, threads: 1 });
    llamaDetail = peer.detail;
    try {
      // One cold run (a full prefill at 32K takes tens of seconds): its first token is the one to match.
      const cold = await peer.generate(promptIds, 1);
      await peer.ingest(sessionIds);
      const stateFile = join(dir, "llama.state");
      let t0 = performance.now();
      const stateBytes = await peer.saveState(stateFile);
      const saveMs = performance.now() - t0;
      const loads: number[] = [];
      const firsts: number[] = [];
      let token = -1;
      for (let i = 0; i < runs; i++) {
        const r = await peer.resume(stateFile, questionIds);
        loads.push(r.loadMs);
        firsts.push(r.firstTokenMs);
        token = r.token;
      }
      t0 = performance.now();
      const sameFirst = token === coldToken && cold.tokenIds[0] === coldToken;
      llamaRows.push([
        String(sessionIds.length),
        (snapshotBytes / sessionIds.length).toFixed(1),
        (stateBytes / sessionIds.length).toFixed(1),
        median(resume).toFixed(1),
        median(firsts).toFixed(1),
        median(loads).toFixed(1),
        saveMs.toFixed(1),
        cold.firstTokenMs.toFixed(0),
        sameFirst ? "yes" : `no (ours ${coldToken}, llama.cpp cold ${cold.tokenIds[0]}, resumed ${token})`,
      ]);
      if (size === 32768) resumeRatio32k = median(resume) / median(firsts);
    } finally {
      await peer.dispose();
    }
  }
  await rm(dir, { recursive: true, force: true });

  const tokens = created.tokens_read;
  const speedup = median(cold) / median(resume);
  if (size === 32768) speedup32k = speedup;
  if (tokens !== size) throw new Error(`the session holds ${tokens} tokens, wanted ${size}`);
  rows.push([
    String(tokens),
    median(cold).toFixed(1),
    median(resume).toFixed(1),
    String(prefilled),
    `${speedup.toFixed(0)}x`,
    (snapshotBytes / tokens).toFixed(1),
    String(engine.info.kvBytesPerToken),
    (mb(snapshotBytes) / (median(encodeMs) / 1000)).toFixed(0),
    (mb(snapshotBytes) / (median(decodeMs) / 1000)).toFixed(0),
  ]);
}

const header = ["tokens", "cold ms", "resume ms", "resume prefill", "speedup", "snap B/tok", "raw KV B/tok", "encode MB/s", "decode MB/s"];
const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
const line = (cells: string[]) => cells.map((c, i) => c.padStart(widths[i]!)).join("  ");
console.log(line(header));
console.log(widths.map((w) => "-".repeat(w)).join("  "));
for (const r of rows) console.log(line(r));
console.log(`
definitions:
  cold ms         fresh request with the document and the question: prefill of every token + first token
  resume ms       new SessionManager on the same store (as after a restart): read and check the snapshot,
                  keep its KV, prefill the question ("resume prefill" tokens), first token
  snap B/tok      snapshot file bytes / tokens, against the raw KV bytes per token of this model
  encode / decode snapshot MB per second, file to tensors and tensors to file (store on ${tmpdir()})
first tokens of cold and resumed runs: identical`);
if (llamaRows.length) {
  const lh = ["tokens", "ours snap B/tok", "llama.cpp state B/tok", "ours resume ms", "llama.cpp resume ms", "llama.cpp load ms", "llama.cpp save ms", "llama.cpp cold ms", "same first token"];
  const lw = lh.map((h, i) => Math.max(h.length, ...llamaRows.map((r) => r[i]!.length)));
  const lline = (cells: string[]) => cells.map((c, i) => c.padStart(lw[i]!)).join("  ");
  console.log(`\nllama.cpp beside ours: ${llamaDetail}`);
  console.log(lline(lh));
  console.log(lw.map((w) => "-".repeat(w)).join("  "));
  for (const r of llamaRows) console.log(lline(r));
  console.log(`
  llama.cpp state B/tok  saveStateToFile's file bytes / session tokens (its KV is f16; ours is ${engine.info.kvDtype})
  llama.cpp resume ms    loadStateFromFile into a cleared sequence + evaluate the question + first token (medians)
  llama.cpp load ms      loadStateFromFile alone; save ms: saveStateToFile once
  llama.cpp cold ms      one fresh run: prefill of every token + first token
  same first token       llama.cpp's cold and resumed first tokens equal ours`);
  if (resumeRatio32k !== null) console.log(`resume ms ours/llama.cpp at 32K: ${resumeRatio32k.toFixed(2)} (lower is better)`);
}
if (speedup32k !== null) console.log(`resume speedup at 32K: ${speedup32k.toFixed(0)}x`);
