/**
 * The KV cache of one sequence: per layer, the key and value tensors the graph returned as present.N.*,
 * which are fed back as past_key_values.N.* on the next step. Every resident slot keeps the original
 * position id of its token, so a later compaction can drop slots without renumbering what remains.
 */
import type { Tensor } from "onnxruntime-web";

export type KvDtype = "float32" | "float16";

export class KvCache {
  /** keys[i] / values[i]: layer i, shape [1, kvHeads, length, headDim]. */
  keys: Tensor[];
  values: Tensor[];
  /** Number of resident slots. */
  length = 0;
  /** Original position id of each resident slot (first `length` entries are valid). */
  positions: Int32Array;
  /** Position id the next token will get (one past the last token read, whatever was dropped). */
  nextPosition = 0;

  constructor(
    readonly dtype: KvDtype,
    readonly kvHeads: number,
    readonly headDim: number,
    emptyKeys: Tensor[],
    emptyValues: Tensor[],
  ) {
    this.keys = emptyKeys;
    this.values = emptyValues;
    this.positions = new Int32Array(256);
  }

  /** Bytes of KV held for this sequence (keys and values, all layers). */
  get bytes(): number {
    const bytesPerElement = this.dtype === "float16" ? 2 : 4;
    return this.keys.length * 2 * this.kvHeads * this.headDim * this.length * bytesPerElement;
  }

  /** Records `count` new slots at consecutive positions starting at nextPosition. */
  appendPositions(count: number): void {
    const needed = this.length + count;
    if (needed > this.positions.length) {
      let capacity = this.positions.length;
      while (capacity < needed) capacity *= 2;
      const grown = new Int32Array(capacity);
      grown.set(this.positions.subarray(0, this.length));
      this.positions = grown;
    }
    for (let i = 0; i < count; i++) this.positions[this.length + i] = this.nextPosition + i;
    this.length = needed;
    this.nextPosition += count;
  }
}
