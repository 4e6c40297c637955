/** Shared test fixtures: the built-in model folder (built by scripts/run-tests.ts before the suites run). */
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Engine, type EngineOptions } from "../../runtime/index.ts";

export const REPO = fileURLToPath(new URL("../../", import.meta.url));
/** Seeded random weights: long, varied greedy output, which the decoding and HTTP tests need. */
export const MODEL_DIR = join(REPO, "models", "random");
/** The trained fixture model, the server's built-in default. */
export const FIXTURE_DIR = join(REPO, "models", "builtin");

for (const dir of [MODEL_DIR, FIXTURE_DIR]) {
  if (!existsSync(join(dir, "config.json"))) {
    throw new Error(`the model folder ${dir} is missing: run \`npm run build:model\` (npm test does this first)`);
  }
}

export function engineOptions(overrides: Partial<EngineOptions> = {}): EngineOptions {
  return {
    modelDir: MODEL_DIR,
    variant: "fp32",
    backend: "wasm",
    threads: 1,
    queueLimit: 8,
    contextLength: 4096,
    prefillChunk: 512,
    ...overrides,
  };
}

const engines = new Map<string, Promise<Engine>>();
/** One engine per distinct option set, shared across the tests of a file. */
export function sharedEngine(overrides: Partial<EngineOptions> = {}): Promise<Engine> {
  const key = JSON.stringify(overrides);
  let engine = engines.get(key);
  if (!engine) {
    engine = Engine.load(engineOptions(overrides));
    engines.set(key, engine);
  }
  return engine;
}

export async function readJsonFile(path: string): Promise<Record<string, unknown>> {
  return JSON.parse(await readFile(path, "utf8")) as Record<string, unknown>;
}
