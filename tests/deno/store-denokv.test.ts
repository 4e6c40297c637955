/// <reference lib="deno.unstable" />
/**
 * The Deno KV session store (runtime/stores/denokv-store.ts), under Deno:
 *
 *   deno test -A --unstable-kv tests/deno/
 *
 * (npm test runs it after the bun suite; bunfig.toml keeps bun test out of tests/deno/). Every case of the
 * store contract (tests/helpers/store-conformance.ts) against a SQLite-backed KV file that each open()
 * opens afresh, then what is particular to Deno KV: values within its 64 KiB limit, old versions and
 * refused uploads collected, forks that copy no chunk, readers that hold the version they read, what a
 * dead writer leaves swept, and a second Deno process on the same file.
 */
import assert from "node:assert/strict";
import { bytes, concat, STORE_CASES } from "../helpers/store-conformance.ts";
import { DEFAULT_CHUNK_BYTES, DenoKvSessionStore, type DenoKvTenant } from "../../runtime/stores/denokv-store.ts";

const dir = await Deno.makeTempDir({ prefix: "ulsess-denokv-" });
const path = `${dir}/store.sqlite`;
globalThis.addEventListener("unload", () => {
  try {
    Deno.removeSync(dir, { recursive: true });
  } catch {
    // already gone
  }
});

for (const [name, run] of STORE_CASES) Deno.test(`denokv conformance: ${name}`, () => run(() => DenoKvSessionStore.open(path)));

let n = 0;
const uid = (label: string) => `${label}-${Date.now().toString(36)}-${(n++).toString(36)}`;
const readAll = (t: DenoKvTenant, id: string) => t.read(id, async (r) => new Uint8Array(await r.read(r.size)));
const stream = (data: Uint8Array, chunk = 5000) =>
  new ReadableStream<Uint8Array>({
    start(c) {
      for (let at = 0; at < data.length; at += chunk) c.enqueue(data.slice(at, at + chunk));
      c.close();
    },
  });

/** A store on a KV file of its own, with a tenant of its own: key counts are the test's alone. */
async function withTenant(fn: (t: DenoKvTenant, store: DenoKvSessionStore, file: string) => Promise<void>, chunkBytes?: number): Promise<void> {
  const file = `${dir}/${uid("own")}.sqlite`;
  const store = await DenoKvSessionStore.open(file, { chunkBytes });
  try {
    const t = store.tenant("default");
    await store.idle(); // the first-use sweep
    await fn(t, store, file);
  } finally {
    await store.close();
  }
}

async function keys(file: string): Promise<{ key: Deno.KvKey; value: unknown }[]> {
  const kv = await Deno.openKv(file);
  try {
    const out: { key: Deno.KvKey; value: unknown }[] = [];
    for await (const e of kv.list({ prefix: [] })) out.push({ key: e.key, value: e.value });
    return out;
  } finally {
    kv.close();
  }
}

Deno.test("denokv: outside Deno KV's limits nothing is stored: chunks of 60 KiB by default, at most 64 KiB, every other value small", async () => {
  for (const chunkBytes of [undefined, 65536]) {
    await withTenant(async (t, _store, file) => {
      const data = bytes(2 * 2 ** 20 + 777, 3);
      const id = uid("limits");
      await t.save(id, [data]);
      await t.append(id, [bytes(70_000, 4)], (await t.head(id))!);
      const all = await keys(file);
      const chunk = chunkBytes ?? DEFAULT_CHUNK_BYTES;
      const chunks = all.filter((e) => e.key[2] === "blob");
      assert.equal(chunks.length, Math.ceil(data.length / chunk) + Math.ceil(70_000 / chunk));
      for (const e of all) {
        const size = e.value instanceof Uint8Array ? e.value.length : JSON.stringify(e.value, (_k, v) => (typeof v === "bigint" ? Number(v) : v))?.length ?? 0;
        assert.ok(size <= 65536, `${JSON.stringify(e.key)}: ${size} bytes`);
        if (!(e.value instanceof Uint8Array)) assert.ok(size < 4096, `${JSON.stringify(e.key)}: ${size} bytes`);
      }
      assert.deepEqual(await readAll(t, id), concat(data, bytes(70_000, 4)));
    }, chunkBytes);
  }
  await assert.rejects(DenoKvSessionStore.open(`${dir}/x.sqlite`, { chunkBytes: 65537 }), RangeError);
});

Deno.test("denokv: old versions are collected (replaced, truncated away, removed); what is left is the current version's", async () => {
  await withTenant(async (t) => {
    const id = uid("gc");
    const v1 = await t.save(id, [bytes(1_000_000, 1)]);
    const v2 = await t.save(id, [bytes(500_000, 2)], { expect: v1 });
    let c = await t.census();
    assert.equal(c.blob, Math.ceil(500_000 / DEFAULT_CHUNK_BYTES));
    assert.equal(c.meta, 1);
    assert.equal(c.ref, 1);
    const v3 = await t.append(id, [bytes(200_000, 3)], v2);
    c = await t.census();
    assert.equal(c.blob, Math.ceil(500_000 / DEFAULT_CHUNK_BYTES) + Math.ceil(200_000 / DEFAULT_CHUNK_BYTES));
    assert.equal(c.meta, 2);
    // Truncating back to the base drops the delta's blob.
    await t.truncate(id, v3.bytes - 200_000);
    c = await t.census();
    assert.equal(c.blob, Math.ceil(500_000 / DEFAULT_CHUNK_BYTES));
    assert.equal(c.meta, 1);
    assert.deepEqual(await readAll(t, id), bytes(500_000, 2));
    await t.remove(id);
    c = await t.census();
    assert.deepEqual([c.head, c.blob, c.meta, c.ref, c.pin], [undefined, undefined, undefined, undefined, undefined]);
  });
});

Deno.test("denokv: a fork adds a head and refcounts, no chunk; the parent's removal keeps the shared chunks", async () => {
  await withTenant(async (t) => {
    const parent = uid("p");
    const data = bytes(1_500_000, 5);
    await t.save(parent, [data]);
    const before = await t.census();
    const t0 = performance.now();
    const v = await t.fork(parent, uid("c"));
    const forkMs = performance.now() - t0;
    const after = await t.census();
    assert.equal(after.blob, before.blob);
    assert.equal(after.meta, before.meta);
    assert.equal(after.head, before.head + 1);
    assert.equal(v.bytes, data.length);
    assert.ok(forkMs < 1000, `fork took ${forkMs} ms`);
    await t.remove(parent);
    assert.equal((await t.census()).blob, before.blob);
  });
});

Deno.test("denokv: an open reader pins its version's blobs; the last one out collects them", async () => {
  await withTenant(async (t) => {
    const id = uid("pin");
    const first = bytes(400_000, 6);
    const v1 = await t.save(id, [first]);
    const r1 = await t.open(id);
    const r2 = await t.open(id);
    await t.save(id, [bytes(1000, 7)], { expect: v1 });
    const c = await t.census();
    assert.equal(c.meta, 2, "the old blob stays while read");
    assert.equal(c.pin, 2);
    assert.deepEqual(new Uint8Array(await r1.read(r1.size)), first);
    await r1.close();
    assert.equal((await t.census()).meta, 2, "another reader still holds it");
    assert.deepEqual(new Uint8Array(await r2.read(r2.size)), first);
    await r2.close();
    const end = await t.census();
    assert.equal(end.meta, 1);
    assert.equal(end.pin, undefined);
    assert.equal(end.blob, 1);
  });
});

Deno.test("denokv: refused and discarded uploads, and failed saves, leave no key", async () => {
  await withTenant(async (t) => {
    const empty = await t.census();
    await assert.rejects(t.stage(stream(bytes(300_000, 8)), 200_000), (e: Error & { reason?: string }) => e.reason === "too_large");
    const staged = await t.stage(stream(bytes(300_000, 8)), 400_000);
    assert.equal((await t.census()).meta, 1);
    await staged.discard();
    const id = uid("fail");
    const v1 = await t.save(id, [bytes(10, 1)]);
    await t.save(id, [bytes(10, 2)]);
    await assert.rejects(t.save(id, [bytes(200_000, 3)], { expect: v1 }), { name: "StaleVersion" });
    const after = await t.census();
    assert.equal(after.meta, 1);
    assert.equal(after.blob, 1);
    assert.equal(empty.meta, undefined);
    // A save that throws half way leaves nothing either.
    async function* failing() {
      yield bytes(200_000, 4);
      throw new Error("the writer's source failed");
    }
    await assert.rejects(t.save(id, failing()), /source failed/);
    assert.deepEqual(await t.census(), after);
  });
});

Deno.test("denokv: a sweep removes a dead writer's pending blob and a blob whose collection was cut short; a live writer's stays", async () => {
  await withTenant(async (t, _store, file) => {
    const id = uid("sweep");
    await t.save(id, [bytes(100_000, 1)]);
    const kv = await Deno.openKv(file);
    try {
      const p = ["ulsess", "default"];
      // A writer that died 2 hours ago, one that writes now, and a committed blob no head lists (refcount 0).
      await kv.set([...p, "meta", "dead"], { pending: true, touchedAt: Date.now() - 2 * 3600_000, bytes: 0, chunk: 61440, chunks: 0 });
      for (let i = 0; i < 3; i++) await kv.set([...p, "blob", "dead", i], new Uint8Array(1000));
      await kv.set([...p, "meta", "live"], { pending: true, touchedAt: Date.now(), bytes: 0, chunk: 61440, chunks: 0 });
      await kv.set([...p, "blob", "live", 0], new Uint8Array(1000));
      await kv.set([...p, "meta", "orphan"], { pending: false, touchedAt: Date.now(), bytes: 2000, chunk: 1000, chunks: 2 });
      await kv.set([...p, "ref", "orphan"], new Deno.KvU64(0n));
      for (let i = 0; i < 2; i++) await kv.set([...p, "blob", "orphan", i], new Uint8Array(1000));
    } finally {
      kv.close();
    }
    await t.sweep(true);
    const left = (await keys(file)).filter((e) => e.key[2] === "blob" || e.key[2] === "meta" || e.key[2] === "ref").map((e) => String(e.key[3]));
    assert.ok(!left.includes("dead") && !left.includes("orphan"), left.join(","));
    assert.ok(left.includes("live"));
    assert.deepEqual(await readAll(t, id), bytes(100_000, 1));
  });
});

Deno.test("denokv: a log of many appends stays within one atomic commit (deltas merged past the segment limit) and reads back whole", async () => {
  await withTenant(async (t) => {
    const id = uid("log");
    const parts = [bytes(100_000, 1)];
    let v = await t.save(id, [parts[0]!]);
    for (let i = 0; i < 230; i++) {
      const d = bytes(50 + i, i);
      parts.push(d);
      v = await t.append(id, [d], v);
    }
    assert.deepEqual(await readAll(t, id), concat(...parts));
    assert.ok((await t.census()).meta! <= 200);
    // Odd-sized temporary reads across segment and chunk edges.
    const again = await t.read(id, async (r) => {
      const out: Uint8Array[] = [];
      for (let left = r.size; left > 0; ) {
        const k = Math.min(left, 1 + (left % 97));
        out.push(new Uint8Array(await r.readTemporary!(k)));
        left -= k;
      }
      return concat(...out);
    });
    assert.deepEqual(again, concat(...parts));
  });
});

const deno = Deno.execPath();
const child = (file: string, id: string, mode: string) =>
  new Deno.Command(deno, { args: ["run", "-A", "--unstable-kv", new URL("./denokv-child.ts", import.meta.url).pathname, file, id, mode], stdin: "piped", stdout: "piped", stderr: "inherit" }).spawn();

async function firstLine(stdout: ReadableStream<Uint8Array>): Promise<{ line: string; rest: ReadableStreamDefaultReader<string> }> {
  const reader = stdout.pipeThrough(new TextDecoderStream() as unknown as TransformStream<Uint8Array, string>).getReader();
  let text = "";
  while (!text.includes("\n")) {
    const { value, done } = await reader.read();
    if (done) break;
    text += value;
  }
  return { line: text.split("\n")[0]!, rest: reader };
}

Deno.test("denokv: two Deno processes on one KV file see each other's commits and leases", async () => {
  const file = `${dir}/${uid("procs")}.sqlite`;
  const store = await DenoKvSessionStore.open(file);
  try {
    const t = store.forTenant("default");
    const id = uid("shared");
    const base = bytes(300_000, 9);
    const v1 = await t.save(id, [base]);
    const proc = child(file, id, "turn");
    const w = proc.stdin.getWriter();
    await w.write(new TextEncoder().encode(v1.tag + "\n"));
    const { line, rest } = await firstLine(proc.stdout);
    const got = JSON.parse(line) as { token: number; version: { tag: string; bytes: number } };
    // The child's commit is ours to see, and its lease is held against us.
    assert.deepEqual(await t.head(id), got.version);
    assert.deepEqual(await readAll(t as DenoKvTenant, id), concat(base, new TextEncoder().encode("child turn")));
    await assert.rejects(t.lease(id, { ttlMs: 5000, wait: false }), { name: "SessionBusy" });
    await assert.rejects(t.append(id, [bytes(5, 1)], v1), { name: "StaleVersion" });
    await w.write(new TextEncoder().encode("release\n"));
    await w.close();
    await rest.cancel();
    assert.equal((await proc.status).code, 0);
    const mine = await t.lease(id, { ttlMs: 5000, wait: false });
    assert.ok(mine.token > got.token);
    await t.append(id, [bytes(5, 2)], got.version, { lease: mine });
    await mine.release();

    // A holder killed with SIGKILL: its lease expires (ttl 400 ms) and this process takes the session.
    const holder = child(file, id, "hold");
    const held = await firstLine(holder.stdout);
    const token = (JSON.parse(held.line) as { token: number }).token;
    await new Promise((r) => setTimeout(r, 900)); // past its ttl: renewed by the other process
    await assert.rejects(t.lease(id, { ttlMs: 5000, wait: false }), { name: "SessionBusy" });
    holder.kill("SIGKILL");
    await holder.status;
    await held.rest.cancel();
    await holder.stdin.close();
    const t0 = Date.now();
    const next = await t.lease(id, { ttlMs: 5000, wait: true });
    assert.ok(Date.now() - t0 < 3000);
    assert.ok(next.token > token);
    await next.release();
  } finally {
    await store.close();
  }
});

Deno.test("denokv: open() outside Deno KV's flag or runtime names what is missing", async () => {
  const saved = (Deno as unknown as { openKv?: unknown }).openKv;
  const g = globalThis as unknown as { Deno: { openKv?: unknown } };
  try {
    Object.defineProperty(g.Deno, "openKv", { value: undefined, configurable: true, writable: true });
    await assert.rejects(DenoKvSessionStore.open(":memory:"), /--unstable-kv/);
  } finally {
    Object.defineProperty(g.Deno, "openKv", { value: saved, configurable: true, writable: true });
  }
});
