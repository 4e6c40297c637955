/**
 * A session's turn tokenizes only what is new: long text pieces (a document) that its last render
 * tokenized are taken from its tokens by their text's hash, also after a restart (the snapshot carries
 * where they lie). The ids are a fresh encoding's. An uploaded snapshot's recorded pieces are dropped (its
 * first turn tokenizes afresh), and recorded pieces whose ids hold a special token are tokenized again.
 */
import { afterAll, expect, test } from "bun:test";
import { readFile, rm, writeFile } from "node:fs/promises";
import { DEFAULT_TENANT, SessionManager, SnapshotStore, decodeSnapshot, encodeSnapshot, type ChatMessage } from "../runtime/index.ts";
import { sharedEngine } from "./helpers/model.ts";
import { tempDir } from "./helpers/sessions.ts";

const DATE = { date_string: "26 Jul 2024" };
const DOCUMENT = Array.from({ length: 120 }, (_, i) => `Day ${i}: the Aurora left port with ${(i * 37) % 300} passengers.`).join("\n");
const QUESTION: ChatMessage = { role: "user", content: "How many passengers on day 7?" };
const engine = await sharedEngine({ contextLength: 4096 });
const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

function manager(dir: string) {
  return new SessionManager(engine, new SnapshotStore(dir), { memoryBudgetBytes: 2 ** 30, busy: "wait", chunkTokens: 64 });
}

/** A store with session "doc" holding DOCUMENT, and the ids a fresh request with DOCUMENT and QUESTION gets. */
async function documentSession() {
  const dir = tempDir("tokenize");
  dirs.push(dir);
  const fresh = await engine.encodeChat([{ role: "user", content: DOCUMENT }, QUESTION], { addGenerationPrompt: true, extra: DATE });
  const writer = manager(dir);
  await writer.create({ tenant: DEFAULT_TENANT, id: "doc", messages: [{ role: "user", content: DOCUMENT }], templateKwargs: DATE });
  return { dir, writer, fresh };
}

/** Asks QUESTION in session `id`; returns the characters tokenized for it and the ids the session then holds as its prompt. */
async function ask(sessions: SessionManager, dir: string, id: string) {
  const before = engine.chatCharsTokenized;
  const r = await sessions.turn(DEFAULT_TENANT, id, { messages: (m) => [...m.slice(0, 1), QUESTION], maxTokens: 1, sampling: { temperature: 0 }, stop: [], ignoreEos: true });
  const chars = engine.chatCharsTokenized - before;
  const snapshot = await new SnapshotStore(dir).read(id, (source) => decodeSnapshot(source, { ...sessions.snapshotExpectation() }));
  return { chars, prompt: Array.from(snapshot.tokens.subarray(0, r.promptTokens)) };
}

test("a turn, also after a restart, tokenizes only the new text; its ids equal a fresh encoding's", async () => {
  const { dir, writer, fresh } = await documentSession();
  const first = await ask(writer, dir, "doc");
  expect(first.chars).toBeLessThan(300);
  expect(first.prompt).toEqual(fresh);
  // After a restart: a new manager on the same store reads the session back.
  await writeFile(new SnapshotStore(dir).path("again"), await readFile(new SnapshotStore(dir).path("doc")));
  const restarted = await ask(manager(dir), dir, "again");
  expect(restarted.chars).toBeLessThan(300);
  expect(restarted.prompt).toEqual(fresh);
}, 120_000);

test("uploaded snapshots and recorded pieces whose ids hold a special token are tokenized again", async () => {
  const { dir, writer, fresh } = await documentSession();
  const bytes = await readFile(new SnapshotStore(dir).path("doc"));

  // Uploaded: the pieces it records are not taken on trust, so its first turn tokenizes everything; the
  // turn after reuses what that turn recorded.
  await writer.upload(DEFAULT_TENANT, "up", new Blob([bytes]).stream(), 2 ** 26);
  const uploaded = await ask(writer, dir, "up");
  expect(uploaded.chars).toBeGreaterThan(DOCUMENT.length);
  expect(uploaded.prompt).toEqual(fresh);
  const again = await ask(writer, dir, "up");
  expect(again.chars).toBeLessThan(300);
  expect(again.prompt).toEqual(fresh);

  // A snapshot (as if written here) whose recorded piece starts at BOS, a special token.
  const data = await new SnapshotStore(dir).read("doc", (source) => decodeSnapshot(source, { ...writer.snapshotExpectation() }));
  expect(data.meta.pieces.length).toBe(1);
  data.meta.pieces = [{ ...data.meta.pieces[0]!, start: 0 }];
  await writeFile(new SnapshotStore(dir).path("planted"), Buffer.concat([...encodeSnapshot(data, 64)]));
  const planted = await ask(manager(dir), dir, "planted");
  expect(planted.chars).toBeGreaterThan(DOCUMENT.length);
  expect(planted.prompt).toEqual(fresh);
}, 120_000);
