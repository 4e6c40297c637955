/**
 * The server under concurrent load, on loopback: N streaming /v1/chat/completions clients at once (N = 4,
 * 16, 64 by default), each sending a bounded number of requests one after another, while /health is
 * probed every 20 ms:
 *
 *   npx bun scripts/bench-load.ts [--url http://127.0.0.1:8080] [--clients 4,16,64] [--requests 4]
 *                                 [--max-tokens 32] [--request-timeout-s 120] [--level-timeout-s 300]
 *                                 [--backend wasm] [--server-flags "--queue-limit 16"]
 *
 * Without --url it starts the server itself (Bun entry point, built-in model, default settings plus
 * --backend and --server-flags) and reads its RSS from /proc. Each request has a client-side timeout: one
 * that fires is a hung connection and counts as an error, as do 5xx answers, failed connections and
 * streams that end without [DONE]. 429s are counted apart: they are the queue limit at work (a client
 * waits 100 ms after one). Each level stops starting requests after --level-timeout-s.
 *
 * Prints per level: requests ok / 429 / 5xx / errors, p50 / p95 time to first token and total time,
 * completion tokens/s over the level, /health worst and p99 latency, server RSS before / after; and ends
 * with `load: N errors, health p99 NN ms` over all levels.
 */
import type { ChildProcess } from "node:child_process";
import { readFileSync } from "node:fs";
import { parseArgs } from "node:util";
import { positiveInt } from "./lib/cli.ts";
import { startProcess } from "./lib/server-process.ts";


const { values } = parseArgs({
  options: {
    url: { type: "string" },
    clients: { type: "string", default: "4,16,64" },
    requests: { type: "string", default: "4" },
    "max-tokens": { type: "string", default: "32" },
    "request-timeout-s": { type: "string", default: "120" },
    "level-timeout-s": { type: "string", default: "300" },
    backend: { type: "string", default: "wasm" },
    "server-flags": { type: "string", default: "" },
    help: { type: "boolean", short: "h", default: false },
  },
  strict: true,
});
if (values.help) {
  console.log(
    "usage: bench-load.ts [--url URL] [--clients 4,16,64] [--requests 4] [--max-tokens 32] [--request-timeout-s 120] [--level-timeout-s 300] [--backend wasm] [--server-flags '...']",
  );
  process.exit(0);
}

const levels = values.clients.split(",").map((v) => positiveInt("clients", v));
const requestsPerClient = positiveInt("requests", values.requests);
const maxTokens = positiveInt("max-tokens", values["max-tokens"]);
const requestTimeoutMs = positiveInt("request-timeout-s", values["request-timeout-s"]) * 1000;
const levelTimeoutMs = positiveInt("level-timeout-s", values["level-timeout-s"]) * 1000;

/** Starts the Bun entry point on a free port; resolves once it prints its listening line. */
async function startServer(): Promise<{ url: string; child: ChildProcess }> {
  const flags = ["--host", "127.0.0.1", "--port", "0", "--backend", values.backend, ...values["server-flags"].split(/\s+/).filter(Boolean)];
  const server = await startProcess(process.execPath, ["src/entry/bun.ts", ...flags]);
  console.log(server.output().trim().split("\n").at(-1));
  return server;
}

/** Resident set of a process in MB (Linux), or null where /proc is not there. */
function rssMb(pid: number | undefined): number | null {
  if (pid === undefined) return null;
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"));
    return m ? Number(m[1]) / 1024 : null;
  } catch {
    return null;
  }
}

type Outcome = "ok" | "429" | "5xx" | "error";
interface RequestResult {
  outcome: Outcome;
  detail?: string;
  ttftMs: number;
  totalMs: number;
  tokens: number;
}

const TOPICS = ["the sea", "lighthouses", "tides", "the harbour at dawn", "storm petrels", "old ferries", "sandbanks", "the coast road"];

/** One streaming chat completion, read to its end; anything but a clean stream is classified. */
async function streamOnce(url: string, client: number, n: number): Promise<RequestResult> {
  const t0 = performance.now();
  const result: RequestResult = { outcome: "error", ttftMs: 0, totalMs: 0, tokens: 0 };
  const body = {
    messages: [
      { role: "system", content: "You are a concise assistant for a harbour office." },
      { role: "user", content: `Client ${client}, request ${n}: write a few lines about ${TOPICS[(client + n) % TOPICS.length]}.` },
    ],
    max_tokens: maxTokens,
    ignore_eos: true, // every request does the same bounded work
    stream: true,
    stream_options: { include_usage: true },
  };
  try {
    const res = await fetch(`${url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify(body),
      signal: AbortSignal.timeout(requestTimeoutMs),
    });
    if (res.status === 429) {
      await res.body?.cancel();
      result.outcome = "429";
    } else if (res.status >= 500) {
      result.outcome = "5xx";
      result.detail = `${res.status} ${await res.text()}`;
    } else if (res.status !== 200) {
      result.detail = `${res.status} ${await res.text()}`;
    } else {
      const reader = res.body!.pipeThrough(new TextDecoderStream()).getReader();
      let buffer = "";
      let done = false;
      while (!done) {
        const { value, done: ended } = await reader.read();
        if (ended) break;
        buffer += value;
        let nl: number;
        while ((nl = buffer.indexOf("\n\n")) !== -1) {
          const event = buffer.slice(0, nl).trim();
          buffer = buffer.slice(nl + 2);
          if (!event.startsWith("data: ")) continue;
          const data = event.slice(6);
          if (data === "[DONE]") {
            done = true;
            break;
          }
          const chunk = JSON.parse(data) as {
            error?: { message: string };
            choices?: { delta?: { content?: string }; finish_reason?: string | null }[];
            usage?: { completion_tokens: number };
          };
          if (chunk.error) throw new Error(`error event: ${chunk.error.message}`);
          const choice = chunk.choices?.[0];
          if (result.ttftMs === 0 && (choice?.delta?.content || choice?.finish_reason)) result.ttftMs = performance.now() - t0;
          if (chunk.usage) result.tokens = chunk.usage.completion_tokens;
        }
      }
      if (done) result.outcome = "ok";
      else result.detail = "the stream ended without [DONE]";
    }
  } catch (e) {
    const name = (e as Error).name;
    result.detail = name === "TimeoutError" ? `hung: no end within ${requestTimeoutMs / 1000} s` : `${name}: ${(e as Error).message}`;
  }
  result.totalMs = performance.now() - t0;
  return result;
}

const percentile = (sorted: number[], p: number) => (sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor((p / 100) * sorted.length))]! : NaN);
const ms = (v: number) => (Number.isNaN(v) ? "n/a" : `${v.toFixed(0)} ms`);
const mb = (v: number | null) => (v === null ? "n/a" : `${v.toFixed(0)} MB`);

async function runLevel(url: string, clients: number, pid: number | undefined) {
  const rssBefore = rssMb(pid);
  const health: number[] = [];
  let healthFailures = 0;
  let running = true;
  const probing = (async () => {
    while (running) {
      const t0 = performance.now();
      try {
        const res = await fetch(`${url}/health`, { signal: AbortSignal.timeout(10_000) });
        await res.json();
        if (res.status !== 200) healthFailures++;
      } catch {
        healthFailures++;
      }
      health.push(performance.now() - t0);
      await new Promise((r) => setTimeout(r, 20));
    }
  })();

  const started = performance.now();
  const deadline = started + levelTimeoutMs;
  const results: RequestResult[] = [];
  await Promise.all(
    Array.from({ length: clients }, async (_, client) => {
      for (let n = 0; n < requestsPerClient && performance.now() < deadline; n++) {
        const r = await streamOnce(url, client, n);
        results.push(r);
        if (r.outcome === "429") await new Promise((res) => setTimeout(res, 100));
      }
    }),
  );
  const wallMs = performance.now() - started;
  running = false;
  await probing;

  const count = (o: Outcome) => results.filter((r) => r.outcome === o).length;
  const ok = results.filter((r) => r.outcome === "ok");
  const ttft = ok.map((r) => r.ttftMs).sort((a, b) => a - b);
  const total = ok.map((r) => r.totalMs).sort((a, b) => a - b);
  const tokens = ok.reduce((s, r) => s + r.tokens, 0);
  health.sort((a, b) => a - b);
  const errors = count("error") + count("5xx") + healthFailures;
  console.log(
    `N=${clients}: requests ok ${ok.length}, 429 ${count("429")}, 5xx ${count("5xx")}, failed/hung ${count("error")}` +
      ` | first token p50 ${ms(percentile(ttft, 50))}, p95 ${ms(percentile(ttft, 95))}` +
      ` | total p50 ${ms(percentile(total, 50))}, p95 ${ms(percentile(total, 95))}` +
      ` | ${((tokens * 1000) / wallMs).toFixed(1)} tokens/s over ${(wallMs / 1000).toFixed(1)} s` +
      ` | /health ${health.length} probes, worst ${ms(health.at(-1) ?? NaN)}, p99 ${ms(percentile(health, 99))}${healthFailures ? `, ${healthFailures} failed` : ""}` +
      ` | RSS ${mb(rssBefore)} -> ${mb(rssMb(pid))}`,
  );
  for (const r of results.filter((x) => x.outcome === "error" || x.outcome === "5xx").slice(0, 3)) console.log(`  ${r.outcome}: ${r.detail}`);
  return { errors, health };
}

const own = values.url ? null : await startServer();
const url = values.url ?? own!.url;
const pid = own?.child.pid;
try {
  console.log(
    `load on ${url}: ${levels.join(", ")} concurrent streaming clients, ${requestsPerClient} requests each, ${maxTokens} tokens per request, ` +
      `request timeout ${requestTimeoutMs / 1000} s; server RSS at start ${mb(rssMb(pid))}`,
  );
  let errors = 0;
  const health: number[] = [];
  for (const clients of levels) {
    const level = await runLevel(url, clients, pid);
    errors += level.errors;
    health.push(...level.health);
  }
  health.sort((a, b) => a - b);
  console.log(`load: ${errors} errors, health p99 ${percentile(health, 99).toFixed(0)} ms`);
} finally {
  own?.child.kill("SIGTERM");
}
