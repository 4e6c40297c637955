/**
 * Memory admission: every KV cache (a request's, a session's, an upload being read) holds a reservation
 * in the process's KV budget, so a request that could never fit gets a 400, one that does not fit now a
 * 429, idle sessions leave memory to make room, and /health and /metrics say what is in use.
 * Real engine (random weights, 1 KiB of KV per token), real HTTP app, real snapshot store.
 */
import { describe, expect, test } from "bun:test";
import { sharedEngine } from "./helpers/model.ts";
import { sessionApp } from "./helpers/sessions.ts";

const KIB = 1024;
const engine = await sharedEngine({ kvMemoryBytes: 256 * KIB });
const bytesPerToken = engine.info.kvBytesPerToken;
const DATE = { date_string: "26 Jul 2024" };
const words = (seed: number, n: number) => Array.from({ length: n }, (_, i) => `w${(seed * 7919 + i * 104729) % 9973}`).join(" ");
const budgetTokens = Math.floor(engine.kvMemory.limitBytes / bytesPerToken);

const chatBody = (content: string, extra: Record<string, unknown> = {}) =>
  JSON.stringify({ messages: [{ role: "user", content }], chat_template_kwargs: DATE, temperature: 0, ...extra });

describe("KV memory admission", () => {
  test("the budget is what the test thinks it is", () => {
    expect(bytesPerToken).toBe(1024);
    expect(budgetTokens).toBe(256);
  });

  test("a request whose KV could never fit gets a 400 naming max_tokens; without max_tokens the reply stops where the budget ends", async () => {
    const { app } = sessionApp(engine);
    const tooMuch = await app.request("/v1/chat/completions", { method: "POST", body: chatBody("Hi", { max_tokens: 1000 }) });
    expect(tooMuch.status).toBe(400);
    const error = ((await tooMuch.json()) as any).error;
    expect(error.param).toBe("max_tokens");
    expect(error.message).toMatch(/KV budget of 262144 bytes/);

    const open = await app.request("/v1/chat/completions", { method: "POST", body: chatBody("Hi", { ignore_eos: true }) });
    expect(open.status).toBe(200);
    const reply = (await open.json()) as any;
    expect(reply.choices[0].finish_reason).toBe("length");
    expect(reply.usage.prompt_tokens + reply.usage.completion_tokens).toBe(budgetTokens);
    expect(engine.kvMemory.usedBytes).toBe(0);
  }, 60_000);

  test("idle sessions leave memory to make room; KV held by others now gets a 429; /health and /metrics report it", async () => {
    const { app, post } = sessionApp(engine);
    const created = await post("/v1/sessions", { id: "big", messages: [{ role: "user", content: words(1, 25) }], chat_template_kwargs: DATE });
    expect(created.status).toBe(201);
    const held = ((await created.json()) as any).kv_bytes as number;
    expect(held).toBeGreaterThan(60 * KIB);
    let health = (await (await app.request("/health")).json()) as any;
    expect(health.kv_memory).toEqual({ used_bytes: held, limit_bytes: 256 * KIB, sessions_bytes: held });

    // This request needs more than what is left beside the session: the idle session leaves memory (it stays in the store).
    const res = await app.request("/v1/chat/completions", { method: "POST", body: chatBody("Hi", { max_tokens: 200 }) });
    expect(res.status).toBe(200);
    const info = (await (await app.request("/v1/sessions/big")).json()) as any;
    expect(info.in_memory).toBe(false);
    health = (await (await app.request("/health")).json()) as any;
    expect(health.kv_memory.used_bytes).toBe(0);

    // KV that cannot be freed (held by something running: here a reservation taken through the same API an upload uses).
    const other = engine.kvMemory.reserve(200 * KIB, "another request");
    try {
      const busy = await app.request("/v1/chat/completions", { method: "POST", body: chatBody("Hi", { max_tokens: 100 }) });
      expect(busy.status).toBe(429);
      expect(((await busy.json()) as any).error.code).toBe("kv_memory_full");
      const metrics = await (await app.request("/metrics")).text();
      expect(metrics).toMatch(/^ultralong:kv_memory_used_bytes 204800$/m);
      expect(metrics).toMatch(/^ultralong:kv_memory_limit_bytes 262144$/m);
    } finally {
      other.release();
    }
    // The session reads back from the store on its next use, and its KV is counted again.
    const turn = await post("/v1/sessions/big/messages", { content: "Go on.", max_tokens: 4, temperature: 0 });
    expect(turn.status).toBe(200);
    expect(engine.kvMemory.usedBytes).toBe(((await (await app.request("/v1/sessions/big")).json()) as any).kv_bytes);
    await app.request("/v1/sessions/big", { method: "DELETE" });
    expect(engine.kvMemory.usedBytes).toBe(0);
  }, 60_000);

  test("a session turn without max_tokens gets what is free beside its session's own KV, not a 429", async () => {
    const { post, app } = sessionApp(engine);
    expect((await post("/v1/sessions", { id: "t", messages: [{ role: "user", content: words(3, 25) }], chat_template_kwargs: DATE })).status).toBe(201);
    const held = ((await (await app.request("/v1/sessions/t")).json()) as any).kv_bytes as number;
    const res = await post("/v1/sessions/t/messages", { content: "Go on.", temperature: 0, ignore_eos: true });
    expect(res.status).toBe(200);
    const turn = (await res.json()) as any;
    expect(turn.choices[0].finish_reason).toBe("length");
    // The turn's working copy had the budget less what the session itself holds while the turn runs.
    expect(turn.usage.prompt_tokens + turn.usage.completion_tokens).toBe(budgetTokens - held / bytesPerToken);
    await app.request("/v1/sessions/t", { method: "DELETE" });
    expect(engine.kvMemory.usedBytes).toBe(0);
  }, 60_000);

  test("an upload larger than the budget is refused as too large; concurrent upload reads are capped", async () => {
    const roomy = await sharedEngine({ kvMemoryBytes: 1024 * KIB });
    const source = sessionApp(roomy);
    expect((await source.post("/v1/sessions", { id: "s", messages: [{ role: "user", content: words(2, 300) }], chat_template_kwargs: DATE })).status).toBe(201);
    const snapshot = new Uint8Array(await (await source.app.request("/v1/sessions/s/snapshot")).arrayBuffer());
    await source.app.request("/v1/sessions/s", { method: "DELETE" });

    const { app } = sessionApp(engine);
    const refused = await app.request("/v1/sessions/s/snapshot", { method: "PUT", body: snapshot as BodyInit });
    expect(refused.status).toBe(413);
    expect(((await refused.json()) as any).error.code).toBe("too_large");
    expect(engine.kvMemory.usedBytes).toBe(0);

    // Two uploads at once by default: a third waits for nothing and gets 429.
    const pending: ReadableStreamDefaultController<Uint8Array>[] = [];
    const slow = () => new ReadableStream<Uint8Array>({ start: (c) => void pending.push(c) });
    const first = app.request("/v1/sessions/a/snapshot", { method: "PUT", body: slow() });
    const second = app.request("/v1/sessions/b/snapshot", { method: "PUT", body: slow() });
    while (pending.length < 2) await new Promise((r) => setTimeout(r, 5));
    const third = await app.request("/v1/sessions/c/snapshot", { method: "PUT", body: new Uint8Array(16) as BodyInit });
    expect(third.status).toBe(429);
    for (const c of pending) {
      c.enqueue(new Uint8Array(16));
      c.close();
    }
    expect((await first).status).toBe(400);
    expect((await second).status).toBe(400);
  }, 60_000);
});
