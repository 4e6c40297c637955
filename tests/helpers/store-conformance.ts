/**
 * The contract of runtime/session-store.ts, as cases any store must pass: plain async functions over
 * node:assert, so that bun test (file and Redis stores) and deno test (Deno KV) run the same cases.
 *
 *   for (const [name, run] of STORE_CASES) test(name, () => run(() => openStore()));
 *
 * `open` gives a fresh handle on the same shared store each call (as another worker would have); the
 * cases use their own unique session ids, so one store can serve them all.
 */
import assert from "node:assert/strict";
import type { SessionStore, TenantStore } from "../../runtime/session-store.ts";

export type OpenStore = () => Promise<SessionStore>;
export type StoreCase = (open: OpenStore) => Promise<void>;

let counter = 0;
const uid = (label: string) => `${label}-${Date.now().toString(36)}-${(counter++).toString(36)}-${Math.floor(Math.random() * 1e6).toString(36)}`;

/** `n` bytes of a pattern that differs by seed. */
export const bytes = (n: number, seed: number) => Uint8Array.from({ length: n }, (_, i) => (i * 31 + seed * 7) & 255);
/** The parts, one after another, in one array. */
export const concat = (...parts: Uint8Array[]) => {
  const out = new Uint8Array(parts.reduce((a, p) => a + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
};

async function readAll(t: TenantStore, id: string): Promise<Uint8Array> {
  return t.read(id, async (r) => {
    const out = await r.read(r.size);
    assert.equal(out.length, r.size);
    return new Uint8Array(out);
  });
}

function stream(data: Uint8Array, chunk = 1000): ReadableStream<Uint8Array> {
  let at = 0;
  return new ReadableStream({
    pull(c) {
      if (at >= data.length) return c.close();
      c.enqueue(data.slice(at, at + chunk));
      at += chunk;
    },
  });
}

async function rejectsWith(p: Promise<unknown>, name: string): Promise<void> {
  await assert.rejects(p, (e: Error) => {
    assert.equal(e.name, name, `expected ${name}, got ${e.name}: ${e.message}`);
    return true;
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function withStore(open: OpenStore, fn: (s: SessionStore) => Promise<void>): Promise<void> {
  const s = await open();
  try {
    await fn(s);
  } finally {
    await s.close();
  }
}

export const STORE_CASES: [string, StoreCase][] = [
  [
    "save, head, open and read a version; a larger snapshot (several MB, many chunks) reads back whole",
    (open) =>
      withStore(open, async (s) => {
        const t = s.forTenant("default");
        const id = uid("save");
        assert.equal(await t.has(id), false);
        assert.equal(await t.head(id), null);
        const data = bytes(3 * 2 ** 20 + 12345, 1);
        const v = await t.save(id, [data.subarray(0, 1000), data.subarray(1000)], { expect: null });
        assert.equal(v.bytes, data.length);
        assert.deepEqual(await t.head(id), v);
        assert.equal(await t.has(id), true);
        assert.ok((await t.ids()).includes(id));
        assert.deepEqual(await readAll(t, id), data);
        // Reads in odd sizes, and readTemporary where offered, give the same bytes.
        const again = await t.read(id, async (r) => {
          assert.deepEqual(r.version, v);
          const parts: Uint8Array[] = [];
          for (let left = r.size; left > 0; ) {
            const n = Math.min(left, 77777);
            parts.push(new Uint8Array(r.readTemporary ? await r.readTemporary(n) : await r.read(n)));
            left -= n;
          }
          return concat(...parts);
        });
        assert.deepEqual(again, data);
      }),
  ],
  [
    "save with expect: null refuses an existing session (Exists); with a stale version refuses (StaleVersion); without expect replaces",
    (open) =>
      withStore(open, async (s) => {
        const t = s.forTenant("default");
        const id = uid("expect");
        const v1 = await t.save(id, [bytes(100, 1)], { expect: null });
        await rejectsWith(t.save(id, [bytes(100, 2)], { expect: null }), "Exists");
        const v2 = await t.save(id, [bytes(120, 3)], { expect: v1 });
        assert.notEqual(v2.tag, v1.tag);
        await rejectsWith(t.save(id, [bytes(100, 4)], { expect: v1 }), "StaleVersion");
        const v3 = await t.save(id, [bytes(90, 5)]);
        assert.notEqual(v3.tag, v2.tag);
        assert.deepEqual(await readAll(t, id), bytes(90, 5));
      }),
  ],
  [
    "append to the current version makes a new one; to an old version it is refused and nothing changes",
    (open) =>
      withStore(open, async (s) => {
        const t = s.forTenant("default");
        const id = uid("append");
        const base = bytes(5000, 1);
        const v1 = await t.save(id, [base]);
        const delta = bytes(700, 2);
        const v2 = await t.append(id, [delta.subarray(0, 300), delta.subarray(300)], v1);
        assert.equal(v2.bytes, 5700);
        assert.notEqual(v2.tag, v1.tag);
        assert.deepEqual(await readAll(t, id), concat(base, delta));
        await rejectsWith(t.append(id, [bytes(10, 3)], v1), "StaleVersion");
        assert.deepEqual(await t.head(id), v2);
        assert.deepEqual(await readAll(t, id), concat(base, delta));
        // Truncate back to the base: a new version, the base's bytes.
        const v3 = await t.truncate(id, 5000);
        assert.equal(v3.bytes, 5000);
        assert.deepEqual(await readAll(t, id), base);
      }),
  ],
  [
    "a reader keeps the version it opened while later commits happen",
    (open) =>
      withStore(open, async (s) => {
        const t = s.forTenant("default");
        const id = uid("snapshot-read");
        const first = bytes(2 * 2 ** 20, 1);
        const v1 = await t.save(id, [first]);
        const reader = await t.open(id);
        try {
          const head = await reader.read(1000);
          await t.append(id, [bytes(500, 2)], v1);
          await t.save(id, [bytes(10, 3)]);
          const rest = await reader.read(reader.size - 1000);
          assert.equal(reader.size, first.length);
          assert.deepEqual(concat(new Uint8Array(head), new Uint8Array(rest)), first);
        } finally {
          await reader.close();
        }
      }),
  ],
  [
    "another handle on the same store sees every commit (versions, bytes, ids, removal)",
    (open) =>
      withStore(open, async (a) =>
        withStore(open, async (b) => {
          const ta = a.forTenant("default");
          const tb = b.forTenant("default");
          const id = uid("shared");
          const v1 = await ta.save(id, [bytes(1000, 1)]);
          assert.deepEqual(await tb.head(id), v1);
          const v2 = await tb.append(id, [bytes(10, 2)], v1);
          assert.deepEqual(await ta.head(id), v2);
          await rejectsWith(ta.append(id, [bytes(10, 3)], v1), "StaleVersion");
          assert.deepEqual(await readAll(ta, id), concat(bytes(1000, 1), bytes(10, 2)));
          await tb.remove(id);
          assert.equal(await ta.has(id), false);
          assert.ok(!(await ta.ids()).includes(id));
          await rejectsWith(ta.open(id), "NotFound");
        }),
      ),
  ],
  [
    "tenants are apart: the same id in two tenants is two sessions, and listing shows only one's own",
    (open) =>
      withStore(open, async (s) => {
        const id = uid("tenant");
        const x = s.forTenant("default");
        const y = s.forTenant(`t${counter}`);
        await x.save(id, [bytes(10, 1)]);
        assert.equal(await y.has(id), false);
        await y.save(id, [bytes(20, 2)]);
        assert.deepEqual(await readAll(x, id), bytes(10, 1));
        assert.deepEqual(await readAll(y, id), bytes(20, 2));
        assert.deepEqual(await y.ids(), [id]);
        await y.remove(id);
        assert.equal(await x.has(id), true);
      }),
  ],
  [
    "fork: the child reads the parent's version; each side's later commits leave the other as it was; deleting the parent keeps the child",
    (open) =>
      withStore(open, async (s) => {
        const t = s.forTenant("default");
        const parent = uid("parent");
        const child = uid("child");
        const base = bytes(3 * 2 ** 20, 1);
        const v1 = await t.save(parent, [base]);
        await rejectsWith(t.fork(uid("none"), child), "NotFound");
        const c1 = await t.fork(parent, child);
        assert.equal(c1.bytes, v1.bytes);
        await rejectsWith(t.fork(parent, child), "Exists");
        assert.deepEqual(await readAll(t, child), base);
        const p2 = await t.append(parent, [bytes(100, 2)], v1);
        const c2 = await t.append(child, [bytes(50, 3)], c1);
        assert.deepEqual(await readAll(t, parent), concat(base, bytes(100, 2)));
        assert.deepEqual(await readAll(t, child), concat(base, bytes(50, 3)));
        await t.save(parent, [bytes(10, 4)], { expect: p2 });
        assert.deepEqual(await readAll(t, child), concat(base, bytes(50, 3)));
        await t.remove(parent);
        assert.deepEqual(await readAll(t, child), concat(base, bytes(50, 3)));
        assert.deepEqual(await t.head(child), c2);
      }),
  ],
  [
    "staged uploads: whole bytes, committed as a version or discarded; past the limit refused (too_large) with nothing left",
    (open) =>
      withStore(open, async (s) => {
        const t = s.forTenant("default");
        const id = uid("staged");
        const data = bytes(300_000, 7);
        const staged = await t.stage(stream(data), 1 << 20);
        assert.equal(staged.bytes, data.length);
        const r = await staged.open();
        assert.deepEqual(new Uint8Array(await r.read(r.size)), data);
        await r.close();
        const v = await t.commitStaged(id, staged, { expect: null });
        assert.equal(v.bytes, data.length);
        assert.deepEqual(await readAll(t, id), data);
        const other = await t.stage(stream(bytes(1000, 8)), 1 << 20);
        await other.discard();
        await assert.rejects(t.stage(stream(bytes(5000, 9)), 4000), (e: Error & { reason?: string }) => e.reason === "too_large");
      }),
  ],
  [
    "leases: one holder at a time across handles; busy without waiting; a waiter gets it on release; tokens grow",
    (open) =>
      withStore(open, async (a) =>
        withStore(open, async (b) => {
          const id = uid("lease");
          const ta = a.forTenant("default");
          const tb = b.forTenant("default");
          const l1 = await ta.lease(id, { ttlMs: 5000, wait: false });
          assert.ok(l1.held);
          await rejectsWith(tb.lease(id, { ttlMs: 5000, wait: false }), "SessionBusy");
          const waiting = tb.lease(id, { ttlMs: 5000, wait: true });
          await sleep(50);
          await l1.release();
          assert.equal(l1.held, false);
          const l2 = await waiting;
          assert.ok(l2.token > l1.token);
          await l2.release();
          const l3 = await ta.lease(id, { ttlMs: 5000, wait: false });
          assert.ok(l3.token > l2.token);
          await l3.release();
        }),
      ),
  ],
  [
    "leases expire unless renewed: a holder that is gone (never renews) frees the session after ttl; a live holder keeps it past ttl",
    (open) =>
      withStore(open, async (a) =>
        withStore(open, async (b) => {
          const id = uid("expiry");
          const ta = a.forTenant("default");
          const tb = b.forTenant("default");
          const live = await ta.lease(id, { ttlMs: 300, wait: false });
          await sleep(700); // renewed every 100 ms: still held
          assert.ok(live.held);
          await rejectsWith(tb.lease(id, { ttlMs: 300, wait: false }), "SessionBusy");
          // A handle closed without releasing stops renewing, like a killed process.
          await a.close();
          const t0 = Date.now();
          const next = await tb.lease(id, { ttlMs: 300, wait: true });
          assert.ok(Date.now() - t0 < 3000);
          assert.ok(next.token > live.token);
          await next.release();
        }),
      ),
  ],
  [
    "fencing: a commit under a lease that lost the session to another holder is refused (LeaseLost) and changes nothing",
    (open) =>
      withStore(open, async (a) =>
        withStore(open, async (b) => {
          const id = uid("fence");
          const ta = a.forTenant("default");
          const tb = b.forTenant("default");
          const v1 = await ta.save(id, [bytes(100, 1)]);
          const old = await ta.lease(id, { ttlMs: 300, wait: false });
          await a.close(); // stops renewing; the lease expires
          const fresh = await tb.lease(id, { ttlMs: 5000, wait: true });
          const v2 = await tb.append(id, [bytes(10, 2)], v1, { lease: fresh });
          const again = await open();
          try {
            const tc = again.forTenant("default");
            await rejectsWith(tc.save(id, [bytes(5, 3)], { lease: old }), "LeaseLost");
            await rejectsWith(tc.append(id, [bytes(5, 3)], v2, { lease: old }), "LeaseLost");
            await rejectsWith(tc.remove(id, { lease: old }), "LeaseLost");
          } finally {
            await again.close();
          }
          assert.deepEqual(await tb.head(id), v2);
          await fresh.release();
        }),
      ),
  ],
];
