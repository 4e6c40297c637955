/**
 * Peak memory of one long ingest, on the server as it runs in production (Bun entry point, built-in
 * model, its in-place KV path):
 *
 *   npx bun scripts/bench-ingest.ts [--tokens 131072] [--backend native|wasm] [--server-flags "..."]
 *
 * Starts the server with a fresh session store, answers one short completion (warm-up), reads its idle
 * RSS and resets its peak (/proc/PID/clear_refs), then creates a session whose document is `--tokens`
 * tokens long (POST /v1/sessions, which reads it and persists its snapshot) and reads the peak RSS
 * (VmHWM). The target: the peak above idle stays under twice the session's KV bytes, plus the model's
 * graph file, plus 300 MB. Ends with `ingest NK: peak above idle X MB, bound Y MB (ok|over)`. Linux only.
 */
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { positiveInt } from "./lib/cli.ts";
import { startProcess } from "./lib/server-process.ts";

const REPO = fileURLToPath(new URL("../", import.meta.url));
const { values } = parseArgs({
  options: {
    tokens: { type: "string", default: "131072" },
    backend: { type: "string", default: "native" },
    "server-flags": { type: "string", default: "" },
  },
  strict: true,
});
const tokens = positiveInt("--tokens", values.tokens);
const mb = (bytes: number) => bytes / 2 ** 20;

function status(pid: number, field: "VmRSS" | "VmHWM"): number {
  const m = new RegExp(`${field}:\\s+(\\d+) kB`).exec(readFileSync(`/proc/${pid}/status`, "utf8"));
  if (!m) throw new Error(`no ${field} in /proc/${pid}/status`);
  return Number(m[1]) * 1024;
}

function startServer(sessionDir: string) {
  const flags = ["--host", "127.0.0.1", "--port", "0", "--backend", values.backend!, "--ctx-size", String(tokens + 4096), "--session-dir", sessionDir];
  return startProcess(process.execPath, ["src/entry/bun.ts", ...flags, ...values["server-flags"]!.split(/\s+/).filter(Boolean)], {}, 120_000);
}

async function post(url: string, body: unknown): Promise<Record<string, any>> {
  const res = await fetch(url, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  const json = (await res.json()) as Record<string, any>;
  if (!res.ok) throw new Error(`${url}: ${res.status} ${JSON.stringify(json)}`);
  return json;
}

/** A varied log-like document of about `n` tokens, sized with the server's own /tokenize. */
async function documentOf(url: string, n: number): Promise<string> {
  const ships = ["Aurora", "Petrel", "Kittiwake", "Marram", "Solway", "Brae", "Tern", "Skerry"];
  let seed = 7;
  const next = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31);
  const lines: string[] = [];
  const line = () => `At ${String(next() % 24).padStart(2, "0")}:${String(next() % 60).padStart(2, "0")} the ${ships[next() % ships.length]} left with ${next() % 400} passengers.\n`;
  const count = async (t: string) => ((await post(`${url}/tokenize`, { content: t })).tokens as number[]).length;
  let text = "";
  let have = 0;
  while (have < n) {
    // Lines for the tokens still missing, at the rate measured so far (about 20 tokens a line).
    const perLine = have > 0 ? have / lines.length : 20;
    for (let i = Math.ceil((n - have) / perLine) + 8; i > 0; i--) lines.push(line());
    text = lines.join("");
    have = await count(text);
  }
  while (have > n) {
    text = text.slice(0, Math.floor((text.length * n) / have));
    have = await count(text);
  }
  return text;
}

const sessionDir = mkdtempSync(join(tmpdir(), "bench-ingest-"));
const { url, child } = await startServer(sessionDir);
try {
  const pid = child.pid!;
  const health = (await (await fetch(`${url}/health`)).json()) as Record<string, any>;
  const document = await documentOf(url, tokens - 64); // the template's headers take the rest
  await post(`${url}/v1/completions`, { prompt: "The harbour", max_tokens: 4, temperature: 0 });
  await new Promise((r) => setTimeout(r, 500));
  const idle = status(pid, "VmRSS");
  writeFileSync(`/proc/${pid}/clear_refs`, "5"); // VmHWM := VmRSS from here on
  const t0 = performance.now();
  const created = await post(`${url}/v1/sessions`, { id: "long", document });
  const seconds = (performance.now() - t0) / 1000;
  const peak = status(pid, "VmHWM");
  const after = status(pid, "VmRSS");
  const kvBytes = created.kv_bytes as number;
  const graph = join(REPO, "models", "builtin", "onnx", "model.kv.onnx");
  const modelBytes = statSync(graph).size;
  const above = peak - idle;
  const bound = 2 * kvBytes + modelBytes + 300 * 2 ** 20;
  console.log(`server: ${health.backend_detail}, model ${health.model}, ctx ${health.context_length}`);
  console.log(`tokens read          ${created.tokens_read}  (${(created.tokens_read / seconds).toFixed(0)} tok/s, ${seconds.toFixed(1)} s, snapshot written)`);
  console.log(`KV bytes             ${mb(kvBytes).toFixed(1)} MB`);
  console.log(`model graph          ${mb(modelBytes).toFixed(1)} MB (${graph.slice(REPO.length)})`);
  console.log(`RSS idle / peak / after   ${mb(idle).toFixed(0)} / ${mb(peak).toFixed(0)} / ${mb(after).toFixed(0)} MB`);
  console.log(`ingest ${Math.round(tokens / 1024)}K: peak above idle ${mb(above).toFixed(0)} MB, bound ${mb(bound).toFixed(0)} MB (${above <= bound ? "ok" : "over"})`);
  if (above > bound) process.exitCode = 1;
} finally {
  child.kill("SIGTERM");
  rmSync(sessionDir, { recursive: true, force: true });
}
