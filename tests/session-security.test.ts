/**
 * Sessions shared by clients that do not trust each other: uploaded KV is never lent to anyone, tenants
 * cannot see or borrow each other's sessions, what the API accepts is stored and read back, a failed
 * delete loses nothing, a stalled download blocks no turn, and a crash's temporary files are cleaned up.
 * Real engine, real snapshot store on disk, real HTTP app.
 */
import { describe, expect, test } from "bun:test";
import { Packr, Unpackr } from "msgpackr";
import { existsSync, mkdirSync, readdirSync, renameSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { crc32 } from "node:zlib";
import { createApp } from "../src/app.ts";
import { DEFAULT_TENANT, RuntimeError, SessionManager, SnapshotStore } from "../runtime/index.ts";
import { SNAPSHOT_MAGIC } from "../runtime/snapshot.ts";
import { sharedEngine } from "./helpers/model.ts";
import { sessionApp, tempDir } from "./helpers/sessions.ts";

const engine = await sharedEngine();
const DATE = { date_string: "26 Jul 2024" };
const GREEDY = { temperature: 0, max_tokens: 16 };
const fresh = createApp({ engine, maxBodyBytes: 4 * 1024 * 1024, log: () => {} });
const words = (seed: number, n: number) => Array.from({ length: n }, (_, i) => `w${(seed * 7919 + i * 104729) % 9973}`).join(" ");

async function chat(app: { request: typeof fresh.request }, messages: unknown[], extra: Record<string, unknown> = {}) {
  const res = await app.request("/v1/chat/completions", { method: "POST", body: JSON.stringify({ messages, chat_template_kwargs: DATE, ...GREEDY, ...extra }) });
  expect(res.status).toBe(200);
  return (await res.json()) as any;
}

const packr = new Packr({ useRecords: false });
const unpackr = new Unpackr({ useRecords: false });

/** Rewrites every "tokens" frame of a snapshot so that it holds `ids`, with correct checksums. */
function withTokens(bytes: Uint8Array, ids: number[]): Uint8Array {
  const out: Uint8Array[] = [bytes.subarray(0, SNAPSHOT_MAGIC.length)];
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  for (let at = SNAPSHOT_MAGIC.length; at < bytes.length; ) {
    const length = view.getUint32(at, true);
    let payload = bytes.subarray(at + 8, at + 8 + length);
    const frame = unpackr.unpack(payload) as Record<string, any>;
    if (frame.t === "tokens") {
      const chunk = Int32Array.from(ids.slice(frame.start, frame.start + frame.count));
      payload = packr.pack({ ...frame, data: new Uint8Array(chunk.buffer) });
    }
    const head = new Uint8Array(8);
    new DataView(head.buffer).setUint32(0, payload.length, true);
    new DataView(head.buffer).setUint32(4, crc32(payload), true);
    out.push(head, payload);
    at += 8 + length;
  }
  return Buffer.concat(out);
}

describe("uploaded KV is never lent", () => {
  test("a snapshot whose tokens were swapped for another client's prompt does not answer that client's plain request", async () => {
    const { app, post, dir } = sessionApp(engine);
    // The attacker reads a document of theirs and downloads the snapshot.
    expect((await post("/v1/sessions", { id: "mine", messages: [{ role: "user", content: `Attacker. ${words(3, 120)}` }], chat_template_kwargs: DATE })).status).toBe(201);
    const snapshot = new Uint8Array(await (await app.request("/v1/sessions/mine/snapshot")).arrayBuffer());
    const header = unpackr.unpack(snapshot.subarray(SNAPSHOT_MAGIC.length + 8, SNAPSHOT_MAGIC.length + 8 + new DataView(snapshot.buffer).getUint32(SNAPSHOT_MAGIC.length, true))) as Record<string, any>;
    // The victim's prompt, which the attacker guesses: its first tokens replace the snapshot's.
    const victim = [{ role: "user", content: `Victim. ${words(4, 300)}` }];
    const victimIds = await engine.encodeChat(victim, { addGenerationPrompt: true, extra: DATE });
    expect(victimIds.length).toBeGreaterThan(header.tokenCount);
    const planted = withTokens(snapshot, victimIds.slice(0, header.tokenCount));
    const uploaded = await app.request("/v1/sessions/planted/snapshot", { method: "PUT", body: planted as BodyInit });
    expect(uploaded.status).toBe(201);
    await app.request("/v1/sessions/mine", { method: "DELETE" });

    // The victim's plain request must not borrow the planted KV: it answers as a fresh computation does.
    const reference = await chat(fresh, victim);
    const answer = await chat(app, victim);
    expect(answer.usage.prompt_tokens_details.cached_tokens).toBe(0);
    expect(answer.choices[0].message.content).toBe(reference.choices[0].message.content);
    // After a restart (the session read back from the store) it is still known as uploaded.
    const { app: restarted } = sessionApp(engine, { dir });
    expect((await restarted.request("/v1/sessions/planted")).status).toBe(200);
    const again = await chat(restarted, victim);
    expect(again.usage.prompt_tokens_details.cached_tokens).toBe(0);
  }, 120_000);
});

describe("tenants", () => {
  const dir = tempDir("tenants");
  const manager = new SessionManager(engine, new SnapshotStore(dir), { memoryBudgetBytes: 2 ** 30, busy: "wait", chunkTokens: 64 });
  const document = { role: "user", content: `Alice's notes. ${words(5, 80)}` };
  const prompt = () => engine.encodeChat([document, { role: "user", content: "Summarize." }], { addGenerationPrompt: true, extra: DATE });
  const turn = { messages: (m: { role: string; content: string | null }[]) => [...m, { role: "user", content: "Summarize." }], maxTokens: 4, sampling: { temperature: 0 }, stop: [] };
  const notFound = async (p: Promise<unknown>) => {
    const error = await p.then(
      () => null,
      (e: unknown) => e,
    );
    expect(error).toBeInstanceOf(RuntimeError);
    expect((error as RuntimeError).kind).toBe("not_found");
  };

  test("another tenant can neither list, see, download, continue, append to, delete nor borrow a session", async () => {
    await manager.create({ tenant: "alice", id: "notes", messages: [document], templateKwargs: DATE });
    expect((await manager.list("alice")).map((s) => s.id)).toEqual(["notes"]);
    expect(await manager.list("bob")).toEqual([]);
    await notFound(manager.info("bob", "notes"));
    await notFound(manager.download("bob", "notes"));
    await notFound(manager.turn("bob", "notes", turn));
    await notFound(manager.append("bob", "notes", { role: "user", content: "x" }));
    await notFound(manager.delete("bob", "notes"));
    await notFound(manager.assertReady("bob", "notes"));
    // Alice's plain requests borrow her KV; Bob's never do.
    expect(manager.prefixCache("alice", await prompt())).not.toBeNull();
    expect(manager.prefixCache("bob", await prompt())).toBeNull();
    // Ids are per tenant: Bob may have a "notes" of his own, and each sees only theirs.
    await manager.create({ tenant: "bob", id: "notes", messages: [{ role: "user", content: "Bob's." }], templateKwargs: DATE });
    expect((await manager.info("alice", "notes")).tokens_read).toBeGreaterThan((await manager.info("bob", "notes")).tokens_read);
    await manager.delete("bob", "notes");
    expect((await manager.info("alice", "notes")).id).toBe("notes");
    // A new manager on the same store (a restart) keeps them apart too.
    const restarted = new SessionManager(engine, new SnapshotStore(dir), { memoryBudgetBytes: 2 ** 30, busy: "wait", chunkTokens: 64 });
    expect((await restarted.list("alice")).map((s) => s.id)).toEqual(["notes"]);
    expect(await restarted.list("bob")).toEqual([]);
    expect(await restarted.list(DEFAULT_TENANT)).toEqual([]);
  }, 120_000);
});

describe("tenants over HTTP: each API key's sessions are its own", () => {
  const dir = tempDir("tenants-http");
  const sessions = new SessionManager(engine, new SnapshotStore(dir), { memoryBudgetBytes: 2 ** 30, busy: "wait", chunkTokens: 64 });
  const app = createApp({
    engine,
    sessions,
    maxBodyBytes: 4 * 1024 * 1024,
    apiKeys: [
      { tenant: "alice", key: "sk-alice" },
      { tenant: "bob", key: "sk-bob" },
    ],
    log: () => {},
  });
  const as = (key: string, path: string, init: { method?: string; body?: unknown } = {}) =>
    app.request(path, {
      method: init.method ?? (init.body === undefined ? "GET" : "POST"),
      headers: { authorization: `Bearer ${key}`, "content-type": "application/json" },
      body: init.body === undefined ? undefined : typeof init.body === "string" || init.body instanceof Uint8Array ? (init.body as BodyInit) : JSON.stringify(init.body),
    });
  const report = { role: "user", content: `Alice's report. ${words(7, 120)}` };
  const question = { role: "user", content: "What is in it?" };

  test("another tenant cannot list, see, download, continue, append to, delete or borrow a session; ids are per tenant", async () => {
    expect((await as("sk-alice", "/v1/sessions", { body: { id: "report", messages: [report], chat_template_kwargs: DATE } })).status).toBe(201);
    const aliceList = (await (await as("sk-alice", "/v1/sessions")).json()) as any;
    expect(aliceList.data.map((s: { id: string }) => s.id)).toEqual(["report"]);
    expect(((await (await as("sk-bob", "/v1/sessions")).json()) as any).data).toEqual([]);
    for (const [method, path, body] of [
      ["GET", "/v1/sessions/report", undefined],
      ["GET", "/v1/sessions/report/snapshot", undefined],
      ["POST", "/v1/sessions/report/messages", { content: "Tell me.", max_tokens: 2 }],
      ["POST", "/v1/sessions/report/append", { text: "More." }],
      ["POST", "/v1/chat/completions", { session_id: "report", messages: [report, question], max_tokens: 2 }],
      ["DELETE", "/v1/sessions/report", undefined],
    ] as const) {
      const res = await as("sk-bob", path, { method, body });
      expect([method, path, res.status]).toEqual([method, path, 404]);
    }
    // Alice's plain request borrows her session's KV; Bob's identical request does not, and answers the same.
    const ask = async (key: string) => {
      const res = await as(key, "/v1/chat/completions", { body: { messages: [report, question], chat_template_kwargs: DATE, temperature: 0, max_tokens: 12 } });
      return (await res.json()) as any;
    };
    const alice = await ask("sk-alice");
    const bob = await ask("sk-bob");
    expect(alice.usage.prompt_tokens_details.cached_tokens).toBeGreaterThan(0);
    expect(bob.usage.prompt_tokens_details.cached_tokens).toBe(0);
    expect(bob.choices[0].message.content).toBe(alice.choices[0].message.content);
    // Bob may have a session called "report" too; uploading Alice's snapshot (if he had it) would make it his, marked uploaded.
    const snapshot = new Uint8Array(await (await as("sk-alice", "/v1/sessions/report/snapshot")).arrayBuffer());
    expect((await as("sk-bob", "/v1/sessions/report/snapshot", { method: "PUT", body: snapshot })).status).toBe(201);
    expect(((await (await as("sk-bob", "/v1/sessions")).json()) as any).data.map((s: { id: string }) => s.id)).toEqual(["report"]);
    const bobAgain = await ask("sk-bob");
    expect(bobAgain.usage.prompt_tokens_details.cached_tokens).toBe(0);
    // Deleting Bob's leaves Alice's.
    expect((await as("sk-bob", "/v1/sessions/report", { method: "DELETE" })).status).toBe(200);
    expect((await as("sk-alice", "/v1/sessions/report")).status).toBe(200);
    expect(existsSync(join(dir, "report.ulsnap"))).toBe(false);
    expect(existsSync(join(dir, "tenants", "alice", "report.ulsnap"))).toBe(true);
  }, 120_000);
});

describe("what the API accepts is stored and read back", () => {
  const nest = (depth: number): unknown => {
    let v: unknown = "leaf";
    for (let i = 0; i < depth; i++) v = { k: v };
    return v;
  };

  test("tool-call arguments and template variables nested as deep as the API allows (32 levels, the field's own object included) survive eviction and restart", async () => {
    const { app, post, dir } = sessionApp(engine, { memoryBudgetBytes: 0 });
    const messages = [
      { role: "user", content: "Call the tool." },
      { role: "assistant", content: null, tool_calls: [{ id: "c1", type: "function", function: { name: "f", arguments: nest(32) } }] },
      { role: "tool", tool_call_id: "c1", content: "done" },
    ];
    const created = await post("/v1/sessions", { id: "deep", messages, chat_template_kwargs: { ...DATE, extra: nest(31) } });
    expect(created.status).toBe(201);
    // Budget 0: the session left memory at once, so this turn reads it back from the store.
    const res = await post("/v1/sessions/deep/messages", { content: "And now?", ...GREEDY });
    expect(res.status).toBe(200);
    const { app: restarted } = sessionApp(engine, { dir });
    const info = (await (await restarted.request("/v1/sessions/deep")).json()) as any;
    expect(info.messages).toBe(5);
    void app;
  }, 60_000);

  test("one level deeper is refused at the door with a 400 naming the field", async () => {
    const { post } = sessionApp(engine);
    const res = await post("/v1/sessions", { id: "deeper", messages: [{ role: "user", content: "x" }], chat_template_kwargs: { ...DATE, extra: nest(32) } });
    expect(res.status).toBe(400);
    const body = (await res.json()) as any;
    expect(body.error.param).toMatch(/^chat_template_kwargs/);
    expect(body.error.message).toMatch(/32/);
  }, 60_000);
});

describe("nothing is lost", () => {
  test("a DELETE that fails leaves the session listed and usable", async () => {
    const { app, post, dir } = sessionApp(engine);
    expect((await post("/v1/sessions", { id: "keep", messages: [{ role: "user", content: "Keep me." }], chat_template_kwargs: DATE })).status).toBe(201);
    // A real filesystem failure: the snapshot's path is a non-empty directory, which rm(force) cannot remove.
    const target = join(dir, "keep.ulsnap");
    renameSync(target, join(dir, "keep.saved"));
    mkdirSync(target);
    writeFileSync(join(target, "blocker"), "x");
    const res = await app.request("/v1/sessions/keep", { method: "DELETE" });
    expect(res.status).toBe(503);
    expect(((await res.json()) as any).error.code).toBe("store_failed");
    const list = (await (await app.request("/v1/sessions")).json()) as any;
    expect(list.data.map((s: { id: string }) => s.id)).toContain("keep");
    rmSync(target, { recursive: true });
    renameSync(join(dir, "keep.saved"), target);
    expect((await post("/v1/sessions/keep/messages", { content: "Still there?", ...GREEDY })).status).toBe(200);
  }, 60_000);

  test("a download that stalls holds no lock: turns go on, and the download is the version it started from", async () => {
    const { app, post } = sessionApp(engine, { busy: "reject" });
    expect((await post("/v1/sessions", { id: "dl", messages: [{ role: "user", content: `Doc. ${words(6, 200)}` }], chat_template_kwargs: DATE })).status).toBe(201);
    const before = new Uint8Array(await (await app.request("/v1/sessions/dl/snapshot")).arrayBuffer());
    const stalled = await app.request("/v1/sessions/dl/snapshot"); // headers only; its body is not read yet
    expect(stalled.status).toBe(200);
    const turn = await post("/v1/sessions/dl/messages", { content: "Next?", ...GREEDY });
    expect(turn.status).toBe(200);
    const read = new Uint8Array(await stalled.arrayBuffer());
    expect(Buffer.from(read).equals(Buffer.from(before))).toBe(true);
    const after = new Uint8Array(await (await app.request("/v1/sessions/dl/snapshot")).arrayBuffer());
    expect(after.length).toBeGreaterThan(before.length);
  }, 60_000);

  test("temporary files of a crashed writer are removed when the store starts; a live writer's are kept", async () => {
    const dir = tempDir("temps");
    const dead = ".tmp-2147483646-s-1b4e28ba"; // no such process
    const legacy = ".tmp-upload-1b4e28ba-2d11"; // the old naming, without a process id
    const live = `.tmp-${process.pid}-s-1b4e28ba`;
    for (const f of [dead, legacy, live]) writeFileSync(join(dir, f), "partial");
    writeFileSync(join(dir, "kept.ulsnap"), "not touched");
    const store = new SnapshotStore(dir);
    await store.ids();
    expect(existsSync(join(dir, dead))).toBe(false);
    expect(existsSync(join(dir, legacy))).toBe(false);
    expect(existsSync(join(dir, live))).toBe(true);
    expect(readdirSync(dir).sort()).toEqual([live, "kept.ulsnap"].sort());
  });
});
