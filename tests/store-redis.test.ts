/**
 * The Redis session store (runtime/stores/redis-store.ts) against a real redis-server that this file
 * starts on a free port in a temporary directory (Debian's redis-server package; skipped, saying so, where
 * the binary is missing): the conformance cases every store passes, then what is Redis's own (chunks
 * bounded in size, old versions collected, forks sharing chunks, uploads and readers of a process that
 * died not kept for long), and the same store used from Node and from Deno.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { Redis } from "ioredis";
import { KvCache } from "../runtime/kv-cache.ts";
import { decodeSnapshot, encodeSnapshot, readSnapshotSummary } from "../runtime/snapshot.ts";
import { RedisSessionStore, type RedisStoreOptions } from "../runtime/stores/redis-store.ts";
import { snapshotDataOf } from "./helpers/snapshot-data.ts";
import { REDIS_SERVER, redisAvailable, startRedisServer, type RedisServer } from "./helpers/redis-server.ts";
import { bytes, concat, STORE_CASES } from "./helpers/store-conformance.ts";

const haveRedis = redisAvailable;
if (!haveRedis) console.warn(`tests/store-redis.test.ts: SKIPPED: ${REDIS_SERVER} is not installed (Debian package redis-server; .ci/run installs it)`);

let redis: RedisServer | null = null;
let url = "";
let admin: Redis;

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let prefixes = 0;
/** A store handle on its own key prefix, so that a test can count the keys it made. */
async function isolated(options: RedisStoreOptions = {}): Promise<{ store: RedisSessionStore; prefix: string }> {
  const prefix = `iso${prefixes++}-${Date.now().toString(36)}:`;
  return { store: await RedisSessionStore.connect(url, { prefix, ...options }), prefix };
}

async function keys(pattern: string): Promise<string[]> {
  const found: string[] = [];
  let cursor = "0";
  do {
    const [next, batch] = await admin.scan(cursor, "MATCH", pattern, "COUNT", 1000);
    found.push(...batch);
    cursor = next;
  } while (cursor !== "0");
  return found;
}
/** Chunk keys (…:blob:<id>:<n>) and blob hashes (…:blob:<id>) under a prefix. */
const chunkKeys = async (prefix: string) => (await keys(`${prefix}*:blob:*`)).filter((k) => /:blob:[0-9a-f]+:\d+$/.test(k));
const blobKeys = async (prefix: string) => (await keys(`${prefix}*:blob:*`)).filter((k) => /:blob:[0-9a-f]+$/.test(k));

async function readAll(store: RedisSessionStore, id: string, tenant = "default"): Promise<Uint8Array> {
  return store.forTenant(tenant).read(id, async (r) => new Uint8Array(await r.read(r.size)));
}

beforeAll(async () => {
  if (!haveRedis) return;
  redis = await startRedisServer();
  ({ url, admin } = redis);
});

afterAll(async () => {
  await redis?.stop();
});

describe.skipIf(!haveRedis)("redis store: the store contract", () => {
  for (const [name, run] of STORE_CASES) test(name, () => run(() => RedisSessionStore.connect(url)));
});

describe.skipIf(!haveRedis)("redis store: the store contract with small, odd-sized chunks", () => {
  for (const [name, run] of STORE_CASES) test(name, () => run(() => RedisSessionStore.connect(url, { chunkBytes: 65_537, prefix: "odd:" })));
});

describe.skipIf(!haveRedis)("redis store: chunks and collection", () => {
  test("chunk values are at most chunkBytes, whatever the sizes written; the version reads back whole", async () => {
    const { store, prefix } = await isolated({ chunkBytes: 1000 });
    try {
      const data = bytes(12_345, 3);
      const sizes = [1, 999, 1001, 5000, 3, 2500, 2841];
      let at = 0;
      const parts = sizes.map((n) => data.subarray(at, (at += n)));
      await store.forTenant("default").save("s", parts);
      const chunks = await chunkKeys(prefix);
      expect(chunks.length).toBe(13);
      const lengths = await Promise.all(chunks.map((k) => admin.strlen(k)));
      expect(Math.max(...lengths)).toBe(1000);
      expect(lengths.reduce((a, b) => a + b, 0)).toBe(data.length);
      expect(lengths.filter((n) => n < 1000)).toEqual([345]);
      // Committed chunks do not expire.
      for (const k of chunks) expect(await admin.pttl(k)).toBe(-1);
      expect(await readAll(store, "s")).toEqual(data);
    } finally {
      await store.close();
    }
  });

  test("old versions are collected: after many saves, appends, truncates and reads, only the current version's chunks remain", async () => {
    const { store, prefix } = await isolated({ chunkBytes: 1000 });
    try {
      const t = store.forTenant("default");
      let expected = bytes(4500, 0);
      let v = await t.save("s", [expected]);
      for (let i = 1; i <= 30; i++) {
        if (i % 3 === 0) {
          v = await t.save("s", [(expected = bytes(3000 + i * 10, i))], { expect: v });
        } else {
          const delta = bytes(700 + i, i);
          v = await t.append("s", [delta], v);
          expected = concat(expected, delta);
        }
        if (i % 5 === 0) {
          v = await t.truncate("s", v.bytes - 100);
          expected = expected.subarray(0, v.bytes);
        }
        expect(await readAll(store, "s")).toEqual(expected);
        // Live keys stay bounded: a few blobs, never the history.
        expect((await blobKeys(prefix)).length).toBeLessThanOrEqual(3);
      }
      await t.save("s", [bytes(4500, 99)]);
      expect((await blobKeys(prefix)).length).toBe(1);
      expect((await chunkKeys(prefix)).length).toBe(5);
      expect(await keys(`${prefix}*:pin:*`)).toEqual([]);
      await t.remove("s");
      expect(await keys(`${prefix}*:blob:*`)).toEqual([]);
      expect(await t.ids()).toEqual([]);
    } finally {
      await store.close();
    }
  });

  test("a fork adds no chunk keys; each side's commits and the parent's removal leave the shared chunks to whoever still refers to them", async () => {
    const { store, prefix } = await isolated({ chunkBytes: 1000 });
    try {
      const t = store.forTenant("default");
      const base = bytes(50_000, 5);
      const v1 = await t.save("parent", [base]);
      expect((await chunkKeys(prefix)).length).toBe(50);
      const before = (await keys(`${prefix}*`)).length;
      const t0 = performance.now();
      const forks = [];
      for (let i = 0; i < 5; i++) forks.push(await t.fork("parent", `child${i}`));
      const forkMs = (performance.now() - t0) / 5;
      expect((await chunkKeys(prefix)).length).toBe(50);
      // Each fork adds its head only (the id set exists already).
      expect((await keys(`${prefix}*`)).length).toBe(before + 5);
      console.log(`redis store: a fork of a 50-chunk version took ${forkMs.toFixed(2)} ms and added 0 chunk keys`);
      await t.append("child0", [bytes(10, 1)], forks[0]!);
      expect((await chunkKeys(prefix)).length).toBe(51);
      await t.save("parent", [bytes(10, 2)], { expect: v1 });
      await t.remove("parent");
      expect((await chunkKeys(prefix)).length).toBe(51);
      for (let i = 1; i < 5; i++) expect(await readAll(store, `child${i}`)).toEqual(base);
      expect(await readAll(store, "child0")).toEqual(concat(base, bytes(10, 1)));
      for (let i = 0; i < 5; i++) await t.remove(`child${i}`);
      expect(await keys(`${prefix}*:blob:*`)).toEqual([]);
    } finally {
      await store.close();
    }
  });

  test("a staged upload whose writer died expires, as does one never committed; a committed one stays", async () => {
    const { store, prefix } = await isolated({ chunkBytes: 1000, stagingTtlMs: 400 });
    const t = store.forTenant("default");
    // A writer that dies in the middle: the body stops coming and the process is gone (the handle closed).
    let sent = 0;
    const hanging = new ReadableStream<Uint8Array>({
      pull(c) {
        if (sent >= 5) return new Promise<void>(() => {}); // never more
        c.enqueue(bytes(1000, sent++));
      },
    });
    void t.stage(hanging, 1 << 20).catch(() => {});
    const until = Date.now() + 5000;
    while ((await chunkKeys(prefix)).length < 4 && Date.now() < until) await sleep(10);
    expect((await chunkKeys(prefix)).length).toBeGreaterThanOrEqual(4);
    for (const k of await chunkKeys(prefix)) expect(await admin.pttl(k)).toBeGreaterThan(0);
    await store.close();
    await sleep(800);
    expect(await keys(`${prefix}*`)).toEqual([]);

    const { store: other, prefix: p2 } = await isolated({ chunkBytes: 1000, stagingTtlMs: 400 });
    try {
      const t2 = other.forTenant("default");
      const kept = await t2.stage(new Blob([bytes(2500, 1)]).stream(), 1 << 20);
      const left = await t2.stage(new Blob([bytes(2500, 2)]).stream(), 1 << 20);
      expect(left.bytes).toBe(2500);
      await t2.commitStaged("s", kept, { expect: null });
      await sleep(800);
      expect((await chunkKeys(p2)).length).toBe(3); // the committed upload's
      expect(await readAll(other, "s")).toEqual(bytes(2500, 1));
      // Committing an upload that expired is refused, and changes nothing.
      await expect(t2.commitStaged("s", left)).rejects.toThrow(/expired/);
      expect(await readAll(other, "s")).toEqual(bytes(2500, 1));
      // Discarding a committed upload leaves the session whole.
      await kept.discard();
      expect(await readAll(other, "s")).toEqual(bytes(2500, 1));
      // Too large: refused, nothing left.
      await expect(t2.stage(new Blob([bytes(5000, 3)]).stream(), 4000)).rejects.toMatchObject({ reason: "too_large" });
      expect((await chunkKeys(p2)).length).toBe(3);
    } finally {
      await other.close();
    }
  });

  test("a reader's version outlives later commits only while it is open; a reader whose process died keeps it for readerTtlMs at most", async () => {
    const { store, prefix } = await isolated({ chunkBytes: 1000, readerTtlMs: 300 });
    const writer = await RedisSessionStore.connect(url, { prefix, chunkBytes: 1000 });
    try {
      const t = store.forTenant("default");
      const w = writer.forTenant("default");
      const first = bytes(5000, 1);
      await w.save("s", [first]);
      const reader = await t.open("s", 1000);
      await w.save("s", [bytes(3000, 2)]);
      expect((await chunkKeys(prefix)).length).toBe(8); // both versions while the reader is open
      await sleep(700); // past readerTtlMs: renewals keep it
      expect(new Uint8Array(await reader.read(reader.size))).toEqual(first);
      await reader.close();
      expect((await chunkKeys(prefix)).length).toBe(3);
      expect(await keys(`${prefix}*:pin:*`)).toEqual([]);

      // A reader left open by a process that died (its handle closed without closing the reader).
      const orphan = await t.open("s");
      await store.close();
      await w.save("s", [bytes(2000, 3)]);
      expect((await chunkKeys(prefix)).length).toBe(5);
      await sleep(300 + 1000 + 500);
      expect((await chunkKeys(prefix)).length).toBe(2);
      expect(await keys(`${prefix}*:pin:*`)).toEqual([]);
      void orphan;
    } finally {
      await store.close();
      await writer.close();
    }
  });

  test("summary reads a snapshot's headers through random access; decoding reads it through the buffered reader", async () => {
    const { store } = await isolated({ chunkBytes: 4096 });
    try {
      const cache = new KvCache("float32", 3, 2, 4);
      const length = 300;
      const make = (seed: number) => Float32Array.from({ length: 2 * length * 4 }, (_, i) => Math.sin(i + seed));
      const positions = Int32Array.from({ length }, (_, i) => i);
      cache.assign([make(1), make(2), make(3)], [make(4), make(5), make(6)], positions, length, length);
      const data = snapshotDataOf(cache, Int32Array.from({ length }, (_, i) => 1000 + i), cache.layerArrays(), { messages: [{ role: "user", content: "hi" }] });
      const encoded = concat(...encodeSnapshot(data, 64));
      const t = store.forTenant("default");
      await t.save("snap", encodeSnapshot(data, 64));
      const expected = await readSnapshotSummary(async (o, n) => encoded.slice(o, Math.min(encoded.length, o + n)), encoded.length);
      expect(await t.summary("snap")).toEqual(expected);
      const back = await t.read("snap", (r) => decodeSnapshot(r, { fingerprint: "f", modelId: "m", layers: 3, kvHeads: 2, headDim: 4, maxTokens: 10_000, vocabSize: 128256, kvDtype: "float32" }));
      expect(Array.from(back.tokens)).toEqual(Array.from(data.tokens));
      for (let l = 0; l < 3; l++) expect(Array.from(back.keys[l]!.subarray(0, length * 8))).toEqual(Array.from(data.keys[l]!.subarray(0, length * 8)));
      await expect(t.summary("absent")).rejects.toMatchObject({ name: "NotFound" });
    } finally {
      await store.close();
    }
  });

  test("description names the server without credentials; a server that is not there is an error naming it", async () => {
    const store = await RedisSessionStore.connect(url.replace("redis://", "redis://:secret@") + "/0");
    try {
      expect(store.description).toBe(`${url}/0`);
    } finally {
      await store.close();
    }
    // A port nothing listens on: the one of a server started and stopped just now.
    const gone = await startRedisServer();
    await gone.stop();
    await expect(RedisSessionStore.connect(gone.url)).rejects.toThrow(gone.url);
  });
});

/** The same store from another runtime: a script there reads what this process wrote and writes a version back. */
const PEER = `
import { RedisSessionStore } from ${JSON.stringify(resolve(import.meta.dir, "../runtime/stores/redis-store.ts"))};
const [url, prefix] = [process.argv[2], process.argv[3]];
const store = await RedisSessionStore.connect(url, { prefix, chunkBytes: 1000 });
const t = store.forTenant("default");
const lease = await t.lease("s", { ttlMs: 5000, wait: true });
const v = await t.head("s");
const got = await t.read("s", async (r) => new Uint8Array(await r.read(r.size)));
let sum = 0;
for (const b of got) sum = (sum + b) % 65521;
const next = await t.append("s", [new Uint8Array([sum & 255, sum >> 8])], v, { lease });
await lease.release();
await store.close();
console.log(JSON.stringify({ bytes: next.bytes, sum, token: lease.token }));
`;

describe.skipIf(!haveRedis)("redis store: Node and Deno workers on the same store", () => {
  const root = resolve(import.meta.dir, "..");
  const bin = (name: string) => join(root, "node_modules", ".bin", name);
  const runtimes: [string, (script: string, args: string[]) => string[]][] = [
    ["node", (script, args) => ["node", "--import", "tsx", script, ...args]],
    ["deno", (script, args) => [bin("deno"), "run", "-A", "--config", join(root, "deno.json"), script, ...args]],
  ];
  for (const [name, argv] of runtimes) {
    test(`${name} reads what Bun wrote, under a lease, and appends; Bun reads it back`, async () => {
      const prefix = `peer-${name}-${Date.now().toString(36)}:`;
      const store = await RedisSessionStore.connect(url, { prefix, chunkBytes: 1000 });
      const scriptDir = mkdtempSync(join(tmpdir(), `uls-peer-${name}-`));
      try {
        const t = store.forTenant("default");
        const data = bytes(25_000, 4);
        await t.save("s", [data]);
        const earlier = await t.lease("s", { ttlMs: 5000, wait: false });
        await earlier.release();
        const script = join(scriptDir, "peer.mts"); // an ES module wherever it lies
        writeFileSync(script, PEER);
        const [cmd, ...args] = argv(script, [url, prefix]);
        const proc = Bun.spawn([cmd!, ...args], { cwd: root, stdout: "pipe", stderr: "pipe" });
        const [out, err, code] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
        expect({ code, err: code === 0 ? "" : err }).toEqual({ code: 0, err: "" });
        const reply = JSON.parse(out.trim().split("\n").pop()!) as { bytes: number; sum: number; token: number };
        let sum = 0;
        for (const b of data) sum = (sum + b) % 65521;
        expect(reply.sum).toBe(sum);
        expect(reply.bytes).toBe(data.length + 2);
        expect(reply.token).toBeGreaterThan(earlier.token);
        expect(await readAll(store, "s")).toEqual(concat(data, new Uint8Array([sum & 255, sum >> 8])));
      } finally {
        await store.close();
        rmSync(scriptDir, { recursive: true, force: true });
      }
    }, 120_000);
  }
});
