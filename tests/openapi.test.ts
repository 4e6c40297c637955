/**
 * The OpenAPI document (/openapi.json) and the reference page (/docs): every route the app registers is
 * documented (and nothing else), every example request validates against the zod schema the route parses
 * with, every $ref resolves, and the examples, run against the real app, get answers that the document's
 * response schemas describe (no undocumented fields). Both routes answer without an API key; the page
 * loads nothing from elsewhere.
 */
import { describe, expect, test } from "bun:test";
import type { Hono } from "hono";
import { createApp } from "../src/app.ts";
import { appRoutes, openApiPath, requestSchemas } from "../src/openapi.ts";
import { responseSchemas } from "../src/response-schemas.ts";
import { sharedEngine } from "./helpers/model.ts";
import { sessionApp } from "./helpers/sessions.ts";
import { readSse } from "./helpers/sse.ts";

const engine = await sharedEngine();
type Json = Record<string, any>;

async function documentOf(app: Hono): Promise<Json> {
  const res = await app.request("/openapi.json");
  expect(res.status).toBe(200);
  expect(res.headers.get("content-type")).toContain("application/json");
  return (await res.json()) as Json;
}

const METHODS = ["get", "put", "post", "delete", "patch", "head", "options"];
const operationsOf = (doc: Json) =>
  Object.entries(doc.paths as Json).flatMap(([path, item]) =>
    Object.entries(item as Json)
      .filter(([method]) => METHODS.includes(method))
      .map(([method, op]) => ({ path, method, op: op as Json })),
  );

const refName = (ref: string) => {
  expect(ref.startsWith("#/components/schemas/")).toBe(true);
  return ref.slice("#/components/schemas/".length);
};

/** Every "$ref" anywhere in a JSON value. */
function refsIn(value: unknown, out: string[] = []): string[] {
  if (Array.isArray(value)) value.forEach((v) => refsIn(v, out));
  else if (value !== null && typeof value === "object") {
    for (const [k, v] of Object.entries(value)) {
      if (k === "$ref" && typeof v === "string") out.push(v);
      else refsIn(v, out);
    }
  }
  return out;
}

/**
 * The problems of `value` against a JSON Schema of the document (the keywords z.toJSONSchema writes):
 * types, const, enum, required, properties, items, unions, and, for objects whose additionalProperties is
 * false or left out, any field the schema does not name (an answer's field the document does not describe).
 */
function problems(doc: Json, schema: Json | undefined, value: unknown, at = "$"): string[] {
  if (schema === undefined || Object.keys(schema).length === 0) return [];
  if (schema.$ref) return problems(doc, doc.components.schemas[refName(schema.$ref)], value, at);
  const union = (schema.anyOf ?? schema.oneOf) as Json[] | undefined;
  if (union) {
    const each = union.map((s) => problems(doc, s, value, at));
    return each.some((p) => p.length === 0) ? [] : [`${at}: matches no branch (${each.map((p) => p[0]).join(" / ")})`];
  }
  const typeOf = (v: unknown) => (v === null ? "null" : Array.isArray(v) ? "array" : Number.isInteger(v) ? "integer" : typeof v);
  const types: string[] | undefined = schema.type === undefined ? undefined : [schema.type].flat();
  const actual = typeOf(value);
  if (types && !types.includes(actual) && !(actual === "integer" && types.includes("number"))) return [`${at}: ${actual}, expected ${types.join("|")}`];
  if (schema.const !== undefined && value !== schema.const) return [`${at}: ${JSON.stringify(value)}, expected ${JSON.stringify(schema.const)}`];
  if (schema.enum && !schema.enum.includes(value)) return [`${at}: ${JSON.stringify(value)} not in enum`];
  const out: string[] = [];
  if (actual === "array" && schema.items) (value as unknown[]).forEach((v, i) => out.push(...problems(doc, schema.items, v, `${at}[${i}]`)));
  if (actual === "object") {
    const obj = value as Json;
    for (const name of schema.required ?? []) if (!(name in obj)) out.push(`${at}.${name}: missing`);
    const properties = (schema.properties ?? {}) as Json;
    for (const [k, v] of Object.entries(obj)) {
      if (k in properties) out.push(...problems(doc, properties[k], v, `${at}.${k}`));
      else if (typeof schema.additionalProperties === "object") out.push(...problems(doc, schema.additionalProperties, v, `${at}.${k}`));
      else out.push(`${at}.${k}: not in the document`); // additionalProperties false or left out
    }
  }
  return out;
}

describe("the OpenAPI document", async () => {
  const { app } = sessionApp(engine);
  const doc = await documentOf(app);
  const ops = operationsOf(doc);

  test("is OpenAPI 3.1 with info, paths and components", () => {
    expect(doc.openapi).toMatch(/^3\.1\.\d+$/);
    expect(doc.info.title).toBe("ultralong-serve");
    expect(typeof doc.info.version).toBe("string");
    expect(doc.components.securitySchemes.bearerAuth).toEqual(expect.objectContaining({ type: "http", scheme: "bearer" }));
    // Without keys configured, no route asks for one.
    expect(doc.security).toBeUndefined();
  });

  test("documents every route the app registers, and only those", () => {
    const routes = app.routes.filter((r) => r.method !== "ALL").map((r) => `${r.method.toLowerCase()} ${openApiPath(r.path)}`);
    expect(routes.length).toBeGreaterThan(20);
    for (const required of ["post /v1/chat/completions", "post /v1/sessions/{id}/fork", "put /v1/sessions/{id}/snapshot", "get /v1/models/{model}", "get /openapi.json", "get /docs"]) {
      expect(routes).toContain(required);
    }
    const documented = ops.map(({ path, method }) => `${method} ${path}`);
    expect([...new Set(routes)].sort()).toEqual([...documented].sort());
    expect(doc["x-undocumented-routes"]).toBeUndefined();
    expect(appRoutes(app).length).toBe(documented.length);
  });

  test("every operation has an id, a summary, its path parameters, a success response and OpenAI-shaped errors", () => {
    const ids = new Set<string>();
    for (const { path, method, op } of ops) {
      const where = `${method} ${path}`;
      expect(typeof op.operationId, where).toBe("string");
      expect(ids.has(op.operationId), where).toBe(false);
      ids.add(op.operationId);
      expect(op.summary, where).toBeTruthy();
      const params = [...path.matchAll(/\{([^}]+)\}/g)].map((m) => m[1]);
      expect((op.parameters ?? []).map((p: Json) => p.name), where).toEqual(params);
      const statuses = Object.keys(op.responses);
      expect(statuses.some((s) => s.startsWith("2")), where).toBe(true);
      expect(statuses, where).toContain("500");
      for (const status of statuses.filter((s) => Number(s) >= 400)) {
        expect(op.responses[status].content["application/json"].schema, `${where} ${status}`).toEqual({ $ref: "#/components/schemas/ErrorResponse" });
        expect(op.responses[status].description, `${where} ${status}`).toBeTruthy();
      }
      if (method === "post" || method === "put") expect(op.requestBody, where).toBeDefined();
      // A route that reads a JSON body answers 400 for a bad one and 413 for an oversize one.
      if (op.requestBody?.content["application/json"]) expect(statuses, where).toEqual(expect.arrayContaining(["400", "413"]));
    }
  });

  test("every JSON request body has examples, and each validates against the route's zod schema", () => {
    let checked = 0;
    for (const { path, method, op } of ops) {
      const media = op.requestBody?.content["application/json"];
      if (!media) continue;
      const name = refName(media.schema.$ref) as keyof typeof requestSchemas;
      const schema = requestSchemas[name];
      expect(schema, `${method} ${path}: ${name}`).toBeDefined();
      const examples = Object.entries((media.examples ?? {}) as Json);
      expect(examples.length, `${method} ${path}`).toBeGreaterThan(0);
      for (const [exampleName, example] of examples) {
        const parsed = schema.safeParse(example.value);
        expect(parsed.success ? "ok" : `${method} ${path} example ${exampleName}: ${parsed.error.message}`).toBe("ok");
        // And the document's own JSON Schema accepts it.
        expect(problems(doc, media.schema, example.value).filter((p) => !p.endsWith("not in the document"))).toEqual([]);
        checked++;
      }
    }
    expect(checked).toBeGreaterThanOrEqual(15);
  });

  test("the checker used below catches an undocumented field, a wrong type and a missing field", () => {
    const session = { $ref: "#/components/schemas/Session" };
    const good = { id: "s", object: "session", created_at: 1, updated_at: 1, tokens_read: 1, tokens_resident: 1, kv_bytes: 1, kv_cold_bytes: 0, recalled_blocks: 0, messages: 1, in_memory: true, busy: false };
    expect(problems(doc, session, good)).toEqual([]);
    expect(problems(doc, session, { ...good, surprise: 1 })).toEqual(["$.surprise: not in the document"]);
    expect(problems(doc, session, { ...good, tokens_read: "1" })).toEqual(["$.tokens_read: string, expected integer"]);
    const { busy: _, ...missing } = good;
    expect(problems(doc, session, missing)).toEqual(["$.busy: missing"]);
  });

  test("tool-call answers, in the shapes tests/tool-calls.test.ts gets from a scripted model, are described", () => {
    const head = { id: "chatcmpl-1", created: 1, model: "m" };
    const usage = { prompt_tokens: 3, completion_tokens: 2, total_tokens: 5, prompt_tokens_details: { cached_tokens: 0 } };
    const timings = { cache_n: 0, prompt_n: 3, prompt_ms: 1, prompt_per_second: 1, predicted_n: 2, predicted_ms: 1, predicted_per_second: 1 };
    const call = { id: "call-1", type: "function", function: { name: "brave_search", arguments: '{"query":"gold price"}' } };
    const answer = { ...head, object: "chat.completion", choices: [{ index: 0, message: { role: "assistant", content: null, tool_calls: [call] }, logprobs: null, finish_reason: "tool_calls" }], usage, timings };
    expect(problems(doc, { $ref: "#/components/schemas/ChatCompletion" }, answer)).toEqual([]);
    const chunk = (delta: Json, finish: string | null = null) => ({ ...head, object: "chat.completion.chunk", choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }] });
    for (const c of [
      chunk({ role: "assistant", content: "" }),
      chunk({ tool_calls: [{ index: 0, id: "call-1", type: "function", function: { name: "brave_search", arguments: "" } }] }),
      chunk({ tool_calls: [{ index: 0, function: { arguments: '{"query":"gold price"}' } }] }),
      chunk({}, "tool_calls"),
      { ...head, object: "chat.completion.chunk", choices: [], usage, timings },
    ]) {
      expect(problems(doc, { $ref: "#/components/schemas/ChatCompletionChunk" }, c)).toEqual([]);
    }
  });

  test("every $ref resolves, and every component is the zod schema of that name", () => {
    const refs = refsIn(doc);
    expect(refs.length).toBeGreaterThan(50);
    for (const ref of refs) expect(doc.components.schemas[refName(ref)], ref).toBeDefined();
    expect(Object.keys(doc.components.schemas).sort()).toEqual([...Object.keys(requestSchemas), ...Object.keys(responseSchemas)].sort());
    // Request fields carry descriptions.
    expect(doc.components.schemas.ChatCompletionRequest.properties.messages.description).toBeTruthy();
    expect(doc.components.schemas.ChatCompletionRequest.properties.session_history).toBeDefined();
  });

  test("streams are documented as text/event-stream with their event schemas", () => {
    const chat = doc.paths["/v1/chat/completions"].post.responses["200"].content;
    expect(chat["application/json"].schema.$ref).toBe("#/components/schemas/ChatCompletion");
    expect(chat["text/event-stream"]["x-sse-data"].oneOf).toContainEqual({ $ref: "#/components/schemas/ChatCompletionChunk" });
    // A streamed create answers 200 (the status goes out before the session exists), a plain one 201.
    const create = doc.paths["/v1/sessions"].post.responses;
    expect(create["200"].content["text/event-stream"]["x-sse-data"].oneOf).toContainEqual({ $ref: "#/components/schemas/SessionProgress" });
    expect(create["201"].content["application/json"].schema.$ref).toBe("#/components/schemas/SessionIngest");
    const upload = doc.paths["/v1/sessions/{id}/snapshot"].put.requestBody.content;
    expect(Object.keys(upload)).toContain("application/vnd.ultralong.snapshot+msgpack");
    expect(doc.paths["/v1/sessions/{id}/snapshot"].get.responses["200"].content["application/vnd.ultralong.snapshot+msgpack"]).toBeDefined();
  });

  test("run against the app, every example gets a documented status and an answer the document describes", async () => {
    const { app } = sessionApp(engine);
    const model = engine.info.modelId;
    const concrete = (path: string) => path.replace("{id}", "report").replace("{model}", model);
    const check = async (method: string, path: string, res: Response, what: string) => {
      const op = doc.paths[path][method];
      const status = String(res.status);
      const documented = op.responses[status];
      if (!documented || !status.startsWith("2")) throw new Error(`${what}: ${status} ${await res.text()}`);
      const type = res.headers.get("content-type")!.split(";")[0]!;
      const media = documented.content[type];
      expect(media, `${what}: ${type}`).toBeDefined();
      if (type === "application/json") {
        const body = await res.json();
        expect(problems(doc, media.schema, body), what).toEqual([]);
        if (media.schema.$ref) expect(responseSchemas[refName(media.schema.$ref) as keyof typeof responseSchemas].safeParse(body).success, what).toBe(true);
      } else if (type === "text/event-stream") {
        const events = await readSse(res);
        expect(events.at(-1), what).toBe("[DONE]");
        const eventSchema = { oneOf: media["x-sse-data"].oneOf.filter((s: Json) => s.$ref !== "#/components/schemas/ErrorResponse") };
        for (const event of events.slice(0, -1)) expect(problems(doc, eventSchema, JSON.parse(event)), `${what}: ${event}`).toEqual([]);
      } else {
        await res.arrayBuffer();
      }
      return res;
    };
    const send = async (method: string, path: string, body?: unknown, what = `${method} ${path}`) => {
      const init: RequestInit = { method: method.toUpperCase() };
      if (body !== undefined) init.body = JSON.stringify(body);
      return check(method, path, await app.request(concrete(path), init), what);
    };
    const examplesOf = (method: string, path: string) => Object.entries(doc.paths[path][method].requestBody.content["application/json"].examples as Json);
    const runExamples = async (method: string, path: string) => {
      for (const [name, example] of examplesOf(method, path)) await send(method, path, example.value, `${method} ${path} example ${name}`);
    };

    // Sessions first (the chat example continues session "report"), then everything else, deletes last.
    await runExamples("post", "/v1/sessions");
    await runExamples("post", "/v1/sessions/{id}/messages");
    await runExamples("post", "/v1/sessions/{id}/append");
    await runExamples("post", "/v1/sessions/{id}/fork");
    await send("get", "/v1/sessions");
    await send("get", "/v1/sessions/{id}");
    const snapshot = await (await app.request(concrete("/v1/sessions/report/snapshot"))).arrayBuffer();
    await send("get", "/v1/sessions/{id}/snapshot");
    const upload = await app.request("/v1/sessions/copy/snapshot", { method: "PUT", body: snapshot });
    await check("put", "/v1/sessions/{id}/snapshot", upload, "upload");
    expect(upload.status).toBe(201);
    for (const [method, path] of [
      ["post", "/v1/chat/completions"],
      ["post", "/v1/completions"],
      ["post", "/tokenize"],
      ["post", "/detokenize"],
      ["post", "/apply-template"],
    ] as const) {
      await runExamples(method, path);
    }
    // Streams with logprobs and several choices, beyond the examples.
    await send("post", "/v1/chat/completions", { messages: [{ role: "user", content: "Hi" }], stream: true, n: 2, logprobs: true, top_logprobs: 2, max_tokens: 4, stream_options: { include_usage: true } }, "chat stream with logprobs");
    await send("post", "/v1/completions", { prompt: ["Hello", "World"], stream: true, n: 2, echo: true, logprobs: 2, max_tokens: 3, stream_options: { include_usage: true } }, "completion stream with echo and logprobs");
    await send("post", "/v1/chat/completions", { messages: [{ role: "user", content: "Hi" }], max_tokens: 4, tools: [{ type: "function", function: { name: "f" } }], tool_choice: "none" }, "chat with tool_choice none");
    for (const path of ["/v1/models", "/v1/models/{model}", "/health", "/metrics", "/docs", "/openapi.json"]) await send("get", path);
    await send("delete", "/v1/sessions/{id}");
  });

  test("errors are answered as documented", async () => {
    const { app } = sessionApp(engine);
    const cases: [string, string, string, RequestInit, string][] = [
      ["post", "/v1/chat/completions", "/v1/chat/completions", { method: "POST", body: "{" }, "400"],
      ["post", "/v1/chat/completions", "/v1/chat/completions", { method: "POST", body: JSON.stringify({ model: "nope", messages: [{ role: "user", content: "x" }] }) }, "404"],
      ["get", "/v1/sessions/{id}", "/v1/sessions/missing", {}, "404"],
      ["post", "/v1/sessions/{id}/fork", "/v1/sessions/missing/fork", { method: "POST" }, "404"],
      ["put", "/v1/sessions/{id}/snapshot", "/v1/sessions/x/snapshot", { method: "PUT", body: "not a snapshot" }, "400"],
      ["post", "/tokenize", "/tokenize", { method: "POST", body: "x".repeat(5 * 1024 * 1024) }, "413"],
    ];
    for (const [method, path, url, init, status] of cases) {
      const res = await app.request(url, init);
      expect(`${method} ${url} ${res.status}`).toBe(`${method} ${url} ${status}`);
      expect(doc.paths[path][method].responses[status], `${method} ${path} ${status}`).toBeDefined();
      expect(problems(doc, { $ref: "#/components/schemas/ErrorResponse" }, await res.json())).toEqual([]);
    }
  });
});

describe("with API keys", () => {
  const app = createApp({ engine, maxBodyBytes: 64 * 1024, apiKey: "sk-test", log: () => {} });

  test("/openapi.json and /docs answer without a key; the document says which routes need one", async () => {
    expect((await app.request("/v1/models")).status).toBe(401);
    const doc = await documentOf(app);
    expect(doc.security).toEqual([{ bearerAuth: [] }]);
    expect((await app.request("/docs")).status).toBe(200);
    const models = doc.paths["/v1/models"].get;
    expect(models.security).toBeUndefined(); // the document's: a key
    expect(models.responses["401"]).toBeDefined();
    expect(doc.paths["/openapi.json"].get.security).toEqual([]);
    expect(doc.paths["/docs"].get.security).toEqual([]);
    expect(doc.paths["/health"].get.security).toEqual([{}, { bearerAuth: [] }]);
    // Without sessions the session routes are not registered, so not documented.
    expect(Object.keys(doc.paths).some((p) => p.startsWith("/v1/sessions"))).toBe(false);
  });
});

describe("/docs", () => {
  test("is an HTML page that loads nothing from elsewhere and renders /openapi.json", async () => {
    const { app } = sessionApp(engine);
    const res = await app.request("/docs");
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toContain("text/html");
    const html = await res.text();
    expect(html).toStartWith("<!doctype html>");
    expect(html).not.toMatch(/https?:\/\//);
    expect(html).not.toMatch(/\b(src|href)\s*=\s*["']?\/\//i);
    expect(html).not.toMatch(/@import|url\(/);
    expect(html).toContain('fetch("openapi.json")');
    // The inline script is valid JavaScript.
    const scripts = [...html.matchAll(/<script>([\s\S]*?)<\/script>/g)].map((m) => m[1]!);
    expect(scripts.length).toBe(1);
    expect(() => new Function(scripts[0]!)).not.toThrow();
  });
});
