/**
 * Real HTTP: the app behind Bun.serve on a loopback port, driven by the official `openai` npm client and
 * by fetch. Checks what only a socket shows: streamed chunks arrive while generation runs, and a client
 * that hangs up stops its generation.
 */
import { afterAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { createApp } from "../src/app.ts";
import { sharedEngine } from "./helpers/model.ts";

const engine = await sharedEngine();
const app = createApp({ engine, maxBodyBytes: 1024 * 1024, log: () => {} });
const server = Bun.serve({ fetch: app.fetch, hostname: "127.0.0.1", port: 0, idleTimeout: 0 });
const base = `http://127.0.0.1:${server.port}`;
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "unused", maxRetries: 0 });
afterAll(() => server.stop(true));

const MODEL = engine.info.modelId;
const messages = [{ role: "user" as const, content: "Name three colours of the sea." }];

describe("openai npm client against the running server", () => {
  test("models.list", async () => {
    const ids: string[] = [];
    for await (const model of client.models.list()) ids.push(model.id);
    expect(ids).toEqual([MODEL]);
  });

  test("chat.completions.create, non-streaming", async () => {
    const completion = await client.chat.completions.create({ model: MODEL, messages, max_tokens: 10, temperature: 0 });
    expect(completion.object).toBe("chat.completion");
    expect(completion.choices[0]!.message.role).toBe("assistant");
    expect(completion.choices[0]!.message.content!.length).toBeGreaterThan(0);
    expect(completion.usage!.completion_tokens).toBeGreaterThan(0);
  });

  test("chat.completions.create, streaming, gives the same text and usage", async () => {
    const plain = await client.chat.completions.create({ model: MODEL, messages, max_tokens: 10, temperature: 0 });
    const stream = await client.chat.completions.create({
      model: MODEL,
      messages,
      max_tokens: 10,
      temperature: 0,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let finish: string | null = null;
    let usage: OpenAI.CompletionUsage | undefined;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta?.content ?? "";
      finish = chunk.choices[0]?.finish_reason ?? finish;
      usage = chunk.usage ?? usage;
    }
    expect(text).toBe(plain.choices[0]!.message.content!);
    expect(finish).toBe(plain.choices[0]!.finish_reason);
    expect(usage).toEqual(plain.usage);
  });

  test("errors surface as the client's typed errors", async () => {
    const notFound = await client.chat.completions.create({ model: "gpt-4o", messages, max_tokens: 1 }).catch((e: unknown) => e);
    expect(notFound).toBeInstanceOf(OpenAI.NotFoundError);
    const bad = await client.chat.completions.create({ model: MODEL, messages: [], max_tokens: 1 }).catch((e: unknown) => e);
    expect(bad).toBeInstanceOf(OpenAI.BadRequestError);
  });

  test("completions.create (legacy completions)", async () => {
    const completion = await client.completions.create({ model: MODEL, prompt: "Once upon a time", max_tokens: 5, temperature: 0 });
    expect(completion.choices[0]!.text.length).toBeGreaterThan(0);
    expect(completion.usage!.completion_tokens).toBe(5);
  });
});

describe("over a socket", () => {
  test("stream chunks arrive while the generation is still running", async () => {
    const res = await fetch(`${base}/v1/chat/completions`, {
      method: "POST",
      body: JSON.stringify({ messages, max_tokens: 400, ignore_eos: true, temperature: 0, stream: true }),
    });
    const reader = res.body!.getReader();
    let received = "";
    while (!received.includes('"content":"') || received.split("\n\n").length < 5) {
      const { value, done } = await reader.read();
      expect(done).toBe(false);
      received += new TextDecoder().decode(value);
    }
    // Several content chunks are here and the engine is still busy with the same request.
    expect(engine.queueState.busy).toBe(true);
    await reader.cancel();
  });

  test("a non-streaming client that hangs up cancels its generation", async () => {
    while (engine.queueState.busy) await Bun.sleep(5); // let an earlier cancelled request finish leaving
    const before = { ...engine.metrics };
    const abort = new AbortController();
    const pending = fetch(`${base}/v1/chat/completions`, {
      method: "POST",
      body: JSON.stringify({ messages, max_tokens: 3500, ignore_eos: true, temperature: 0 }),
      signal: abort.signal,
    }).catch((e: unknown) => e);
    while (!engine.queueState.busy) await Bun.sleep(5);
    await Bun.sleep(50);
    abort.abort();
    expect(await pending).toBeInstanceOf(Error);
    while (engine.queueState.busy) await Bun.sleep(5);
    // The cancelled request produced far fewer than its 3500 tokens, and the server still answers.
    expect(engine.metrics.cancelled).toBe(before.cancelled + 1);
    const generated = engine.metrics.completionTokens - before.completionTokens;
    expect(generated).toBeGreaterThan(0);
    expect(generated).toBeLessThan(1500);
    const after = await client.chat.completions.create({ model: MODEL, messages, max_tokens: 2 });
    expect(after.choices).toHaveLength(1);
  });
});
