/**
 * Graceful shutdown of each runtime's entry point: on SIGTERM the server stops accepting connections,
 * lets a running streamed generation and a queued session turn finish, persists the session, and exits
 * 0; a restart on the same store has the turn. With the grace run out it exits 1 and says so.
 */
import { afterEach, describe, expect, test } from "bun:test";
import type { ChildProcess } from "node:child_process";
import { rm } from "node:fs/promises";
import { connect } from "node:net";
import { createApp } from "../src/app.ts";
import { sharedEngine } from "./helpers/model.ts";
import { bin, startProcess, type ServerProcess } from "./helpers/server.ts";
import { tempDir } from "./helpers/sessions.ts";

const children: ChildProcess[] = [];
const dirs: string[] = [];
afterEach(async () => {
  for (const child of children.splice(0)) child.kill("SIGKILL");
  for (const d of dirs.splice(0)) await rm(d, { recursive: true, force: true });
});

const RUNTIMES: Record<string, [string, string[]]> = {
  bun: [bin("bun"), ["src/entry/bun.ts"]],
  node: ["node", ["--import", "tsx", "src/entry/node.ts"]],
  deno: [bin("deno"), ["run", "-A", "src/entry/deno.ts"]],
};

async function start(runtime: string, args: string[]): Promise<ServerProcess & { exited: Promise<number | null> }> {
  const [cmd, entry] = RUNTIMES[runtime]!;
  const server = await startProcess(cmd, [...entry, "--port", "0", "--backend", "wasm", "--model", "models/random", "--ctx-size", "8192", ...args]);
  children.push(server.child);
  // "close": the exit status once stdout and stderr are read to their end.
  const exited = new Promise<number | null>((resolve) => server.child.on("close", (code) => resolve(code)));
  return { ...server, exited };
}

const json = async (url: string, path: string, body?: unknown) => {
  const res = await fetch(url + path, { method: body === undefined ? "GET" : "POST", body: body === undefined ? undefined : JSON.stringify(body) });
  return { status: res.status, body: (await res.json()) as any };
};

/** Whether a new TCP connection to the server's port is refused. */
const refused = (url: string) =>
  new Promise<boolean>((resolve) => {
    const { hostname, port } = new URL(url);
    const socket = connect(Number(port), hostname);
    socket.on("connect", () => {
      socket.destroy();
      resolve(false);
    });
    socket.on("error", (e: NodeJS.ErrnoException) => resolve(e.code === "ECONNREFUSED"));
  });

/** A long streamed generation, read from its first chunk on. */
async function streaming(url: string, maxTokens: number) {
  const res = await fetch(`${url}/v1/chat/completions`, {
    method: "POST",
    body: JSON.stringify({ messages: [{ role: "user", content: "Go on." }], max_tokens: maxTokens, ignore_eos: true, temperature: 0, stream: true }),
  });
  expect(res.status).toBe(200);
  const reader = res.body!.getReader();
  let text = new TextDecoder().decode((await reader.read()).value);
  let ended = false;
  const rest = (async () => {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      text += new TextDecoder().decode(value);
    }
    ended = true;
    return text;
  })().finally(() => {
    ended = true;
  });
  rest.catch(() => {}); // a reset stream is the caller's to judge, when it awaits `rest`
  return { rest, ended: () => ended };
}

describe("SIGTERM", () => {
  for (const runtime of ["bun", "node", "deno"]) {
    test(`${runtime}: running work finishes, new connections are refused, the session is persisted, exit 0`, async () => {
      const store = tempDir("shutdown-store");
      dirs.push(store);
      const args = ["--session-dir", store, "--shutdown-grace-ms", "100000"];
      const server = await start(runtime, args);
      const created = await json(server.url, "/v1/sessions", { id: "kept", document: "The boat left at 06:10 with 212 passengers.", chat_template_kwargs: { date_string: "26 Jul 2024" } });
      expect(created.status).toBe(201);

      // A long generation runs; a session turn waits behind it in the queue.
      const stream = await streaming(server.url, 2500);
      const turn = json(server.url, "/v1/sessions/kept/messages", { content: "How many passengers?", max_tokens: 12, temperature: 0 });
      for (let i = 0; i < 2000 && (await json(server.url, "/health")).body.queue.waiting < 1; i++) await Bun.sleep(10);
      expect((await json(server.url, "/health")).body.queue).toMatchObject({ busy: true, waiting: 1 });

      server.child.kill("SIGTERM");
      // The listener closes while the work goes on.
      let closed = false;
      for (let i = 0; i < 500 && !closed; i++) {
        closed = await refused(server.url);
        if (!closed) await Bun.sleep(20);
      }
      expect(closed).toBe(true);
      expect(server.child.exitCode).toBeNull();
      expect(stream.ended()).toBe(false);

      // Both requests complete.
      const text = await stream.rest;
      expect(text.trimEnd().endsWith("data: [DONE]")).toBe(true);
      expect(text).toContain('"finish_reason":"length"');
      const reply = await turn;
      expect(reply.status).toBe(200);
      expect(reply.body.choices[0].message.content.length).toBeGreaterThan(0);

      expect(await server.exited).toBe(0);
      expect(server.output()).toContain("every request finished and every session is persisted");

      // A new process on the same store has the turn: its question and reply, and the tokens it read.
      const again = await start(runtime, args);
      const info = await json(again.url, "/v1/sessions/kept");
      expect(info.status).toBe(200);
      expect(info.body.messages).toBe(created.body.messages + 2);
      expect(reply.body.usage.prompt_tokens).toBeGreaterThan(created.body.tokens_read);
      expect(info.body.tokens_read).toBeGreaterThanOrEqual(reply.body.usage.prompt_tokens);
      again.child.kill("SIGKILL");
    }, 120_000);
  }

  test("bun: when the grace runs out the server says so and exits 1", async () => {
    const store = tempDir("shutdown-store");
    dirs.push(store);
    const server = await start("bun", ["--session-dir", store, "--shutdown-grace-ms", "300"]);
    const stream = await streaming(server.url, 6000);
    server.child.kill("SIGTERM");
    expect(await server.exited).toBe(1);
    expect(server.output()).toContain("the shutdown grace of 300 ms ran out with work unfinished");
    await stream.rest.catch(() => {});
  }, 120_000);
});

test("while draining, a request that still arrives on an open connection gets 503 and Connection: close", async () => {
  const draining = { active: false };
  const app = createApp({ engine: await sharedEngine(), maxBodyBytes: 64 * 1024, draining, log: () => {} });
  expect((await app.request("/v1/models")).status).toBe(200);
  draining.active = true;
  for (const path of ["/v1/models", "/health"]) {
    const res = await app.request(path);
    expect(res.status).toBe(503);
    expect(res.headers.get("connection")).toBe("close");
    expect(((await res.json()) as { error: { code: string } }).error.code).toBe("shutting_down");
  }
}, 60_000);
