/**
 * A real redis-server (Debian's package; .ci/run installs it) on a free port, in a temporary directory,
 * without persistence: for the tests of the Redis session store. `available` says whether the binary is here.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Redis } from "ioredis";

export const REDIS_SERVER = "redis-server";
export const redisAvailable = spawnSync(REDIS_SERVER, ["--version"]).status === 0;

export interface RedisServer {
  url: string;
  /** A connected client, for inspecting keys. */
  admin: Redis;
  stop(): Promise<void>;
}

async function freePort(): Promise<number> {
  return new Promise((done, fail) => {
    const s = createServer();
    s.once("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => done(port));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function startRedisServer(): Promise<RedisServer> {
  const dir = mkdtempSync(join(tmpdir(), "uls-redis-"));
  const port = await freePort();
  let output = "";
  const server: ChildProcess = spawn(REDIS_SERVER, ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir], { stdio: ["ignore", "pipe", "pipe"] });
  server.stdout!.on("data", (d) => (output += d));
  server.stderr!.on("data", (d) => (output += d));
  const url = `redis://127.0.0.1:${port}`;
  const stop = async () => {
    if (server.exitCode === null) {
      await new Promise<void>((resolve) => {
        server.once("exit", () => resolve());
        server.kill("SIGKILL");
      });
    }
    rmSync(dir, { recursive: true, force: true });
  };
  const deadline = Date.now() + 20_000;
  for (;;) {
    if (server.exitCode !== null) throw new Error(`redis-server exited (${server.exitCode}): ${output}`);
    const probe = new Redis(url, { lazyConnect: true, retryStrategy: () => null });
    probe.on("error", () => {});
    try {
      await probe.connect();
      if ((await probe.ping()) === "PONG") {
        return {
          url,
          admin: probe,
          stop: async () => {
            probe.disconnect();
            await stop();
          },
        };
      }
    } catch {
      probe.disconnect();
    }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`redis-server did not answer on ${url}: ${output}`);
    }
    await sleep(50);
  }
}
