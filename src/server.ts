/**
 * What every entry point does before it listens: read the configuration, load the model, build the app.
 * Runtime-specific listening lives in entry/*.ts.
 */
import { stderr } from "node:process";
import { fileURLToPath } from "node:url";
import type { Hono } from "hono";
import { Engine, SessionManager, SnapshotStore } from "../runtime/index.ts";
import { createApp } from "./app.ts";
import { loadConfig, type ServerConfig } from "./config.ts";

/** The built-in model folder, written by `npm run build:model` (scripts/build-model.ts). */
export const BUILTIN_MODEL_DIR = fileURLToPath(new URL("../models/builtin/", import.meta.url));

export interface Server {
  app: Hono;
  engine: Engine;
  sessions: SessionManager;
  config: ServerConfig;
}

export async function createServer(env: Record<string, string | undefined>, argv: string[]): Promise<Server> {
  const config = loadConfig(env, argv);
  const engine = await Engine.load({
    modelDir: config.modelDir ?? BUILTIN_MODEL_DIR,
    modelId: config.modelId,
    variant: config.variant,
    backend: config.backend,
    threads: config.threads,
    queueLimit: config.queueLimit,
    contextLength: config.ctxSize,
    prefillChunk: config.prefillChunk,
    prefillTargetMs: config.prefillTargetMs,
    textLimits: { maxFieldChars: config.maxFieldChars, maxPromptChars: config.maxPromptChars, maxRunChars: config.maxRunChars },
  });
  const sessions = new SessionManager(engine, new SnapshotStore(config.sessionDir), {
    memoryBudgetBytes: config.sessionMemoryBytes,
    busy: config.sessionBusy,
    chunkTokens: config.snapshotChunkTokens,
  });
  const app = createApp({ engine, sessions, maxBodyBytes: config.maxBodyBytes, maxSnapshotBytes: config.maxSnapshotBytes, apiKey: config.apiKey });
  return { app, engine, sessions, config };
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
