/**
 * A session is exactly as before a turn or exactly as after it, whatever happens in the middle: a client
 * that goes away during prefill, a snapshot that cannot be written. Checked against fresh requests on the
 * same engine without sessions (an independent computation of the same prompt), with the random-weights
 * model, whose long varied output shows any wrong KV slot.
 */
import { describe, expect, test } from "bun:test";
import { mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { createApp } from "../src/app.ts";
import { sharedEngine } from "./helpers/model.ts";
import { sessionApp } from "./helpers/sessions.ts";

const engine = await sharedEngine({ prefillChunk: 32 });
const DATE = { date_string: "26 Jul 2024" };
const GREEDY = { temperature: 0, max_tokens: 24 };
const fresh = createApp({ engine, maxBodyBytes: 4 * 1024 * 1024, log: () => {} });

const chatBody = (messages: unknown[], extra: Record<string, unknown> = {}) =>
  JSON.stringify({ messages, chat_template_kwargs: DATE, ...GREEDY, ...extra });

async function reply(app: { request: typeof fresh.request }, messages: unknown[], extra: Record<string, unknown> = {}) {
  const res = await app.request("/v1/chat/completions", { method: "POST", body: chatBody(messages, extra) });
  expect(res.status).toBe(200);
  return (await res.json()) as any;
}

const words = (seed: number, n: number) => Array.from({ length: n }, (_, i) => `w${(seed * 7919 + i * 104729) % 9973}`).join(" ");
const SYSTEM = { role: "system", content: "You answer from the document." };
const DOC_A = { role: "user", content: `Document A. ${words(1, 120)}` };
const DOC_B = { role: "user", content: `Document B. ${words(2, 400)}` };
const QUESTION = { role: "user", content: "What does the document say first?" };

/** Aborts `abort` once the model has run `runs` more forward passes (the prefill yields between chunks, so this lands mid-prefill). */
function abortAfterRuns(abort: AbortController, runs: number): void {
  const start = engine.model.runStats.runs;
  const poll = () => (engine.model.runStats.runs - start >= runs ? abort.abort() : setImmediate(poll));
  setImmediate(poll);
}

describe("a turn is all or nothing", () => {
  test("a client that goes away during a diverging turn's prefill leaves the session's KV as it was", async () => {
    const { app, post } = sessionApp(engine);
    expect((await post("/v1/sessions", { id: "s", messages: [SYSTEM, DOC_A], chat_template_kwargs: DATE })).status).toBe(201);
    const before = (await (await app.request("/v1/sessions/s")).json()) as any;

    // A turn whose conversation diverges right after the system prompt, cancelled after two prefill chunks.
    const abort = new AbortController();
    abortAfterRuns(abort, 2);
    try {
      const res = await app.request("/v1/chat/completions", { method: "POST", body: chatBody([SYSTEM, DOC_B, QUESTION], { session_id: "s", session_history: "replace" }), signal: abort.signal });
      await res.text();
    } catch {
      // the request was aborted: what it answered does not matter here
    }
    expect(abort.signal.aborted).toBe(true);

    const after = (await (await app.request("/v1/sessions/s")).json()) as any;
    expect(after.tokens_read).toBe(before.tokens_read);
    expect(after.tokens_resident).toBe(before.tokens_resident);
    expect(after.messages).toBe(before.messages);

    // A plain request that begins with the session's conversation borrows its KV: it must answer as a fresh computation does.
    const reference = await reply(fresh, [SYSTEM, DOC_A, QUESTION]);
    const borrowed = await reply(app, [SYSTEM, DOC_A, QUESTION]);
    expect(borrowed.usage.prompt_tokens_details.cached_tokens).toBeGreaterThan(0);
    expect(borrowed.choices[0].message.content).toBe(reference.choices[0].message.content);
    // And the session itself, continued with its own conversation, answers the same.
    const continued = await reply(app, [SYSTEM, DOC_A, QUESTION], { session_id: "s" });
    expect(continued.usage.prompt_tokens_details.cached_tokens).toBeGreaterThan(0);
    expect(continued.choices[0].message.content).toBe(reference.choices[0].message.content);
  }, 120_000);

  test("a request queued behind a diverging turn borrows the session's KV as it was committed, never half-updated", async () => {
    const { app, post } = sessionApp(engine);
    expect((await post("/v1/sessions", { id: "q", messages: [SYSTEM, DOC_A], chat_template_kwargs: DATE })).status).toBe(201);
    const reference = await reply(fresh, [SYSTEM, DOC_A, QUESTION]);
    // The turn replaces the session's conversation; the plain request, queued right behind it, begins with the old one.
    const turn = reply(app, [SYSTEM, DOC_B, QUESTION], { session_id: "q", session_history: "replace" });
    while (!engine.queueState.busy) await new Promise((r) => setImmediate(r));
    const plain = reply(app, [SYSTEM, DOC_A, QUESTION]);
    const [, borrowed] = await Promise.all([turn, plain]);
    expect(borrowed.choices[0].message.content).toBe(reference.choices[0].message.content);
  }, 120_000);

  test("a turn whose snapshot cannot be written fails and leaves the session as before the turn", async () => {
    const { app, post, dir } = sessionApp(engine);
    expect((await post("/v1/sessions", { id: "p", messages: [SYSTEM, DOC_A], chat_template_kwargs: DATE })).status).toBe(201);
    const before = (await (await app.request("/v1/sessions/p")).json()) as any;
    // A real filesystem failure: the snapshot's path becomes a non-empty directory, so the rename that commits a save fails.
    const target = join(dir, "p.ulsnap");
    const { renameSync } = await import("node:fs");
    renameSync(target, join(dir, "p.saved"));
    mkdirSync(target);
    writeFileSync(join(target, "blocker"), "x");

    const failed = await app.request("/v1/chat/completions", { method: "POST", body: chatBody([SYSTEM, DOC_B, QUESTION], { session_id: "p", session_history: "replace" }) });
    expect(failed.status).toBe(503);
    expect(((await failed.json()) as any).error.code).toBe("store_failed");
    const after = (await (await app.request("/v1/sessions/p")).json()) as any;
    expect(after.tokens_read).toBe(before.tokens_read);
    expect(after.messages).toBe(before.messages);
    // No temporary file is left behind.
    const { readdirSync, rmSync } = await import("node:fs");
    expect(readdirSync(dir).filter((f) => f.startsWith(".tmp"))).toEqual([]);

    // Once the disk works again the session goes on from where it was before the failed turn.
    rmSync(target, { recursive: true });
    renameSync(join(dir, "p.saved"), target);
    const reference = await reply(fresh, [SYSTEM, DOC_A, QUESTION]);
    const continued = await reply(app, [SYSTEM, DOC_A, QUESTION], { session_id: "p" });
    expect(continued.usage.prompt_tokens_details.cached_tokens).toBeGreaterThan(0);
    expect(continued.choices[0].message.content).toBe(reference.choices[0].message.content);
  }, 120_000);
});
