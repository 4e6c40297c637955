/**
 * Loading model folders: variants, external data, float16 KV, the native backend, and start-up errors
 * that name the problem for a folder with a missing file or an unexpected graph.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { cp, mkdtemp, rm, symlink, writeFile, readFile, mkdir } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Engine, ModelFolderError } from "../runtime/index.ts";
import { loadModelFolder } from "../runtime/model-folder.ts";
import { buildLlamaOnnx, TINY_LLAMA_CONFIG } from "../scripts/lib/onnx-llama.ts";
import { randomLlamaWeights } from "../scripts/lib/random-weights.ts";
import { engineOptions, MODEL_DIR, sharedEngine } from "./helpers/model.ts";

const temp = await mkdtemp(join(tmpdir(), "model-folder-test-"));
afterAll(() => rm(temp, { recursive: true, force: true }));

/** A copy of the built-in folder (big files linked, not copied) that a test can break. */
let counter = 0;
async function folderCopy(): Promise<string> {
  const dir = join(temp, `m${counter++}`);
  await mkdir(join(dir, "onnx"), { recursive: true });
  for (const f of ["config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json"]) await cp(join(MODEL_DIR, f), join(dir, f));
  await symlink(join(MODEL_DIR, "tokenizer.json"), join(dir, "tokenizer.json"));
  for (const f of ["model.onnx", "model_fp16.onnx", "model_fp16.onnx_data"]) await symlink(join(MODEL_DIR, "onnx", f), join(dir, "onnx", f));
  return dir;
}

const loadError = async (dir: string, variant: "auto" | "fp32" | "q4" = "auto"): Promise<string> => {
  try {
    await Engine.load(engineOptions({ modelDir: dir, variant }));
  } catch (e) {
    expect(e).toBeInstanceOf(ModelFolderError);
    return (e as Error).message;
  }
  throw new Error("the folder loaded, but an error was expected");
};

const prompt = (engine: Engine) => engine.encodeChat([{ role: "user", content: "Count the waves." }], { extra: { date_string: "26 Jul 2024" } });

describe("model folder", () => {
  test("auto picks fp32 first; all three Llama-3.1 eos ids are read", async () => {
    const folder = await loadModelFolder(MODEL_DIR, "auto");
    expect(folder.variant).toBe("fp32");
    expect(folder.externalData).toEqual([]);
    expect(folder.generation.eosTokenIds.sort()).toEqual([128001, 128008, 128009]);
    expect(folder.config).toMatchObject({ numLayers: 2, numKeyValueHeads: 2, headDim: TINY_LLAMA_CONFIG.head_dim, vocabSize: 128256, maxPositionEmbeddings: 1048576 });
  });

  test("fp16 variant: external data file and float16 KV, same greedy tokens as fp32 for a short run", async () => {
    const folder = await loadModelFolder(MODEL_DIR, "fp16");
    expect(folder.externalData.map((f) => f.path)).toEqual(["model_fp16.onnx_data"]);
    const fp16 = await sharedEngine({ variant: "fp16" });
    expect(fp16.info.kvDtype).toBe("float16");
    expect(fp16.info.kvBytesPerToken).toBe(2 * 2 * 2 * TINY_LLAMA_CONFIG.head_dim * 2); // layers x (K, V) x KV heads x head_dim x fp16
    const fp32 = await sharedEngine();
    const job = { promptIds: await prompt(fp32), maxTokens: 8, sampling: { temperature: 0 }, stop: [] };
    const a = await fp32.complete(job);
    const b = await fp16.complete(job);
    expect(b.tokenIds).toEqual(a.tokenIds);
  });

  test("native backend (onnxruntime-node) gives the same greedy tokens as WASM", async () => {
    const native = await Engine.load(engineOptions({ backend: "native" }));
    expect(native.info.backend).toBe("native");
    const wasm = await sharedEngine();
    const job = { promptIds: await prompt(wasm), maxTokens: 24, sampling: { temperature: 0 }, stop: [] };
    expect((await native.complete(job)).tokenIds).toEqual((await wasm.complete(job)).tokenIds);
    await native.close();
  });

  test("backend auto never picks WebGPU without an adapter, and webgpu by name fails clearly", async () => {
    const auto = await Engine.load(engineOptions({ backend: "auto" }));
    expect(["native", "wasm"]).toContain(auto.info.backend);
    await auto.close();
    if (!(globalThis as { navigator?: { gpu?: unknown } }).navigator?.gpu) {
      await expect(Engine.load(engineOptions({ backend: "webgpu" }))).rejects.toThrow(/no WebGPU adapter/);
    }
  });

  test("missing files are named", async () => {
    expect(await loadError(join(temp, "nope"))).toContain("does not exist");
    const noTokenizer = await folderCopy();
    await rm(join(noTokenizer, "tokenizer.json"));
    expect(await loadError(noTokenizer)).toContain("has no tokenizer.json");
    const noConfig = await folderCopy();
    await rm(join(noConfig, "config.json"));
    expect(await loadError(noConfig)).toContain("has no config.json");
    const noOnnx = await folderCopy();
    await rm(join(noOnnx, "onnx"), { recursive: true });
    expect(await loadError(noOnnx)).toContain("has no onnx/ directory");
    const msg = await loadError(await folderCopy(), "q4");
    expect(msg).toContain("onnx/model_q4.onnx");
    expect(msg).toContain("this folder has: fp32, fp16");
  });

  test("broken JSON and bad config values are named", async () => {
    const badJson = await folderCopy();
    await writeFile(join(badJson, "config.json"), "{ not json");
    expect(await loadError(badJson)).toMatch(/config\.json is not a valid JSON object/);
    const badField = await folderCopy();
    const config = JSON.parse(await readFile(join(badField, "config.json"), "utf8"));
    await writeFile(join(badField, "config.json"), JSON.stringify({ ...config, hidden_size: "big" }));
    expect(await loadError(badField)).toContain('"hidden_size" must be a positive integer');
    const noTemplate = await folderCopy();
    const tc = JSON.parse(await readFile(join(noTemplate, "tokenizer_config.json"), "utf8"));
    delete tc.chat_template;
    await writeFile(join(noTemplate, "tokenizer_config.json"), JSON.stringify(tc));
    expect(await loadError(noTemplate)).toContain("no chat_template");
  });

  test("a graph that does not match config.json is named", async () => {
    const dir = await folderCopy();
    const oneLayer = { ...TINY_LLAMA_CONFIG, num_hidden_layers: 1 };
    await rm(join(dir, "onnx", "model.onnx"));
    await writeFile(join(dir, "onnx", "model.onnx"), buildLlamaOnnx(oneLayer, randomLlamaWeights(oneLayer, 1), { dtype: "fp32" }).model);
    expect(await loadError(dir, "fp32")).toContain("graph has no input past_key_values.1.key (config.json says num_hidden_layers=2");
  });

  test("a file that is not an ONNX graph is named", async () => {
    const dir = await folderCopy();
    await rm(join(dir, "onnx", "model.onnx"));
    await writeFile(join(dir, "onnx", "model.onnx"), "this is not protobuf");
    expect(await loadError(dir, "fp32")).toMatch(/model\.onnx: onnxruntime could not open the graph/);
  });
});
