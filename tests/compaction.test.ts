/**
 * KV compaction through the real runtime: the built-in trained fixture on onnxruntime-node (the trained
 * model, so retrieval means something), real tokenizer and template, real archive files.
 */
import { describe, expect, test } from "bun:test";
import { appendFileSync, cpSync, existsSync, mkdtempSync, readdirSync, rmSync, statSync, truncateSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Engine } from "../runtime/index.ts";
import { ColdTier, FileColdStorage } from "../runtime/kv/cold-tier.ts";
import { KvCompactor, PINNED, compactionSettings, compactionStateSchema } from "../runtime/kv/compaction.ts";
import { KvCache } from "../runtime/kv-cache.ts";
import { ropeInvFreq } from "../runtime/rope.ts";
import { int8ErrorBound } from "../kernels/compaction.ts";
import { FixtureTasks, answerIsRight, rngOf } from "../scripts/lib/fixture-tasks.ts";
import { FIXTURE_DIR } from "./helpers/model.ts";
import { refRope } from "./helpers/rope.ts";

const coldDir = mkdtempSync(join(tmpdir(), "cold-test-"));
const load = (compaction?: Parameters<typeof Engine.load>[0]["compaction"], prefillChunk = 512) =>
  Engine.load({ modelDir: FIXTURE_DIR, variant: "fp32", backend: "native", threads: 1, queueLimit: 4, contextLength: 0, prefillChunk, compaction });
const plain = await load();
const windowRecall = await load({ policy: "window", budget: 1024, recall: true, coldDir });
const attention = await load({ policy: "attention", budget: 256, coldDir }, 64);
const tasks = new FixtureTasks(plain.tokenizer, plain.template, "eval");
const greedy = { sampling: { temperature: 0 }, stop: [] };
/** A snapshot's bytes as a ByteSource. */
const source = (b: Uint8Array) => {
  let at = 0;
  return { read: async (n: number) => b.slice(at, (at += n) > b.length ? b.length : at) };
};

describe("KV compaction", () => {
  test("a request that fits its budget drops nothing: the same tokens as without compaction", async () => {
    const s = tasks.sample(rngOf(3), { kind: "passkey", fillerTokens: 600, depth: 0.5, dateString: "26 Jul 2024" });
    const a = await plain.complete({ promptIds: s.prompt, maxTokens: 12, ...greedy });
    const b = await windowRecall.complete({ promptIds: s.prompt, maxTokens: 12, ...greedy });
    expect(b.tokenIds).toEqual(a.tokenIds);
    expect(b.kv.evicted).toBe(0);
  });

  test("past the budget: resident slots stay within it, the reply is the same every time, the archive file is removed", async () => {
    const s = tasks.sample(rngOf(4), { kind: "multikey", fillerTokens: 3000, depth: 0.3, keys: 4, dateString: "26 Jul 2024" });
    const runs = [];
    for (let i = 0; i < 2; i++) {
      let peak = 0;
      const cache = attention.newCache();
      const forward = attention.model.forward.bind(attention.model);
      // Watch every run's cache size from outside (the largest a run leaves behind, before compaction is the budget + one chunk).
      attention.model.forward = async (c, ids, o) => {
        peak = Math.max(peak, c.length + ids.length);
        return forward(c, ids, o);
      };
      try {
        runs.push({ r: await attention.complete({ promptIds: s.prompt, maxTokens: 16, ...greedy, prepare: () => cache }), peak, cache });
      } finally {
        attention.model.forward = forward;
      }
    }
    const [a, b] = runs;
    expect(a!.r.kv.evicted).toBeGreaterThan(2000);
    expect(a!.r.kv.residentSlots).toBeLessThanOrEqual(256);
    expect(a!.peak).toBeLessThanOrEqual(256 + 64);
    // Every reply token but a last one that hit max_tokens was read back.
    expect(a!.r.kv.tokensRead).toBe(s.prompt.length + a!.r.completionTokens - (a!.r.finishReason === "length" ? 1 : 0));
    expect(b!.r.tokenIds).toEqual(a!.r.tokenIds);
    expect(readdirSync(coldDir)).toEqual([]);
  });

  test("a 64K-token haystack through a 1,024-slot budget: the recall tier brings the needle back", async () => {
    let right = 0;
    const trials = [0.2, 0.7];
    for (const depth of trials) {
      const s = tasks.haystack(rngOf(11 + depth * 100), { kind: "passkey", exactTokens: 65536, depth, dateString: "26 Jul 2024", distractorEvery: 0 });
      const r = await windowRecall.complete({ promptIds: s.prompt, maxTokens: s.answer.length + 2, ...greedy });
      expect(r.kv.residentSlots).toBeLessThanOrEqual(1024);
      expect(r.kv.recalledBlocks).toBeGreaterThan(0);
      if (answerIsRight(r.text, s.key)) right++;
    }
    expect(right).toBe(trials.length);
  }, 300_000);

  test("the cold tier: int8 blocks read back within the quantization bound, from a file removed on dispose", async () => {
    const shape = { layers: 2, kvHeads: 2, headDim: 32, heads: 4, dtype: "float32" as const };
    const path = join(coldDir, "tier.bin");
    const tier = new ColdTier(shape, "int8", new FileColdStorage(path));
    const random = rngOf(5);
    const block = () => Array.from({ length: 2 }, () => Float32Array.from({ length: 2 * 64 * 32 }, () => random() * 4 - 2));
    const keys = block();
    const values = block();
    tier.add(keys, values, Int32Array.from({ length: 64 }, (_, i) => 100 + i), Int32Array.from({ length: 64 }, (_, i) => 7 + (i % 3)), 64);
    tier.add(block(), block(), Int32Array.from({ length: 64 }, (_, i) => 164 + i), new Int32Array(64).fill(9), 64);
    expect(tier.bytes).toBe(2 * (4 * 2 * 64 * 32 + 4 * 4 * 2 * 64)); // a byte per value and a float32 scale per 32
    const back = tier.read(0);
    for (const [orig, got] of [...keys.map((k, l) => [k, back.keys[l]!]), ...values.map((v, l) => [v, back.values[l]!])] as [Float32Array, Float32Array][]) {
      for (let g = 0; g < orig.length / 32; g++) {
        let max = 0;
        for (let i = g * 32; i < (g + 1) * 32; i++) max = Math.max(max, Math.abs(orig[i]!));
        for (let i = g * 32; i < (g + 1) * 32; i++) expect(Math.abs(orig[i]! - got[i]!)).toBeLessThanOrEqual(int8ErrorBound(max / 127));
      }
    }
    expect(Array.from(back.positions.subarray(0, 3))).toEqual([100, 101, 102]);
    // Token 8 is only in block 0, token 9 in both: block 0 (and block 1, which stands for block 0 too) score, block 0 by the rare token.
    const scores = new Float32Array(2);
    tier.lexicalScores([8], scores);
    expect(scores[0]).toBeGreaterThan(0);
    await tier.dispose();
    expect(existsSync(path)).toBe(false);
  });

  test("the keys scorer (a probe run for the question's queries, dropped after) recalls blocks and leaves the cache as reading the prompt once would", async () => {
    const keys = await load({ policy: "window", budget: 1024, recall: true, recallScorer: "keys", coldDir });
    const s = tasks.haystack(rngOf(24), { kind: "passkey", exactTokens: 8000, depth: 0.5, dateString: "26 Jul 2024", distractorEvery: 0 });
    const caches = [keys.newCache(), keys.newCache()];
    const results = [];
    for (const cache of caches) results.push(await keys.complete({ promptIds: s.prompt, maxTokens: 8, ...greedy, prepare: () => cache }));
    expect(results[0]!.kv.recalledBlocks).toBeGreaterThan(0);
    expect(results[1]!.tokenIds).toEqual(results[0]!.tokenIds);
    // The probe's slots were dropped: every token was read once, positions are distinct.
    const c = caches[0]!;
    expect(c.tokensRead).toBe(s.prompt.length + results[0]!.completionTokens - 1);
    expect(new Set(c.positions.subarray(0, c.length)).size).toBe(c.length);
    await keys.close();
  }, 120_000);

  test("lexical recall: question words alone ('What is the ...') do not outrank the needle that shares the question's content", async () => {
    const { KvCompactor } = await import("../runtime/kv/compaction.ts");
    const c = plain.model.folder.config;
    const shape = { layers: c.numLayers, kvHeads: c.numKeyValueHeads, headDim: c.headDim, heads: c.numAttentionHeads, dtype: plain.model.io.kvDtype };
    const filler = tasks.haystack(rngOf(41), { kind: "multikey", exactTokens: 20000, depth: 0.5, dateString: "26 Jul 2024" });
    const B = 64;
    const block = (text: string) => {
      const ids = plain.tokenizer.encode(text).slice(0, B);
      return [...ids, ...filler.prompt.slice(1000, 1000 + B - ids.length)];
    };
    // What a 1M-token haystack held: filler asking a question beside the words "pass" and (in the block
    // before, which a block's score includes) "key", and the needle.
    const beforeDecoy = block(" He turned the key in the lock and went in.");
    const decoy = block(" What is the common man's complaint? Let's take a look back. Beckworth handed his pass to the colonel.");
    const needle = block(" The pass key is 58231. Remember it.");
    const probe = plain.tokenizer.encode(" What is the pass key?<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    const ranked = (lexicon: import("../runtime/kv/compaction.ts").Lexicon) => {
      const compactor = KvCompactor.create(windowRecall.compaction!, shape, undefined, lexicon);
      const kv = Array.from({ length: shape.layers }, () => new Float32Array(shape.kvHeads * B * shape.headDim));
      const fill = (from: number, to: number) => Array.from({ length: to - from }, (_, b) => filler.prompt.slice(B * (from + b), B * (from + b + 1)));
      const blocks = [...fill(0, 120), beforeDecoy, decoy, ...fill(120, 249), needle];
      blocks.forEach((tokens, b) => compactor.cold!.add(kv, kv, Int32Array.from({ length: B }, (_, j) => b * B + j), Int32Array.from(tokens), B));
      const scores = compactor.lexicalScores(compactor.cold!, probe);
      return { needle: scores[251]!, decoy: scores[121]!, best: Math.max(...scores) };
    };
    const engineRule = ranked(windowRecall.lexicon());
    expect(engineRule.needle).toBe(engineRule.best);
    expect(engineRule.decoy).toBeLessThan(windowRecall.compaction!.recallCutoff * engineRule.needle);
    // Counted like content words, the question's function words ranked the decoy first.
    const everyToken = ranked({ ...windowRecall.lexicon(), isFunctionWord: () => false });
    expect(everyToken.decoy).toBeGreaterThan(everyToken.needle);
  });

  test("settings that cannot work are refused", () => {
    expect(() => compactionSettings("window", 32)).toThrow(RangeError);
    expect(() => compactionSettings("attention", 4096, { recallBlocks: 64 })).toThrow(RangeError);
    expect(compactionSettings("attention", 4096).recall).toBe(true);
  });
});

process.on("exit", () => rmSync(coldDir, { recursive: true, force: true }));

describe("where recalled blocks attend from", () => {
  /**
   * A cache that read 6,000 tokens through a window+recall compactor (budget 512 unless given, 64-token
   * blocks, float32 archive), each token's key its own vector (a fixed function of position and head)
   * embedded at its position, as a graph leaves them; then a question whose two tokens only the block at
   * 4,480-4,543 holds. (Position 3,000 holds a third rare token, for a later question.)
   */
  function readThenRecall(recallPlacement: "near" | "original", overrides: Partial<Parameters<typeof compactionSettings>[2]> = {}, budget = 512) {
    const [kvHeads, headDim] = [2, 16];
    const invFreq = ropeInvFreq({ head_dim: headDim, rope_theta: 500000, rope_scaling: { rope_type: "llama3", factor: 128, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 } })!;
    const settings = compactionSettings("window", budget, { recall: true, coldFormat: "float32", recent: 96, recallPlacement, ...overrides });
    const compactor = KvCompactor.create(settings, { layers: 1, kvHeads, headDim, heads: 4, dtype: "float32", invFreq });
    const cache = new KvCache("float32", 1, kvHeads, headDim, "inplace");
    cache.compactor = compactor;
    const raw = (p: number, h: number) => Float32Array.from({ length: headDim }, (_, i) => Math.sin(p * 7.1 + h * 3.3 + i * 1.7));
    const total = 6000;
    for (let start = 0; start < total; start += 50) {
      const n = Math.min(50, total - start);
      const keys = new Float32Array(kvHeads * n * headDim);
      for (let h = 0; h < kvHeads; h++) for (let j = 0; j < n; j++) keys.set(refRope(raw(start + j, h), start + j, invFreq), (h * n + j) * headDim);
      cache.reserveSlots(n);
      cache.writeNewSlots(0, keys, new Float32Array(kvHeads * n * headDim), n);
      const id = (p: number) => ({ 4500: 90001, 4501: 90002, 3000: 90003 })[p] ?? 1000 + (p % 300);
      cache.appendPositions(n, Int32Array.from({ length: n }, (_, j) => id(start + j)));
      compactor.maintain(cache, false);
    }
    expect(cache.length).toBeLessThanOrEqual(budget);
    // The needle's block scores, and so does the block after it (which recall brings with the block before it).
    expect(compactor.recall(cache, [90001, 90002], undefined)).toBe(3);
    const recalled = Array.from({ length: cache.length }, (_, i) => i).filter((i) => cache.scores[i]! >= PINNED);
    const all = Int32Array.from({ length: cache.length }, (_, i) => i);
    const { keys } = cache.readSlots(all, cache.length);
    const keyOf = (slot: number, h: number) => (keys[0] as Float32Array).subarray((h * cache.length + slot) * headDim, (h * cache.length + slot + 1) * headDim);
    return { cache, compactor, recalled, keyOf, raw, invFreq, kvHeads };
  }

  test('"near" (the default): slots keep their positions, but the keys of recalled blocks move to just before the recent window, and the sinks\' to just before them', () => {
    expect(compactionSettings("window", 4096, { recall: true }).recallPlacement).toBe("near");
    const { cache, compactor, recalled, keyOf, raw, invFreq, kvHeads } = readThenRecall("near");
    // Blocks 69-71 (the needle's, the one before and the one after), at their original positions.
    expect(recalled.map((i) => cache.positions[i]!)).toEqual(Array.from({ length: 192 }, (_, j) => 4416 + j));
    const resident = new Set(cache.positions.subarray(0, cache.length));
    let runStart = cache.nextPosition;
    while (resident.has(runStart - 1)) runStart--;
    expect(runStart).toBeGreaterThan(5000);
    const expectAt = (slot: number, at: number) => {
      for (let h = 0; h < kvHeads; h++) {
        const want = refRope(raw(cache.positions[slot]!, h), at, invFreq);
        const got = keyOf(slot, h);
        for (let i = 0; i < want.length; i++) expect(Math.abs(got[i]! - want[i]!)).toBeLessThan(1e-5);
      }
    };
    recalled.forEach((slot, j) => expectAt(slot, runStart - 192 + j));
    // The 32 sinks just before them: the resident set reads as one stretch of text.
    const sinks = Array.from({ length: cache.length }, (_, i) => i).filter((i) => cache.positions[i]! < 32);
    expect(sinks.length).toBe(32);
    for (const slot of sinks) expectAt(slot, runStart - 192 - 32 + cache.positions[slot]!);
    // A snapshot carries how far the sinks moved, so that a restored session moves them on from there.
    const state = compactor.state();
    expect(state.sinkShift).toBe(runStart - 192 - 32);
    // (Its archive's blocks are added after it: empty here.)
    expect(KvCompactor.restore(compactionStateSchema.parse(state), compactor.shape).state()).toEqual({ ...state, archivedUpTo: 0, blocks: 0 });
    // The recent window where it was read.
    for (let slot = 0; slot < cache.length; slot++) if (cache.positions[slot]! >= runStart) expectAt(slot, cache.positions[slot]!);
  });

  test("a later question on the same needle, beside a block not resident, keeps the needle (regression)", () => {
    const { cache, compactor } = readThenRecall("original", { recallCutoff: 0.1 }, 1024);
    // The needle's block is resident (pinned) from the first question; this one also points at position 3000.
    expect(compactor.recall(cache, [90001, 90002, 90003], undefined)).toBeGreaterThan(0);
    const resident = new Set(cache.positions.subarray(0, cache.length));
    for (const p of [3000, 4500, 4501]) expect(resident.has(p)).toBe(true);
  });

  test('"original": recalled keys are the archived ones, where they were read', () => {
    const { cache, recalled, keyOf, raw, invFreq, kvHeads } = readThenRecall("original");
    expect(recalled.length).toBe(192);
    for (const slot of recalled) {
      for (let h = 0; h < kvHeads; h++) {
        const want = refRope(raw(cache.positions[slot]!, h), cache.positions[slot]!, invFreq);
        expect(Array.from(keyOf(slot, h))).toEqual(Array.from(want));
      }
    }
  });
});

describe("KV compaction on both graph paths", () => {
  test("the Optimum graph (present = past + new) and the in-place graph compact alike: same resident positions, same logits (1e-4)", async () => {
    const { selectBackend } = await import("../runtime/backend.ts");
    const { LlamaModel } = await import("../runtime/llama-model.ts");
    const { loadModelFolder } = await import("../runtime/model-folder.ts");
    const { KvCompactor } = await import("../runtime/kv/compaction.ts");
    const { MODEL_DIR } = await import("./helpers/model.ts");
    const backend = await selectBackend("wasm", 1);
    const folder = await loadModelFolder(MODEL_DIR, "fp32");
    const models = [await LlamaModel.load(folder, backend), await LlamaModel.load({ ...folder, kvOnnxFile: null }, backend)];
    expect(models.map((m) => m.io.kvMode)).toEqual(["inplace", "present"]);
    // Words repeat, so the last tokens' words are in archived blocks and recall brings some back.
    const prompt = Array.from({ length: 2000 }, (_, i) => 1000 + ((i * 7919) % 300));
    // float32 archives: int8 would round the two paths' (1e-6 apart) keys to different steps now and then.
    const settings = compactionSettings("window", 512, { recall: true, recallBlocks: 2, coldFormat: "float32" });
    const runs = [];
    for (const model of models) {
      const cache = model.newCache();
      const c = model.folder.config;
      cache.compactor = KvCompactor.create(settings, { layers: c.numLayers, kvHeads: c.numKeyValueHeads, headDim: c.headDim, heads: c.numAttentionHeads, dtype: cache.dtype }, undefined, { ignored: new Set(), questionOf: (p) => Array.from(p).slice(-4), isFunctionWord: () => false });
      const logits = await model.prefill(cache, prompt, 64);
      runs.push({ cache, logits });
    }
    const [a, b] = runs;
    expect(a!.cache.compactor!.stats.evicted).toBeGreaterThan(1200);
    expect(a!.cache.compactor!.stats.recalledBlocks).toBeGreaterThan(0);
    expect(a!.cache.length).toBeLessThanOrEqual(512);
    expect(Array.from(b!.cache.positions.subarray(0, b!.cache.length))).toEqual(Array.from(a!.cache.positions.subarray(0, a!.cache.length)));
    let diff = 0;
    for (let i = 0; i < a!.logits.length; i++) diff = Math.max(diff, Math.abs(a!.logits[i]! - b!.logits[i]!));
    expect(diff).toBeLessThan(1e-4);
    for (const m of models) await m.release();
  }, 120_000);
});

describe("KvCache compaction storage", () => {
  test("compacting to far fewer slots shrinks the storage in place and keeps every kept slot's KV, position and token", async () => {
    const { KvCache } = await import("../runtime/kv-cache.ts");
    const heads = 2;
    const d = 4;
    const cache = new KvCache("float32", 1, heads, d, "inplace");
    const n = 3000;
    const valueOf = (slot: number, h: number, j: number) => slot * 100 + h * 10 + j;
    for (let start = 0; start < n; start += 500) {
      cache.reserveSlots(500);
      const block = new Float32Array(heads * 500 * d);
      for (let h = 0; h < heads; h++) for (let s = 0; s < 500; s++) for (let j = 0; j < d; j++) block[(h * 500 + s) * d + j] = valueOf(start + s, h, j);
      cache.writeNewSlots(0, block, block.map((x) => -x), 500);
      cache.appendPositions(500, Array.from({ length: 500 }, (_, i) => 7 + start + i));
    }
    const before = cache.capacity;
    const keep = Int32Array.from({ length: 100 }, (_, i) => i * 29 + 3);
    cache.compact(keep, keep.length);
    expect(cache.capacity).toBeLessThan(before / 4);
    const { keys, values } = cache.readSlots(Int32Array.from({ length: 100 }, (_, i) => i), 100);
    for (let i = 0; i < 100; i++) {
      expect(cache.positions[i]).toBe(keep[i]!);
      expect(cache.tokens[i]).toBe(7 + keep[i]!);
      for (let h = 0; h < heads; h++) for (let j = 0; j < d; j++) {
        expect(keys[0]![(h * 100 + i) * d + j]).toBe(valueOf(keep[i]!, h, j));
        expect(values[0]![(h * 100 + i) * d + j]).toBe(-valueOf(keep[i]!, h, j));
      }
    }
    // It grows again in place as slots are appended.
    cache.reserveSlots(2000);
    expect(cache.capacity).toBeGreaterThanOrEqual(2100);
    const again = cache.readSlots(Int32Array.of(99), 1);
    expect(again.keys[0]![0]).toBe(valueOf(keep[99]!, 0, 0));
    expect(again.keys[0]![d]).toBe(valueOf(keep[99]!, 1, 0));
  });
});

describe("compacted sessions", () => {
  test("a session past its budget answers the same after a restart and after download + upload into another store; its info reports the archive", async () => {
    const { SessionManager, SnapshotStore } = await import("../runtime/index.ts");
    const { tempDir } = await import("./helpers/sessions.ts");
    const options = { memoryBudgetBytes: 2 ** 30, busy: "wait" as const, chunkTokens: 512 };
    const dir = tempDir("compacted-sessions");
    const s = tasks.haystack(rngOf(21), { kind: "passkey", exactTokens: 12000, depth: 0.3, dateString: "26 Jul 2024", distractorEvery: 0 });
    const question = s.content.slice(s.content.lastIndexOf(" What is"));
    const document = s.content.slice(0, s.content.lastIndexOf(" What is"));
    const ask = (m: InstanceType<typeof SessionManager>, id: string) =>
      m.turn("default", id, { messages: (current) => [...current.slice(0, 1), { role: "user", content: question.trim() }], maxTokens: 12, sampling: { temperature: 0 }, stop: [] });

    const first = new SessionManager(windowRecall, new SnapshotStore(dir), options);
    const created = await first.create({ tenant: "default", id: "doc", messages: [{ role: "user", content: document }], templateKwargs: { date_string: "26 Jul 2024" } });
    expect(created.tokens_read).toBeGreaterThan(11000);
    expect(created.tokens_resident).toBeLessThanOrEqual(1024);
    expect(created.kv_cold_bytes).toBeGreaterThan(0);
    const a = await ask(first, "doc");
    expect(answerIsRight(a.text, s.key)).toBe(true);
    // The same question again on the session as it was (the turn above was saved with its reply: ask a copy).
    const restarted = new SessionManager(windowRecall, new SnapshotStore(dir), options);
    const info = await restarted.info("default", "doc");
    expect(info.in_memory).toBe(false);
    expect(info.kv_cold_bytes).toBeGreaterThan(0);
    expect(info.recalled_blocks).toBeGreaterThan(0);
    const again = await restarted.turn("default", "doc", { messages: (current) => [...current.slice(0, 2), { role: "user", content: "What is the pass key?" }], maxTokens: 12, sampling: { temperature: 0 }, stop: [] });
    const control = await first.turn("default", "doc", { messages: (current) => [...current.slice(0, 2), { role: "user", content: "What is the pass key?" }], maxTokens: 12, sampling: { temperature: 0 }, stop: [] });
    expect(again.tokenIds).toEqual(control.tokenIds);

    // Download from one store, upload into another (a new process would do the same), ask there.
    const { stream } = await first.download("default", "doc");
    const other = new SessionManager(windowRecall, new SnapshotStore(tempDir("compacted-upload")), options);
    await other.upload("default", "copy", stream, 2 ** 30);
    const third = await other.turn("default", "copy", { messages: (current) => [...current, { role: "user", content: "What is the pass key?" }], maxTokens: 12, sampling: { temperature: 0 }, stop: [] });
    const fourth = await first.turn("default", "doc", { messages: (current) => [...current, { role: "user", content: "What is the pass key?" }], maxTokens: 12, sampling: { temperature: 0 }, stop: [] });
    expect(third.tokenIds).toEqual(fourth.tokenIds);
    expect(answerIsRight(third.text, s.key)).toBe(true);
  }, 300_000);
});

describe("compacted snapshots from outside", () => {
  test("a tampered compacted snapshot is refused, naming what is wrong", async () => {
    const { decodeSnapshot, encodeSnapshot } = await import("../runtime/snapshot.ts");
    const { SessionManager, SnapshotStore } = await import("../runtime/index.ts");
    const { tempDir } = await import("./helpers/sessions.ts");
    const manager = new SessionManager(windowRecall, new SnapshotStore(tempDir("compacted-refusals")), { memoryBudgetBytes: 2 ** 30, busy: "wait", chunkTokens: 512 });
    const s = tasks.haystack(rngOf(22), { kind: "passkey", exactTokens: 6000, depth: 0.5, dateString: "26 Jul 2024", distractorEvery: 0 });
    await manager.create({ tenant: "default", id: "doc", messages: [{ role: "user", content: s.content }], templateKwargs: { date_string: "26 Jul 2024" } });
    const { stream } = await manager.download("default", "doc");
    const bytes = new Uint8Array(await new Response(stream).arrayBuffer());
    const blocks: import("../runtime/kv/cold-tier.ts").RawColdBlock[] = [];
    const expectation = { ...manager.snapshotExpectation(), onCompaction: () => (block: (typeof blocks)[number]) => void blocks.push(block) };
    const data = await decodeSnapshot(source(bytes), expectation);
    expect(data.compaction!.state.blocks).toBeGreaterThan(10);
    expect(blocks.length).toBe(data.compaction!.state.blocks);
    const encode = (d: typeof data, bs = blocks) => {
      const chunks = [...encodeSnapshot({ ...d, compaction: { ...d.compaction!, block: (b) => bs[b]! } }, 512)];
      const out = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
      let at = 0;
      for (const c of chunks) {
        out.set(c, at);
        at += c.length;
      }
      return out;
    };
    const refused = async (d: typeof data, message: RegExp, bs = blocks) => {
      await expect(decodeSnapshot(source(encode(d, bs)), { ...expectation, onCompaction: () => () => {} })).rejects.toThrow(message);
    };
    // Re-encoded untouched, it reads back.
    await decodeSnapshot(source(encode(data)), { ...expectation, onCompaction: () => () => {} });
    const positions = data.positions.slice();
    positions[1] = positions[0]!;
    await refused({ ...data, positions }, /repeated/);
    await refused({ ...data, compaction: { ...data.compaction!, state: { ...data.compaction!.state, pinned: data.compaction!.state.pinned + 1 } } }, /pinned/);
    const scores = data.compaction!.slotScores.slice();
    scores[0] = Number.NaN;
    await refused({ ...data, compaction: { ...data.compaction!, slotScores: scores } }, /score/);
    const swapped = blocks.slice();
    [swapped[2], swapped[3]] = [swapped[3]!, swapped[2]!];
    await refused(data, /out of order/, swapped);
    const badScale = blocks.map((b) => ({ ...b, data: b.data.slice() }));
    new DataView(badScale[0]!.data.buffer).setFloat32(2 * 64 * 32, -1, true); // the first scale of layer 0's keys
    await refused(data, /quantization scale/, badScale);
    await refused({ ...data, compaction: { ...data.compaction!, state: { ...data.compaction!.state, settings: { ...data.compaction!.state.settings, recent: 10 ** 6 } } } }, /compaction settings/);
  }, 120_000);
});

describe("compaction over HTTP", () => {
  test("/health reports the policy; a chat request longer than the budget is answered from the recall tier", async () => {
    const { createApp } = await import("../src/app.ts");
    const app = createApp({ engine: windowRecall, maxBodyBytes: 16 * 1024 * 1024, log: () => {} });
    const health = (await (await app.request("/health")).json()) as { kv_compaction: unknown };
    expect(health.kv_compaction).toEqual({ policy: "window", budget: 1024, recall: true, placement: "near" });
    const s = tasks.haystack(rngOf(23), { kind: "multikey", exactTokens: 8000, depth: 0.4, dateString: "26 Jul 2024", distractorEvery: 0 });
    const res = await app.request("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ messages: [{ role: "user", content: s.content }], chat_template_kwargs: { date_string: "26 Jul 2024" }, temperature: 0, max_tokens: 16 }),
    });
    expect(res.status).toBe(200);
    const body = (await res.json()) as { choices: { message: { content: string } }[]; usage: { prompt_tokens: number } };
    expect(body.usage.prompt_tokens).toBeGreaterThan(7000);
    expect(answerIsRight(body.choices[0]!.message.content, s.key)).toBe(true);
  }, 120_000);
});

describe("compacted sessions' snapshot log", () => {
  const options = { memoryBudgetBytes: 2 ** 30, busy: "wait" as const, chunkTokens: 512 };
  const askTurn = (content: string): import("../runtime/index.ts").TurnRequest => ({ messages: (current) => [...current, { role: "user", content }], maxTokens: 8, ...greedy });
  const sizeOf = (store: { path(id: string): string }, id: string) => statSync(store.path(id)).size;
  /** A new store, a manager on it, and its session "doc" that has read a passkey haystack (`document`: without its question). */
  const docSession = async (label: string, seed: number, tokens: number, { depth = 0.5, document = false } = {}) => {
    const { SessionManager, SnapshotStore } = await import("../runtime/index.ts");
    const { tempDir } = await import("./helpers/sessions.ts");
    const dir = tempDir(label);
    const store = new SnapshotStore(dir);
    const manager = new SessionManager(windowRecall, store, options);
    const s = tasks.haystack(rngOf(seed), { kind: "passkey", exactTokens: tokens, depth, dateString: "26 Jul 2024", distractorEvery: 0 });
    const content = document ? s.content.slice(0, s.content.lastIndexOf(" What is")) : s.content;
    await manager.create({ tenant: "default", id: "doc", messages: [{ role: "user", content }], templateKwargs: { date_string: "26 Jul 2024" } });
    return { dir, store, manager, s };
  };

  test("a turn appends what changed: after 12K tokens read it writes about what one after 2K does; the log reads back (restart, listing, download + upload) and answers the same", async () => {
    const { SessionManager, SnapshotStore } = await import("../runtime/index.ts");
    const { tempDir } = await import("./helpers/sessions.ts");
    const written: Record<number, { base: number; turn: number }> = {};
    for (const size of [2000, 12000]) {
      const { dir, store, manager, s } = await docSession("session-log", 31, size, { depth: 0.4, document: true });
      const base = sizeOf(store, "doc");
      const first = await manager.turn("default", "doc", askTurn("What is the pass key?"));
      written[size] = { base, turn: sizeOf(store, "doc") - base };
      if (size !== 12000) continue;
      expect(answerIsRight(first.text, s.key)).toBe(true);
      const before = await manager.info("default", "doc");

      // A restart on a copy of the store: the listing reads the log's last state; the next turn answers as
      // the session that never left memory does.
      const copyDir = tempDir("session-log-copy");
      cpSync(dir, copyDir, { recursive: true });
      const restarted = new SessionManager(windowRecall, new SnapshotStore(copyDir), options);
      const listed = await restarted.info("default", "doc");
      expect(listed.in_memory).toBe(false);
      expect({ ...listed, in_memory: true }).toEqual(before);
      const [a, b] = [await restarted.turn("default", "doc", askTurn("And the pass key again?")), await manager.turn("default", "doc", askTurn("And the pass key again?"))];
      expect(a.tokenIds).toEqual(b.tokenIds);
      // The two turns ran one after the other: their updated_at may fall in different seconds.
      const sameButTime = async (m: typeof manager) => ({ ...(await m.info("default", "doc")), updated_at: 0 });
      expect(await sameButTime(restarted)).toEqual(await sameButTime(manager));

      // Downloaded (two deltas now) and uploaded into another store, it answers as the original.
      const { stream } = await manager.download("default", "doc");
      const other = new SessionManager(windowRecall, new SnapshotStore(tempDir("session-log-upload")), options);
      await other.upload("default", "copy", stream, 2 ** 30);
      const [c, d] = [await other.turn("default", "copy", askTurn("What is the pass key?")), await manager.turn("default", "doc", askTurn("What is the pass key?"))];
      expect(c.tokenIds).toEqual(d.tokenIds);
      expect(answerIsRight(c.text, s.key)).toBe(true);
    }
    // The 12K session's archive and tokens were written once, with its first segment: its turn writes what
    // the 2K session's does (the resident set and the new tokens), not its history again.
    expect(written[12000]!.base).toBeGreaterThan(3 * written[2000]!.base);
    expect(written[12000]!.turn).toBeLessThan(written[12000]!.base / 4);
    expect(written[12000]!.turn).toBeLessThan(2 * written[2000]!.turn);
  }, 300_000);

  test("a document appended to an empty session is written whole (not as a delta a later turn must rewrite); the turn after it appends", async () => {
    const { SessionManager, SnapshotStore } = await import("../runtime/index.ts");
    const { decodeSnapshot } = await import("../runtime/snapshot.ts");
    const { tempDir } = await import("./helpers/sessions.ts");
    const store = new SnapshotStore(tempDir("session-log-append"));
    const manager = new SessionManager(windowRecall, store, options);
    const s = tasks.haystack(rngOf(36), { kind: "passkey", exactTokens: 3000, depth: 0.5, dateString: "26 Jul 2024", distractorEvery: 0 });
    await manager.create({ tenant: "default", id: "doc", templateKwargs: { date_string: "26 Jul 2024" } });
    const empty = sizeOf(store, "doc");
    await manager.append("default", "doc", { role: "user", content: s.content });
    const whole = sizeOf(store, "doc");
    const log = async () => (await store.read("doc", (src) => decodeSnapshot(src, { ...manager.snapshotExpectation(), onCompaction: () => () => {} }))).log;
    expect(await log()).toEqual({ bytes: whole, baseBytes: whole, deltas: 0 });
    await manager.turn("default", "doc", askTurn("What is the pass key?"));
    expect(await log()).toMatchObject({ baseBytes: whole, deltas: 1 });
    expect(sizeOf(store, "doc") - whole).toBeLessThan(whole / 4);
    expect(empty).toBeLessThan(whole / 100);
  }, 120_000);

  test("a turn whose append did not finish (a crash) is cut off when the session is read back: it is as it was before that turn", async () => {
    const { SessionManager, SnapshotStore } = await import("../runtime/index.ts");
    const { tempDir } = await import("./helpers/sessions.ts");
    const { dir, store, manager } = await docSession("session-log-torn", 32, 3000);
    await manager.turn("default", "doc", askTurn("What is the pass key?"));
    const committed = sizeOf(store, "doc");
    const asBefore = await manager.info("default", "doc");
    const beforeDir = tempDir("session-log-before");
    cpSync(dir, beforeDir, { recursive: true });
    await manager.turn("default", "doc", askTurn("What is the pass key?"));
    const full = sizeOf(store, "doc");
    expect(full).toBeGreaterThan(committed);
    // The process died halfway through writing the second turn's delta.
    truncateSync(store.path("doc"), committed + Math.floor((full - committed) / 2));
    // Downloaded before anything reads it back, it is the session before that turn (and uploads).
    const downloader = new SessionManager(windowRecall, new SnapshotStore(dir), options);
    expect((await new SnapshotStore(dir).summary("doc")).whole).toBe(false);
    const { stream, bytes } = await downloader.download("default", "doc");
    expect(bytes).toBe(committed);
    const uploaded = new SessionManager(windowRecall, new SnapshotStore(tempDir("session-log-torn-up")), options);
    expect((await uploaded.upload("default", "doc", stream, 2 ** 30)).messages).toBe(asBefore.messages);
    truncateSync(store.path("doc"), committed + Math.floor((full - committed) / 2));
    const restarted = new SessionManager(windowRecall, new SnapshotStore(dir), options);
    const control = new SessionManager(windowRecall, new SnapshotStore(beforeDir), options);
    const [a, b] = [await restarted.turn("default", "doc", askTurn("What is the pass key?")), await control.turn("default", "doc", askTurn("What is the pass key?"))];
    expect(a.tokenIds).toEqual(b.tokenIds);
    expect(a.promptTokens).toBe(b.promptTokens);
    expect((await restarted.info("default", "doc")).messages).toBe(asBefore.messages + 2);
    // The unfinished bytes are gone: the log holds the first turn, then the turn just answered.
    expect(sizeOf(new SnapshotStore(dir), "doc")).toBe(sizeOf(new SnapshotStore(beforeDir), "doc"));
  }, 300_000);

  test("the log is written whole again once its deltas outweigh it, and a download never includes an append under way", async () => {
    const { SessionManager, SnapshotStore } = await import("../runtime/index.ts");
    const { tempDir } = await import("./helpers/sessions.ts");
    const { store, manager, s } = await docSession("session-log-rewrite", 33, 1500);
    const base = sizeOf(store, "doc");
    let largest = base;
    let rewritten = false;
    // Turns that each add a few hundred tokens, until the deltas outweigh the first segment.
    for (let turn = 0; turn < 40 && !rewritten; turn++) {
      const before = sizeOf(store, "doc");
      await manager.turn("default", "doc", askTurn(`${s.content.slice(400 * turn, 400 * turn + 1200)} What is the pass key?`));
      const after = sizeOf(store, "doc");
      largest = Math.max(largest, after);
      rewritten = after < before;
    }
    expect(rewritten).toBe(true);
    // Deltas stop once they outweigh the segment they follow: the file stays within about twice its whole size.
    expect(largest).toBeLessThan(3 * base);

    // Bytes past the committed end (an append in progress) are not part of a download.
    const committed = sizeOf(store, "doc");
    appendFileSync(store.path("doc"), new Uint8Array(1000).fill(7));
    const { stream, bytes } = await manager.download("default", "doc");
    expect(bytes).toBe(committed);
    const other = new SessionManager(windowRecall, new SnapshotStore(tempDir("session-log-rewrite-up")), options);
    await other.upload("default", "copy", stream, 2 ** 30);
    const [a, b] = [await other.turn("default", "copy", askTurn("What is the pass key?")), await manager.turn("default", "doc", askTurn("What is the pass key?"))];
    expect(a.tokenIds).toEqual(b.tokenIds);
  }, 300_000);
});

describe("compacted snapshot logs from outside", () => {
  test("a delta that does not fit the state before it is refused, naming what is wrong; an unfinished one in an upload is refused, not cut off", async () => {
    const { decodeSnapshot, encodeSnapshotDelta, planSnapshotDelta } = await import("../runtime/snapshot.ts");
    const { SessionManager, SnapshotStore } = await import("../runtime/index.ts");
    const { tempDir } = await import("./helpers/sessions.ts");
    const manager = new SessionManager(windowRecall, new SnapshotStore(tempDir("delta-refusals")), { memoryBudgetBytes: 2 ** 30, busy: "wait", chunkTokens: 512 });
    const s = tasks.haystack(rngOf(34), { kind: "passkey", exactTokens: 3000, depth: 0.5, dateString: "26 Jul 2024", distractorEvery: 0 });
    await manager.create({ tenant: "default", id: "doc", messages: [{ role: "user", content: s.content }], templateKwargs: { date_string: "26 Jul 2024" } });
    const download = async () => new Uint8Array(await new Response((await manager.download("default", "doc")).stream).arrayBuffer());
    const before = await download();
    // A turn long enough that tokens leave the recent window (320 slots here), so the delta carries newly
    // archived blocks, and short enough that some of the window stays (slots the delta refers to).
    await manager.turn("default", "doc", { messages: (m) => [...m, { role: "user", content: `${s.content.slice(0, 700)} What is the pass key?` }], maxTokens: 8, ...greedy });
    const after = await download();
    // The first segment is not written again: the turn's bytes follow it.
    expect(after.length).toBeGreaterThan(before.length);
    expect(Buffer.compare(after.subarray(0, before.length), before)).toBe(0);

    const read = async (bytes: Uint8Array) => {
      const blocks: import("../runtime/kv/cold-tier.ts").RawColdBlock[] = [];
      const data = await decodeSnapshot(source(bytes), { ...manager.snapshotExpectation(), onCompaction: () => (block) => void blocks.push(block) });
      return { ...data, compaction: { ...data.compaction!, block: (b: number) => blocks[b]!, archiveId: "one archive" } };
    };
    const previous = await read(before);
    const next = await read(after);
    expect(next.log).toEqual({ bytes: after.length, baseBytes: before.length, deltas: 1 });
    expect(next.compaction.state.blocks).toBeGreaterThan(previous.compaction.state.blocks);
    const plan = planSnapshotDelta(previous, next)!;
    expect(plan.newSlots).toBeLessThan(next.length);
    const withDelta = (p: typeof plan, seq = 1, at = before.length) => Buffer.concat([before, ...encodeSnapshotDelta(next, p, seq, at, 512)]);
    // Written again from the decoded states, the delta reads back to the same state.
    const again = await read(withDelta(plan));
    expect(Array.from(again.tokens)).toEqual(Array.from(next.tokens));
    expect(Array.from(again.positions.subarray(0, again.length))).toEqual(Array.from(next.positions.subarray(0, next.length)));
    expect(again.meta.messages).toEqual(next.meta.messages);
    for (let l = 0; l < next.layers; l++) {
      const slots = (d: typeof next, a: import("../kernels/kv-slots.ts").KvArray) => Array.from({ length: d.kvHeads }, (_, h) => Array.from(a.subarray(h * d.arraySlots! * d.headDim, (h * d.arraySlots! + d.length) * d.headDim)));
      expect(slots(again, again.keys[l]!)).toEqual(slots(next, next.keys[l]!));
      expect(slots(again, again.values[l]!)).toEqual(slots(next, next.values[l]!));
    }

    const refused = (bytes: Uint8Array, message: RegExp) => expect(decodeSnapshot(source(bytes), { ...manager.snapshotExpectation(), onCompaction: () => () => {} })).rejects.toThrow(message);
    const map = (edit: (m: Int32Array) => void) => {
      const slotMap = plan.slotMap.slice();
      edit(slotMap);
      return { ...plan, slotMap };
    };
    const reused = plan.slotMap.findIndex((j) => j >= 0);
    await refused(withDelta(map((m) => (m[reused] = previous.length + 3))), /refers to slot/);
    await refused(withDelta(plan, 2), /numbered 2/);
    await refused(withDelta({ ...plan, tokensKeep: previous.tokens.length + 1 }), /keeps \d+ tokens/);
    await refused(withDelta({ ...plan, messagesKeep: previous.meta.messages.length + 1 }), /keeps \d+ messages/);
    await refused(withDelta(map((m) => (m[reused] = -1))), /new slots/);
    await refused(withDelta(plan, 1, 12), /trailer/);
    // An upload is read strictly: an unfinished delta is a truncated file.
    await refused(withDelta(plan).subarray(0, before.length + 100), /truncated/);
  }, 120_000);
});

describe("archived blocks' key summaries in snapshots", () => {
  test("under the keys scorer a session's blocks carry them and it answers the same after download + upload; a version-2 file (always with them) still reads", async () => {
    const { decodeSnapshot } = await import("../runtime/snapshot.ts");
    const { SessionManager, SnapshotStore } = await import("../runtime/index.ts");
    const { tempDir } = await import("./helpers/sessions.ts");
    const { Packr, Unpackr } = await import("msgpackr");
    const { crc32 } = await import("node:zlib");
    const keys = await load({ policy: "window", budget: 1024, recall: true, recallScorer: "keys", coldDir });
    const options = { memoryBudgetBytes: 2 ** 30, busy: "wait" as const, chunkTokens: 512 };
    const manager = new SessionManager(keys, new SnapshotStore(tempDir("keys-summaries")), options);
    const s = tasks.haystack(rngOf(35), { kind: "passkey", exactTokens: 4000, depth: 0.5, dateString: "26 Jul 2024", distractorEvery: 0 });
    await manager.create({ tenant: "default", id: "doc", messages: [{ role: "user", content: s.content }], templateKwargs: { date_string: "26 Jul 2024" } });
    const bytes = new Uint8Array(await new Response((await manager.download("default", "doc")).stream).arrayBuffer());
    const read = async (b: Uint8Array) => {
      const blocks: import("../runtime/kv/cold-tier.ts").RawColdBlock[] = [];
      const data = await decodeSnapshot(source(b), { ...manager.snapshotExpectation(), onCompaction: () => (block) => void blocks.push(block) });
      return { data, blocks };
    };
    const v3 = await read(bytes);
    expect(v3.blocks.length).toBeGreaterThan(10);
    expect(v3.blocks.every((b) => b.mins.length === keys.model.folder.config.numLayers && b.maxs.length === b.mins.length)).toBe(true);

    // The same file as version 2 wrote it: that header version, no trailer.
    const length = new DataView(bytes.buffer, bytes.byteOffset + 8, 4).getUint32(0, true);
    const unpackr = new Unpackr({ useRecords: false, mapsAsObjects: true });
    const header = unpackr.unpack(bytes.subarray(16, 16 + length)) as Record<string, unknown>;
    expect(header.version).toBe(3);
    const body = new Packr({ useRecords: false }).pack({ ...header, version: 2 });
    const head = new Uint8Array(8);
    new DataView(head.buffer).setUint32(0, body.length, true);
    new DataView(head.buffer).setUint32(4, crc32(body), true);
    const v2bytes = Buffer.concat([bytes.subarray(0, 8), head, body, bytes.subarray(16 + length, bytes.length - 16)]);
    const v2 = await read(v2bytes);
    expect(v2.data.log).toBeNull();
    expect(Array.from(v2.data.tokens)).toEqual(Array.from(v3.data.tokens));
    expect(v2.blocks.map((b) => Array.from(b.maxs[0]!))).toEqual(v3.blocks.map((b) => Array.from(b.maxs[0]!)));

    const other = new SessionManager(keys, new SnapshotStore(tempDir("keys-summaries-up")), options);
    await other.upload("default", "copy", new Response(v2bytes).body!, 2 ** 30);
    const ask = { messages: (m: import("../runtime/index.ts").ChatMessage[]) => [...m, { role: "user" as const, content: "What is the pass key?" }], maxTokens: 8, ...greedy };
    const [a, b] = [await other.turn("default", "copy", ask), await manager.turn("default", "doc", ask)];
    expect(a.tokenIds).toEqual(b.tokenIds);
    await keys.close();
  }, 120_000);
});
