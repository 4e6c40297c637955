/**
 * The GGUF writer (scripts/lib/gguf*.ts) checked against llama.cpp itself: the built-in model written as GGUF,
 * read back by node-llama-cpp's own GGUF parser, and run by llama.cpp's CPU binary (1 thread, f16 KV, flash
 * attention off) must give our greedy tokens exactly. This is what makes the benchmark's llama.cpp peer
 * trustworthy. Skipped, with a message, only where node-llama-cpp's prebuilt binary cannot load.
 */
import { afterAll, describe, expect, test } from "bun:test";
import { createHash } from "node:crypto";
import { mkdtempSync } from "node:fs";
import { readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { buildBuiltinGguf } from "../scripts/lib/gguf-llama.ts";
import { loadLlamaCppPeer, loadLlamaCppRuntime } from "../scripts/lib/llama-cpp-peer.ts";
import { sharedEngine, FIXTURE_DIR } from "./helpers/model.ts";

let unavailable: string | null = null;
try {
  const llama = await loadLlamaCppRuntime(1);
  await llama.dispose();
} catch (err) {
  unavailable = (err as Error).message;
  console.warn(`tests/gguf.test.ts: SKIPPED: node-llama-cpp's llama.cpp binary cannot load on this machine (${unavailable})`);
}

const dir = mkdtempSync(join(tmpdir(), "gguf-test-"));
afterAll(() => rm(dir, { recursive: true, force: true }));

/** A harbour log chat of about 500 tokens with a question, rendered by our chat template. */
async function prompt(): Promise<number[]> {
  const engine = await sharedEngine({ modelDir: FIXTURE_DIR, contextLength: 0 });
  const lines = Array.from({ length: 28 }, (_, i) => `${i + 1}. The ferry Petrel left at ${String(i % 24).padStart(2, "0")}:${(i * 7) % 60} with ${(i * 37) % 101} passengers.`);
  return engine.encodeChat([{ role: "user", content: `${lines.join("\n")}\n\nThe pass key is 48213. Remember it. What is the pass key?` }], { extra: { date_string: "26 Jul 2024" } });
}

describe("GGUF of the built-in model", () => {
  test("is deterministic and llama.cpp's own parser reads our metadata and tensors back", async () => {
    const a = await buildBuiltinGguf(join(dir, "a.gguf"));
    const b = await buildBuiltinGguf(join(dir, "b.gguf"));
    const hash = async (p: string) => createHash("sha256").update(await readFile(p)).digest("hex");
    expect(a.bytes).toBe(b.bytes);
    expect(await hash(a.path)).toBe(await hash(b.path));

    const { readGgufFileInfo } = await import("node-llama-cpp");
    const info = await readGgufFileInfo(a.path, { readTensorInfo: true });
    expect(info.version).toBe(3);
    const md = info.metadata as unknown as Record<string, Record<string, unknown>>;
    expect(md.general!.architecture).toBe("llama");
    const llama = md.llama as { attention: Record<string, unknown>; block_count: number; embedding_length: number };
    expect(llama.block_count).toBe(2);
    expect(llama.embedding_length).toBe(64);
    expect(llama.attention.key_length).toBe(32);
    expect(llama.attention.head_count_kv).toBe(2);
    const tokenizer = md.tokenizer as { ggml: { tokens: string[]; merges: string[]; model: string; pre: string } };
    expect(tokenizer.ggml.model).toBe("gpt2");
    expect(tokenizer.ggml.tokens.length).toBe(128256);
    expect(tokenizer.ggml.tokens[128009]).toBe("<|eot_id|>");
    const names = (info.fullTensorInfo ?? []).map((t) => t.name);
    expect(names).toContain("rope_freqs.weight");
    expect(names).toContain("blk.1.attn_q.weight");
    expect(names.length).toBe(3 + 9 * 2 + 1);
  }, 120_000);

  test.skipIf(unavailable !== null)("llama.cpp (1 thread, f16 KV, flash attention off) generates our greedy tokens", async () => {
    const ids = await prompt();
    expect(ids.length).toBeGreaterThan(450);
    expect(ids.length).toBeLessThan(600);
    const engine = await sharedEngine({ modelDir: FIXTURE_DIR, contextLength: 0 });
    const ours = await engine.complete({ promptIds: ids, maxTokens: 64, sampling: { temperature: 0 }, stop: [], ignoreEos: true });
    expect(ours.tokenIds.length).toBe(64);

    const gguf = await buildBuiltinGguf(join(dir, "model.gguf"));
    const peer = await loadLlamaCppPeer({ ggufPath: gguf.path, contextTokens: ids.length + 64, threads: 1 });
    try {
      const theirs = await peer.generate(ids, 64);
      expect(theirs.tokenIds).toEqual(ours.tokenIds);
      // The fixture is trained to retrieve the pass key: the comparison is over meaningful output.
      expect(ours.text).toContain("48213");
    } finally {
      await peer.dispose();
    }
  }, 180_000);
});
