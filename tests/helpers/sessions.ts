/** An app with sessions on a fresh temporary snapshot store. */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createApp } from "../../src/app.ts";
import { SessionManager, SnapshotStore, type BusyPolicy, type Engine } from "../../runtime/index.ts";

const made: string[] = [];
process.on("exit", () => {
  for (const dir of made) rmSync(dir, { recursive: true, force: true });
});

/** A new temporary directory, removed when the test process exits. */
export function tempDir(label: string): string {
  const dir = mkdtempSync(join(tmpdir(), `${label}-`));
  made.push(dir);
  return dir;
}

export function sessionApp(engine: Engine, options: { dir?: string; busy?: BusyPolicy; memoryBudgetBytes?: number; maxSnapshotBytes?: number; chunkTokens?: number } = {}) {
  const dir = options.dir ?? tempDir("sessions");
  const sessions = new SessionManager(engine, new SnapshotStore(dir), {
    memoryBudgetBytes: options.memoryBudgetBytes ?? 2 ** 30,
    busy: options.busy ?? "wait",
    chunkTokens: options.chunkTokens ?? 64,
  });
  const app = createApp({ engine, sessions, maxBodyBytes: 4 * 1024 * 1024, maxSnapshotBytes: options.maxSnapshotBytes ?? 64 * 1024 * 1024, log: () => {} });
  const post = (path: string, body: unknown) => app.request(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  return { app, sessions, dir, post };
}
