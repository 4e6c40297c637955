/**
 * The file store (`--session-store file:<dir>`, the default) against the session-store contract
 * (tests/helpers/store-conformance.ts): each open() is a new handle on the same directory, as another
 * process on the machine would have.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { FileSessionStore } from "../runtime/stores/file-store.ts";
import { STORE_CASES } from "./helpers/store-conformance.ts";

const dir = mkdtempSync(join(tmpdir(), "store-file-"));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe("file store: the session-store contract", () => {
  for (const [name, run] of STORE_CASES) test(name, () => run(async () => new FileSessionStore(dir)), 30_000);
});

describe("file store: leases survive a writer killed at any point", () => {
  test("a claim file left empty or half-written (a process killed while writing it) holds the session for a minute at most", async () => {
    const { mkdirSync, writeFileSync, utimesSync, readdirSync } = await import("node:fs");
    const root = mkdtempSync(join(tmpdir(), "store-file-claims-"));
    try {
      const store = new FileSessionStore(root);
      const t = store.forTenant("default");
      mkdirSync(join(root, ".leases"), { recursive: true });
      writeFileSync(join(root, ".leases", "doc.1"), '{"owner":"12'); // cut off mid-write
      // Just written: it may be a claim being written now, so the session is busy...
      await expect(t.lease("doc", { ttlMs: 1000, wait: false })).rejects.toThrow("busy");
      // ...but not forever.
      const old = new Date(Date.now() - 120_000);
      utimesSync(join(root, ".leases", "doc.1"), old, old);
      const lease = await t.lease("doc", { ttlMs: 1000, wait: false });
      expect(lease.token).toBe(2);
      await lease.release();
      // Claims are linked into place whole: no temporary files are left beside them.
      expect(readdirSync(root).filter((f) => f.startsWith(".tmp-"))).toEqual([]);
      await store.close();
    } finally {
      rmSync(root, { recursive: true, force: true });
    }
  });
});
