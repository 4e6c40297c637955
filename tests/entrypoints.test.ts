/**
 * The same app under each runtime's entry point: Bun.serve, Deno.serve, Node (@hono/node-server), and the
 * Deno Deploy-style `export default { fetch }` module under `deno serve`. Each is started as its own
 * process on a free port, answers a real chat completion, and notices clients that hang up (disconnect
 * detection is each runtime's own).
 */
import { afterEach, describe, expect, test } from "bun:test";
import type { ChildProcess } from "node:child_process";
import { bin, startProcess } from "./helpers/server.ts";

const children: ChildProcess[] = [];
afterEach(() => {
  for (const child of children.splice(0)) child.kill("SIGKILL");
});

/** Starts a server process (killed after each test) and resolves with its base URL once it listens. */
async function start(cmd: string, args: string[], env: Record<string, string> = {}): Promise<{ url: string; output: () => string }> {
  const server = await startProcess(cmd, args, env);
  children.push(server.child);
  return server;
}

async function chatOnce(url: string) {
  const res = await fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({ messages: [{ role: "user", content: "Say hello." }], max_tokens: 6, temperature: 0 }),
  });
  expect(res.status).toBe(200);
  const body = (await res.json()) as { choices: { message: { content: string } }[]; usage: { completion_tokens: number } };
  expect(body.usage.completion_tokens).toBeGreaterThan(0);
  expect(body.choices[0]!.message.content.length).toBeGreaterThan(0);
  const health = (await (await fetch(`${url}/health`)).json()) as { backend: string };
  return { text: body.choices[0]!.message.content, backend: health.backend };
}

const metric = async (url: string, name: string) => {
  const text = await (await fetch(`${url}/metrics`)).text();
  return Number(new RegExp(`^${name} (\\d+)$`, "m").exec(text)?.[1]);
};

/** A non-streaming and a streaming client that hang up mid-generation each cancel it, in this runtime. */
async function hangUpsCancel(url: string) {
  const body = JSON.stringify({ messages: [{ role: "user", content: "Go on forever." }], max_tokens: 3000, ignore_eos: true });
  expect(await metric(url, "llamacpp:requests_cancelled_total")).toBe(0);
  for (const [n, stream] of [false, true].entries()) {
    const abort = new AbortController();
    const pending = fetch(`${url}/v1/chat/completions`, { method: "POST", body: stream ? body.replace("{", '{"stream":true,') : body, signal: abort.signal });
    if (stream) await (await pending).body!.getReader().read();
    else await new Promise((r) => setTimeout(r, 300));
    abort.abort();
    await pending.catch(() => {});
    // The server notices a hang-up within milliseconds, not at once: a next request sent before that waits
    // in the queue, and if its client then hangs up it leaves the queue without a generation to cancel.
    for (let i = 0; i < 400 && (await metric(url, "llamacpp:requests_cancelled_total")) < n + 1; i++) await new Promise((r) => setTimeout(r, 25));
  }
  expect(await metric(url, "llamacpp:requests_cancelled_total")).toBe(2);
  expect(await metric(url, "llamacpp:tokens_predicted_total")).toBeLessThan(3000);
}

const common = ["--host", "127.0.0.1", "--port", "0", "--backend", "wasm", "--model", "models/random"];
/** Each test starts a process (and waits up to 60 s for it to listen): bun test's 5 s default is far too short on a busy machine. */
const PROCESS_TEST_MS = 180_000;

describe("entry points", () => {
  const texts: string[] = [];

  test("bun src/entry/bun.ts", async () => {
    const { url, output } = await start(bin("bun"), ["src/entry/bun.ts", ...common]);
    expect(output()).toContain("backend wasm");
    const r = await chatOnce(url);
    expect(r.backend).toBe("wasm");
    texts.push(r.text);
    await hangUpsCancel(url);
  }, PROCESS_TEST_MS);

  test("deno run src/entry/deno.ts", async () => {
    const { url } = await start(bin("deno"), ["run", "-A", "src/entry/deno.ts", ...common]);
    const r = await chatOnce(url);
    expect(r.backend).toBe("wasm");
    texts.push(r.text);
    await hangUpsCancel(url);
  }, PROCESS_TEST_MS);

  test("node --import tsx src/entry/node.ts", async () => {
    const { url } = await start("node", ["--import", "tsx", "src/entry/node.ts", ...common]);
    const r = await chatOnce(url);
    expect(r.backend).toBe("wasm");
    texts.push(r.text);
    await hangUpsCancel(url);
  }, PROCESS_TEST_MS);

  test("deno serve src/entry/deploy.ts (export default { fetch })", async () => {
    const { url } = await start(bin("deno"), ["serve", "-A", "--host", "127.0.0.1", "--port", "0", "src/entry/deploy.ts"], { BACKEND: "wasm", MODEL_DIR: "models/random" });
    const r = await chatOnce(url);
    expect(r.backend).toBe("wasm");
    texts.push(r.text);
    await hangUpsCancel(url);
  }, PROCESS_TEST_MS);

  test("all four runtimes give the same greedy completion", () => {
    expect(texts).toHaveLength(4);
    expect(new Set(texts).size).toBe(1);
  });

  test("a bad configuration or model folder stops start-up with a message naming the problem", async () => {
    await expect(start(bin("bun"), ["src/entry/bun.ts", "--port", "70000"])).rejects.toThrow(/--port \/ PORT/);
    await expect(start(bin("bun"), ["src/entry/bun.ts", "--model", "/nonexistent/folder", "--port", "0"])).rejects.toThrow(
      /model folder \/nonexistent\/folder does not exist/,
    );
  }, PROCESS_TEST_MS);
});
