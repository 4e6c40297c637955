/**
 * Deno Deploy-style hosting: a module whose default export is `{ fetch }`. `deno serve` runs it
 * (deno task serve:deploy); configuration comes from the environment only. Under Deno, sessions live in
 * Deno KV (SESSION_STORE=denokv:) unless SESSION_STORE says otherwise.
 */
import { createServer } from "../server.ts";

declare const Deno: { env: { toObject(): Record<string, string> } } | undefined;
const env = typeof Deno !== "undefined" ? Deno.env.toObject() : (globalThis as { process?: { env: Record<string, string> } }).process?.env ?? {};
// Deno Deploy has no writable filesystem: sessions live in the deployment's Deno KV unless told otherwise.
if (typeof Deno !== "undefined" && !env.SESSION_STORE) env.SESSION_STORE = "denokv:";

const server = await createServer(env, []);
console.log(`ultralong-serve: model ${server.engine.info.modelId} on backend ${server.engine.info.backend} [${server.engine.info.backendDetail}]`);

export default { fetch: server.app.fetch };
