// Imports a Hugging Face Llama-family checkpoint (e.g. nvidia/Llama-3.1-Nemotron-8B-UltraLong-1M-Instruct)
// into a model folder the server loads. No Python; nothing is downloaded.
//
//   npm run import -- --from <hf-folder> --out models/<name> [--dtype q4f16] [--force]
//
// --dtype: one or more of fp32, fp16, q4f16, q4, int8, comma-separated (default q4f16: 4-bit weights,
// float16 KV). Each becomes onnx/model_<dtype>.onnx (+ .kv.onnx) over onnx/model_<dtype>.onnx_data.
// --accuracy-level 4 (default): the q4 / int8 matmuls quantize activations to int8 (about 2x faster on CPU);
// 0 keeps them float32.
// Prints progress on stderr, then the files, the time and the peak resident memory.

import { parseArgs } from "node:util";
import { relative } from "node:path";
import { CheckpointError, importHfCheckpoint, type ImportProgress } from "./lib/import-hf.ts";
import { LLAMA_ONNX_DTYPES, type LlamaOnnxDtype } from "./lib/onnx-llama.ts";

const USAGE = `usage: npm run import -- --from <hf-folder> --out <model-folder> [--dtype ${LLAMA_ONNX_DTYPES.join("|")}[,...]] [--accuracy-level 4|0] [--force]`;

let values: { from?: string; out?: string; dtype: string; "accuracy-level": string; force: boolean; help: boolean };
try {
  ({ values } = parseArgs({
    options: {
      from: { type: "string" },
      out: { type: "string" },
      dtype: { type: "string", default: "q4f16" },
      "accuracy-level": { type: "string", default: "4" },
      force: { type: "boolean", default: false },
      help: { type: "boolean", short: "h", default: false },
    },
    strict: true,
  }) as { values: typeof values });
} catch (e) {
  console.error(`${(e as Error).message}\n${USAGE}`);
  process.exit(2);
}
if (values.help) {
  console.log(USAGE);
  process.exit(0);
}
if (!values.from || !values.out) {
  console.error(USAGE);
  process.exit(2);
}
const dtypes = values.dtype.split(",").map((d) => d.trim()) as LlamaOnnxDtype[];
const unknown = dtypes.filter((d) => !LLAMA_ONNX_DTYPES.includes(d));
if (unknown.length) {
  console.error(`unknown --dtype ${unknown.join(", ")} (supported: ${LLAMA_ONNX_DTYPES.join(", ")})`);
  process.exit(2);
}

const accuracyLevel = Number(values["accuracy-level"]);
if (accuracyLevel !== 0 && accuracyLevel !== 4) {
  console.error(`--accuracy-level must be 4 (int8 activations in the q4 / int8 matmuls, the default) or 0 (float32), got ${values["accuracy-level"]}`);
  process.exit(2);
}

const gib = (n: number) => `${(n / 2 ** 30).toFixed(2)} GiB`;
const mib = (n: number) => `${(n / 2 ** 20).toFixed(1)} MiB`;
let lastPrint = 0;
const progress = (p: ImportProgress) => {
  const now = performance.now();
  if (p.weightsDone !== p.weightsTotal && now - lastPrint < 1000) return;
  lastPrint = now;
  const eta = p.valuesDone > 0 ? (p.elapsed * (p.valuesTotal - p.valuesDone)) / p.valuesDone : 0;
  process.stderr.write(
    `[import ${p.dtype}] ${p.weightsDone}/${p.weightsTotal} tensors, ${gib(p.bytesWritten)} of ${gib(p.bytesTotal)} written, ` +
      `ETA ${eta.toFixed(0)} s (${p.weight})\n`,
  );
};

try {
  const result = await importHfCheckpoint({ from: values.from, out: values.out, dtypes, force: values.force, accuracyLevel, onProgress: progress });
  const rel = relative(process.cwd(), result.outDir);
  const shown = rel === "" ? "." : rel.startsWith("..") ? result.outDir : rel;
  for (const f of result.files) console.log(`${mib(f.bytes).padStart(12)}  ${shown}/${f.path}`);
  // maxRSS is in kilobytes (Node, Bun and Deno alike).
  const peak = process.resourceUsage().maxRSS * 1024;
  console.log(`imported ${values.from} -> ${shown} (${dtypes.join(", ")}) in ${result.seconds.toFixed(1)} s`);
  console.log(`peak RSS ${mib(peak)}; largest tensor ${mib(result.largestTensorBytes)} as float32 (${(peak / result.largestTensorBytes).toFixed(2)}x)`);
} catch (e) {
  if (e instanceof CheckpointError) {
    console.error(`import failed: ${e.message}`);
    process.exit(1);
  }
  throw e;
}
