/**
 * The in-place KV path (onnx/model.kv.onnx: runtime-owned storage, the graph returns only the new tokens'
 * KV) against the Optimum path (onnx/model.onnx: present = past + new) on the real random-weight model:
 * same logits and greedy tokens; clones share storage yet stay isolated; the slot mask is a real input
 * (a masked slot is as good as a removed one); snapshots see the same layout from both paths.
 */
import { describe, expect, test } from "bun:test";
import { selectBackend } from "../runtime/backend.ts";
import { KvCache, capacityFor, type KvArray } from "../runtime/kv-cache.ts";
import { LlamaModel } from "../runtime/llama-model.ts";
import { loadModelFolder } from "../runtime/model-folder.ts";
import { argmax } from "../runtime/sampling.ts";
import { sliceSlots } from "../kernels/kv-slots.ts";
import { encodeSnapshot, type SnapshotData } from "../runtime/snapshot.ts";
import { MODEL_DIR } from "./helpers/model.ts";
import { snapshotDataOf } from "./helpers/snapshot-data.ts";

const backend = await selectBackend("wasm", 1);
const folder = await loadModelFolder(MODEL_DIR, "fp32");
const inplace = await LlamaModel.load(folder, backend);
const present = await LlamaModel.load({ ...folder, kvOnnxFile: null }, backend);
const prompt = Array.from({ length: 300 }, (_, i) => 1000 + ((i * 7919) % 20000));

const maxDiff = (a: Float32Array, b: Float32Array) => {
  let d = 0;
  for (let i = 0; i < a.length; i++) d = Math.max(d, Math.abs(a[i]! - b[i]!));
  return d;
};

describe("in-place KV path", () => {
  test("the folder has an in-place graph and the model takes it; the Optimum graph stays the other path", () => {
    expect(folder.kvOnnxFile).toMatch(/onnx[\\/]model\.kv\.onnx$/);
    expect(inplace.io.kvMode).toBe("inplace");
    expect(present.io.kvMode).toBe("present");
    expect(inplace.newCache().mode).toBe("inplace");
  });

  test("same logits (1e-4) and greedy tokens as the Optimum graph, prefill in chunks then 40 decode steps", async () => {
    const a = inplace.newCache();
    const b = present.newCache();
    let la = await inplace.prefill(a, prompt, 61);
    let lb = await present.prefill(b, prompt, 61);
    let worst = maxDiff(la, lb);
    const tokens: number[] = [];
    for (let step = 0; step < 40; step++) {
      const next = argmax(lb);
      expect(argmax(la)).toBe(next);
      tokens.push(next);
      la = await inplace.forward(a, [next]);
      lb = await present.forward(b, [next]);
      worst = Math.max(worst, maxDiff(la, lb));
    }
    expect(worst).toBeLessThan(1e-4);
    expect(new Set(tokens).size).toBeGreaterThan(8);
    // Storage grew past its first capacity (256 slots) and keeps spare room bounded.
    expect(a.length).toBe(340);
    expect(a.capacity).toBeGreaterThanOrEqual(340);
    expect(a.capacity).toBeLessThanOrEqual(capacityFor(340));
    // The snapshot layout is the same from both paths.
    const ka = a.layerArrays();
    const kb = b.layerArrays();
    for (let l = 0; l < folder.config.numLayers; l++) {
      expect(ka.keys[l]!.length).toBe(kb.keys[l]!.length);
      expect(maxDiff(ka.keys[l] as Float32Array, kb.keys[l] as Float32Array)).toBeLessThan(1e-4);
      expect(maxDiff(ka.values[l] as Float32Array, kb.values[l] as Float32Array)).toBeLessThan(1e-4);
    }
  }, 120_000);

  test("onnxruntime-node's one-row matmuls (rows_per_matmul 1 in one-token steps) give the Optimum graph's logits", async () => {
    const native = await LlamaModel.load(folder, await selectBackend("native", 1));
    const a = native.newCache();
    const b = present.newCache();
    let la = await native.prefill(a, prompt, 61);
    let lb = await present.prefill(b, prompt, 61);
    let worst = maxDiff(la, lb);
    for (let step = 0; step < 20; step++) {
      const next = argmax(lb);
      expect(argmax(la)).toBe(next);
      la = await native.forward(a, [next]);
      lb = await present.forward(b, [next]);
      worst = Math.max(worst, maxDiff(la, lb));
    }
    expect(worst).toBeLessThan(1e-4);
    await native.release();
  }, 120_000);

  test("a clone shares storage but never sees, or changes, what the original writes after it (and vice versa)", async () => {
    const base = inplace.newCache();
    await inplace.prefill(base, prompt.slice(0, 50), 512);
    const before = base.layerArrays();
    // Both the original and a full-length clone append different tokens at the same slot.
    const copy = base.clone();
    const fromCopy = await inplace.forward(copy, [11, 12, 13]);
    const fromBase = await inplace.forward(base, [21, 22]);
    // A prefix clone appends inside the original's slots.
    const prefix = base.clone(20);
    const fromPrefix = await inplace.forward(prefix, [31]);

    const check = async (cache: KvCache, ids: number[], logits: Float32Array) => {
      const fresh = present.newCache();
      const expected = await present.forward(fresh, ids);
      expect(maxDiff(logits, expected)).toBeLessThan(1e-4);
      const got = cache.layerArrays();
      const want = fresh.layerArrays();
      for (let l = 0; l < folder.config.numLayers; l++) expect(maxDiff(got.keys[l] as Float32Array, want.keys[l] as Float32Array)).toBeLessThan(1e-4);
    };
    await check(copy, [...prompt.slice(0, 50), 11, 12, 13], fromCopy);
    await check(base, [...prompt.slice(0, 50), 21, 22], fromBase);
    await check(prefix, [...prompt.slice(0, 20), 31], fromPrefix);
    // The original's first 50 slots are bit-identical to what they were.
    const after = base.layerArrays();
    const layout = { heads: base.kvHeads, headDim: base.headDim };
    for (let l = 0; l < base.layers; l++) {
      expect(Array.from(sliceSlots(after.keys[l]!, 52, 0, 50, layout))).toEqual(Array.from(before.keys[l]!));
      expect(Array.from(sliceSlots(after.values[l]!, 52, 0, 50, layout))).toEqual(Array.from(before.values[l]!));
    }
  }, 120_000);

  test("storage no other cache holds grows in place (same buffer); shared storage is copied and stays as it was", async () => {
    const base = inplace.newCache();
    await inplace.prefill(base, prompt.slice(0, 200), 512);
    const buffer = base.layerViews().keys[0]!.buffer;
    const capacity = base.capacity;
    const more = Array.from({ length: 400 }, (_, i) => 2000 + ((i * 31) % 5000));
    await inplace.prefill(base, more, 512); // past the first capacity
    expect(base.capacity).toBeGreaterThan(capacity);
    expect(base.layerViews().keys[0]!.buffer).toBe(buffer);
    const snapshot = base.layerArrays();
    const copy = base.clone();
    await inplace.prefill(copy, Array.from({ length: base.capacity - base.length + 5 }, (_, i) => 500 + i), 512);
    expect(copy.layerViews().keys[0]!.buffer).not.toBe(buffer);
    const still = base.layerArrays();
    for (let l = 0; l < base.layers; l++) {
      expect(Array.from(still.keys[l]!)).toEqual(Array.from(snapshot.keys[l]!));
      expect(Array.from(still.values[l]!)).toEqual(Array.from(snapshot.values[l]!));
    }
    const logits = await inplace.forward(base, [7]);
    const expected = await present.prefill(present.newCache(), [...prompt.slice(0, 200), ...more, 7], 512);
    expect(maxDiff(logits, expected)).toBeLessThan(1e-4);
  }, 120_000);

  test("a failed step leaves the cache it ran on unchanged and its clones usable", async () => {
    const base = inplace.newCache();
    await inplace.prefill(base, prompt.slice(0, 30), 512);
    const copy = base.clone();
    // An id outside the vocabulary makes onnxruntime's Gather fail inside the run.
    await expect(inplace.forward(copy, [10_000_000])).rejects.toThrow();
    expect(copy.length).toBe(30);
    const logits = await inplace.forward(base, [5]);
    const expected = await present.forward(present.newCache(), [...prompt.slice(0, 30), 5]);
    expect(maxDiff(logits, expected)).toBeLessThan(1e-4);
  }, 120_000);

  test("slot_mask is a real input: a masked slot gives the logits of the cache without that slot", async () => {
    const ids = prompt.slice(0, 40);
    const masked = inplace.newCache();
    await inplace.prefill(masked, ids, 512);
    // Present path: the same KV with slot 17 removed (positions keep their original ids, as compaction will).
    const full = present.newCache();
    await present.prefill(full, ids, 512);
    const kv = full.layerArrays();
    const layout = { heads: full.kvHeads, headDim: full.headDim };
    const without = (a: Float32Array | Uint16Array) => {
      const head = sliceSlots(a, 40, 0, 17, layout);
      const tail = sliceSlots(a, 40, 18, 22, layout);
      const out = new Float32Array(full.kvHeads * 39 * full.headDim);
      for (let h = 0; h < full.kvHeads; h++) {
        out.set(head.subarray(h * 17 * full.headDim, (h + 1) * 17 * full.headDim), h * 39 * full.headDim);
        out.set(tail.subarray(h * 22 * full.headDim, (h + 1) * 22 * full.headDim), (h * 39 + 17) * full.headDim);
      }
      return out;
    };
    const dropped = present.newCache();
    const positions = Int32Array.from([...Array(17).keys(), ...Array.from({ length: 22 }, (_, i) => 18 + i)]);
    dropped.assign(kv.keys.map(without), kv.values.map(without), positions, 39, 40);
    const expected = await present.forward(dropped, [77]);

    masked.maskSlot(17);
    expect(() => masked.layerArrays()).toThrow(/masked/);
    expect(masked.length).toBe(40);
    const got = await inplace.forward(masked, [77]);
    expect(maxDiff(got, expected)).toBeLessThan(1e-4);
    // Without the drop the logits differ: the mask is what made them equal.
    const kept = inplace.newCache();
    await inplace.prefill(kept, ids, 512);
    expect(maxDiff(await inplace.forward(kept, [77]), expected)).toBeGreaterThan(1e-3);
  }, 120_000);

  test("a snapshot encoded from the storage's views (spare capacity, shared with a clone that appended) equals one from copies", async () => {
    const cache = inplace.newCache();
    await inplace.prefill(cache, prompt.slice(0, 100), 512);
    // A clone at the frontier appends in place into the same storage, past this cache's slots.
    const clone = cache.clone();
    await inplace.forward(clone, [42, 43]);
    const views = cache.layerViews();
    expect(views.slots).toBeGreaterThan(cache.length);
    const copies = cache.layerArrays();
    const data = (keys: KvArray[], values: KvArray[], slots?: number) => snapshotDataOf(cache, Int32Array.from(prompt.slice(0, 100)), { keys, values, slots });
    const bytes = (d: SnapshotData) => Buffer.concat([...encodeSnapshot(d, 32)]);
    expect(bytes(data(views.keys, views.values, views.slots)).equals(bytes(data(copies.keys, copies.values)))).toBe(true);
  }, 60_000);
});
