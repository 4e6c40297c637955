/**
 * The session stores (issue 15) on the built-in model, one thread of onnxruntime-node:
 *
 *   npm run bench:store [-- --sizes 8192,32768] [--stores file,redis,denokv] [--runs 3] [--forks 5]
 *
 * For each store (`file:<dir>`, `redis://` on a redis-server this script starts, `denokv:<file>`) and each
 * session size:
 *
 *   writer   a server process on the store (Bun entry; Deno entry for denokv, which exists only under Deno)
 *            creates the session: POST /v1/sessions with a fixture haystack document (scripts/lib/fixture-tasks.ts)
 *            of exactly N session tokens, forks it once per resume run (forks share its stored bytes), hands
 *            out the snapshot (GET .../snapshot), and exits.
 *   save/load  those snapshot bytes through the store API in this process: save = TenantStore.save of the
 *            snapshot's frames (the chunks the server's encoder yields), load = TenantStore.read reading
 *            every byte; MB/s (MiB), median of --runs. Deno KV's part runs in a Deno child process (this
 *            script with --denokv-io: `deno run -A --unstable-kv`).
 *   resume   a fresh reader server process on the same store, with --session-memory-bytes 0 (every turn reads
 *            the session back from the store; nothing stays in memory), answers one short warm-up request;
 *            then each run asks the question in a fork this process has never read: POST
 *            /v1/sessions/:id/messages, stream, max_tokens 1, timed at the client from the request to the
 *            SSE event of the first token. Median of --runs.
 *   cold     on the same reader, POST /v1/chat/completions with the same conversation (document, question),
 *            no session: prefill of every token, first token (its usage must show no cached tokens).
 *            Median of --runs; the first tokens of resume and cold must be the same.
 *   fork     on the largest session: POST /v1/sessions/:id/fork, median of --forks, and what the forks added
 *            to the store: file, bytes on disk (du of the store directory: a fork is a hard link); redis, keys
 *            (SCAN) and INFO used_memory; denokv, entries and key + value bytes (kv.list, in a Deno child).
 *
 * A store that fails says why in its rows, and the others go on. The last line is `redis resume speedup at
 * 32K: NNNx` (cold first-token time / resume first-token time on Redis at 32K). Every process this script
 * starts (servers, Deno children, redis-server) is stopped at the end, also on error or Ctrl-C.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import process from "node:process";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import type { SessionStore, TenantStore } from "../runtime/session-store.ts";

const REPO = fileURLToPath(new URL("../", import.meta.url));
const SELF = fileURLToPath(import.meta.url);
const DENO = join(REPO, "node_modules", ".bin", "deno");
const BUN = join(REPO, "node_modules", ".bin", "bun");
const DENO_RUN = ["run", "-A", "--unstable-kv"];
const MIB = 2 ** 20;
const DATE = { date_string: "26 Jul 2024" };
const QUESTION = "What is the pass key?";

const { values } = parseArgs({
  options: {
    sizes: { type: "string", default: "8192,32768" },
    stores: { type: "string", default: "file,redis,denokv" },
    runs: { type: "string", default: "3" },
    forks: { type: "string", default: "5" },
    model: { type: "string", default: join(REPO, "models", "builtin") },
    // Child modes (under Deno): the in-process Deno KV timings, and counting its entries.
    "denokv-io": { type: "string" },
    "denokv-count": { type: "string" },
    snapshot: { type: "string" },
    prefix: { type: "string" },
  },
});

const median = (xs: number[]) => (xs.length ? [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]! : NaN);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** The snapshot's chunks as its encoder yields them: the magic, each frame (u32 length, u32 CRC-32, body), the trailer if any. */
function framesOf(bytes: Uint8Array): Uint8Array[] {
  const out: Uint8Array[] = [bytes.subarray(0, 8)];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let at = 8;
  while (at < bytes.length) {
    const rest = bytes.length - at;
    const len = rest >= 8 ? view.getUint32(at, true) : Infinity;
    if (rest < 8 || at + 8 + len > bytes.length) {
      out.push(bytes.subarray(at)); // a trailer (16 bytes), or whatever is left
      break;
    }
    out.push(bytes.subarray(at, at + 8 + len));
    at += 8 + len;
  }
  return out;
}

interface IoResult {
  bytes: number;
  chunks: number;
  saveMs: number[];
  loadMs: number[];
}

/** save and read-back timings of `bytes` through a tenant store, under ids `<prefix>-<i>` (removed after). */
async function timeIo(t: TenantStore, bytes: Uint8Array, runs: number, prefix: string): Promise<IoResult> {
  const chunks = framesOf(bytes);
  const saveMs: number[] = [];
  const loadMs: number[] = [];
  const ids = Array.from({ length: runs }, (_, i) => `${prefix}-${i}`);
  const buffer = new Uint8Array(MIB);
  try {
    for (const id of ids) {
      const t0 = performance.now();
      await t.save(id, chunks);
      saveMs.push(performance.now() - t0);
    }
    for (const id of ids) {
      const t0 = performance.now();
      const n = await t.read(id, async (reader) => {
        let total = 0;
        for (;;) {
          const got = await reader.read(MIB, buffer);
          if (got.length === 0) return total;
          total += got.length;
        }
      });
      loadMs.push(performance.now() - t0);
      if (n !== bytes.length) throw new Error(`read back ${n} bytes of ${id}, saved ${bytes.length}`);
    }
    // Untimed: the bytes read back are the bytes saved.
    const back = await t.read(ids[0]!, async (reader) => new Uint8Array(await reader.read(reader.size)));
    if (back.length !== bytes.length || back.some((b, i) => b !== bytes[i])) throw new Error(`the bytes read back from ${ids[0]} differ from those saved`);
  } finally {
    for (const id of ids) await t.remove(id).catch(() => {});
  }
  return { bytes: bytes.length, chunks: chunks.length, saveMs, loadMs };
}

// ------------------------------------------------------------------------------------------------------
// Child modes, run under Deno (Deno KV exists only there).

interface DenoKvApi {
  openKv(path?: string): Promise<{
    list(selector: { prefix: unknown[] }): AsyncIterable<{ key: unknown[]; value: unknown }>;
    close(): void;
  }>;
  KvU64?: new (n: bigint) => unknown;
}

async function denoKvIo(path: string, snapshotFile: string, runs: number, prefix: string): Promise<void> {
  const { DenoKvSessionStore } = await import("../runtime/stores/denokv-store.ts");
  const store = await DenoKvSessionStore.open(path);
  try {
    const result = await timeIo(store.forTenant("default"), new Uint8Array(readFileSync(snapshotFile)), runs, prefix);
    console.log(`RESULT ${JSON.stringify(result)}`);
  } finally {
    await store.close();
  }
}

/** Entries under the store's prefix, and their key + value bytes (values: bytes as stored for chunks, 8 for counters, JSON length for records). */
async function denoKvCount(path: string): Promise<void> {
  const deno = (globalThis as unknown as { Deno: DenoKvApi }).Deno;
  const kv = await deno.openKv(path);
  let entries = 0;
  let bytes = 0;
  const kinds: Record<string, number> = {};
  try {
    for await (const e of kv.list({ prefix: ["ulsess"] })) {
      entries++;
      const kind = String(e.key[2]);
      kinds[kind] = (kinds[kind] ?? 0) + 1;
      bytes += e.key.reduce<number>((n, p) => n + (p instanceof Uint8Array ? p.length : String(p).length), 0);
      const v = e.value;
      bytes += v instanceof Uint8Array ? v.length : deno.KvU64 && v instanceof deno.KvU64 ? 8 : JSON.stringify(v ?? null).length;
    }
  } finally {
    kv.close();
  }
  console.log(`RESULT ${JSON.stringify({ entries, bytes, kinds })}`);
}

/** Runs this script under Deno in a child mode; resolves with its RESULT line's JSON. */
function denoChild<T>(args: string[]): Promise<T> {
  return new Promise((resolve, reject) => {
    const child = spawn(DENO, [...DENO_RUN, SELF, ...args], { cwd: REPO, env: { ...process.env, NO_COLOR: "1" }, stdio: ["ignore", "pipe", "pipe"] });
    children.add(child);
    let out = "";
    child.stdout!.on("data", (d: Buffer) => (out += d.toString()));
    child.stderr!.on("data", (d: Buffer) => (out += d.toString()));
    child.on("close", (code) => {
      children.delete(child);
      const line = out.split("\n").find((l) => l.startsWith("RESULT "));
      if (code !== 0 || !line) reject(new Error(`deno ${args[0]} exited ${code}: ${lastLines(out)}`));
      else resolve(JSON.parse(line.slice("RESULT ".length)) as T);
    });
  });
}

const lastLines = (text: string, n = 6) => text.trim().split("\n").slice(-n).join(" | ");

// ------------------------------------------------------------------------------------------------------
// Processes: every one started is tracked, and stopped at the end whatever happens.

const children = new Set<ChildProcess>();
const cleanups: (() => Promise<void>)[] = [];

async function stopChild(child: ChildProcess, graceMs = 15_000): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return void children.delete(child);
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  child.kill("SIGTERM");
  if (await Promise.race([exited.then(() => true), sleep(graceMs).then(() => false)])) return void children.delete(child);
  child.kill("SIGKILL");
  await exited;
  children.delete(child);
}

async function cleanupAll(): Promise<void> {
  await Promise.all([...children].map((c) => stopChild(c, 5_000)));
  for (const c of cleanups.splice(0).reverse()) await c().catch(() => {});
}

interface Server {
  url: string;
  child: ChildProcess;
  output: () => string;
}

async function startServer(runtime: "bun" | "deno", spec: string, ctxSize: number, extra: string[] = []): Promise<Server> {
  const { startProcess } = await import("./lib/server-process.ts");
  const flags = ["--port", "0", "--backend", "native", "--threads", "1", "--model", values.model!, "--session-store", spec, "--ctx-size", String(ctxSize), ...extra];
  const server = runtime === "bun" ? await startProcess(BUN, ["src/entry/bun.ts", ...flags]) : await startProcess(DENO, [...DENO_RUN, "src/entry/deno.ts", ...flags]);
  children.add(server.child);
  return server;
}

// ------------------------------------------------------------------------------------------------------
// HTTP.

async function post(url: string, body: unknown): Promise<any> {
  const res = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  const text = await res.text();
  if (!res.ok) throw new Error(`POST ${url}: ${res.status} ${text.slice(0, 400)}`);
  return text ? JSON.parse(text) : null;
}

/** A streamed completion: client-side ms from the request to the SSE event carrying the first token's text; reads the stream to its end. */
async function firstToken(url: string, body: Record<string, unknown>): Promise<{ ms: number; text: string; usage: any }> {
  const t0 = performance.now();
  const res = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }) });
  if (!res.ok || !res.body) throw new Error(`POST ${url}: ${res.status} ${(await res.text()).slice(0, 400)}`);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let pending = "";
  let first = 0;
  let text = "";
  let usage: any = null;
  let error: unknown = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    pending += decoder.decode(value, { stream: true });
    for (let cut = pending.indexOf("\n\n"); cut >= 0; cut = pending.indexOf("\n\n")) {
      const block = pending.slice(0, cut);
      pending = pending.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const event = JSON.parse(line.slice("data: ".length));
        if (event.error) error = event.error;
        const content = event.choices?.[0]?.delta?.content;
        if (content) {
          first ||= performance.now();
          text += content;
        }
        if (event.usage) usage = event.usage;
      }
    }
  }
  if (error) throw new Error(`POST ${url}: error event ${JSON.stringify(error)}`);
  if (!first) throw new Error(`POST ${url}: no token arrived`);
  return { ms: first - t0, text, usage };
}

async function download(url: string): Promise<Uint8Array> {
  const res = await fetch(url);
  if (!res.ok) throw new Error(`GET ${url}: ${res.status} ${(await res.text()).slice(0, 400)}`);
  return new Uint8Array(await res.arrayBuffer());
}

// ------------------------------------------------------------------------------------------------------
// The documents: fixture haystacks (pass key at mid depth) whose session holds exactly N tokens.

interface Doc {
  size: number;
  document: string;
  key: string;
}

async function makeDocuments(sizes: number[]): Promise<Doc[]> {
  const { loadModelFolder } = await import("../runtime/model-folder.ts");
  const { TextTokenizer } = await import("../runtime/tokenizer.ts");
  const { ChatTemplate } = await import("../runtime/chat-template.ts");
  const { FixtureTasks, rngOf } = await import("./lib/fixture-tasks.ts");
  const folder = await loadModelFolder(values.model!);
  const tokenizer = new TextTokenizer(folder.tokenizerJson, folder.tokenizerConfig);
  const template = new ChatTemplate(folder.tokenizerConfig, tokenizer.specialTokens);
  const tasks = new FixtureTasks(tokenizer, template, "eval", { digits: true });
  // What the session reads: the document as one user message, no generation prompt (special-token strings of the template are specials).
  const sessionTokens = (document: string) => tokenizer.encode(template.render([{ role: "user", content: document }], { addGenerationPrompt: false, extra: DATE }), false, true).length;
  const docs: Doc[] = [];
  for (const size of sizes) {
    let exact = size + 16;
    let best: Doc | null = null;
    for (let attempt = 0; attempt < 6 && !best; attempt++) {
      const sample = tasks.haystack(rngOf(size), { kind: "passkey", exactTokens: exact, depth: 0.5, dateString: DATE.date_string });
      let document = sample.content.slice(0, sample.content.lastIndexOf(" What is"));
      let n = sessionTokens(document);
      if (n > size) {
        exact -= n - size;
        continue;
      }
      // The haystack stops at a sentence boundary: pad with one-token words up to the size.
      const base = document;
      for (let pad = size - n, tries = 0; n !== size && tries < 4; tries++) {
        document = base + " ok".repeat(pad);
        n = sessionTokens(document);
        pad += size - n;
      }
      if (n === size) best = { size, document, key: sample.key };
      else exact -= 8;
    }
    if (!best) throw new Error(`could not make a document of ${size} session tokens`);
    docs.push(best);
  }
  return docs;
}

// ------------------------------------------------------------------------------------------------------
// Store-specific parts: the spec, the in-process timings, and what a fork adds.

interface Usage {
  [label: string]: number;
}

interface StoreCase {
  name: "file" | "redis" | "denokv";
  runtime: "bun" | "deno";
  spec: string;
  /** save / load timings in a process that can open the store. */
  io(doc: Doc, bytes: Uint8Array): Promise<IoResult>;
  /** Storage now: numbers by label (compared before and after the forks). */
  usage(): Promise<Usage>;
  describeAdded(before: Usage, after: Usage, forks: number): Promise<string>;
}

async function inProcessIo(spec: string, doc: Doc, bytes: Uint8Array): Promise<IoResult> {
  const { openSessionStore } = await import("../runtime/stores/open.ts");
  const store: SessionStore = await openSessionStore(spec);
  try {
    return await timeIo(store.forTenant("default"), bytes, Number(values.runs), `io-${doc.size}`);
  } finally {
    await store.close();
  }
}

const perFork = (delta: number, forks: number) => (delta / forks).toFixed(delta % forks === 0 ? 0 : 1);

function du(dir: string, flag: "-sB1" | "-sb"): number {
  const r = spawnSync("du", [flag, dir], { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`du ${flag} ${dir}: ${r.stderr}`);
  return Number(r.stdout.split(/\s+/)[0]);
}

function fileCase(dir: string): StoreCase {
  const spec = `file:${dir}`;
  return {
    name: "file",
    runtime: "bun",
    spec,
    io: (doc, bytes) => inProcessIo(spec, doc, bytes),
    usage: async () => ({ disk: du(dir, "-sB1"), apparent: du(dir, "-sb") }),
    describeAdded: async (b, a, n) => `${perFork(a.disk! - b.disk!, n)} B on disk (du -sB1), ${perFork(a.apparent! - b.apparent!, n)} B apparent (du -sb; hard links counted once)`,
  };
}

async function redisCase(): Promise<StoreCase> {
  const { startRedisServer, redisAvailable } = await import("../tests/helpers/redis-server.ts");
  if (!redisAvailable) throw new Error("redis-server is not installed (Debian package redis-server)");
  const redis = await startRedisServer();
  cleanups.push(() => redis.stop());
  const allKeys = async () => {
    const found = new Set<string>();
    let cursor = "0";
    do {
      const [next, keys] = await redis.admin.scan(cursor, "COUNT", 1000);
      cursor = next;
      for (const k of keys) found.add(k);
    } while (cursor !== "0");
    return found;
  };
  // The key set of each usage() call, by its index (describeAdded compares two).
  const keySets: Set<string>[] = [];
  const memory = async () => {
    const info = await redis.admin.info("memory");
    const field = (name: string) => Number(new RegExp(`^${name}:(\\d+)`, "m").exec(info)?.[1] ?? NaN);
    return { memory: field("used_memory"), dataset: field("used_memory_dataset") };
  };
  return {
    name: "redis",
    runtime: "bun",
    spec: redis.url,
    io: (doc, bytes) => inProcessIo(redis.url, doc, bytes),
    usage: async () => {
      const keys = await allKeys();
      keySets.push(keys);
      return { keys: keys.size, ...(await memory()), set: keySets.length - 1 };
    },
    describeAdded: async (b, a, n) => {
      const before = keySets[b.set!]!;
      const added = [...keySets[a.set!]!].filter((k) => !before.has(k));
      let bytes = 0;
      for (const k of added) bytes += Number((await redis.admin.call("MEMORY", "USAGE", k)) ?? 0);
      const kinds = [...new Set(added.map((k) => k.split(":").at(-2)))].join(", ");
      return `${perFork(a.keys! - b.keys!, n)} key(s) (${kinds}), ${perFork(bytes, n)} B by MEMORY USAGE of the new keys; INFO memory used_memory ${perFork(a.memory! - b.memory!, n)} B (used_memory_dataset ${perFork(a.dataset! - b.dataset!, n)} B)`;
    },
  };
}

function denoKvCase(dir: string): StoreCase {
  const path = join(dir, "kv.sqlite");
  return {
    name: "denokv",
    runtime: "deno",
    spec: `denokv:${path}`,
    io: async (doc, bytes) => {
      const file = join(dir, `snapshot-${doc.size}.ulsnap`);
      writeFileSync(file, bytes);
      try {
        return await denoChild<IoResult>(["--denokv-io", path, "--snapshot", file, "--runs", values.runs!, "--prefix", `io-${doc.size}`]);
      } finally {
        rmSync(file, { force: true });
      }
    },
    usage: async () => {
      const r = await denoChild<{ entries: number; bytes: number }>(["--denokv-count", path]);
      return { entries: r.entries, bytes: r.bytes };
    },
    describeAdded: async (b, a, n) => `${perFork(a.entries! - b.entries!, n)} entr${a.entries! - b.entries! === n ? "y" : "ies"}, ${perFork(a.bytes! - b.bytes!, n)} B of keys + values (kv.list)`,
  };
}

// ------------------------------------------------------------------------------------------------------
// One store: writer, in-process timings, reader (resume, cold), forks.

interface Row {
  store: string;
  runtime: string;
  size: number;
  snapshotBytes?: number;
  saveMbS?: number;
  loadMbS?: number;
  resumeMs?: number;
  resumePrefill?: number;
  coldMs?: number;
  same?: boolean;
  resumeRuns?: number[];
  coldRuns?: number[];
  error?: string;
}

interface ForkRow {
  store: string;
  ms?: number;
  runs?: number[];
  added?: string;
  error?: string;
}

const log = (text: string) => process.stderr.write(`${text}\n`);
const errorText = (e: unknown) => ((e as Error)?.message ?? String(e)).split("\n").slice(0, 3).join(" | ");

async function benchStore(c: StoreCase, docs: Doc[], rows: Row[], forks: ForkRow[]): Promise<void> {
  const runs = Number(values.runs);
  const ctxSize = Math.max(...docs.map((d) => d.size)) + 512;
  const byDoc = new Map<number, Row>(docs.map((d) => [d.size, { store: c.name, runtime: c.runtime, size: d.size }]));
  const snapshots = new Map<number, Uint8Array>();
  const largest = docs.at(-1)!;
  const fork: ForkRow = { store: c.name };
  const fail = (e: unknown, which: Row[] = [...byDoc.values()]) => {
    for (const r of which) r.error ??= errorText(e);
  };
  try {
    // Writer: create each session, fork it once per resume run, hand out its snapshot; then exit.
    log(`${c.name}: writer (${c.runtime}) on ${c.spec}`);
    const writer = await startServer(c.runtime, c.spec, ctxSize);
    try {
      for (const doc of docs) {
        const t0 = performance.now();
        const created = await post(`${writer.url}/v1/sessions`, { id: `doc-${doc.size}`, document: doc.document, chat_template_kwargs: DATE });
        if (created.tokens_read !== doc.size) throw new Error(`session doc-${doc.size} read ${created.tokens_read} tokens, expected ${doc.size}`);
        for (let i = 0; i < runs; i++) await post(`${writer.url}/v1/sessions/doc-${doc.size}/fork`, { id: `run-${doc.size}-${i}` });
        const bytes = await download(`${writer.url}/v1/sessions/doc-${doc.size}/snapshot`);
        snapshots.set(doc.size, bytes);
        byDoc.get(doc.size)!.snapshotBytes = bytes.length;
        log(`  created doc-${doc.size}: ${created.tokens_read} tokens in ${((performance.now() - t0) / 1000).toFixed(1)} s, snapshot ${(bytes.length / MIB).toFixed(1)} MB`);
      }
    } finally {
      await stopChild(writer.child);
    }

    // In-process save / load of the real snapshot bytes (no server running meanwhile).
    for (const doc of docs) {
      const row = byDoc.get(doc.size)!;
      try {
        const r = await c.io(doc, snapshots.get(doc.size)!);
        row.saveMbS = r.bytes / MIB / (median(r.saveMs) / 1000);
        row.loadMbS = r.bytes / MIB / (median(r.loadMs) / 1000);
        log(`  io ${doc.size}: ${r.chunks} chunks; save ms ${r.saveMs.map((x) => x.toFixed(1)).join(", ")}; load ms ${r.loadMs.map((x) => x.toFixed(1)).join(", ")}`);
      } catch (e) {
        row.error = `save/load: ${errorText(e)}`;
        log(`  io ${doc.size} failed: ${errorText(e)}`);
      }
    }

    // Reader: a new process that has never read these sessions; nothing stays in its memory.
    log(`${c.name}: reader (${c.runtime}), --session-memory-bytes 0`);
    const reader = await startServer(c.runtime, c.spec, ctxSize, ["--session-memory-bytes", "0"]);
    try {
      // Warm-up (the first forward passes of a fresh onnxruntime session), not timed.
      await post(`${reader.url}/v1/chat/completions`, { messages: [{ role: "user", content: "Hello!" }], max_tokens: 2, temperature: 0 });
      for (const doc of docs) {
        const row = byDoc.get(doc.size)!;
        try {
          const resume: number[] = [];
          let resumeText = "";
          for (let i = 0; i < runs; i++) {
            const r = await firstToken(`${reader.url}/v1/sessions/run-${doc.size}-${i}/messages`, { content: QUESTION, max_tokens: 1, temperature: 0 });
            resume.push(r.ms);
            resumeText = r.text;
            row.resumePrefill = r.usage ? r.usage.prompt_tokens - (r.usage.prompt_tokens_details?.cached_tokens ?? 0) : undefined;
          }
          const cold: number[] = [];
          let coldText = "";
          const messages = [
            { role: "user", content: doc.document },
            { role: "user", content: QUESTION },
          ];
          for (let i = 0; i < runs; i++) {
            const r = await firstToken(`${reader.url}/v1/chat/completions`, { messages, max_tokens: 1, temperature: 0, chat_template_kwargs: DATE });
            const cached = r.usage?.prompt_tokens_details?.cached_tokens ?? 0;
            if (cached !== 0) throw new Error(`the cold request reused ${cached} cached tokens`);
            cold.push(r.ms);
            coldText = r.text;
          }
          Object.assign(row, { resumeMs: median(resume), coldMs: median(cold), same: resumeText === coldText, resumeRuns: resume, coldRuns: cold });
          log(`  ${doc.size}: resume ms ${resume.map((x) => x.toFixed(1)).join(", ")} (${JSON.stringify(resumeText)}); cold ms ${cold.map((x) => x.toFixed(0)).join(", ")} (${JSON.stringify(coldText)})`);
        } catch (e) {
          row.error = `resume/cold: ${errorText(e)}`;
          log(`  ${doc.size} failed: ${errorText(e)}`);
        }
      }

      // Forks of the largest session, on the reader: time, and what they add to the store.
      try {
        const n = Number(values.forks);
        const before = await c.usage();
        const ms: number[] = [];
        for (let i = 0; i < n; i++) {
          const t0 = performance.now();
          await post(`${reader.url}/v1/sessions/doc-${largest.size}/fork`, { id: `fork-${largest.size}-${i}` });
          ms.push(performance.now() - t0);
        }
        const after = await c.usage();
        Object.assign(fork, { ms: median(ms), runs: ms, added: await c.describeAdded(before, after, n) });
        log(`  fork ms ${ms.map((x) => x.toFixed(2)).join(", ")}; before ${JSON.stringify(before)}, after ${JSON.stringify(after)}`);
      } catch (e) {
        fork.error = errorText(e);
      }
    } finally {
      await stopChild(reader.child);
    }
  } catch (e) {
    fail(e);
    fork.error ??= errorText(e);
    log(`${c.name} failed: ${errorText(e)}`);
  } finally {
    rows.push(...byDoc.values());
    forks.push(fork);
  }
}

// ------------------------------------------------------------------------------------------------------

/** Columns in `left` are left-aligned, the others right-aligned. */
function table(header: string[], rows: string[][], left: number[] = [0]): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
  const line = (cells: string[]) => cells.map((cell, i) => (left.includes(i) ? cell.padEnd(widths[i]!) : cell.padStart(widths[i]!))).join("  ").trimEnd();
  return [line(header), widths.map((w) => "-".repeat(w)).join("  "), ...rows.map(line)].join("\n");
}

async function main(): Promise<void> {
  const sizes = values.sizes!.split(",").filter(Boolean).map(Number).sort((a, b) => a - b);
  const stores = values.stores!.split(",").filter(Boolean);
  for (const s of stores) if (!["file", "redis", "denokv"].includes(s)) throw new Error(`--stores: unknown store ${s} (file, redis, denokv)`);
  const work = mkdtempSync(join(tmpdir(), "bench-store-"));
  cleanups.push(async () => rmSync(work, { recursive: true, force: true }));
  const t0 = performance.now();

  log(`documents: fixture pass-key haystacks of ${sizes.join(", ")} session tokens`);
  const docs = await makeDocuments(sizes);
  const rows: Row[] = [];
  const forks: ForkRow[] = [];
  for (const name of stores) {
    let c: StoreCase;
    try {
      c = name === "file" ? fileCase(join(work, "file-store")) : name === "redis" ? await redisCase() : denoKvCase(work);
    } catch (e) {
      for (const size of sizes) rows.push({ store: name, runtime: name === "denokv" ? "deno" : "bun", size, error: errorText(e) });
      forks.push({ store: name, error: errorText(e) });
      continue;
    }
    await benchStore(c, docs, rows, forks);
  }

  const fmt = (x: number | undefined, digits: number) => (x === undefined || !Number.isFinite(x) ? "-" : x.toFixed(digits));
  console.log(`\nsession stores: built-in model, onnxruntime-node, 1 thread; ${values.runs} runs per figure, medians; store files under ${work}`);
  console.log(
    table(
      ["store", "server", "tokens", "snapshot MB", "save MB/s", "load MB/s", "resume ms", "resume prefill", "cold ms", "cold/resume", "same token"],
      rows.map((r) => [
        r.store,
        r.runtime,
        String(r.size),
        fmt(r.snapshotBytes === undefined ? undefined : r.snapshotBytes / MIB, 1),
        fmt(r.saveMbS, 0),
        fmt(r.loadMbS, 0),
        fmt(r.resumeMs, 1),
        r.resumePrefill === undefined ? "-" : String(r.resumePrefill),
        fmt(r.coldMs, 0),
        r.resumeMs && r.coldMs ? `${(r.coldMs / r.resumeMs).toFixed(0)}x` : "-",
        r.same === undefined ? "-" : r.same ? "yes" : "NO",
      ]),
      [0, 1],
    ),
  );
  const failed = rows.filter((r) => r.error);
  for (const r of failed) console.log(`  ${r.store} ${r.size}: ${r.error}`);
  console.log(`
  save / load MB/s  the snapshot's bytes (MiB) through the store API in-process: TenantStore.save of its frames;
                    TenantStore.read reading every byte (denokv: in a Deno child process)
  resume ms         a reader process that has never read the session (started, warmed up with one short request,
                    --session-memory-bytes 0): POST /v1/sessions/:id/messages, stream, max_tokens 1, until the first
                    token's SSE event, at the client: read from the store, prefill the question ("resume prefill"
                    tokens), first token
  cold ms           the same conversation to POST /v1/chat/completions on that reader, no session: prefill of
                    every token, first token
  same token        the first tokens of resume and cold are equal`);

  const largest = sizes.at(-1)!;
  console.log(`\nforks of the ${largest}-token session (POST /v1/sessions/:id/fork on the reader, ${values.forks} forks, median; storage added per fork):`);
  console.log(
    table(
      ["store", "fork ms", "added per fork"],
      forks.map((f) => [f.store, fmt(f.ms, 2), f.error ? `failed: ${f.error}` : f.added!]),
      [0, 2],
    ),
  );
  console.log(`\ntotal ${((performance.now() - t0) / 1000).toFixed(0)} s`);
  const redis32k = rows.find((r) => r.store === "redis" && r.size === 32768);
  console.log(`redis resume speedup at 32K: ${redis32k?.resumeMs && redis32k.coldMs ? `${(redis32k.coldMs / redis32k.resumeMs).toFixed(0)}x` : `not measured${redis32k?.error ? ` (${redis32k.error})` : ""}`}`);
}

if (values["denokv-io"]) {
  await denoKvIo(values["denokv-io"], values.snapshot!, Number(values.runs), values.prefix ?? "io");
} else if (values["denokv-count"]) {
  await denoKvCount(values["denokv-count"]);
} else {
  let interrupted = false;
  const onSignal = (signal: NodeJS.Signals) => {
    if (interrupted) return;
    interrupted = true;
    log(`${signal}: stopping every process started`);
    void cleanupAll().finally(() => process.exit(130));
  };
  process.on("SIGINT", onSignal);
  process.on("SIGTERM", onSignal);
  try {
    await main();
  } finally {
    await cleanupAll();
  }
}
