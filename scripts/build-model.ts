// Builds model folders in the onnx-community layout from files in the repo, deterministically.
//
//   npx bun scripts/build-model.ts [--if-missing]
//       models/builtin  the trained fixture model (fixtures/fixture-model.safetensors), the server's default
//       models/random   the same architecture with seeded random weights (tests that need varied output)
//   npx bun scripts/build-model.ts --out DIR [--weights FILE | --seed N] [--if-missing]
//   (npx tsx works the same)

import { parseArgs } from "node:util";
import { relative } from "node:path";
import { TINY_LLAMA_CONFIG, type LlamaWeights } from "./lib/onnx-llama.ts";
import { FIXTURE_WEIGHTS_FILE, loadFixture } from "./lib/fixture-weights.ts";
import { buildModelFolder, computeBuildStamp, DEFAULT_SEED, isUpToDate } from "./lib/model-folder.ts";

const { values } = parseArgs({
  options: {
    out: { type: "string" },
    weights: { type: "string" },
    "if-missing": { type: "boolean", default: false },
    seed: { type: "string", default: String(DEFAULT_SEED) },
    help: { type: "boolean", short: "h", default: false },
  },
  strict: true,
});

if (values.help) {
  console.log("usage: build-model.ts [--if-missing]  |  build-model.ts --out DIR [--weights FILE | --seed N] [--if-missing]");
  process.exit(0);
}

const seed = Number(values.seed);
if (!Number.isSafeInteger(seed) || seed < 0) {
  console.error(`--seed must be a non-negative integer, got ${values.seed}`);
  process.exit(2);
}

const jobs: { outDir: string; weightsFile?: string }[] = values.out
  ? [{ outDir: values.out, weightsFile: values.weights }]
  : [{ outDir: "models/builtin", weightsFile: FIXTURE_WEIGHTS_FILE }, { outDir: "models/random" }];

const mib = (n: number) => (n / 2 ** 20).toFixed(2).padStart(8);
for (const { outDir, weightsFile } of jobs) {
  let weights: LlamaWeights | undefined;
  let config = TINY_LLAMA_CONFIG;
  try {
    // A fixture file carries its own architecture (the trainer writes config.json's fields into it).
    if (weightsFile) ({ config, weights } = loadFixture(weightsFile));
  } catch (e) {
    console.error(`cannot read weights ${weightsFile}: ${(e as Error).message}`);
    process.exit(1);
  }
  const source = weights ? { weights } : { seed };
  if (values["if-missing"]) {
    const stamp = await computeBuildStamp(config, source);
    if (await isUpToDate(outDir, stamp)) {
      console.log(`${outDir} is up to date (stamp ${stamp.slice(0, 12)})`);
      continue;
    }
  }
  const started = performance.now();
  const result = await buildModelFolder(outDir, config, weights, { seed });
  const rel = relative(process.cwd(), result.outDir);
  const shown = rel === "" ? "." : rel.startsWith("..") ? result.outDir : rel;
  for (const f of result.files) console.log(`${mib(f.bytes)} MiB  ${shown}/${f.path}`);
  const total = result.files.reduce((a, f) => a + f.bytes, 0);
  const what = weightsFile ? `weights ${relative(process.cwd(), weightsFile)}` : `seed ${seed}`;
  console.log(`built ${shown} (${what}, stamp ${result.stamp.slice(0, 12)}): ${mib(total).trim()} MiB in ${((performance.now() - started) / 1000).toFixed(1)} s`);
}
