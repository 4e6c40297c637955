/**
 * Lexical recall alone, without running the model: on bench:compaction's hard haystack, how often the
 * queried needle's block is among the blocks recall would bring back. Cheap (tokenizing is most of it),
 * so recall rules can be checked on many haystacks, and on seeds other than the benchmark's (--seed-base)
 * so that a rule tuned on the benchmark is not judged by it alone.
 *
 *   npx bun scripts/eval-recall.ts [--sizes 131072,1048576] [--kinds passkey,multikey] [--trials 10]
 *        [--seed-base 0] [--compare] [--verbose]
 *
 * The archive is what reading the whole prompt under window + recall (budget 4096, --recent 448) archives:
 * every 64-token block before the recent window and the probe. --seed-base 0 gives the benchmark's own
 * haystacks; --compare also scores with function words counted like any token (the rule before them).
 */
import { parseArgs } from "node:util";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { cpuKernels as K } from "../kernels/compaction.ts";
import { Engine } from "../runtime/index.ts";
import { KvCompactor, type Lexicon } from "../runtime/kv/compaction.ts";
import { FixtureTasks, rngOf } from "./lib/fixture-tasks.ts";

const { values } = parseArgs({
  options: {
    sizes: { type: "string", default: "131072,1048576" },
    kinds: { type: "string", default: "passkey,multikey" },
    trials: { type: "string", default: "10" },
    "seed-base": { type: "string", default: "0" },
    recent: { type: "string", default: "448" },
    compare: { type: "boolean", default: false },
    verbose: { type: "boolean", default: false },
    model: { type: "string", default: fileURLToPath(new URL("../models/builtin/", import.meta.url)) },
  },
});
const coldDir = mkdtempSync(join(tmpdir(), "eval-recall-"));
const recent = Number(values.recent);
const engine = await Engine.load({
  modelDir: values.model!,
  variant: "fp32",
  backend: "native",
  threads: 1,
  queueLimit: 4,
  contextLength: 0,
  prefillChunk: 512,
  kvMemoryBytes: 2 ** 40,
  compaction: { policy: "window", budget: 4096, recall: true, recent, coldDir },
});
const tasks = new FixtureTasks(engine.tokenizer, engine.template, "eval", { digits: true });
const rules: [string, Lexicon][] = [["function words paired", engine.lexicon()]];
if (values.compare) rules.push(["every token", { ...engine.lexicon(), isFunctionWord: () => false }]);
const base = Number(values["seed-base"]);
const trials = Number(values.trials);
const config = engine.model.folder.config;
const shape = { layers: config.numLayers, kvHeads: config.numKeyValueHeads, headDim: config.headDim, heads: config.numAttentionHeads, dtype: engine.model.io.kvDtype };

for (const size of values.sizes!.split(",").map(Number)) {
  for (const kind of values.kinds!.split(",") as ("passkey" | "multikey")[]) {
    const found = rules.map(() => 0);
    for (let d = 0; d < trials; d++) {
      const depth = trials === 1 ? 0.5 : d / (trials - 1);
      // The benchmark's seed for this size, kind and depth (bench-compaction.ts runOne), moved by --seed-base.
      const sample = tasks.haystack(rngOf(base + size + 7919 * d + (kind === "passkey" ? 0 : 104729)), {
        kind,
        exactTokens: Math.min(size, engine.info.contextLength - 64),
        depth,
        dateString: "26 Jul 2024",
      });
      const n = sample.prompt.length;
      for (const [r, [name, lexicon]] of rules.entries()) {
        const compactor = KvCompactor.create(engine.compaction!, shape, undefined, lexicon);
        const cold = compactor.cold!;
        const B = compactor.settings.blockTokens;
        const archived = Math.floor((n - recent - compactor.settings.probeTokens) / B) * B;
        const kv = Array.from({ length: shape.layers }, () => new Float32Array(shape.kvHeads * B * shape.headDim));
        for (let start = 0; start < archived; start += B) {
          cold.add(kv, kv, Int32Array.from({ length: B }, (_, j) => start + j), Int32Array.from(sample.prompt.slice(start, start + B)), B);
        }
        const scores = compactor.lexicalScores(cold, sample.prompt.slice(n - compactor.settings.probeTokens));
        const top = K.topK(scores, cold.blockCount, compactor.settings.recallBlocks);
        const best = Math.max(...Array.from(top, (b) => scores[b]!));
        const hits = Array.from(top).filter((b) => scores[b]! >= 0 && scores[b]! >= compactor.settings.recallCutoff * best);
        const needle = Math.floor(sample.needleStart / B);
        // A hit brings its block and the one before it; a needle in the recent window needs no recall.
        const ok = sample.needleStart >= archived || hits.some((b) => b === needle || b === needle + 1);
        if (ok) found[r]!++;
        if (values.verbose || !ok) console.log(`  ${size} ${kind} depth ${depth.toFixed(2)} [${name}]: needle block scores ${scores[needle]!.toFixed(2)}, best ${best.toFixed(2)}: ${ok ? "recalled" : "MISSED"}`);
        await cold.dispose();
      }
    }
    console.log(`${size} ${kind} seeds ${base}: ${rules.map(([name], r) => `${name} ${found[r]}/${trials}`).join(", ")}`);
  }
}
await engine.close();
rmSync(coldDir, { recursive: true, force: true });
