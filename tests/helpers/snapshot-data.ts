/** SnapshotData for codec tests: a cache's KV (or given arrays over `slots` slots) with placeholder model fields and meta. */
import type { KvArray, KvCache } from "../../runtime/kv-cache.ts";
import type { SnapshotData, SnapshotMeta } from "../../runtime/snapshot.ts";

export function snapshotDataOf(
  cache: KvCache,
  tokens: Int32Array,
  kv: { keys: KvArray[]; values: KvArray[]; slots?: number } = cache.layerArrays(),
  meta: Partial<SnapshotMeta> = {},
): SnapshotData {
  return {
    fingerprint: "f",
    modelId: "m",
    kvDtype: cache.dtype,
    layers: cache.layers,
    kvHeads: cache.kvHeads,
    headDim: cache.headDim,
    tokens,
    length: cache.length,
    nextPosition: cache.nextPosition,
    positions: cache.positions.subarray(0, cache.length),
    keys: kv.keys,
    values: kv.values,
    arraySlots: kv.slots,
    meta: { id: "x", createdAt: 1, updatedAt: 2, messages: [], templateKwargs: {}, compaction: null, origin: "computed", pieces: [], ...meta },
  };
}
