/**
 * The session store a `--session-store` value names: `file:<dir>`, `redis://...` / `rediss://...`, or
 * `denokv:[path]` (Deno's built-in KV; under Deno Deploy with no path, the deployment's own). Redis and
 * Deno KV modules load only when asked for.
 */
import type { SessionStore } from "../session-store.ts";
import { FileSessionStore } from "./file-store.ts";

export async function openSessionStore(spec: string): Promise<SessionStore> {
  if (spec.startsWith("file:")) return new FileSessionStore(spec.slice("file:".length));
  if (spec.startsWith("redis://") || spec.startsWith("rediss://")) {
    const { RedisSessionStore } = await import("./redis-store.ts");
    return RedisSessionStore.connect(spec);
  }
  if (spec.startsWith("denokv:")) {
    const { DenoKvSessionStore } = await import("./denokv-store.ts");
    const path = spec.slice("denokv:".length);
    return DenoKvSessionStore.open(path || undefined);
  }
  throw new Error(`--session-store ${JSON.stringify(spec)}: expected file:<dir>, redis://host:port or denokv:[path]`);
}
