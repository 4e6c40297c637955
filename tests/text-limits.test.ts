/**
 * Text limits at the HTTP edge, on the real engine through app.request(): every text field of every route
 * is held to the per-field and per-run limits before anything is tokenized, and the rendered text of a
 * request (a session's whole conversation included) to the per-request limit; each refusal is a 400
 * that names the field and the limit. Large /tokenize and /detokenize answers equal the tokenizer's own.
 */
import { describe, expect, test } from "bun:test";
import { sharedEngine } from "./helpers/model.ts";
import { sessionApp } from "./helpers/sessions.ts";

const LIMITS = { maxFieldChars: 20_000, maxPromptChars: 30_000, maxRunChars: 300 };
const engine = await sharedEngine({ textLimits: LIMITS });
const { app, post } = sessionApp(engine);

async function refused(res: Response, param: string, limit: number) {
  expect(res.status).toBe(400);
  const { error } = (await res.json()) as { error: { message: string; param: string; type: string } };
  expect(error.type).toBe("invalid_request_error");
  expect(error.param).toBe(param);
  expect(error.message).toContain(param);
  expect(error.message).toContain(String(limit));
}

const long = "Waves broke on the long grey shingle of the bay. ".repeat(500); // 24.5K chars: over the field limit
const word = `Then ${"x".repeat(400)} ends.`; // a 400-character run: over the run limit

describe("text limits", () => {
  test("a field over max-field-chars or with a run over max-run-chars is refused by name, on every route", async () => {
    const user = (content: string) => ({ messages: [{ role: "user", content }], max_tokens: 1 });
    await refused(await post("/v1/chat/completions", user(long)), "messages.0.content", LIMITS.maxFieldChars);
    await refused(await post("/v1/chat/completions", user(word)), "messages.0.content", LIMITS.maxRunChars);
    await refused(
      await post("/v1/chat/completions", { messages: [{ role: "system", content: "Be brief." }, { role: "user", content: [{ type: "text", text: word }] }] }),
      "messages.1.content.0.text",
      LIMITS.maxRunChars,
    );
    const tools = [{ type: "function", function: { name: "lookup", description: word } }];
    await refused(await post("/v1/chat/completions", { ...user("Hi"), tools }), "tools.0.function.description", LIMITS.maxRunChars);
    await refused(await post("/v1/completions", { prompt: long, max_tokens: 1 }), "prompt", LIMITS.maxFieldChars);
    await refused(await post("/tokenize", { content: word }), "content", LIMITS.maxRunChars);
    await refused(await post("/apply-template", { messages: [{ role: "user", content: long }] }), "messages.0.content", LIMITS.maxFieldChars);
    await refused(await post("/v1/sessions", { id: "limits-doc", document: long }), "document", LIMITS.maxFieldChars);
    expect((await post("/v1/sessions", { id: "limits-doc" })).status).toBe(201);
    await refused(await post("/v1/sessions/limits-doc/append", { text: word }), "text", LIMITS.maxRunChars);
    await refused(await post("/v1/sessions/limits-doc/messages", { content: word, max_tokens: 1 }), "content", LIMITS.maxRunChars);
  }, 60_000);

  test("the rendered text of one request is held to max-prompt-chars: a session stops growing there", async () => {
    const part = "Waves broke on the long grey shingle of the bay. ".repeat(300); // 14.7K chars, under the field limit
    expect((await post("/v1/sessions", { id: "limits-grow", document: part })).status).toBe(201);
    // The whole conversation (two parts plus the template) passes 30K characters: refused, the session unchanged.
    const second = await post("/v1/sessions/limits-grow/append", { text: `${part}${part.slice(0, 1000)}` });
    await refused(second, "messages", LIMITS.maxPromptChars);
    const after = (await (await app.request("/v1/sessions/limits-grow")).json()) as { messages: number };
    expect(after.messages).toBe(1);
    await refused(await post("/v1/chat/completions", { messages: [{ role: "user", content: part }, { role: "user", content: `${part}${part.slice(0, 1000)}` }], max_tokens: 1 }), "messages", LIMITS.maxPromptChars);
  }, 60_000);

  test("text within the limits is served; /tokenize (with pieces) and /detokenize of a long text equal the tokenizer's own", async () => {
    const text = "Grüße, 世界! The year is 2024.\n\tTabs and  spaces. ".repeat(350); // 17K chars, many slices
    const tokens = ((await (await post("/tokenize", { content: text, add_special: true })).json()) as { tokens: number[] }).tokens;
    expect(tokens).toEqual(engine.tokenizer.encode(text, true));
    const pieces = ((await (await post("/tokenize", { content: text, with_pieces: true })).json()) as { tokens: { id: number; piece: string }[] }).tokens;
    expect(pieces.map((p) => p.id)).toEqual(engine.tokenizer.encode(text));
    expect(pieces.slice(0, 5).map((p) => p.piece)).toEqual(engine.tokenizer.encode(text).slice(0, 5).map((id) => engine.tokenizer.decode([id])));
    const many = Array.from({ length: 200_000 }, (_, i) => tokens[i % tokens.length]!);
    const detok = (await (await post("/detokenize", { tokens: many })).json()) as { content: string };
    expect(detok.content).toBe(engine.tokenizer.decode(many));
    const chat = await post("/v1/chat/completions", { messages: [{ role: "user", content: `A ${"y".repeat(290)} z` }], max_tokens: 2 });
    expect(chat.status).toBe(200);
  }, 60_000);
});
