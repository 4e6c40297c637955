/**
 * CPU kernels for KV-cache compaction: float16 conversion, slot gathering, int8 group quantization,
 * H2O score accumulation, Quest block summaries and bounds, top-k selection, and rotary re-positioning. Plain typed-array
 * loops; `CompactionKernels` is the contract a WGSL implementation will share.
 */
import type { KvArray, KvLayout } from "./kv-slots.ts";

function checkCount(name: string, value: number): void {
  if (!Number.isInteger(value) || value < 0) throw new RangeError(`${name} must be a non-negative integer, got ${value}`);
}

function checkLength(name: string, length: number, needed: number): void {
  if (length < needed) throw new RangeError(`${name} holds ${length} values, needs ${needed}`);
}

// ---------------------------------------------------------------------------------------------------------
// float16 <-> float32

let halfTable: Float32Array | undefined;

// Every half decodes exactly into a float32, so a 256 KiB table replaces per-element bit twiddling.
function buildHalfTable(): Float32Array {
  const table = new Float32Array(65536);
  for (let h = 0; h < 65536; h++) {
    const exp = (h >>> 10) & 0x1f;
    const mant = h & 0x3ff;
    let v: number;
    if (exp === 0) v = mant * 2 ** -24;
    else if (exp === 31) v = mant === 0 ? Infinity : NaN;
    else v = (1024 + mant) * 2 ** (exp - 25);
    table[h] = h & 0x8000 ? -v : v;
  }
  return table;
}

/** float16 bits -> float32 (table of 65536 built once); float32 arrays are copied into `out`. */
export function toFloat32(src: KvArray, out?: Float32Array): Float32Array {
  const n = src.length;
  const dst = out ?? new Float32Array(n);
  checkLength("out", dst.length, n);
  if (src instanceof Float32Array) {
    if (dst !== src) dst.set(src);
    return dst;
  }
  const table = (halfTable ??= buildHalfTable());
  for (let i = 0; i < n; i++) dst[i] = table[src[i]!]!;
  return dst;
}

/** float32 -> float16 bits, round to nearest even, overflow to +-Inf, NaN kept NaN. */
export function toFloat16Bits(src: Float32Array, out?: Uint16Array): Uint16Array {
  const n = src.length;
  const dst = out ?? new Uint16Array(n);
  checkLength("out", dst.length, n);
  // A Float32Array's byteOffset is always a multiple of 4, so its bits can be read in place.
  const bits = new Uint32Array(src.buffer, src.byteOffset, n);
  for (let i = 0; i < n; i++) {
    const b = bits[i]!;
    const sign = (b >>> 16) & 0x8000;
    const exp = (b >>> 23) & 0xff;
    const mant = b & 0x7fffff;
    if (exp === 0xff) {
      // Keep the top payload bits and force the quiet bit, so a NaN never turns into Inf.
      dst[i] = mant === 0 ? sign | 0x7c00 : sign | 0x7e00 | (mant >>> 13);
      continue;
    }
    const e = exp - 112; // rebiased exponent (127 -> 15)
    if (e >= 31) {
      dst[i] = sign | 0x7c00;
    } else if (e >= 1) {
      let h = (e << 10) | (mant >>> 13);
      const rest = mant & 0x1fff;
      // A carry out of the mantissa bumps the exponent, and from 0x7bff lands on Inf, as it should.
      if (rest > 0x1000 || (rest === 0x1000 && (h & 1) === 1)) h++;
      dst[i] = sign | h;
    } else if (e >= -10) {
      // Half subnormal: value = m * 2^-24 with the implicit bit made explicit.
      const m = mant | 0x800000;
      const shift = 14 - e;
      let h = m >>> shift;
      const rest = m & ((1 << shift) - 1);
      const half = 1 << (shift - 1);
      if (rest > half || (rest === half && (h & 1) === 1)) h++;
      dst[i] = sign | h;
    } else {
      // Below 2^-25 (half the smallest subnormal, which ties to even = 0).
      dst[i] = sign;
    }
  }
  return dst;
}

// ---------------------------------------------------------------------------------------------------------
// Slot gathering

/**
 * Copies slots keep[0..keepCount) (strictly ascending slot indices of src, which holds srcSlots slots) of a
 * [heads, srcSlots, headDim] array into slots [dstStart, dstStart + keepCount) of dst ([heads, dstSlots, headDim]).
 * dst may be src itself (in-place compaction) when dstStart + i <= keep[i] for every i: copies go in increasing
 * order so no slot is overwritten before it is read. Throws RangeError on out-of-range / non-ascending input,
 * or when in-place and the condition does not hold. dst and src must have the same element type.
 * Contiguous runs of kept slots are copied with one copyWithin/set per head per run (speed matters: called per chunk).
 */
export function gatherSlots(
  src: KvArray,
  srcSlots: number,
  keep: Int32Array,
  keepCount: number,
  dst: KvArray,
  dstSlots: number,
  dstStart: number,
  layout: KvLayout,
): void {
  const { heads, headDim } = layout;
  checkCount("heads", heads);
  checkCount("headDim", headDim);
  checkCount("srcSlots", srcSlots);
  checkCount("dstSlots", dstSlots);
  checkCount("dstStart", dstStart);
  checkCount("keepCount", keepCount);
  if (src.constructor !== dst.constructor) throw new TypeError("gatherSlots: src and dst must have the same element type");
  checkLength("keep", keep.length, keepCount);
  checkLength("src", src.length, heads * srcSlots * headDim);
  checkLength("dst", dst.length, heads * dstSlots * headDim);
  if (dstStart + keepCount > dstSlots) throw new RangeError(`slots [${dstStart}, ${dstStart + keepCount}) outside 0..${dstSlots}`);

  // Positions in elements from the start of the shared buffer, so overlapping views of one buffer are
  // handled like src === dst: one view spans both, copyWithin moves the bytes.
  const bpe = src.BYTES_PER_ELEMENT;
  const srcBase = src.byteOffset / bpe;
  const dstBase = dst.byteOffset / bpe;
  const srcUsed = heads * srcSlots * headDim;
  const dstUsed = heads * dstSlots * headDim;
  const sameBuffer = src.buffer === dst.buffer;
  const overlaps = src === dst || (sameBuffer && srcBase < dstBase + dstUsed && dstBase < srcBase + srcUsed && srcUsed > 0 && dstUsed > 0);
  // A later head's destination moves right of its source by (heads - 1) * (dstSlots - srcSlots) slots at worst.
  const headDrift = heads > 1 && dstSlots > srcSlots ? (heads - 1) * (dstSlots - srcSlots) * headDim : 0;

  let prev = -1;
  for (let i = 0; i < keepCount; i++) {
    const k = keep[i]!;
    if (k <= prev || k >= srcSlots) {
      throw new RangeError(k >= srcSlots || k < 0 ? `keep[${i}] = ${k} outside 0..${srcSlots}` : `keep is not strictly ascending at ${i} (${prev}, ${k})`);
    }
    prev = k;
    if (overlaps) {
      // Copies run in increasing position, so each write must land at or before the slot it reads.
      const slotsAhead = dstStart + i - k;
      if ((src === dst && slotsAhead > 0) || slotsAhead * headDim + headDrift + dstBase - srcBase > 0) {
        throw new RangeError(`in-place gather would overwrite slot ${k} before reading it (writes slot ${dstStart + i})`);
      }
    }
  }
  if (keepCount === 0 || heads === 0 || headDim === 0) return;

  let whole: KvArray | undefined;
  let srcOff = 0;
  let dstOff = 0;
  if (src === dst) {
    whole = src;
  } else if (sameBuffer) {
    // Different views of one buffer: a single view over both keeps every copy a memmove (set would clone).
    const lo = Math.min(srcBase, dstBase);
    const hi = Math.max(srcBase + srcUsed, dstBase + dstUsed);
    whole = src instanceof Float32Array ? new Float32Array(src.buffer, lo * 4, hi - lo) : new Uint16Array(src.buffer, lo * 2, hi - lo);
    srcOff = srcBase - lo;
    dstOff = dstBase - lo;
  }

  for (let h = 0; h < heads; h++) {
    const srcHead = h * srcSlots;
    const dstHead = h * dstSlots + dstStart;
    let i = 0;
    while (i < keepCount) {
      const first = keep[i]!;
      let end = i + 1;
      while (end < keepCount && keep[end] === first + (end - i)) end++;
      const from = (srcHead + first) * headDim;
      const to = (dstHead + i) * headDim;
      const len = (end - i) * headDim;
      if (whole !== undefined) whole.copyWithin(dstOff + to, srcOff + from, srcOff + from + len);
      else if (src instanceof Float32Array) (dst as Float32Array).set(src.subarray(from, from + len), to);
      else (dst as Uint16Array).set(src.subarray(from, from + len), to);
      i = end;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// int8 group quantization

const scratchF32 = new Float32Array(1);
const scratchU32 = new Uint32Array(scratchF32.buffer);

/** The smallest float32 >= absmax / 127, so |x / scale| <= 127 and no value is clipped by the rounding of the scale. */
function scaleFor(absmax: number): number {
  const s = Math.fround(absmax / 127);
  if (s * 127 >= absmax) return s; // exact in float64: 24-bit * 7-bit
  scratchF32[0] = s;
  scratchU32[0]! += 1; // next float32 up (s >= 0, finite)
  return scratchF32[0]!;
}

/**
 * Symmetric int8 quantization with one float32 scale per group of `group` consecutive values (the last
 * group may be shorter): scale = absmax / 127 (0 for an all-zero group), q = round(x / scale) clamped to [-127, 127].
 * Non-finite input throws RangeError. q.length >= src.length, scales.length >= ceil(src.length / group).
 */
export function quantizeInt8(src: Float32Array, group: number, q: Int8Array, scales: Float32Array): void {
  if (!Number.isInteger(group) || group < 1) throw new RangeError(`group must be a positive integer, got ${group}`);
  const n = src.length;
  checkLength("q", q.length, n);
  checkLength("scales", scales.length, Math.ceil(n / group));
  for (let start = 0, g = 0; start < n; start += group, g++) {
    const end = Math.min(start + group, n);
    let absmax = 0;
    for (let i = start; i < end; i++) {
      const x = src[i]!;
      if (x - x !== 0) throw new RangeError(`quantizeInt8: non-finite value ${x} at ${i}`);
      const a = x < 0 ? -x : x;
      if (a > absmax) absmax = a;
    }
    if (absmax === 0) {
      scales[g] = 0;
      q.fill(0, start, end);
      continue;
    }
    const scale = scaleFor(absmax);
    scales[g] = scale;
    for (let i = start; i < end; i++) {
      const v = src[i]! / scale;
      // Round half away from zero, so q(-x) = -q(x).
      let r = v < 0 ? -Math.round(-v) : Math.round(v);
      if (r > 127) r = 127;
      else if (r < -127) r = -127;
      q[i] = r;
    }
  }
}

/** Inverse: out[i] = q[i] * scales[floor(i / group)] for i < out.length. */
export function dequantizeInt8(q: Int8Array, scales: Float32Array, group: number, out: Float32Array): void {
  if (!Number.isInteger(group) || group < 1) throw new RangeError(`group must be a positive integer, got ${group}`);
  const n = out.length;
  checkLength("q", q.length, n);
  checkLength("scales", scales.length, Math.ceil(n / group));
  for (let start = 0, g = 0; start < n; start += group, g++) {
    const end = Math.min(start + group, n);
    const scale = scales[g]!;
    for (let i = start; i < end; i++) out[i] = q[i]! * scale;
  }
}

/**
 * The largest |x - dequantize(quantize(x))| the scheme allows for values of the group with that scale:
 * scale / 2 from rounding to the int8 grid, plus 2^-17 * scale to cover rounding q * scale to float32
 * (at most 127 * scale * 2^-24) and the float64 division in quantizeInt8.
 */
export function int8ErrorBound(scale: number): number {
  return scale * (0.5 + 2 ** -17);
}

// ---------------------------------------------------------------------------------------------------------
// Scores

/** H2O-style score accumulation: scores[i] = scores[i] * decay + mass[i] for i < n. */
export function accumulateScores(scores: Float32Array, mass: Float32Array, n: number, decay = 1): void {
  checkCount("n", n);
  checkLength("scores", scores.length, n);
  checkLength("mass", mass.length, n);
  if (decay === 1) {
    for (let i = 0; i < n; i++) scores[i]! += mass[i]!;
  } else {
    for (let i = 0; i < n; i++) scores[i] = scores[i]! * decay + mass[i]!;
  }
}

/**
 * Quest-style block summary of keys: for slots [start, start + count) of a [heads, slots, headDim] float32
 * array, per head and channel the min and the max over those slots, written at outMin/outMax[offset + h * headDim + d].
 * An empty range writes +Inf / -Inf (the identities of min and max).
 */
export function blockSummary(
  keys: Float32Array,
  slots: number,
  start: number,
  count: number,
  layout: KvLayout,
  outMin: Float32Array,
  outMax: Float32Array,
  offset = 0,
): void {
  const { heads, headDim } = layout;
  checkCount("start", start);
  checkCount("count", count);
  checkCount("offset", offset);
  if (start + count > slots) throw new RangeError(`slots [${start}, ${start + count}) outside 0..${slots}`);
  checkLength("keys", keys.length, heads * slots * headDim);
  checkLength("outMin", outMin.length, offset + heads * headDim);
  checkLength("outMax", outMax.length, offset + heads * headDim);
  for (let h = 0; h < heads; h++) {
    const o = offset + h * headDim;
    outMin.fill(Infinity, o, o + headDim);
    outMax.fill(-Infinity, o, o + headDim);
    // Slot-major so each key row is read contiguously.
    for (let s = start; s < start + count; s++) {
      const row = (h * slots + s) * headDim;
      for (let d = 0; d < headDim; d++) {
        const v = keys[row + d]!;
        if (v < outMin[o + d]!) outMin[o + d] = v;
        if (v > outMax[o + d]!) outMax[o + d] = v;
      }
    }
  }
}

function checkHeads(qHeads: number, kvHeads: number): void {
  checkCount("qHeads", qHeads);
  if (!Number.isInteger(kvHeads) || kvHeads < 1) throw new RangeError(`kvHeads must be a positive integer, got ${kvHeads}`);
  if (qHeads % kvHeads !== 0) throw new RangeError(`qHeads (${qHeads}) is not a multiple of kvHeads (${kvHeads})`);
}

/**
 * Upper bounds of q.k for every block: queries are [qHeads, rows, headDim] float32 (qHeads a multiple of
 * kvHeads; query head h reads kv head floor(h / (qHeads / kvHeads))), mins/maxs are [blocks, kvHeads, headDim]
 * (blockSummary's layout, one block after another). out[(b * qHeads + h) * rows + r] =
 * sum_d max(q[h,r,d] * min[b,kv,d], q[h,r,d] * max[b,kv,d]). out.length >= blocks * qHeads * rows.
 * Sums run in float64 over d in order, like blockMaxDots, so bound >= max dot holds exactly (rounding is monotone).
 */
export function blockUpperBounds(
  queries: Float32Array,
  qHeads: number,
  rows: number,
  headDim: number,
  kvHeads: number,
  mins: Float32Array,
  maxs: Float32Array,
  blocks: number,
  out: Float32Array,
): void {
  checkHeads(qHeads, kvHeads);
  checkCount("rows", rows);
  checkCount("headDim", headDim);
  checkCount("blocks", blocks);
  checkLength("queries", queries.length, qHeads * rows * headDim);
  checkLength("mins", mins.length, blocks * kvHeads * headDim);
  checkLength("maxs", maxs.length, blocks * kvHeads * headDim);
  checkLength("out", out.length, blocks * qHeads * rows);
  const groupSize = qHeads / kvHeads;
  for (let b = 0; b < blocks; b++) {
    for (let h = 0; h < qHeads; h++) {
      const summary = (b * kvHeads + Math.floor(h / groupSize)) * headDim;
      for (let r = 0; r < rows; r++) {
        const qRow = (h * rows + r) * headDim;
        let acc = 0;
        for (let d = 0; d < headDim; d++) {
          const qv = queries[qRow + d]!;
          // The sign of q picks the maximizing end, one multiply instead of two and a max (q = 0 adds 0).
          if (qv > 0) acc += qv * maxs[summary + d]!;
          else if (qv < 0) acc += qv * mins[summary + d]!;
        }
        out[(b * qHeads + h) * rows + r] = acc;
      }
    }
  }
}

/**
 * Exact max over a block's slots of q.k, same shapes as blockUpperBounds but keys instead of a summary:
 * keys [kvHeads, slots, headDim] float32 of one block (slots = its length); out[h * rows + r] = max_s q[h,r].k[kv,s].
 * An empty block gives -Inf.
 */
export function blockMaxDots(
  queries: Float32Array,
  qHeads: number,
  rows: number,
  headDim: number,
  kvHeads: number,
  keys: Float32Array,
  slots: number,
  out: Float32Array,
): void {
  checkHeads(qHeads, kvHeads);
  checkCount("rows", rows);
  checkCount("headDim", headDim);
  checkCount("slots", slots);
  checkLength("queries", queries.length, qHeads * rows * headDim);
  checkLength("keys", keys.length, kvHeads * slots * headDim);
  checkLength("out", out.length, qHeads * rows);
  const groupSize = qHeads / kvHeads;
  for (let h = 0; h < qHeads; h++) {
    const kvHead = Math.floor(h / groupSize) * slots * headDim;
    for (let r = 0; r < rows; r++) {
      const qRow = (h * rows + r) * headDim;
      let best = -Infinity;
      for (let s = 0; s < slots; s++) {
        const kRow = kvHead + s * headDim;
        let acc = 0;
        for (let d = 0; d < headDim; d++) acc += queries[qRow + d]! * keys[kRow + d]!;
        if (acc > best) best = acc;
      }
      out[h * rows + r] = best;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Top-k

/** Whether index a ranks below index b: lower score, or equal score and higher index; NaN ranks below every number. */
function ranksBelow(scores: Float32Array, a: number, b: number): boolean {
  const x = scores[a]!;
  const y = scores[b]!;
  if (x < y) return true;
  if (x > y) return false;
  if (x === y) return a > b;
  const xNaN = x !== x;
  if (xNaN !== (y !== y)) return xNaN;
  return a > b;
}

/**
 * Indices of the k largest of scores[0..n), returned ascending by index (ties: the lower index wins, so the result is
 * deterministic). k >= n returns 0..n-1. O(n log k): a min-heap of the k best so far, its root the weakest.
 * NaN scores rank below all numbers.
 */
export function topK(scores: Float32Array, n: number, k: number): Int32Array {
  checkCount("n", n);
  checkCount("k", k);
  checkLength("scores", scores.length, n);
  if (k >= n) {
    const all = new Int32Array(n);
    for (let i = 0; i < n; i++) all[i] = i;
    return all;
  }
  const heap = new Int32Array(k);
  if (k === 0) return heap;
  for (let i = 0; i < k; i++) {
    // Sift up.
    let c = i;
    while (c > 0) {
      const p = (c - 1) >> 1;
      if (!ranksBelow(scores, i, heap[p]!)) break;
      heap[c] = heap[p]!;
      c = p;
    }
    heap[c] = i;
  }
  for (let i = k; i < n; i++) {
    if (!ranksBelow(scores, heap[0]!, i)) continue;
    // Replace the root and sift down.
    let c = 0;
    for (;;) {
      const l = 2 * c + 1;
      if (l >= k) break;
      const r = l + 1;
      const m = r < k && ranksBelow(scores, heap[r]!, heap[l]!) ? r : l;
      if (!ranksBelow(scores, heap[m]!, i)) break;
      heap[c] = heap[m]!;
      c = m;
    }
    heap[c] = i;
  }
  return heap.sort();
}

// ---------------------------------------------------------------------------------------------------------
// rotary re-positioning

/**
 * Moves keys that carry rotary embeddings (RoPE, rotate-half layout: dimension i pairs with i + headDim/2
 * and turns at `invFreq[i]` radians per position) by `shifts[slot]` positions, in place, on a
 * [heads, slots, headDim] float32 array: each pair turns by shift * invFreq[i]. A key embedded at position
 * p then equals the same key embedded at p + shift (up to rounding), since rotations compose. Angles and
 * their sines are taken in float64.
 */
export function rotateSlots(keys: Float32Array, slots: number, layout: KvLayout, shifts: Int32Array, invFreq: Float32Array): void {
  const { heads, headDim } = layout;
  checkCount("slots", slots);
  checkCount("heads", heads);
  if (!Number.isInteger(headDim) || headDim <= 0 || headDim % 2 !== 0) throw new RangeError(`headDim must be a positive even integer, got ${headDim}`);
  const half = headDim / 2;
  checkLength("keys", keys.length, heads * slots * headDim);
  checkLength("shifts", shifts.length, slots);
  checkLength("invFreq", invFreq.length, half);
  const cos = new Float64Array(half);
  const sin = new Float64Array(half);
  for (let s = 0; s < slots; s++) {
    const shift = shifts[s]!;
    if (shift === 0) continue;
    for (let i = 0; i < half; i++) {
      const angle = shift * invFreq[i]!;
      cos[i] = Math.cos(angle);
      sin[i] = Math.sin(angle);
    }
    for (let h = 0; h < heads; h++) {
      const o = (h * slots + s) * headDim;
      for (let i = 0; i < half; i++) {
        const x = keys[o + i]!;
        const y = keys[o + half + i]!;
        keys[o + i] = x * cos[i]! - y * sin[i]!;
        keys[o + half + i] = y * cos[i]! + x * sin[i]!;
      }
    }
  }
}

/** One interface, so a WGSL implementation can stand beside this one later. */
export interface CompactionKernels {
  toFloat32: typeof toFloat32;
  toFloat16Bits: typeof toFloat16Bits;
  gatherSlots: typeof gatherSlots;
  quantizeInt8: typeof quantizeInt8;
  dequantizeInt8: typeof dequantizeInt8;
  accumulateScores: typeof accumulateScores;
  blockSummary: typeof blockSummary;
  blockUpperBounds: typeof blockUpperBounds;
  blockMaxDots: typeof blockMaxDots;
  topK: typeof topK;
  rotateSlots: typeof rotateSlots;
}

export const cpuKernels: CompactionKernels = {
  toFloat32,
  toFloat16Bits,
  gatherSlots,
  quantizeInt8,
  dequantizeInt8,
  accumulateScores,
  blockSummary,
  blockUpperBounds,
  blockMaxDots,
  topK,
  rotateSlots,
};
