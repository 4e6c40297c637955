/**
 * API keys and tenants: several keys, each naming a tenant, from a keys file and --api-key; tenantOf(c)
 * is the tenant of the key used; refusals are OpenAI error JSON; /health without a key says only "ok";
 * a bad keys file stops start-up with a message naming the file.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { rm, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { createApp } from "../src/app.ts";
import { ApiKeysError, DEFAULT_TENANT, keyTable, parseApiKeysFile, tenantOf } from "../src/auth.ts";
import { createServer } from "../src/server.ts";
import { sharedEngine } from "./helpers/model.ts";
import { startBunServer } from "./helpers/server.ts";
import { tempDir } from "./helpers/sessions.ts";

const engine = await sharedEngine();
const dirs: string[] = [];
afterAll(async () => {
  for (const d of dirs) await rm(d, { recursive: true, force: true });
});

/** The app with a route that answers the caller's tenant, as the session routes will ask it. */
function appWith(options: { apiKey?: string; keysFile?: string }) {
  const apiKeys = options.keysFile !== undefined ? parseApiKeysFile(options.keysFile, "keys.json") : undefined;
  const app = createApp({ engine, maxBodyBytes: 64 * 1024, apiKey: options.apiKey, apiKeys, log: () => {} });
  app.get("/v1/whoami", (c) => c.text(tenantOf(c)));
  const as = (key: string | null, path = "/v1/whoami", header = key === null ? undefined : `Bearer ${key}`) =>
    app.request(path, { headers: header === undefined ? {} : { authorization: header } });
  return { app, as };
}

const KEYS = JSON.stringify({ "tenant-a": ["sk-a-1", "sk-a-2"], tenant_b: "sk-b" });

describe("keys and tenants", () => {
  test("each key authenticates as its tenant; --api-key is tenant default", async () => {
    const { as } = appWith({ apiKey: "sk-main", keysFile: KEYS });
    for (const [key, tenant] of [
      ["sk-a-1", "tenant-a"],
      ["sk-a-2", "tenant-a"],
      ["sk-b", "tenant_b"],
      ["sk-main", DEFAULT_TENANT],
    ]) {
      const res = await as(key!);
      expect(res.status).toBe(200);
      expect(await res.text()).toBe(tenant!);
    }
  });

  test("a missing, unknown, partial or malformed key gets 401 in OpenAI's shape, with a bearer challenge", async () => {
    const { as } = appWith({ keysFile: KEYS });
    for (const header of [undefined, "Bearer sk-a", "Bearer sk-a-10", "Bearer two words", "Basic c2stYg==", "sk-b", "Bearer"]) {
      const res = await as(null, "/v1/whoami", header);
      expect(res.status).toBe(401);
      expect(res.headers.get("www-authenticate")).toMatch(/^Bearer/);
      const body = (await res.json()) as { error: Record<string, unknown> };
      expect(body.error).toEqual({ message: "invalid or missing API key", type: "authentication_error", param: null, code: "invalid_api_key" });
    }
    // The same refusal on the real routes.
    expect((await as("sk-wrong", "/v1/models")).status).toBe(401);
    expect((await as("sk-b", "/v1/models")).status).toBe(200);
  });

  test("without keys every caller is tenant default, whatever it sends", async () => {
    const { as } = appWith({});
    expect(await (await as(null)).text()).toBe(DEFAULT_TENANT);
    expect(await (await as("sk-anything")).text()).toBe(DEFAULT_TENANT);
  });

  test("/health without a valid key says only that the server is up; with one, the full body", async () => {
    const { as } = appWith({ keysFile: KEYS });
    for (const key of [null, "sk-wrong"]) {
      const res = await as(key, "/health");
      expect(res.status).toBe(200);
      expect(await res.json()).toEqual({ status: "ok" });
    }
    const full = (await (await as("sk-b", "/health")).json()) as Record<string, unknown>;
    expect(full).toMatchObject({ status: "ok", model: engine.info.modelId, backend: "wasm", context_length: engine.info.contextLength });
    // No keys configured: everyone gets the full body, as before.
    expect(await (await appWith({}).as(null, "/health")).json()).toMatchObject({ status: "ok", model: engine.info.modelId });
  });
});

describe("keys file validation", () => {
  const problems: [string, RegExp][] = [
    ["{not json", /keys\.json: not valid JSON/],
    ['["sk-1"]', /keys\.json: expected a JSON object of tenant name to key or keys/],
    ['{"a b": "sk-1"}', /keys\.json: tenant name "a b" is not 1-64 letters/],
    [JSON.stringify({ ["x".repeat(65)]: "sk-1" }), /tenant name "x{65}" is not 1-64/],
    ['{"a": ""}', /keys\.json: tenant a, key 1: the key is empty/],
    ['{"a": []}', /keys\.json: tenant a has no keys/],
    ['{"a": 42}', /keys\.json: tenant a: expected a key or an array of keys/],
    ['{"a": ["sk-1", 7]}', /keys\.json: tenant a, key 2: expected a string/],
    ['{"a": "sk 1"}', /keys\.json: tenant a, key 1: a key may hold only/],
    ['{"a": ["sk-1", "sk-1"]}', /keys\.json: the same key is given twice for tenant a/],
    ['{"a": "sk-1", "b": ["sk-2", "sk-1"]}', /keys\.json: the same key is given for tenants a and b/],
  ];
  for (const [text, message] of problems) {
    test(`refused: ${text.slice(0, 40)}`, () => {
      expect(() => parseApiKeysFile(text, "keys.json")).toThrow(message);
      expect(() => parseApiKeysFile(text, "keys.json")).toThrow(ApiKeysError);
    });
  }

  test("--api-key must be a usable bearer token and not repeat a file key", () => {
    expect(() => keyTable({ apiKey: "has space" })).toThrow(/--api-key \/ API_KEY: a key may hold only/);
    expect(() => keyTable({ apiKey: "sk-1", apiKeys: parseApiKeysFile('{"a": "sk-1"}', "k") })).toThrow(/--api-key \/ API_KEY is also in the API keys file \(for tenants default and a\)/);
    expect(keyTable({ apiKey: "sk-0", apiKeys: parseApiKeysFile('{"default": "sk-1"}', "k") })).toEqual([
      { tenant: "default", key: "sk-0" },
      { tenant: "default", key: "sk-1" },
    ]);
  });

  test("a bad or missing keys file stops start-up, naming the file, before the model loads", async () => {
    const dir = tempDir("keys");
    dirs.push(dir);
    const bad = join(dir, "keys.json");
    await writeFile(bad, '{"tenant-a": "sk-1", "tenant-b": "sk-1"}');
    await expect(createServer({}, ["--api-keys-file", bad, "--model", "/nonexistent"])).rejects.toThrow(
      `API keys file ${bad}: the same key is given for tenants tenant-a and tenant-b`,
    );
    const missing = join(dir, "none.json");
    await expect(createServer({ API_KEYS_FILE: missing }, ["--model", "/nonexistent"])).rejects.toThrow(`API keys file ${missing}: cannot be read`);
  });

  test("the server process exits with that message", async () => {
    const dir = tempDir("keys");
    dirs.push(dir);
    const bad = join(dir, "keys.json");
    await writeFile(bad, '{"tenant a": "sk-1"}');
    await expect(startBunServer(["--port", "0", "--backend", "wasm", "--model", "models/random", "--api-keys-file", bad])).rejects.toThrow(
      `ultralong-serve failed to start: API keys file ${bad}: tenant name "tenant a" is not 1-64 letters`,
    );
  }, 60_000);

  test("a keys file serves its tenants in a real server process", async () => {
    const dir = tempDir("keys");
    dirs.push(dir);
    const file = join(dir, "keys.json");
    await writeFile(file, KEYS);
    const server = await startBunServer(["--port", "0", "--backend", "wasm", "--model", "models/random", "--api-keys-file", file, "--api-key", "sk-main"]);
    try {
      const models = (key: string) => fetch(`${server.url}/v1/models`, { headers: { authorization: `Bearer ${key}` } });
      expect((await models("sk-a-2")).status).toBe(200);
      expect((await models("sk-main")).status).toBe(200);
      expect((await models("sk-nope")).status).toBe(401);
      expect(await (await fetch(`${server.url}/health`)).json()).toEqual({ status: "ok" });
    } finally {
      server.child.kill("SIGKILL");
    }
  }, 60_000);
});
