/**
 * The HTTP app on the real engine, through Hono's app.request(): OpenAI and llama.cpp routes, the
 * response formats, bad input with OpenAI error JSON and the right status, queueing and cancellation.
 */
import { describe, expect, test } from "bun:test";
import { createApp } from "../src/app.ts";
import { sharedEngine } from "./helpers/model.ts";
import { readSse, sseJson } from "./helpers/sse.ts";

const engine = await sharedEngine();
const app = createApp({ engine, maxBodyBytes: 64 * 1024, log: () => {} });
const MODEL = engine.info.modelId;

const post = (path: string, body: unknown, init: RequestInit = {}) =>
  app.request(path, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: typeof body === "string" ? body : JSON.stringify(body),
    ...init,
  });
const chat = (extra: Record<string, unknown> = {}) => ({
  model: MODEL,
  messages: [{ role: "user", content: "Tell me about the ocean." }],
  max_tokens: 8,
  temperature: 0,
  ...extra,
});

async function expectError(res: Response, status: number, param?: string | null) {
  expect(res.status).toBe(status);
  const body = (await res.json()) as { error: { message: string; type: string; param: string | null; code: string | null } };
  expect(typeof body.error.message).toBe("string");
  expect(body.error.message.length).toBeGreaterThan(0);
  expect(typeof body.error.type).toBe("string");
  if (param !== undefined) expect(body.error.param).toBe(param);
  expect(JSON.stringify(body)).not.toContain("    at "); // no stack traces
  return body.error;
}

async function stillServing() {
  const res = await post("/v1/chat/completions", chat({ max_tokens: 2 }));
  expect(res.status).toBe(200);
}

describe("OpenAI routes", () => {
  test("POST /v1/chat/completions (non-stream) returns a chat.completion with usage", async () => {
    const res = await post("/v1/chat/completions", chat());
    expect(res.status).toBe(200);
    const body = (await res.json()) as any;
    expect(body.object).toBe("chat.completion");
    expect(body.id).toMatch(/^chatcmpl-/);
    expect(body.model).toBe(MODEL);
    expect(body.choices).toHaveLength(1);
    expect(body.choices[0].message.role).toBe("assistant");
    expect(typeof body.choices[0].message.content).toBe("string");
    expect(["stop", "length"]).toContain(body.choices[0].finish_reason);
    const promptTokens = (await engine.encodeChat([{ role: "user", content: "Tell me about the ocean." }])).length;
    expect(body.usage.prompt_tokens).toBe(promptTokens);
    expect(body.usage.completion_tokens).toBeLessThanOrEqual(8);
    expect(body.usage.total_tokens).toBe(body.usage.prompt_tokens + body.usage.completion_tokens);
  });

  test("stream: role chunk, content chunks, finish chunk, usage chunk, [DONE]; same text as non-stream", async () => {
    const plain = (await (await post("/v1/chat/completions", chat({ max_tokens: 12 }))).json()) as any;
    const res = await post("/v1/chat/completions", chat({ max_tokens: 12, stream: true, stream_options: { include_usage: true } }));
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/event-stream");
    const events = await readSse(res);
    expect(events.at(-1)).toBe("[DONE]");
    const chunks = sseJson(events);
    expect(chunks[0]!.choices[0].delta).toEqual({ role: "assistant", content: "" });
    for (const c of chunks) expect(c.object).toBe("chat.completion.chunk");
    const finish = chunks.at(-2)!;
    expect(finish.choices[0].finish_reason).toBe(plain.choices[0].finish_reason);
    const usage = chunks.at(-1)!;
    expect(usage.choices).toEqual([]);
    expect(usage.usage).toEqual(plain.usage);
    const text = chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("");
    expect(text).toBe(plain.choices[0].message.content);
  });

  test("POST /v1/completions, plain and streaming, with a raw prompt and with token ids", async () => {
    const res = await post("/v1/completions", { model: MODEL, prompt: "The sea is", max_tokens: 6, temperature: 0 });
    expect(res.status).toBe(200);
    const body = (await res.json()) as any;
    expect(body.object).toBe("text_completion");
    expect(body.usage.prompt_tokens).toBe((await engine.encodePrompt("The sea is")).length);
    expect(body.usage.prompt_tokens).toBe(4); // BOS + 3 tokens
    const ids = await post("/v1/completions", { prompt: await engine.encodePrompt("The sea is"), max_tokens: 6, temperature: 0 });
    expect(((await ids.json()) as any).choices[0].text).toBe(body.choices[0].text);
    const stream = await post("/v1/completions", { prompt: "The sea is", max_tokens: 6, temperature: 0, stream: true });
    const events = await readSse(stream);
    expect(events.at(-1)).toBe("[DONE]");
    expect(sseJson(events).map((c) => c.choices[0].text).join("")).toBe(body.choices[0].text);
  });

  test("GET /v1/models and /v1/models/:id", async () => {
    const list = (await (await app.request("/v1/models")).json()) as any;
    expect(list.object).toBe("list");
    expect(list.data.map((m: any) => m.id)).toEqual([MODEL]);
    expect((await app.request(`/v1/models/${MODEL}`)).status).toBe(200);
    await expectError(await app.request("/v1/models/gpt-4"), 404, "model");
  });

  test("tools are rendered into the prompt the model sees (same ids as /apply-template)", async () => {
    const tools = [{ type: "function", function: { name: "get_weather", parameters: { type: "object", properties: {} } } }];
    const messages = [{ role: "user", content: "Weather?" }];
    const kwargs = { date_string: "26 Jul 2024" };
    const res = await post("/apply-template", { messages, tools, chat_template_kwargs: kwargs });
    const { prompt } = (await res.json()) as { prompt: string };
    expect(prompt).toContain('"name": "get_weather"');
    const withTools = await post("/v1/chat/completions", chat({ messages, tools, chat_template_kwargs: kwargs, max_tokens: 4 }));
    expect(withTools.status).toBe(200);
    expect(((await withTools.json()) as any).usage.prompt_tokens).toBe(engine.tokenizer.encode(prompt, false, true).length);
    // tool_choice "none" leaves the tools out of the prompt.
    const none = await post("/v1/chat/completions", chat({ messages, tools, tool_choice: "none", chat_template_kwargs: kwargs, max_tokens: 4 }));
    const plainPrompt = engine.renderChat(messages, { extra: kwargs });
    expect(((await none.json()) as any).usage.prompt_tokens).toBe(engine.tokenizer.encode(plainPrompt, false, true).length);
  });
});

describe("llama.cpp extras", () => {
  test("/tokenize, /detokenize, /apply-template, /health, /metrics", async () => {
    const tok = (await (await post("/tokenize", { content: "Hello world" })).json()) as any;
    expect(tok.tokens).toEqual([9906, 1917]);
    const withBos = (await (await post("/tokenize", { content: "Hello world", add_special: true, with_pieces: true })).json()) as any;
    expect(withBos.tokens).toEqual([
      { id: 128000, piece: "<|begin_of_text|>" },
      { id: 9906, piece: "Hello" },
      { id: 1917, piece: " world" },
    ]);
    const detok = (await (await post("/detokenize", { tokens: [9906, 1917] })).json()) as any;
    expect(detok.content).toBe("Hello world");
    await expectError(await post("/detokenize", { tokens: [999999] }), 400, "tokens");
    const tpl = (await (await post("/apply-template", { messages: [{ role: "user", content: "Hi" }], chat_template_kwargs: { date_string: "26 Jul 2024" } })).json()) as any;
    expect(tpl.prompt).toBe(
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>" +
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
    );
    const health = (await (await app.request("/health")).json()) as any;
    expect(health).toMatchObject({ status: "ok", model: MODEL, backend: "wasm" });
    const metrics = await (await app.request("/metrics")).text();
    expect(metrics).toMatch(/^llamacpp:tokens_predicted_total \d+$/m);
  });
});

describe("bad input gets OpenAI error JSON with its 4xx, and the server goes on serving", () => {
  test("malformed JSON -> 400", async () => {
    const err = await expectError(await post("/v1/chat/completions", '{"messages": [ {"role": "user"'), 400, null);
    expect(err.code).toBe("invalid_json");
    await stillServing();
  });

  test("wrong types -> 400 naming the field", async () => {
    await expectError(await post("/v1/chat/completions", chat({ messages: "hello" })), 400, "messages");
    await expectError(await post("/v1/chat/completions", chat({ temperature: "hot" })), 400, "temperature");
    await expectError(await post("/v1/chat/completions", chat({ messages: [{ role: "wizard", content: "x" }] })), 400, "messages.0.role");
    await expectError(await post("/v1/chat/completions", chat({ stream: "yes" })), 400, "stream");
    await expectError(await post("/v1/completions", { prompt: 42 }), 400, "prompt");
    await stillServing();
  });

  test("empty messages -> 400", async () => {
    const err = await expectError(await post("/v1/chat/completions", chat({ messages: [] })), 400, "messages");
    expect(err.message).toBe("messages: at least 1 message");
    await stillServing();
  });

  test("negative, zero, fractional or absurd max_tokens -> 400", async () => {
    for (const max_tokens of [-1, 0, 2.5, 1e12]) {
      await expectError(await post("/v1/chat/completions", chat({ max_tokens })), 400, "max_tokens");
    }
    // Within the schema's range but beyond this model's context.
    const err = await expectError(await post("/v1/chat/completions", chat({ max_tokens: 1_000_000 })), 400, "max_tokens");
    expect(err.message).toContain("context");
    await stillServing();
  });

  test("options out of range are refused by name: n > 16, top_logprobs > 20, logprobs not a boolean (see logprobs.test.ts)", async () => {
    await expectError(await post("/v1/chat/completions", chat({ n: 17 })), 400, "n");
    await expectError(await post("/v1/chat/completions", chat({ logprobs: true, top_logprobs: 21 })), 400, "top_logprobs");
    await expectError(await post("/v1/chat/completions", chat({ logprobs: 2 })), 400, "logprobs");
    await stillServing();
  });

  test("oversize body -> 413", async () => {
    const huge = chat({ messages: [{ role: "user", content: "x".repeat(100 * 1024) }] });
    const err = await expectError(await post("/v1/chat/completions", huge), 413);
    expect(err.code).toBe("request_too_large");
    await stillServing();
  });

  test("unknown model -> 404 model_not_found; unknown route -> 404", async () => {
    const err = await expectError(await post("/v1/chat/completions", chat({ model: "gpt-4o" })), 404, "model");
    expect(err.code).toBe("model_not_found");
    await expectError(await app.request("/v1/nothing-here"), 404);
    await expectError(await post("/v1/embeddings", { input: "x" }), 404);
    await stillServing();
  });

  test("a prompt beyond the context -> 400", async () => {
    const res = await post("/v1/completions", { prompt: "word ".repeat(5000), max_tokens: 1 });
    const err = await expectError(res, 400);
    expect(err.message).toContain("context holds");
    await stillServing();
  });
});

describe("queueing and cancellation", () => {
  test("requests beyond the queue limit get 429 while one runs; the queue drains afterwards", async () => {
    const small = createApp({ engine: await sharedEngine({ queueLimit: 1 }), maxBodyBytes: 64 * 1024, log: () => {} });
    const req = (max: number, signal?: AbortSignal) =>
      small.request("/v1/chat/completions", { method: "POST", body: JSON.stringify(chat({ max_tokens: max, ignore_eos: true, stream: true })), signal });
    const abort = new AbortController();
    const running = await req(4000, abort.signal);
    const reader = running.body!.getReader();
    await reader.read(); // first chunk: generation is under way
    const waiting = req(2); // queued (limit 1)
    await Bun.sleep(20);
    const refused = await req(2);
    const err = await expectError(refused, 429);
    expect(err.code).toBe("queue_full");
    abort.abort();
    await reader.cancel();
    const done = await waiting;
    expect(done.status).toBe(200);
    expect((await readSse(done)).at(-1)).toBe("[DONE]");
  });

  test("a streaming client that goes away cancels its generation", async () => {
    while (engine.queueState.busy) await Bun.sleep(5); // let an earlier cancelled request finish leaving
    const before = { ...engine.metrics };
    const res = await post("/v1/chat/completions", chat({ max_tokens: 3000, ignore_eos: true, stream: true }));
    const reader = res.body!.getReader();
    await reader.read();
    await reader.read();
    await reader.cancel();
    await Bun.sleep(200);
    await stillServing(); // it had to wait for the cancelled job to leave the queue
    expect(engine.metrics.cancelled).toBe(before.cancelled + 1);
    const generated = engine.metrics.completionTokens - before.completionTokens - 2; // minus stillServing's 2
    expect(generated).toBeGreaterThan(0);
    expect(generated).toBeLessThan(1000);
  });
});

describe("auth", () => {
  test("with an API key, routes need the bearer token; /health does not", async () => {
    const secured = createApp({ engine, maxBodyBytes: 64 * 1024, apiKey: "sk-test", log: () => {} });
    const err = await expectError(await secured.request("/v1/models"), 401);
    expect(err.code).toBe("invalid_api_key");
    expect((await secured.request("/v1/models", { headers: { authorization: "Bearer sk-test" } })).status).toBe(200);
    expect((await secured.request("/health")).status).toBe(200);
  });
});

describe("internal errors", () => {
  test("an unexpected error is a 500 in OpenAI's shape, without its message or stack; the log gets both", async () => {
    const { toErrorResponse } = await import("../src/http-errors.ts");
    const logged: string[] = [];
    const error = new Error("secret: /srv/models/private path");
    const { status, body } = toErrorResponse(error, (m) => logged.push(m));
    expect(status).toBe(500);
    expect(body.error).toEqual({ message: "internal server error", type: "server_error", param: null, code: "internal_error" });
    expect(JSON.stringify(body)).not.toContain("secret");
    expect(logged.join("\n")).toContain("secret: /srv/models/private path");
    expect(logged.join("\n")).toContain("http.test.ts"); // the stack
  });
});
