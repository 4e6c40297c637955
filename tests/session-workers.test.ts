/**
 * Issue 15's acceptance over real processes: several servers share one session store (the file store, a
 * real Redis, and Deno KV with the workers running under Deno), each case in tests/helpers/workers.ts.
 */
import { afterAll, beforeAll } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REDIS_SERVER, redisAvailable, startRedisServer, type RedisServer } from "./helpers/redis-server.ts";
import { workerSuite } from "./helpers/workers.ts";

workerSuite(
  "file store",
  {
    async make() {
      const dir = mkdtempSync(join(tmpdir(), "workers-file-"));
      return { spec: `file:${dir}`, cleanup: async () => rmSync(dir, { recursive: true, force: true }) };
    },
  },
  null,
);

let redis: RedisServer | null = null;
let db = 0;
beforeAll(async () => {
  if (redisAvailable) redis = await startRedisServer();
});
afterAll(async () => {
  await redis?.stop();
});

workerSuite(
  "Redis",
  {
    // Each store a database of its own on the one server (16 by default).
    async make() {
      const n = db++ % 16;
      const spec = `${redis!.url}/${n}`;
      return { spec, cleanup: async () => void (await redis!.admin.call("FLUSHDB", "ASYNC").catch(() => {})) };
    },
  },
  redisAvailable ? null : `${REDIS_SERVER} is not installed (Debian package redis-server; .ci/run installs it)`,
);

workerSuite(
  "Deno KV (workers under Deno)",
  {
    runtime: "deno",
    async make() {
      const dir = mkdtempSync(join(tmpdir(), "workers-denokv-"));
      return { spec: `denokv:${join(dir, "sessions.sqlite")}`, cleanup: async () => rmSync(dir, { recursive: true, force: true }) };
    },
  },
  null,
);
