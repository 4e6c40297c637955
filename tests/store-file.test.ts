/**
 * The file store (`--session-store file:<dir>`, the default) against the session-store contract
 * (tests/helpers/store-conformance.ts): each open() is a new handle on the same directory, as another
 * process on the machine would have.
 */
import { afterAll, describe, test } from "bun:test";
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
