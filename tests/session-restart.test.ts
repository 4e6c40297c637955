/**
 * Sessions across processes: a server killed (SIGKILL, mid-generation) and started again on the same
 * store continues its sessions token-for-token, and a snapshot downloaded from one process and uploaded
 * to a new one resumes identically. The uninterrupted reference runs in this process on the same model.
 */
import { afterAll, expect, test } from "bun:test";
import type { ChildProcess } from "node:child_process";
import { rm } from "node:fs/promises";
import { sharedEngine } from "./helpers/model.ts";
import { startBunServer } from "./helpers/server.ts";
import { sessionApp, tempDir } from "./helpers/sessions.ts";

const DATE = { date_string: "26 Jul 2024" };
const GREEDY = { temperature: 0, max_tokens: 10 };
const DOCUMENT = "Log of the Aurora: left port at 06:10, 212 passengers, wind north-west force 5, returned 18:30.";
const QUESTIONS = ["When did it leave?", "How many passengers?", "When did it return?"];

const dirs: string[] = [];
const children: ChildProcess[] = [];
afterAll(async () => {
  for (const c of children) c.kill("SIGKILL");
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

async function startServer(sessionDir: string): Promise<{ url: string; child: ChildProcess }> {
  const server = await startBunServer(["--port", "0", "--backend", "wasm", "--model", "models/random", "--ctx-size", "4096", "--session-dir", sessionDir]);
  children.push(server.child);
  return server;
}

const call = async (url: string, path: string, body?: unknown, method = body === undefined ? "GET" : "POST") => {
  const res = await fetch(url + path, { method, headers: { "content-type": "application/json" }, body: body === undefined ? undefined : JSON.stringify(body) });
  return { status: res.status, json: (await res.json()) as any };
};

test("a killed server's sessions continue identically after a restart on the same store; a downloaded snapshot resumes in a new process", async () => {
  // Reference: the uninterrupted session, in this process.
  const engine = await sharedEngine({ contextLength: 4096 });
  const reference = sessionApp(engine);
  await reference.post("/v1/sessions", { id: "log", document: DOCUMENT, chat_template_kwargs: DATE });
  const expected: any[] = [];
  for (const q of QUESTIONS) expected.push(await (await reference.post("/v1/sessions/log/messages", { content: q, ...GREEDY })).json());

  const store = tempDir("restart-store");
  dirs.push(store);
  const first = await startServer(store);
  expect((await call(first.url, "/v1/sessions", { id: "log", document: DOCUMENT, chat_template_kwargs: DATE })).status).toBe(201);
  expect((await call(first.url, "/v1/sessions", { id: "busy", document: "Another session, mid-turn when the server dies.", chat_template_kwargs: DATE })).status).toBe(201);
  const busyBefore = (await call(first.url, "/v1/sessions/busy")).json;
  for (const [i, q] of QUESTIONS.slice(0, 2).entries()) {
    const turn = (await call(first.url, "/v1/sessions/log/messages", { content: q, ...GREEDY })).json;
    expect(turn.choices[0].message.content).toBe(expected[i].choices[0].message.content);
  }
  const snapshot = new Uint8Array(await (await fetch(`${first.url}/v1/sessions/log/snapshot`)).arrayBuffer());

  // Kill it while another session's long generation is running.
  const inFlight = fetch(`${first.url}/v1/sessions/busy/messages`, {
    method: "POST",
    body: JSON.stringify({ content: "Talk for a long time.", max_tokens: 3000, ignore_eos: true, temperature: 0 }),
  }).catch((e: unknown) => e);
  await Bun.sleep(150);
  first.child.kill("SIGKILL");
  expect(await inFlight).toBeInstanceOf(Error);

  // A new process on the same store: the session continues where it was, from its saved KV.
  const second = await startServer(store);
  const list = (await call(second.url, "/v1/sessions")).json;
  expect(list.data.map((s: any) => s.id).sort()).toEqual(["busy", "log"]);
  expect(list.data.every((s: any) => s.in_memory === false)).toBe(true);
  const third = (await call(second.url, "/v1/sessions/log/messages", { content: QUESTIONS[2], ...GREEDY })).json;
  expect(third.choices[0].message.content).toBe(expected[2].choices[0].message.content);
  expect(third.usage).toEqual(expected[2].usage);
  expect(third.usage.prompt_tokens_details.cached_tokens).toBeGreaterThan(expected[1].usage.prompt_tokens); // KV came back, not recomputed
  // The session whose turn was cut off is intact at its last saved state.
  const busyAfter = (await call(second.url, "/v1/sessions/busy")).json;
  expect({ ...busyAfter, in_memory: true }).toEqual({ ...busyBefore, in_memory: true });
  expect((await call(second.url, "/v1/sessions/busy/messages", { content: "Still there?", ...GREEDY })).status).toBe(200);
  second.child.kill("SIGKILL");

  // A third process with an empty store: upload the snapshot downloaded before the kill, and go on.
  const emptyStore = tempDir("upload-store");
  dirs.push(emptyStore);
  const third3 = await startServer(emptyStore);
  const uploaded = await fetch(`${third3.url}/v1/sessions/moved/snapshot`, { method: "PUT", body: snapshot });
  expect(uploaded.status).toBe(201);
  const resumed = (await call(third3.url, "/v1/sessions/moved/messages", { content: QUESTIONS[2], ...GREEDY })).json;
  expect(resumed.choices[0].message.content).toBe(expected[2].choices[0].message.content);
  expect(resumed.usage).toEqual(expected[2].usage);
  third3.child.kill("SIGKILL");
}, 120_000);
