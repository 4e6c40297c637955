/**
 * Who is calling: API keys, each naming a tenant. Routes ask `tenantOf(c)` for the caller's tenant; with
 * no key configured every caller is the one tenant "default".
 *
 * Keys come from --api-key (tenant "default") and from a keys file (--api-keys-file), a JSON object of
 * tenant name to key or keys: {"tenant-a": "sk-...", "tenant-b": ["sk-1", "sk-2"]}. hono's bearerAuth reads
 * the Authorization header; the key is found by comparing SHA-256 digests in constant time against every
 * configured key, so neither the time taken nor an early exit tells which key (or how much of one) matched.
 */
import type { Context, MiddlewareHandler } from "hono";
import { bearerAuth } from "hono/bearer-auth";
import { HTTPException } from "hono/http-exception";
import { DEFAULT_TENANT, NAME_PATTERN } from "../runtime/index.ts";
import { isPlaygroundAsset } from "./playground.ts";

export { DEFAULT_TENANT };

/** A bearer token as hono's bearerAuth accepts it (RFC 6750's b64token): a key outside it could never be presented. */
const KEY_CHARS = /^[A-Za-z0-9._~+/-]+=*$/;

export interface ApiKey {
  tenant: string;
  key: string;
}

/** A keys file or key that cannot be used; the message names the file (or flag) and the problem. */
export class ApiKeysError extends Error {}

export interface AuthOptions {
  /** A single key (tenant "default"), as --api-key gives. */
  apiKey?: string;
  /** Keys of named tenants, as a keys file gives (see parseApiKeysFile). */
  apiKeys?: readonly ApiKey[];
}

/**
 * Reads a keys file's text: a JSON object whose names are tenants and whose values are a key or a
 * non-empty array of keys. `source` (the file's path) prefixes every error message.
 */
export function parseApiKeysFile(text: string, source: string): ApiKey[] {
  const fail = (problem: string): never => {
    throw new ApiKeysError(`API keys file ${source}: ${problem}`);
  };
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (e) {
    return fail(`not valid JSON (${(e as Error).message})`);
  }
  if (json === null || typeof json !== "object" || Array.isArray(json)) {
    return fail('expected a JSON object of tenant name to key or keys, e.g. {"tenant-a": "sk-...", "tenant-b": ["sk-1", "sk-2"]}');
  }
  const keys: ApiKey[] = [];
  for (const [tenant, value] of Object.entries(json)) {
    // Tenant names use the session-id alphabet: they name folders of the store and appear in logs unescaped.
    if (!NAME_PATTERN.test(tenant)) fail(`tenant name ${JSON.stringify(tenant)} is not 1-64 letters, digits, '_' or '-'`);
    const list = typeof value === "string" ? [value] : Array.isArray(value) ? (value as unknown[]) : fail(`tenant ${tenant}: expected a key or an array of keys`);
    if (list.length === 0) fail(`tenant ${tenant} has no keys`);
    for (const [i, key] of list.entries()) {
      const where = `tenant ${tenant}, key ${i + 1}`;
      if (typeof key !== "string") fail(`${where}: expected a string`);
      const problem = keyProblem(key as string);
      if (problem) fail(`${where}: ${problem}`);
      keys.push({ tenant, key: key as string });
    }
  }
  return checkDuplicates(keys, (tenants) => fail(`the same key is given ${tenants}`));
}

function keyProblem(key: string): string | null {
  if (key.length === 0) return "the key is empty";
  if (!KEY_CHARS.test(key)) return "a key may hold only letters, digits and . _ ~ + / - (then '=' padding), as a bearer token does";
  return null;
}

function checkDuplicates(keys: ApiKey[], fail: (tenants: string) => never): ApiKey[] {
  const seen = new Map<string, string>();
  for (const { tenant, key } of keys) {
    const other = seen.get(key);
    if (other !== undefined) fail(other === tenant ? `twice for tenant ${tenant}` : `for tenants ${other} and ${tenant}`);
    seen.set(key, tenant);
  }
  return keys;
}

/** Every configured key with its tenant: --api-key's as "default", then the keys file's. Throws ApiKeysError. */
export function keyTable(options: AuthOptions): ApiKey[] {
  const keys: ApiKey[] = [];
  if (options.apiKey !== undefined) {
    const problem = keyProblem(options.apiKey);
    if (problem) throw new ApiKeysError(`--api-key / API_KEY: ${problem}`);
    keys.push({ tenant: DEFAULT_TENANT, key: options.apiKey });
  }
  keys.push(...(options.apiKeys ?? []));
  return checkDuplicates(keys, (tenants) => {
    throw new ApiKeysError(`the key of --api-key / API_KEY is also in the API keys file (${tenants})`);
  });
}

const TENANT_VAR = "tenant" as never;

/** The tenant the authenticated request belongs to. Throws on a request that was not authenticated (fail closed). */
export function tenantOf(c: Context): string {
  const tenant = c.get(TENANT_VAR) as string | undefined;
  if (tenant === undefined) throw new Error(`tenantOf: ${c.req.method} ${c.req.path} was not authenticated`);
  return tenant;
}

/** Whether the request carried a valid key, or no keys are configured (every caller is then "default"). */
export const isAuthenticated = (c: Context): boolean => c.get(TENANT_VAR) !== undefined;

const sha256 = async (text: string) => new Uint8Array(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text)));

/** Equal digests, looking at every byte whatever the first difference. */
function digestsEqual(a: Uint8Array, b: Uint8Array): boolean {
  let diff = a.length ^ b.length;
  for (let i = 0; i < a.length; i++) diff |= a[i]! ^ (b[i] ?? 0);
  return diff === 0;
}

/**
 * Refuses requests without a valid key (hono's HTTPException 401, answered as OpenAI error JSON by the
 * app's error handler) and records the caller's tenant. /health answers everyone; a valid key there only
 * marks the request authenticated (it then gets the full body). The playground's files (GET / and its
 * assets) answer everyone and carry no tenant.
 */
export function authMiddleware(options: AuthOptions): MiddlewareHandler {
  const keys = keyTable(options);
  if (keys.length === 0) {
    return async (c, next) => {
      c.set(TENANT_VAR, DEFAULT_TENANT as never);
      await next();
    };
  }
  const digests = Promise.all(keys.map(async ({ tenant, key }) => ({ tenant, digest: await sha256(key) })));
  const bearer = bearerAuth({
    verifyToken: async (token, c) => {
      const digest = await sha256(token);
      let tenant: string | undefined;
      // No early exit: every key is compared, so the time does not depend on which one matched.
      for (const entry of await digests) if (digestsEqual(entry.digest, digest)) tenant = entry.tenant;
      if (tenant === undefined) return false;
      c.set(TENANT_VAR, tenant as never);
      return true;
    },
  });
  return async (c, next) => {
    // The playground's page and files (a fixed list) are public: the page asks for the key itself.
    if (isPlaygroundAsset(c.req.method, c.req.path)) return next();
    if (c.req.path !== "/health") return bearer(c, next);
    try {
      await bearer(c, async () => {});
    } catch (e) {
      if (!(e instanceof HTTPException)) throw e;
    }
    await next();
  };
}
