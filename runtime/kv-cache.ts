/**
 * The KV cache of one sequence: per layer, the keys and values the graph returned as present.N.*, kept
 * as plain typed arrays laid out [kvHeads, length, headDim] and fed back as past_key_values.N.*.
 * Every resident slot keeps the original position id of its token, so a later compaction can drop slots
 * without renumbering what remains.
 *
 * A layer's arrays are never written in place: forward() and truncate() put new arrays in their place. So
 * clone() can share them, and a working copy taken for a turn that may fail leaves the original intact.
 */
import { sliceSlots, type KvArray } from "../kernels/kv-slots.ts";

export type KvDtype = "float32" | "float16";
export type { KvArray };

export class KvCache {
  /** keys[i] / values[i]: layer i, [kvHeads, length, headDim]. */
  keys: KvArray[];
  values: KvArray[];
  /** Number of resident slots. */
  length = 0;
  /** Original position id of each resident slot (first `length` entries are valid). */
  positions: Int32Array;
  /** Position id the next token will get (one past the last token read, whatever was dropped). */
  nextPosition = 0;

  constructor(
    readonly dtype: KvDtype,
    readonly layers: number,
    readonly kvHeads: number,
    readonly headDim: number,
  ) {
    const empty = () => (dtype === "float16" ? new Uint16Array(0) : new Float32Array(0));
    this.keys = Array.from({ length: layers }, empty);
    this.values = Array.from({ length: layers }, empty);
    this.positions = new Int32Array(256);
  }

  get bytesPerElement(): number {
    return this.dtype === "float16" ? 2 : 4;
  }

  /** Bytes of KV one slot takes, all layers, keys and values. */
  get bytesPerSlot(): number {
    return this.layers * 2 * this.kvHeads * this.headDim * this.bytesPerElement;
  }

  /** Bytes of KV held for this sequence. */
  get bytes(): number {
    return this.length * this.bytesPerSlot;
  }

  private ensurePositionCapacity(needed: number): void {
    if (needed <= this.positions.length) return;
    let capacity = this.positions.length;
    while (capacity < needed) capacity *= 2;
    const grown = new Int32Array(capacity);
    grown.set(this.positions.subarray(0, this.length));
    this.positions = grown;
  }

  /** Records `count` new slots at consecutive positions starting at nextPosition. */
  appendPositions(count: number): void {
    this.ensurePositionCapacity(this.length + count);
    for (let i = 0; i < count; i++) this.positions[this.length + i] = this.nextPosition + i;
    this.length += count;
    this.nextPosition += count;
  }

  /** Replaces the whole content (a restored snapshot, a clone); the arrays are taken as they are, the positions copied. */
  assign(keys: KvArray[], values: KvArray[], positions: Int32Array, length: number, nextPosition: number): void {
    this.keys = [...keys];
    this.values = [...values];
    this.ensurePositionCapacity(length);
    this.positions.set(positions.subarray(0, length));
    this.length = length;
    this.nextPosition = nextPosition;
  }

  /** Position the next token gets when only the first `n` slots are kept. */
  private positionAfter(n: number): number {
    return n >= this.length ? this.nextPosition : n > 0 ? this.positions[n - 1]! + 1 : 0;
  }

  /** Keeps the first `n` slots. The next token follows the last kept one. */
  truncate(n: number): void {
    if (n >= this.length) return;
    const layout = { heads: this.kvHeads, headDim: this.headDim };
    for (let i = 0; i < this.layers; i++) {
      this.keys[i] = sliceSlots(this.keys[i]!, this.length, 0, n, layout);
      this.values[i] = sliceSlots(this.values[i]!, this.length, 0, n, layout);
    }
    this.nextPosition = this.positionAfter(n);
    this.length = n;
  }

  /**
   * An independent cache holding the first `n` slots (all by default): nothing done to the copy changes
   * this cache. Arrays are shared when every slot is kept (they are never written in place), copied otherwise.
   */
  clone(n = this.length): KvCache {
    const copy = new KvCache(this.dtype, this.layers, this.kvHeads, this.headDim);
    const layout = { heads: this.kvHeads, headDim: this.headDim };
    const count = Math.min(n, this.length);
    const keep = (a: KvArray) => (count === this.length ? a : sliceSlots(a, this.length, 0, count, layout));
    copy.assign(this.keys.map(keep), this.values.map(keep), this.positions, count, this.positionAfter(count));
    return copy;
  }
}
