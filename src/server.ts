/**
 * What every entry point does before it listens: read the configuration, load the model, build the app.
 * Runtime-specific listening lives in entry/*.ts.
 */
import { readFile } from "node:fs/promises";
import { stderr } from "node:process";
import { fileURLToPath } from "node:url";
import type { Context, Hono } from "hono";
import { Engine, SessionManager } from "../runtime/index.ts";
import { openSessionStore } from "../runtime/stores/open.ts";
import { createApp } from "./app.ts";
import { ApiKeysError, keyTable, parseApiKeysFile, type ApiKey } from "./auth.ts";
import { loadConfig, type ServerConfig } from "./config.ts";

/** The built-in model folder, written by `npm run build:model` (scripts/build-model.ts). */
export const BUILTIN_MODEL_DIR = fileURLToPath(new URL("../models/builtin/", import.meta.url));

export interface Server {
  app: Hono;
  engine: Engine;
  sessions: SessionManager;
  config: ServerConfig;
  /** Set by shutdown(): the app answers 503 to requests that arrive after it. */
  draining: { active: boolean };
  /** The entry point sets how a request's idle timeout is lifted (see AppOptions.idle). */
  idle: { exempt: (c: Context) => void };
}

async function readApiKeysFile(path: string): Promise<ApiKey[]> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (e) {
    throw new ApiKeysError(`API keys file ${path}: cannot be read (${(e as Error).message})`);
  }
  return parseApiKeysFile(text, path);
}

export async function createServer(env: Record<string, string | undefined>, argv: string[]): Promise<Server> {
  const config = loadConfig(env, argv);
  // Keys before the model: a bad keys file should stop start-up at once.
  const apiKeys = config.apiKeysFile !== undefined ? await readApiKeysFile(config.apiKeysFile) : [];
  keyTable({ apiKey: config.apiKey, apiKeys });
  const engine = await Engine.load({
    modelDir: config.modelDir ?? BUILTIN_MODEL_DIR,
    modelId: config.modelId,
    variant: config.variant,
    backend: config.backend,
    threads: config.threads,
    queueLimit: config.queueLimit,
    contextLength: config.ctxSize,
    prefillChunk: config.prefillChunk,
    kvMemoryBytes: config.kvMemoryBytes,
    prefillTargetMs: config.prefillTargetMs,
    compaction: {
      policy: config.kvPolicy,
      budget: config.kvBudget,
      coldDir: config.kvColdDir,
      recallPlacement: config.kvPlacement,
      ...(config.kvRecent > 0 ? { recent: config.kvRecent } : {}),
      ...(config.kvRecall !== "auto" ? { recall: config.kvRecall === "on" } : {}),
    },
    textLimits: { maxFieldChars: config.maxFieldChars, maxPromptChars: config.maxPromptChars, maxRunChars: config.maxRunChars },
  });
  const store = await openSessionStore(config.sessionStore ?? `file:${config.sessionDir}`);
  const sessions = new SessionManager(engine, store, {
    memoryBudgetBytes: config.sessionMemoryBytes,
    busy: config.sessionBusy,
    chunkTokens: config.snapshotChunkTokens,
    leaseMs: config.sessionLeaseMs,
  });
  const draining = { active: false };
  const idle = { exempt: (_c: Context) => {} };
  const app = createApp({
    engine,
    sessions,
    maxBodyBytes: config.maxBodyBytes,
    maxSnapshotBytes: config.maxSnapshotBytes,
    apiKey: config.apiKey,
    apiKeys,
    draining,
    idle,
  });
  return { app, engine, sessions, config, draining, idle };
}

export function startupLine(server: Server, runtime: string, url: string): string {
  const i = server.engine.info;
  return (
    `ultralong-serve on ${runtime}: model ${i.modelId} (${i.variant}, kv ${i.kvDtype}, ctx ${i.contextLength}) ` +
    `backend ${i.backend} [${i.backendDetail}] loaded in ${i.loadMs} ms; listening on ${url}`
  );
}

/**
 * createServer for an entry point: a start-up failure (a config or model-folder problem is a user error)
 * is printed as one readable message and the process exits with status 1 through the runtime's `exit`.
 */
export async function createServerOrExit(env: Record<string, string | undefined>, argv: string[], exit: (code: number) => never): Promise<Server> {
  try {
    return await createServer(env, argv);
  } catch (error) {
    const message = `ultralong-serve failed to start: ${error instanceof Error ? error.message : String(error)}\n`;
    // Exit only once the message is written: stderr may be a pipe that a supervisor reads.
    await new Promise<void>((resolve) => stderr.write(message, () => resolve()));
    return exit(1);
  }
}

/** What an entry point gives shutdown(): how to stop its listener, exit, and hear signals. */
export interface ShutdownHooks {
  /**
   * Stops accepting connections and resolves once every accepted one has finished (in-flight responses,
   * streams included, run to their end).
   */
  stopListening: () => Promise<void>;
  exit: (code: number) => never;
  onSignal: (signal: "SIGINT" | "SIGTERM", handler: () => void) => void;
  log?: (message: string) => void;
}

/**
 * Graceful shutdown on SIGTERM / SIGINT: stop accepting, let running and queued requests finish and
 * sessions be persisted within --shutdown-grace-ms, release the model, exit 0. If the grace runs out the
 * process says so and exits 1 without waiting (each session's last completed snapshot stays in the store:
 * snapshots are replaced by rename). A second signal exits at once.
 */
export function exitOnSignals(server: Server, hooks: ShutdownHooks): void {
  const log = hooks.log ?? ((m: string) => console.error(m));
  let started = false;
  const onSignal = (signal: string) => {
    if (started) {
      log(`ultralong-serve: ${signal} again: exiting now, without waiting for running requests`);
      hooks.exit(1);
    }
    started = true;
    void shutdown(server, signal, hooks.stopListening, log).then(hooks.exit, (error: unknown) => {
      log(`ultralong-serve: shutdown failed: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}`);
      hooks.exit(1);
    });
  };
  hooks.onSignal("SIGTERM", () => onSignal("SIGTERM"));
  hooks.onSignal("SIGINT", () => onSignal("SIGINT"));
}

/** The shutdown sequence; resolves with the exit status (0: everything finished within the grace). */
export async function shutdown(server: Server, signal: string, stopListening: () => Promise<void>, log: (message: string) => void): Promise<number> {
  const grace = server.config.shutdownGraceMs;
  const q = server.engine.queueState;
  server.draining.active = true;
  log(
    `ultralong-serve: ${signal}: not accepting new connections; letting ${q.busy ? 1 : 0} running and ${q.waiting} queued ` +
      `request(s) finish (grace ${grace} ms)`,
  );
  const deadline = Date.now() + grace;
  let timer: ReturnType<typeof setTimeout> | undefined;
  const graceOver = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), grace);
  });
  const finished = (async () => {
    await Promise.all([stopListening(), server.engine.idle()]);
    // Sessions are written under their locks (turns, appends, uploads): wait for those writes too.
    return server.sessions.drain(Math.max(0, deadline - Date.now()));
  })();
  const done = await Promise.race([finished, graceOver]);
  clearTimeout(timer);
  if (!done) {
    const now = server.engine.queueState;
    log(
      `ultralong-serve: the shutdown grace of ${grace} ms ran out with work unfinished (${now.busy ? 1 : 0} running, ` +
        `${now.waiting} queued, or a session still being written); exiting with status 1`,
    );
    return 1;
  }
  await server.engine.close();
  log("ultralong-serve: every request finished and every session is persisted; exiting");
  return 0;
}
