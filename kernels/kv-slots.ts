/**
 * KV-cache slot gathers on the CPU. A layer's keys or values are one typed array laid out
 * [heads, slots, headDim] (ORT's [1, kvHeads, length, headDim]); these copy whole slots between such
 * arrays without knowing what a slot means. Float32 and float16 (as Uint16 bits) caches alike.
 */
export type KvArray = Float32Array | Uint16Array;

export interface KvLayout {
  heads: number;
  headDim: number;
}

function like(src: KvArray, length: number): KvArray {
  return src instanceof Float32Array ? new Float32Array(length) : new Uint16Array(length);
}

/** Copies slots [start, start + count) of `src` (which holds `slots` slots) into a new [heads, count, headDim] array. */
export function sliceSlots(src: KvArray, slots: number, start: number, count: number, layout: KvLayout): KvArray {
  const { heads, headDim } = layout;
  if (start < 0 || count < 0 || start + count > slots) throw new RangeError(`slots [${start}, ${start + count}) outside 0..${slots}`);
  const out = like(src, heads * count * headDim);
  for (let h = 0; h < heads; h++) {
    const from = (h * slots + start) * headDim;
    out.set(src.subarray(from, from + count * headDim), h * count * headDim);
  }
  return out;
}

/** Writes a [heads, count, headDim] block into slots [start, start + count) of `dst` (which holds `slots` slots). */
export function writeSlots(dst: KvArray, slots: number, start: number, block: KvArray, count: number, layout: KvLayout): void {
  const { heads, headDim } = layout;
  if (start < 0 || count < 0 || start + count > slots) throw new RangeError(`slots [${start}, ${start + count}) outside 0..${slots}`);
  if (block.length !== heads * count * headDim) throw new RangeError(`block holds ${block.length} values, expected ${heads * count * headDim}`);
  for (let h = 0; h < heads; h++) {
    dst.set(block.subarray(h * count * headDim, (h + 1) * count * headDim), (h * slots + start) * headDim);
  }
}
