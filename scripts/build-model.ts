// Builds the built-in tiny Llama-3.1 model folder (onnx-community layout) from files in the repo.
//
//   npx bun scripts/build-model.ts [--out models/builtin] [--if-missing] [--seed 1234]
//   npx tsx scripts/build-model.ts ...

import { parseArgs } from "node:util";
import { relative } from "node:path";
import { TINY_LLAMA_CONFIG } from "./lib/onnx-llama.ts";
import { buildModelFolder, computeBuildStamp, DEFAULT_SEED, isUpToDate } from "./lib/model-folder.ts";

const { values } = parseArgs({
  options: {
    out: { type: "string", default: "models/builtin" },
    "if-missing": { type: "boolean", default: false },
    seed: { type: "string", default: String(DEFAULT_SEED) },
    help: { type: "boolean", short: "h", default: false },
  },
  strict: true,
});

if (values.help) {
  console.log("usage: build-model.ts [--out models/builtin] [--if-missing] [--seed 1234]");
  process.exit(0);
}

const seed = Number(values.seed);
if (!Number.isSafeInteger(seed) || seed < 0) {
  console.error(`--seed must be a non-negative integer, got ${values.seed}`);
  process.exit(2);
}
const outDir = values.out;
const config = TINY_LLAMA_CONFIG;

if (values["if-missing"]) {
  const stamp = await computeBuildStamp(config, { seed });
  if (await isUpToDate(outDir, stamp)) {
    console.log(`${outDir} is up to date (stamp ${stamp.slice(0, 12)})`);
    process.exit(0);
  }
}

const started = performance.now();
const result = await buildModelFolder(outDir, config, undefined, { seed });
const mib = (n: number) => (n / 2 ** 20).toFixed(2).padStart(8);
const rel = relative(process.cwd(), result.outDir);
const shown = rel === "" ? "." : rel.startsWith("..") ? result.outDir : rel;
for (const f of result.files) console.log(`${mib(f.bytes)} MiB  ${shown}/${f.path}`);
const total = result.files.reduce((a, f) => a + f.bytes, 0);
console.log(
  `built ${shown} (seed ${seed}, stamp ${result.stamp.slice(0, 12)}): ${mib(total).trim()} MiB in ${((performance.now() - started) / 1000).toFixed(1)} s`,
);
