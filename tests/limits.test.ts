/**
 * Limits at the HTTP edge: validation messages that name the field and the limit, logit_bias ids
 * outside the vocabulary, nesting depth of free-form JSON fields, internal errors (a stack overflow)
 * that never reach a client, and requests cancelled while queued counted in /metrics.
 */
import { describe, expect, test } from "bun:test";
import { createApp } from "../src/app.ts";
import { toErrorResponse } from "../src/http-errors.ts";
import { MAX_JSON_DEPTH, nestedDeeperThan } from "../src/schemas.ts";
import { RuntimeError } from "../runtime/index.ts";
import { sharedEngine } from "./helpers/model.ts";
import { sessionApp } from "./helpers/sessions.ts";

const engine = await sharedEngine();
const app = createApp({ engine, maxBodyBytes: 4 * 1024 * 1024, log: () => {} });
const post = (path: string, body: unknown) =>
  app.request(path, { method: "POST", headers: { "content-type": "application/json" }, body: typeof body === "string" ? body : JSON.stringify(body) });
const user = [{ role: "user", content: "Hi" }];
const chat = (extra: Record<string, unknown>) => ({ messages: user, max_tokens: 2, temperature: 0, ...extra });

async function refused(res: Response, param: string, status = 400): Promise<string> {
  const text = await res.text();
  expect(res.status).toBe(status);
  const body = JSON.parse(text) as { error: { message: string; param: string | null; type: string } };
  expect(body.error.param).toBe(param);
  expect(body.error.type).toBe("invalid_request_error");
  expect(text).not.toMatch(/call stack|RangeError|    at /);
  return body.error.message;
}

/** `levels` nested arrays around `inner`: nest(2, 1) = [[1]]. */
const nest = (levels: number, inner = "1") => "[".repeat(levels) + inner + "]".repeat(levels);

describe("validation messages name the field and the limit", () => {
  const cases: [string, Record<string, unknown>, string, string][] = [
    ["/v1/chat/completions", chat({ stop: Array.from({ length: 17 }, (_, i) => `s${i}`) }), "stop", "stop: at most 16 strings"],
    ["/v1/chat/completions", chat({ temperature: 3 }), "temperature", "temperature: at most 2"],
    ["/v1/chat/completions", chat({ top_p: 0 }), "top_p", "top_p: greater than 0"],
    ["/v1/chat/completions", chat({ frequency_penalty: -2.5 }), "frequency_penalty", "frequency_penalty: at least -2"],
    ["/v1/chat/completions", chat({ messages: [] }), "messages", "messages: at least 1 message"],
    ["/v1/chat/completions", chat({ max_tokens: 2.5 }), "max_tokens", "max_tokens: expected an integer, got a number"],
    ["/v1/chat/completions", chat({ max_tokens: 2 ** 31 }), "max_tokens", "max_tokens: at most 1073741824"],
    ["/v1/chat/completions", chat({ temperature: "hot" }), "temperature", "temperature: expected a number, got a string"],
    ["/v1/chat/completions", chat({ stop: 5 }), "stop", "stop: expected a string or an array, got a number"],
    ["/v1/chat/completions", { max_tokens: 2 }, "messages", "messages: required (an array)"],
    ["/v1/chat/completions", chat({ messages: [{ role: "wizard", content: "x" }] }), "messages.0.role", 'messages.0.role: must be one of "system", "developer", "user"'],
    ["/v1/chat/completions", chat({ tools: [{ type: "function", function: { name: "" } }] }), "tools.0.function.name", "tools.0.function.name: at least 1 character"],
    ["/v1/completions", { prompt: [], max_tokens: 1 }, "prompt", "prompt: at least 1 item"],
    ["/v1/chat/completions", chat({ n: 17 }), "n", "n: at most 16"],
  ];
  for (const [path, body, param, message] of cases) {
    test(message, async () => {
      expect(await refused(await post(path, body), param)).toStartWith(message);
    });
  }
});

describe("logit_bias ids outside the vocabulary are refused by name", () => {
  const outside = String(engine.info.vocabSize);
  test("chat completions and completions", async () => {
    for (const [path, body] of [
      ["/v1/chat/completions", chat({ logit_bias: { "1": 5, [outside]: 5 } })],
      ["/v1/completions", { prompt: "Hi", max_tokens: 1, logit_bias: { "99999999999": -100 } }],
    ] as const) {
      const message = await refused(await post(path, body), "logit_bias");
      expect(message).toMatch(/^logit_bias: token id \d+ is outside the vocabulary \(0\.\.128255\)/);
    }
    // The last id of the vocabulary is fine.
    expect((await post("/v1/chat/completions", chat({ logit_bias: { [String(engine.info.vocabSize - 1)]: 5 } }))).status).toBe(200);
  });

  test("session messages and chat completions continuing a session", async () => {
    const s = sessionApp(engine);
    expect((await s.post("/v1/sessions", { id: "lb", system: "Be brief." })).status).toBe(201);
    const bad = { logit_bias: { [outside]: 1 } };
    await refused(await s.post("/v1/sessions/lb/messages", { content: "Hi", max_tokens: 1, ...bad }), "logit_bias");
    await refused(await s.post("/v1/chat/completions", { session_id: "lb", messages: user, max_tokens: 1, ...bad }), "logit_bias");
    expect((await s.post("/v1/sessions/lb/messages", { content: "Hi", max_tokens: 1, logit_bias: { "1": 1 } })).status).toBe(200);
  });
});

describe("nesting depth of free-form JSON fields", () => {
  test("nestedDeeperThan counts levels of arrays and objects, and stops early", () => {
    expect(nestedDeeperThan(1, 0)).toBe(false);
    expect(nestedDeeperThan([], 0)).toBe(true);
    expect(nestedDeeperThan({ a: [1, { b: 2 }] }, 3)).toBe(false);
    expect(nestedDeeperThan({ a: [1, { b: {} }] }, 3)).toBe(true);
    expect(nestedDeeperThan(JSON.parse(nest(MAX_JSON_DEPTH)), MAX_JSON_DEPTH)).toBe(false);
    expect(nestedDeeperThan(JSON.parse(nest(MAX_JSON_DEPTH + 1)), MAX_JSON_DEPTH)).toBe(true);
    expect(nestedDeeperThan(JSON.parse(nest(200_000)), MAX_JSON_DEPTH)).toBe(true);
  });

  test(`${MAX_JSON_DEPTH} levels are accepted, ${MAX_JSON_DEPTH + 1} refused naming the field`, async () => {
    // chat_template_kwargs is itself one level.
    const kwargs = (levels: number) => `{"date_string":"26 Jul 2024","x":${nest(levels - 1)}}`;
    const template = (k: string) => `{"messages":[{"role":"user","content":"Hi"}],"chat_template_kwargs":${k}}`;
    expect((await post("/apply-template", template(kwargs(MAX_JSON_DEPTH)))).status).toBe(200);
    const message = await refused(await post("/apply-template", template(kwargs(MAX_JSON_DEPTH + 1))), "chat_template_kwargs");
    expect(message).toBe(`chat_template_kwargs: at most ${MAX_JSON_DEPTH} levels of nesting`);
  });

  const deep = nest(100_000);
  const toolCall = (args: string) =>
    `{"messages":[{"role":"user","content":"Hi"},{"role":"assistant","content":null,"tool_calls":[{"function":{"name":"f","arguments":${args}}}]}],"max_tokens":1}`;
  const cases: [string, string, string][] = [
    ["chat_template_kwargs", `{"messages":[{"role":"user","content":"Hi"}],"max_tokens":1,"chat_template_kwargs":{"a":${deep}}}`, "chat_template_kwargs"],
    ["tool parameters", `{"messages":[{"role":"user","content":"Hi"}],"max_tokens":1,"tools":[{"type":"function","function":{"name":"f","parameters":{"a":${deep}}}}]}`, "tools.0.function.parameters"],
    ["tool-call arguments (object)", toolCall(`{"a":${deep}}`), "messages.1.tool_calls.0.function.arguments"],
    ["tool-call arguments (JSON string)", toolCall(JSON.stringify(`{"a":${deep}}`)), "messages.1.tool_calls.0.function.arguments"],
  ];
  for (const [label, body, param] of cases) {
    test(`100,000 levels in ${label}: 400 naming it, no stack overflow message`, async () => {
      for (const path of ["/v1/chat/completions", "/apply-template"]) {
        expect(await refused(await post(path, body), param)).toBe(`${param}: at most ${MAX_JSON_DEPTH} levels of nesting`);
      }
    });
  }

  test("sessions: chat_template_kwargs on create, tools on a message", async () => {
    const s = sessionApp(engine);
    await refused(await s.post("/v1/sessions", JSON.parse(`{"id":"d","chat_template_kwargs":{"a":${nest(40)}}}`)), "chat_template_kwargs");
    expect((await s.post("/v1/sessions", { id: "d", system: "x" })).status).toBe(201);
    const tools = JSON.parse(`[{"type":"function","function":{"name":"f","parameters":{"a":${nest(40)}}}}]`);
    await refused(await s.post("/v1/sessions/d/messages", { content: "Hi", max_tokens: 1, tools }), "tools.0.function.parameters");
  });
});

describe("internal errors never reach a client", () => {
  test("a stack overflow while rendering is an internal error, not a client message", () => {
    // Past the schemas (a caller of the runtime): the renderer overflows; the error must not become a 400 echoing it.
    let thrown: unknown;
    try {
      engine.renderChat(user, { extra: { a: JSON.parse(nest(100_000)) } });
    } catch (e) {
      thrown = e;
    }
    expect(thrown).toBeInstanceOf(RangeError);
    expect(thrown).not.toBeInstanceOf(RuntimeError);
    const logged: string[] = [];
    const { status, body } = toErrorResponse(thrown, (m) => logged.push(m));
    expect(status).toBe(500);
    expect(body.error.message).toBe("internal server error");
    expect(logged.join("")).toContain("RangeError");
  });
});

describe("requests cancelled while queued are counted in /metrics", () => {
  test("a request aborted while it waits behind a long one", async () => {
    const queued = createApp({ engine: await sharedEngine({ queueLimit: 4 }), maxBodyBytes: 64 * 1024, log: () => {} });
    const metric = async (name: string) => Number(new RegExp(`^${name} (\\d+)$`, "m").exec(await (await queued.request("/metrics")).text())?.[1]);
    const before = { queued: await metric("llamacpp:requests_cancelled_queued_total"), total: await metric("llamacpp:requests_total") };
    expect(before.queued).toBeGreaterThanOrEqual(0);
    const request = (max: number, signal: AbortSignal) =>
      queued.request("/v1/chat/completions", { method: "POST", body: JSON.stringify(chat({ max_tokens: max, ignore_eos: true, stream: true })), signal });
    const long = new AbortController();
    const running = await request(4000, long.signal);
    const reader = running.body!.getReader();
    await reader.read(); // generation under way
    const waiter = new AbortController();
    const waiting = request(2, waiter.signal);
    // It waits in the queue: the stream committed to 200, its job has not started.
    while ((await (await queued.request("/health")).json() as { queue: { waiting: number } }).queue.waiting < 1) await Bun.sleep(5);
    waiter.abort();
    await (await waiting).text().catch(() => "");
    while ((await metric("llamacpp:requests_cancelled_queued_total")) === before.queued) await Bun.sleep(5);
    expect(await metric("llamacpp:requests_cancelled_queued_total")).toBe(before.queued + 1);
    long.abort();
    await reader.cancel();
    const engine4 = await sharedEngine({ queueLimit: 4 });
    while (engine4.queueState.busy) await Bun.sleep(5);
    // The long one ran (cancelled mid-way); the queued one never did.
    expect(await metric("llamacpp:requests_total")).toBe(before.total + 1);
    expect(await metric("llamacpp:requests_cancelled_queued_total")).toBe(before.queued + 1);
  }, 60_000);
});
