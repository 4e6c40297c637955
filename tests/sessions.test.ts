/**
 * Sessions through the HTTP app on the real engine and a real snapshot store on disk: multi-turn parity
 * with fresh requests, only new tokens prefilled, append with progress, prefix reuse, download/upload,
 * LRU eviction and reload, busy sessions, and the listing and deletion routes.
 */
import { describe, expect, test } from "bun:test";
import { createApp } from "../src/app.ts";
import { sharedEngine } from "./helpers/model.ts";
import { sessionApp } from "./helpers/sessions.ts";
import { readSse, sseJson } from "./helpers/sse.ts";

const engine = await sharedEngine();
const DATE = { date_string: "26 Jul 2024" };
const GREEDY = { temperature: 0, max_tokens: 12 };
/** The same engine without sessions: every request starts from an empty cache. */
const fresh = createApp({ engine, maxBodyBytes: 4 * 1024 * 1024, log: () => {} });
const freshChat = async (messages: unknown[]) => {
  const res = await fresh.request("/v1/chat/completions", {
    method: "POST",
    body: JSON.stringify({ messages, chat_template_kwargs: DATE, ...GREEDY }),
  });
  expect(res.status).toBe(200);
  return (await res.json()) as any;
};

const DOCUMENT =
  "Harbour log, 3 March. The ferry Aurora left at 06:10 with 212 passengers. Wind from the north-west, " +
  "force 5. The pilot boat returned at 07:45. Fog lifted by 09:00; the lighthouse keeper reported a seal colony on the east rocks.";

describe("sessions", () => {
  test("a multi-turn session answers token-for-token like fresh requests with the whole conversation, prefilling only new tokens", async () => {
    const { post } = sessionApp(engine);
    const created = await post("/v1/sessions", { id: "talk", system: "You keep the harbour log.", document: DOCUMENT, chat_template_kwargs: DATE });
    expect(created.status).toBe(201);
    const info = (await created.json()) as any;
    expect(info.ingest.prefilled_tokens).toBe(info.tokens_read);
    expect(info.messages).toBe(2);

    const conversation: { role: string; content: string }[] = [
      { role: "system", content: "You keep the harbour log." },
      { role: "user", content: DOCUMENT },
    ];
    let previousTokens = info.tokens_read as number;
    for (const question of ["When did the ferry leave?", "How many passengers?", "What did the keeper see?"]) {
      const res = await post("/v1/sessions/talk/messages", { content: question, ...GREEDY });
      expect(res.status).toBe(200);
      const turn = (await res.json()) as any;
      expect(turn.session_id).toBe("talk");
      conversation.push({ role: "user", content: question });
      const reference = await freshChat(conversation);
      // Same prompt, same reply.
      expect(turn.usage.prompt_tokens).toBe(reference.usage.prompt_tokens);
      expect(turn.choices[0].message.content).toBe(reference.choices[0].message.content);
      expect(turn.usage.completion_tokens).toBe(reference.usage.completion_tokens);
      // Everything the session had read is reused (the last sampled token was never fed, so at most one is re-read)...
      expect(turn.usage.prompt_tokens_details.cached_tokens).toBeGreaterThanOrEqual(previousTokens - 1);
      // ...and what is prefilled is only this turn's new tokens.
      const newTokens = engine.tokenizer.encode(`<|start_header_id|>user<|end_header_id|>\n\n${question}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n`, false, true).length;
      expect(turn.timings.prompt_n).toBe(turn.usage.prompt_tokens - turn.usage.prompt_tokens_details.cached_tokens);
      expect(turn.timings.prompt_n).toBeLessThanOrEqual(newTokens + 2);
      expect(reference.usage.prompt_tokens_details.cached_tokens).toBe(0);
      conversation.push({ role: "assistant", content: turn.choices[0].message.content });
      previousTokens = turn.usage.prompt_tokens + turn.usage.completion_tokens;
    }
  });

  test("chat completions continue a session by session_id (full conversation), streaming too", async () => {
    const { post } = sessionApp(engine);
    await post("/v1/sessions", { id: "chat", chat_template_kwargs: DATE });
    const messages = [{ role: "user", content: "Name a colour." }];
    const first = (await (await post("/v1/chat/completions", { session_id: "chat", messages, ...GREEDY })).json()) as any;
    expect(first.session_id).toBe("chat");
    expect(first.choices[0].message.content).toBe((await freshChat(messages)).choices[0].message.content);
    const next = [...messages, { role: "assistant", content: first.choices[0].message.content }, { role: "user", content: "Another one." }];
    const stream = await post("/v1/chat/completions", { session_id: "chat", messages: next, stream: true, stream_options: { include_usage: true }, ...GREEDY });
    const chunks = sseJson(await readSse(stream));
    const text = chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("");
    expect(text).toBe((await freshChat(next)).choices[0].message.content);
    const usage = chunks.at(-1)!.usage;
    expect(usage.prompt_tokens_details.cached_tokens).toBeGreaterThanOrEqual(first.usage.prompt_tokens);
    for (const c of chunks) expect(c.session_id).toBe("chat");
  });

  test("session_id with only the new message (as OpenAI clients often send): refused with how to continue, never answered without the document; append and replace as asked", async () => {
    const { app, post } = sessionApp(engine);
    await post("/v1/sessions", { id: "doc", system: "You keep the harbour log.", document: DOCUMENT, chat_template_kwargs: DATE });
    const only = [{ role: "user", content: "When did the ferry leave?" }];
    // Neither as JSON nor as a stream: the session's document would be dropped.
    for (const stream of [false, true]) {
      const refused = await post("/v1/chat/completions", { session_id: "doc", messages: only, stream, ...GREEDY });
      expect(refused.status).toBe(400);
      const error = ((await refused.json()) as any).error;
      expect(error.param).toBe("messages");
      expect(error.message).toContain('"session_history": "append"');
      expect(error.message).toContain("/v1/sessions/doc/messages");
    }
    // The same refusal from a process that has not read the session yet (it is checked inside the turn too).
    const { post: otherPost, dir } = sessionApp(engine);
    const copied = await (await app.request("/v1/sessions/doc/snapshot")).arrayBuffer();
    expect((await sessionApp(engine, { dir }).app.request("/v1/sessions/doc/snapshot", { method: "PUT", body: copied })).status).toBe(201);
    expect((await otherPost("/v1/chat/completions", { session_id: "doc", messages: only, ...GREEDY })).status).toBe(400);
    expect(((await (await app.request("/v1/sessions/doc")).json()) as any).messages).toBe(2);

    // append: the new message joins the history; the answer is the one to the whole conversation.
    const whole = [{ role: "system", content: "You keep the harbour log." }, { role: "user", content: DOCUMENT }, ...only];
    const appended = (await (await post("/v1/chat/completions", { session_id: "doc", session_history: "append", messages: only, ...GREEDY })).json()) as any;
    expect(appended.choices[0].message.content).toBe((await freshChat(whole)).choices[0].message.content);
    expect(appended.usage.prompt_tokens_details.cached_tokens).toBeGreaterThan(40);
    expect(((await (await app.request("/v1/sessions/doc")).json()) as any).messages).toBe(4);
    // extend (the default) with the whole conversation goes on as before.
    const next = [...whole, { role: "assistant", content: appended.choices[0].message.content }, { role: "user", content: "And the pilot boat?" }];
    expect((await post("/v1/chat/completions", { session_id: "doc", messages: next, ...GREEDY })).status).toBe(200);
    // replace: the messages become the conversation.
    const replaced = (await (await post("/v1/chat/completions", { session_id: "doc", session_history: "replace", messages: only, ...GREEDY })).json()) as any;
    expect(replaced.choices[0].message.content).toBe((await freshChat(only)).choices[0].message.content);
    expect(((await (await app.request("/v1/sessions/doc")).json()) as any).messages).toBe(2);
  });

  test("a request without a session reuses the KV of an in-memory session sharing its prefix, without changing that session", async () => {
    const { app, post } = sessionApp(engine);
    await post("/v1/sessions", { id: "doc", document: DOCUMENT, chat_template_kwargs: DATE });
    const before = (await (await app.request("/v1/sessions/doc")).json()) as any;
    const messages = [{ role: "user", content: DOCUMENT }, { role: "user", content: "Summarise." }];
    const res = (await (await post("/v1/chat/completions", { messages, chat_template_kwargs: DATE, ...GREEDY })).json()) as any;
    expect(res.usage.prompt_tokens_details.cached_tokens).toBeGreaterThan(40);
    expect(res.choices[0].message.content).toBe((await freshChat(messages)).choices[0].message.content);
    const after = (await (await app.request("/v1/sessions/doc")).json()) as any;
    expect(after.tokens_read).toBe(before.tokens_read);
    expect(after.messages).toBe(before.messages);
  });

  test("append reads text and token ids without generating; a long input streams progress per prefill chunk", async () => {
    const { app, post } = sessionApp(engine);
    await post("/v1/sessions", { id: "ingest", chat_template_kwargs: DATE });
    const runsBefore = engine.model.runStats.runs;
    const long = "The tide rose and fell along the old stone quay. ".repeat(120);
    const res = await post("/v1/sessions/ingest/append", { text: long, stream: true });
    const events = sseJson(await readSse(res));
    const progress = events.filter((e) => e.object === "session.progress");
    const final = events.at(-1)!;
    expect(final.object).toBe("session");
    const prefilled = final.ingest.prefilled_tokens as number;
    expect(prefilled).toBeGreaterThan(1200);
    // One forward pass per 512-token chunk (the configured prefill chunk), each reported.
    expect(progress.length).toBe(Math.ceil(prefilled / 512));
    expect(engine.model.runStats.runs - runsBefore).toBe(progress.length);
    expect(progress.at(-1)!.tokens_done).toBe(prefilled);
    expect(final.tokens_resident).toBe(final.tokens_read);

    const ids = engine.tokenizer.encode(" Seven gulls.");
    const byTokens = (await (await post("/v1/sessions/ingest/append", { tokens: ids })).json()) as any;
    expect(byTokens.messages).toBe(2);
    expect(byTokens.ingest.cached_tokens).toBe(final.tokens_read);
    expect((await post("/v1/sessions/ingest/append", { text: "a", tokens: [1] })).status).toBe(400);
    expect((await post("/v1/sessions/ingest/append", { tokens: [999999] })).status).toBe(400);
    expect((await app.request("/v1/sessions/ingest")).status).toBe(200);
  });

  test("download and upload: the uploaded copy continues exactly like the original", async () => {
    const { app, post } = sessionApp(engine);
    await post("/v1/sessions", { id: "orig", document: DOCUMENT, chat_template_kwargs: DATE });
    await post("/v1/sessions/orig/messages", { content: "First question?", ...GREEDY });
    const snap = await app.request("/v1/sessions/orig/snapshot");
    expect(snap.status).toBe(200);
    expect(snap.headers.get("content-type")).toContain("snapshot");
    const bytes = new Uint8Array(await snap.arrayBuffer());
    expect(Number(snap.headers.get("content-length"))).toBe(bytes.length);

    const other = sessionApp(engine);
    const up = await other.app.request("/v1/sessions/copy/snapshot", { method: "PUT", body: bytes });
    expect(up.status).toBe(201);
    const a = (await (await post("/v1/sessions/orig/messages", { content: "Second?", ...GREEDY })).json()) as any;
    const b = (await (await other.post("/v1/sessions/copy/messages", { content: "Second?", ...GREEDY })).json()) as any;
    expect(b.choices[0].message.content).toBe(a.choices[0].message.content);
    expect(b.usage).toEqual(a.usage);
    // Uploading over an existing session replaces it (200).
    expect((await other.app.request("/v1/sessions/copy/snapshot", { method: "PUT", body: bytes })).status).toBe(200);
  });

  test("beyond the memory budget, least recently used sessions leave memory and come back transparently from the store", async () => {
    // A budget of about two sessions.
    const { app, post, sessions } = sessionApp(engine, { memoryBudgetBytes: 195 * engine.info.kvBytesPerToken });
    for (const id of ["s1", "s2", "s3"]) await post("/v1/sessions", { id, document: `${id}: ${DOCUMENT}`, chat_template_kwargs: DATE });
    const list = (await (await app.request("/v1/sessions")).json()) as any;
    expect(list.data.map((s: any) => s.id)).toEqual(["s1", "s2", "s3"]);
    const inMemory = list.data.filter((s: any) => s.in_memory).map((s: any) => s.id);
    expect(inMemory).not.toContain("s1"); // the least recently used went first
    expect(inMemory).toContain("s3");
    const evicted = list.data.find((s: any) => s.id === "s1");
    expect(evicted.tokens_read).toBeGreaterThan(40);
    expect(evicted.kv_bytes).toBe(evicted.tokens_resident * engine.info.kvBytesPerToken);

    // s1 answers as a session that never left memory would.
    const reference = sessionApp(engine);
    await reference.post("/v1/sessions", { id: "s1", document: `s1: ${DOCUMENT}`, chat_template_kwargs: DATE });
    const a = (await (await post("/v1/sessions/s1/messages", { content: "Who reported seals?", ...GREEDY })).json()) as any;
    const b = (await (await reference.post("/v1/sessions/s1/messages", { content: "Who reported seals?", ...GREEDY })).json()) as any;
    expect(a.choices[0].message.content).toBe(b.choices[0].message.content);
    expect(a.usage.prompt_tokens_details.cached_tokens).toBe(b.usage.prompt_tokens_details.cached_tokens);
    expect(((await (await app.request("/v1/sessions/s1")).json()) as any).in_memory).toBe(true);
    expect(sessions).toBeDefined();
  });

  test("two requests on one session never interleave: they wait (default) or the second gets 409", async () => {
    const waiting = sessionApp(engine);
    await waiting.post("/v1/sessions", { id: "w", chat_template_kwargs: DATE });
    const [r1, r2] = await Promise.all([
      waiting.post("/v1/sessions/w/messages", { content: "One?", ...GREEDY }),
      waiting.post("/v1/sessions/w/messages", { content: "Two?", ...GREEDY }),
    ]);
    expect([r1.status, r2.status]).toEqual([200, 200]);
    const info = (await (await waiting.app.request("/v1/sessions/w")).json()) as any;
    expect(info.messages).toBe(4); // user, assistant, user, assistant: one turn after the other

    const rejecting = sessionApp(engine, { busy: "reject" });
    await rejecting.post("/v1/sessions", { id: "r", chat_template_kwargs: DATE });
    const long = rejecting.post("/v1/sessions/r/messages", { content: "Long?", max_tokens: 300, ignore_eos: true, temperature: 0 });
    await Bun.sleep(30);
    const refused = await rejecting.post("/v1/sessions/r/messages", { content: "Now?", ...GREEDY });
    expect(refused.status).toBe(409);
    expect(((await refused.json()) as any).error.code).toBe("session_busy");
    expect((await long).status).toBe(200);
    expect((await rejecting.post("/v1/sessions/r/messages", { content: "Now?", ...GREEDY })).status).toBe(200);
  });

  test("errors: unknown session 404, duplicate id 400, bad id 400, delete", async () => {
    const { app, post } = sessionApp(engine);
    expect((await app.request("/v1/sessions/nope")).status).toBe(404);
    expect((await post("/v1/sessions/nope/messages", { content: "x" })).status).toBe(404);
    expect((await app.request("/v1/sessions/nope/snapshot")).status).toBe(404);
    expect((await post("/v1/sessions", { id: "dup" })).status).toBe(201);
    expect((await post("/v1/sessions", { id: "dup" })).status).toBe(400);
    expect((await post("/v1/sessions", { id: "../../etc" })).status).toBe(400);
    expect((await post("/v1/chat/completions", { session_id: "nope", messages: [{ role: "user", content: "x" }] })).status).toBe(404);
    const del = await app.request("/v1/sessions/dup", { method: "DELETE" });
    expect(await del.json()).toEqual({ id: "dup", object: "session.deleted", deleted: true });
    expect((await app.request("/v1/sessions/dup")).status).toBe(404);
    expect((await app.request("/v1/sessions/dup", { method: "DELETE" })).status).toBe(404);
  });
});
