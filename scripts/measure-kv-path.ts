/**
 * Decode speed and peak memory of the two KV paths on the same model folder, one thread:
 *
 *   npx bun scripts/measure-kv-path.ts [--model models/builtin] [--contexts 512,8192,32768]
 *                                      [--backends native,wasm] [--paths present,inplace] [--steps 64]
 *
 * present = onnx/model.onnx (Optimum: the whole cache in, present = past + new out, every step);
 * inplace = onnx/model.kv.onnx (runtime-owned storage, only the new tokens' KV out). Each case runs in its
 * own child process so its peak RSS (VmHWM) is its own: load, prefill `context` token ids in chunks of
 * 512, 4 warm-up decode steps, then `--steps` timed steps (greedy). Prints one row per case.
 */
import { spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { selectBackend, type BackendName } from "../runtime/backend.ts";
import { LlamaModel } from "../runtime/llama-model.ts";
import { loadModelFolder } from "../runtime/model-folder.ts";
import { argmax } from "../runtime/sampling.ts";
import { positiveInt } from "./lib/cli.ts";

const MARK = "KV_PATH_RESULT ";
const { values } = parseArgs({
  options: {
    model: { type: "string", default: "models/builtin" },
    contexts: { type: "string", default: "512,8192,32768" },
    backends: { type: "string", default: "native,wasm" },
    paths: { type: "string", default: "present,inplace" },
    steps: { type: "string", default: "64" },
    case: { type: "string" },
  },
  strict: true,
});
const steps = positiveInt("--steps", values.steps);

function peakRssMb(): number {
  const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(readFileSync("/proc/self/status", "utf8"));
  return m ? Number(m[1]) / 1024 : process.memoryUsage().rss / 2 ** 20;
}

interface Result {
  backend: string;
  path: string;
  context: number;
  prefillTokS: number;
  decodeTokS: number;
  ortMsPerTok: number;
  peakRssMb: number;
  kvMb: number;
}

async function runCase(spec: string): Promise<Result> {
  const [backendName, path, contextText] = spec.split(":") as [BackendName, "present" | "inplace", string];
  const context = Number(contextText);
  const folder = await loadModelFolder(values.model!, "fp32");
  const model = await LlamaModel.load(path === "present" ? { ...folder, kvOnnxFile: null } : folder, await selectBackend(backendName, 1));
  if (model.io.kvMode !== path) throw new Error(`${values.model} has no ${path} graph`);
  const ids = Array.from({ length: context }, (_, i) => 1000 + ((i * 7919) % 100_000));
  const cache = model.newCache();
  let t0 = performance.now();
  let logits = await model.prefill(cache, ids, 512);
  const prefillMs = performance.now() - t0;
  for (let i = 0; i < 4; i++) logits = await model.forward(cache, [argmax(logits)]);
  const runMs0 = model.runStats.runMs;
  t0 = performance.now();
  for (let i = 0; i < steps; i++) logits = await model.forward(cache, [argmax(logits)]);
  const decodeMs = performance.now() - t0;
  return {
    backend: backendName,
    path,
    context,
    prefillTokS: context / (prefillMs / 1000),
    decodeTokS: steps / (decodeMs / 1000),
    ortMsPerTok: (model.runStats.runMs - runMs0) / steps,
    peakRssMb: peakRssMb(),
    kvMb: cache.bytes / 2 ** 20,
  };
}

if (values.case) {
  console.log(MARK + JSON.stringify(await runCase(values.case)));
  process.exit(0);
}

const script = fileURLToPath(import.meta.url);
const rows: Result[] = [];
for (const context of values.contexts!.split(",").map((c) => positiveInt("--contexts", c))) {
  for (const backend of values.backends!.split(",")) {
    for (const path of values.paths!.split(",")) {
      const spec = `${backend}:${path}:${context}`;
      const child = spawn(process.execPath, [script, "--case", spec, "--model", values.model!, "--steps", String(steps)], { stdio: ["ignore", "pipe", "inherit"] });
      let out = "";
      child.stdout.on("data", (c: Buffer) => (out += c.toString()));
      const code = await new Promise<number>((r) => child.on("close", (c) => r(c ?? 1)));
      const line = out.split("\n").find((l) => l.startsWith(MARK));
      if (code !== 0 || !line) {
        console.log(`${spec}: failed (exit ${code})`);
        continue;
      }
      const r = JSON.parse(line.slice(MARK.length)) as Result;
      rows.push(r);
      console.log(
        `${r.backend.padEnd(6)} ${r.path.padEnd(7)} ctx ${String(r.context).padStart(6)}  prefill ${r.prefillTokS.toFixed(0).padStart(6)} tok/s  decode ${r.decodeTokS.toFixed(1).padStart(6)} tok/s  ORT ${r.ortMsPerTok.toFixed(2).padStart(6)} ms/tok  peak RSS ${r.peakRssMb.toFixed(0).padStart(5)} MB  KV ${r.kvMb.toFixed(1)} MB`,
      );
    }
  }
}
