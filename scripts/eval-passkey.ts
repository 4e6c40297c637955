/**
 * Accuracy of the built-in fixture model on its retrieval tasks, through our runtime with the full KV
 * cache, on held-out filler text:
 *
 *   npx bun scripts/eval-passkey.ts [--model models/builtin] [--backend auto] [--trials 100]
 *        [--lengths 256,1024,4096,16384,32768] [--depths 0,0.25,0.5,0.75,1]
 *        [--gaps 10,1000,100000,1000000] [--gap-filler 4096] [--tasks passkey,multikey] [--seed 7]
 *        [--date "26 Jul 2024"] [--digits]
 *
 * Prints one table per task (filler tokens x needle depth) and one for position gaps (the question
 * stands that many positions after the end of the filler, the needle at a random depth). Each cell is
 * exact-match accuracy over --trials trials with a fixed seed.
 */
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { Engine } from "../runtime/index.ts";
import { FixtureTasks, type TaskKind } from "./lib/fixture-tasks.ts";
import { runCell, serverDateLine, type CellSpec } from "./lib/passkey-eval.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string", default: fileURLToPath(new URL("../models/builtin/", import.meta.url)) },
    backend: { type: "string", default: "auto" },
    threads: { type: "string", default: "1" },
    trials: { type: "string", default: "100" },
    lengths: { type: "string", default: "256,1024,4096,16384,32768" },
    depths: { type: "string", default: "0,0.25,0.5,0.75,1" },
    gaps: { type: "string", default: "10,1000,100000,1000000" },
    "gap-filler": { type: "string", default: "4096" },
    tasks: { type: "string", default: "passkey,multikey" },
    seed: { type: "string", default: "7" },
    date: { type: "string" },
    // Filler that keeps sentences with digits (numbers beside the needle's): a harder variant.
    digits: { type: "boolean", default: false },
  },
});
const list = (s: string) => s.split(",").filter(Boolean).map(Number);
const trials = Number(values.trials);
const seed = Number(values.seed);
const kinds = values.tasks!.split(",") as TaskKind[];

const engine = await Engine.load({
  modelDir: values.model!,
  variant: "fp32",
  backend: values.backend as "auto",
  threads: Number(values.threads),
  queueLimit: 4,
  contextLength: 0,
  prefillChunk: 512,
});
const tasks = new FixtureTasks(engine.tokenizer, engine.template, "eval", { digits: values.digits });
// The chat template's date line, as the server renders it without a date_string (or --date "21 Sep 2024").
const date = values.date ?? serverDateLine(engine);
console.log(`model ${engine.info.modelId}, backend ${engine.info.backendDetail}; held-out Brown Corpus filler${values.digits ? " with numbers" : ""}; ${trials} trials per cell, seed ${seed}; date line "${date}"`);
const t0 = performance.now();

const pct = (c: number, n: number) => `${((100 * c) / n).toFixed(0)}%`.padStart(5);
let cellIndex = 0;
async function cell(spec: Omit<CellSpec, "trials" | "seed">): Promise<string> {
  const r = await runCell(engine, tasks, { ...spec, trials, seed: seed * 1000 + cellIndex++ }, date);
  const note = r.misses.length ? ` e.g. ${r.misses.map((m) => `${m.expected}->${JSON.stringify(m.got)}`).join(" ")}` : "";
  process.stderr.write(
    `  ${spec.kind} filler ${spec.fillerTokens} depth ${spec.depth ?? "random"} gap ${spec.gap ?? 0}: ${r.correct}/${r.trials} (${(r.ms / 1000).toFixed(1)} s, ~${Math.round(r.promptTokens)} prompt tokens)${note}\n`,
  );
  return pct(r.correct, r.trials);
}

const depths = list(values.depths!);
const lengths = list(values.lengths!);
const out: string[] = [];
for (const kind of kinds) {
  out.push(`\n${kind}: accuracy by filler tokens (rows) and needle depth (columns)`);
  out.push(`${"filler".padStart(7)} ${depths.map((d) => `${Math.round(d * 100)}%`.padStart(5)).join(" ")}`);
  for (const fillerTokens of lengths) {
    const row: string[] = [];
    for (const depth of depths) row.push(await cell({ kind, fillerTokens, depth }));
    out.push(`${String(fillerTokens).padStart(7)} ${row.join(" ")}`);
    console.log(out.slice(-1)[0]);
  }
}
const gaps = list(values.gaps!);
if (gaps.length) {
  out.push(`\nposition gap between filler (${values["gap-filler"]} tokens, needle at a random depth) and question`);
  out.push(`${"task".padStart(9)} ${gaps.map((g) => String(g).padStart(8)).join(" ")}`);
  for (const kind of kinds) {
    const row: string[] = [];
    for (const gap of gaps) row.push((await cell({ kind, fillerTokens: Number(values["gap-filler"]), gap })).padStart(8));
    out.push(`${kind.padStart(9)} ${row.join(" ")}`);
  }
}
console.log(out.join("\n"));
console.log(`\n${((performance.now() - t0) / 1000).toFixed(0)} s`);
await engine.close();
