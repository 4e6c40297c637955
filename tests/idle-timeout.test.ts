/**
 * Idle connections time out (--idle-timeout-s): a client that opens a connection and stops sending is cut
 * off, under Bun and Node, while a non-streaming generation that is silent for longer than the timeout
 * still completes (its request lifts the timeout once its body is in). Real server processes.
 */
import { afterAll, describe, expect, test } from "bun:test";
import type { ChildProcess } from "node:child_process";
import { connect } from "node:net";
import { bin, startProcess } from "./helpers/server.ts";

const children: ChildProcess[] = [];
afterAll(() => {
  for (const c of children) c.kill("SIGKILL");
});

const ENTRIES: Record<string, [string, string[]]> = {
  bun: [bin("bun"), ["src/entry/bun.ts"]],
  node: ["node", ["--import", "tsx", "src/entry/node.ts"]],
};

/** Opens a TCP connection, sends half a request, and resolves with the milliseconds until the server closes it (or null after `giveUpMs`). */
function halfRequestClosedAfter(url: string, giveUpMs: number): Promise<number | null> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve) => {
    const started = Date.now();
    const socket = connect(Number(port), hostname, () => socket.write("POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{\"mess"));
    const timer = setTimeout(() => {
      socket.destroy();
      resolve(null);
    }, giveUpMs);
    const done = () => {
      clearTimeout(timer);
      resolve(Date.now() - started);
    };
    socket.on("close", done);
    socket.on("error", () => {});
    socket.resume();
  });
}

describe.each(Object.keys(ENTRIES))("%s", (name) => {
  test("a silent client is cut off after the idle timeout; a silent generation longer than it completes", async () => {
    const [cmd, entry] = ENTRIES[name]!;
    const server = await startProcess(cmd, [...entry, "--port", "0", "--backend", "wasm", "--model", "models/random", "--ctx-size", "8192", "--idle-timeout-s", "2"]);
    children.push(server.child);

    // Half a body, then nothing: closed by the server (well before the 60 s this test gives up at).
    const closedAfter = await halfRequestClosedAfter(server.url, 60_000);
    expect(closedAfter).not.toBeNull();

    // A non-streaming generation that runs for longer than 2 s sends nothing until it ends, and must not be cut.
    const started = Date.now();
    const res = await fetch(`${server.url}/v1/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ messages: [{ role: "user", content: "Go on and on." }], max_tokens: 800, ignore_eos: true, temperature: 0 }),
    });
    expect(res.status).toBe(200);
    const body = (await res.json()) as { usage: { completion_tokens: number } };
    expect(body.usage.completion_tokens).toBe(800);
    // Only meaningful if the generation really outlasted the timeout; say so if this machine was too fast.
    if (Date.now() - started < 2500) console.warn(`idle-timeout test (${name}): the generation took under 2.5 s, so it did not outlast the timeout`);
    server.child.kill("SIGKILL");
  }, 120_000);
});
