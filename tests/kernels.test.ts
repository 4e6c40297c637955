/**
 * KV-compaction CPU kernels against naive reference loops written here, on seeded random data.
 * Comparisons are element-wise and exact: every kernel either moves values or does its arithmetic in the
 * same order as its reference. The tolerances are int8ErrorBound, the quantizer's own contract, and
 * float32 rounding where rotateSlots is checked against rotary embedding applied at the shifted position.
 */
import { describe, expect, test } from "bun:test";
import {
  accumulateScores,
  blockMaxDots,
  blockSummary,
  blockUpperBounds,
  cpuKernels,
  dequantizeInt8,
  gatherSlots,
  int8ErrorBound,
  quantizeInt8,
  rotateSlots,
  toFloat16Bits,
  toFloat32,
  topK,
} from "../kernels/compaction.ts";
import type { KvArray } from "../kernels/kv-slots.ts";
import { ropeInvFreq, ropeSpec } from "../runtime/rope.ts";
import { createRng } from "../runtime/sampling.ts";
import { refRope } from "./helpers/rope.ts";

// The runtime's seeded PRNG (mulberry32).
const mulberry32 = createRng;

function randomF32(rng: () => number, n: number, scale = 1): Float32Array {
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = (rng() * 2 - 1) * scale;
  return out;
}

function randomU16(rng: () => number, n: number): Uint16Array {
  const out = new Uint16Array(n);
  for (let i = 0; i < n; i++) out[i] = Math.floor(rng() * 65536);
  return out;
}

type NumArray = ArrayLike<number>;

/** Fails with the first differing index (Object.is, so NaN equals NaN and -0 differs from 0). */
function expectSame(actual: NumArray, expected: NumArray, label = ""): void {
  expect(actual.length).toBe(expected.length);
  for (let i = 0; i < expected.length; i++) {
    if (!Object.is(actual[i], expected[i])) {
      expect(`${label}[${i}] = ${actual[i]}`).toBe(`${label}[${i}] = ${expected[i]}`);
    }
  }
}

/** Ascending random subset of [from, to), each slot kept with probability p. */
function randomKeep(rng: () => number, from: number, to: number, p: number): number[] {
  const keep: number[] = [];
  for (let s = from; s < to; s++) if (rng() < p) keep.push(s);
  return keep;
}

// ---------------------------------------------------------------------------------------------------------

/** IEEE half decoded from its definition. */
function refHalf(h: number): number {
  const sign = h & 0x8000 ? -1 : 1;
  const e = (h >> 10) & 31;
  const m = h & 1023;
  if (e === 31) return m === 0 ? sign * Infinity : NaN;
  if (e === 0) return sign * (m / 1024) * Math.pow(2, -14);
  return sign * (1 + m / 1024) * Math.pow(2, e - 15);
}

const isHalfNaN = (h: number) => (h & 0x7c00) === 0x7c00 && (h & 0x3ff) !== 0;

/** Nearest half by search over all finite positive halves (their bit patterns sort like their values). */
function refToHalf(x: number): number {
  if (Number.isNaN(x)) return 0x7e00;
  const sign = x < 0 || Object.is(x, -0) ? 0x8000 : 0;
  const a = Math.abs(x);
  if (a >= 65520) return sign | 0x7c00;
  let lo = 0;
  let hi = 0x7bff;
  while (lo < hi) {
    const mid = (lo + hi + 1) >> 1;
    if (refHalf(mid) <= a) lo = mid;
    else hi = mid - 1;
  }
  if (lo === 0x7bff || refHalf(lo) === a) return sign | lo;
  const below = a - refHalf(lo);
  const above = refHalf(lo + 1) - a;
  if (below < above) return sign | lo;
  if (above < below) return sign | (lo + 1);
  return sign | (lo % 2 === 0 ? lo : lo + 1);
}

describe("float16 conversion", () => {
  const all = new Uint16Array(65536);
  for (let i = 0; i < 65536; i++) all[i] = i;

  test("toFloat32 decodes all 65536 half patterns like the reference", () => {
    const f = toFloat32(all);
    const expected = Array.from(all, refHalf);
    expectSame(f, Float32Array.from(expected), "half");
  });

  test("toFloat16Bits(toFloat32(h)) === h for every non-NaN pattern; NaN patterns stay NaN", () => {
    const f = toFloat32(all);
    const back = toFloat16Bits(f);
    let nanCount = 0;
    for (let h = 0; h < 65536; h++) {
      if (isHalfNaN(h)) {
        nanCount++;
        expect(Number.isNaN(f[h]!)).toBe(true);
        expect(isHalfNaN(back[h]!)).toBe(true);
      } else if (back[h] !== h) {
        expect(back[h]!.toString(16)).toBe(h.toString(16));
      }
    }
    expect(nanCount).toBe(2 * 1023);
  });

  test("known roundings: 1/3, 65504, overflow at 65520, ties to even, tiny subnormals, signed zero, Inf, NaN", () => {
    const cases: [number, number][] = [
      [1 / 3, 0x3555],
      [1, 0x3c00],
      [-2, 0xc000],
      [65504, 0x7bff],
      [65519, 0x7bff],
      [65520, 0x7c00], // tie between 65504 (odd mantissa) and 65536 (= Inf): even wins
      [-65520, 0xfc00],
      [1e6, 0x7c00],
      [Infinity, 0x7c00],
      [-Infinity, 0xfc00],
      [0, 0x0000],
      [-0, 0x8000],
      [2 ** -14, 0x0400], // smallest normal
      [1023 * 2 ** -24, 0x03ff], // largest subnormal
      [1023.5 * 2 ** -24, 0x0400], // tie: 0x3ff is odd, rounds up into the normals
      [2 ** -24, 0x0001], // smallest subnormal
      [-(2 ** -24), 0x8001],
      [2 ** -25, 0x0000], // exactly half the smallest subnormal: ties to 0
      [Math.fround(2 ** -25 * 1.0000001), 0x0001],
      [3 * 2 ** -25, 0x0002], // tie between 1 and 2
      [5 * 2 ** -25, 0x0002], // tie between 2 and 3
      [2 ** -26, 0x0000],
      [1e-30, 0x0000],
      [1 + 2 ** -11, 0x3c00], // tie, 0x3c00 even
      [1 + 3 * 2 ** -11, 0x3c02], // tie, 0x3c01 odd
      [2049, 0x6800],
      [2051, 0x6802],
    ];
    const src = Float32Array.from(cases.map((c) => c[0]));
    const bits = toFloat16Bits(src);
    for (let i = 0; i < cases.length; i++) {
      expect(`${cases[i]![0]} -> 0x${bits[i]!.toString(16)}`).toBe(`${cases[i]![0]} -> 0x${cases[i]![1].toString(16)}`);
      expect(bits[i]).toBe(refToHalf(src[i]!));
    }
    // NaNs whose payload sits only in the low 13 bits, which a half cannot hold, must not turn into Inf.
    const nans = new Float32Array(new Uint32Array([0x7fc00000, 0xffc00000, 0x7f800001, 0xff800001, 0x7f801fff]).buffer);
    for (const h of toFloat16Bits(nans)) expect(`0x${h.toString(16)} is NaN: ${isHalfNaN(h)}`).toBe(`0x${h.toString(16)} is NaN: true`);
  });

  test("random float32 values round like the reference search (and like Math.f16round where the runtime has it)", () => {
    const rng = mulberry32(16);
    const n = 20000;
    const src = new Float32Array(n);
    const srcBits = new Uint32Array(src.buffer);
    for (let i = 0; i < n; i++) {
      // Exponents 95..145 span float16's underflow, subnormal, normal and overflow ranges.
      const exp = 95 + Math.floor(rng() * 51);
      srcBits[i] = ((rng() < 0.5 ? 1 : 0) << 31) | (exp << 23) | Math.floor(rng() * 0x800000);
    }
    // Exact halfway points between adjacent halves, where ties-to-even decides.
    for (let i = 0; i < 2000; i++) {
      const h = Math.floor(rng() * 0x7bff);
      src[i] = (refHalf(h) + refHalf(h + 1)) / 2;
    }
    const bits = toFloat16Bits(src);
    const expected = Array.from(src, refToHalf);
    expectSame(bits, expected, "f16");
    const f16round = (Math as { f16round?: (x: number) => number }).f16round;
    if (f16round) expectSame(toFloat32(bits), Float32Array.from(src, f16round), "f16round");
  });

  test("toFloat32 copies float32 input, writes into `out`, and rejects a short `out`", () => {
    const src = randomF32(mulberry32(1), 33);
    const copy = toFloat32(src);
    expect(copy).not.toBe(src);
    expectSame(copy, src);
    const out = new Float32Array(40);
    expect(toFloat32(src, out)).toBe(out);
    expectSame(out.subarray(0, 33), src);
    const halfOut = new Float32Array(3);
    expect(toFloat32(Uint16Array.of(0x3c00, 0xc000, 0x7c00), halfOut)).toBe(halfOut);
    expectSame(halfOut, [1, -2, Infinity]);
    expect(() => toFloat32(src, new Float32Array(32))).toThrow(RangeError);
    expect(() => toFloat16Bits(src, new Uint16Array(32))).toThrow(RangeError);
  });

  test("toFloat16Bits reads a float32 view at an offset", () => {
    const base = Float32Array.of(7, 1, -2, 0.5);
    expectSame(toFloat16Bits(base.subarray(1)), [0x3c00, 0xc000, 0x3800]);
  });
});

// ---------------------------------------------------------------------------------------------------------

/** Naive gather; reads from a snapshot of src, which is what a correct in-place gather must equal. */
function refGather(src: KvArray, srcSlots: number, keep: number[], dst: KvArray, dstSlots: number, dstStart: number, heads: number, headDim: number): void {
  const snapshot = src.slice();
  for (let h = 0; h < heads; h++) {
    for (let i = 0; i < keep.length; i++) {
      for (let d = 0; d < headDim; d++) {
        dst[(h * dstSlots + dstStart + i) * headDim + d] = snapshot[(h * srcSlots + keep[i]!) * headDim + d]!;
      }
    }
  }
}

function makeKv(kind: "f32" | "f16", rng: () => number, n: number): KvArray {
  return kind === "f32" ? randomF32(rng, n) : randomU16(rng, n);
}

/** keep as an Int32Array with junk after keepCount, which the kernel must ignore. */
function keepArray(keep: number[]): Int32Array {
  return Int32Array.from([...keep, -5, 999999, 0]);
}

function countRuns(keep: number[]): number {
  let runs = 0;
  for (let i = 0; i < keep.length; i++) if (i === 0 || keep[i] !== keep[i - 1]! + 1) runs++;
  return runs;
}

describe("gatherSlots", () => {
  const shapes = [
    { heads: 1, headDim: 1, srcSlots: 1 },
    { heads: 2, headDim: 4, srcSlots: 9 },
    { heads: 3, headDim: 5, srcSlots: 37 },
    { heads: 8, headDim: 16, srcSlots: 100 },
  ];

  for (const kind of ["f32", "f16"] as const) {
    test(`${kind}: into another array — runs, scattered, all, none`, () => {
      const rng = mulberry32(kind === "f32" ? 11 : 12);
      for (const { heads, headDim, srcSlots } of shapes) {
        const patterns = [
          randomKeep(rng, 0, srcSlots, 0.3),
          randomKeep(rng, 0, srcSlots, 0.9),
          Array.from({ length: srcSlots }, (_, i) => i),
          [],
          [srcSlots - 1],
          Array.from({ length: srcSlots }, (_, i) => i).filter((s) => s % 5 < 3),
        ];
        for (const keep of patterns) {
          const layout = { heads, headDim };
          const dstSlots = keep.length + 3;
          const dstStart = keep.length === 0 ? dstSlots : 2; // dstStart may sit at the end when nothing is copied
          const src = makeKv(kind, rng, heads * srcSlots * headDim);
          const dst = makeKv(kind, rng, heads * dstSlots * headDim);
          const expected = dst.slice();
          refGather(src, srcSlots, keep, expected, dstSlots, dstStart, heads, headDim);
          const srcBefore = src.slice();
          let sets = 0;
          const realSet = dst.set.bind(dst) as (a: ArrayLike<number>, o?: number) => void;
          Object.defineProperty(dst, "set", { value: (a: ArrayLike<number>, o?: number) => (sets++, realSet(a, o)) });
          gatherSlots(src, srcSlots, keepArray(keep), keep.length, dst, dstSlots, dstStart, layout);
          expectSame(dst, expected, "dst");
          expectSame(src, srcBefore, "src");
          expect(sets).toBe(heads * countRuns(keep)); // one copy per head per run
        }
      }
    });

    test(`${kind}: in place (src === dst), compaction from slot 0 and from a later start`, () => {
      const rng = mulberry32(kind === "f32" ? 21 : 22);
      for (const { heads, headDim, srcSlots } of shapes) {
        for (const [p, from, dstStart] of [[0.5, 0, 0], [0.2, 0, 0], [1, 0, 0], [0.6, 4, 3], [0.6, 4, 4]] as const) {
          if (from > srcSlots) continue;
          const keep = randomKeep(rng, from, srcSlots, p);
          const layout = { heads, headDim };
          const arr = makeKv(kind, rng, heads * srcSlots * headDim);
          const expected = arr.slice();
          refGather(arr, srcSlots, keep, expected, srcSlots, dstStart, heads, headDim);
          let moves = 0;
          const realCopy = arr.copyWithin.bind(arr);
          Object.defineProperty(arr, "copyWithin", { value: (t: number, s: number, e?: number) => (moves++, realCopy(t, s, e)) });
          gatherSlots(arr, srcSlots, keepArray(keep), keep.length, arr, srcSlots, dstStart, layout);
          expectSame(arr, expected, "in place");
          expect(moves).toBe(heads * countRuns(keep));
        }
      }
    });
  }

  test("in place into fewer slots per head (the array re-read as [heads, dstSlots, headDim])", () => {
    const rng = mulberry32(31);
    const heads = 4;
    const headDim = 3;
    const srcSlots = 20;
    const keep = randomKeep(rng, 0, srcSlots, 0.5);
    const dstSlots = keep.length + 1;
    const arr = randomF32(rng, heads * srcSlots * headDim);
    const expected = arr.slice();
    refGather(arr, srcSlots, keep, expected, dstSlots, 1, heads, headDim);
    gatherSlots(arr, srcSlots, keepArray(keep), keep.length, arr, dstSlots, 1, { heads, headDim });
    expectSame(arr, expected);
  });

  test("overlapping views of one buffer: allowed when every write lands at or before its read, else RangeError", () => {
    const rng = mulberry32(32);
    const heads = 2;
    const headDim = 4;
    const slots = 10;
    const n = heads * slots * headDim;
    const keep = [1, 2, 3, 6, 9];
    for (const kind of ["f32", "f16"] as const) {
      const buffer = makeKv(kind, rng, n + 8);
      const src = buffer.subarray(8, 8 + n);
      const dst = buffer.subarray(0, n); // 2 slots to the left of src
      const expected = buffer.slice();
      refGather(src, slots, keep, expected.subarray(0, n), slots, 0, heads, headDim);
      gatherSlots(src, slots, keepArray(keep), keep.length, dst, slots, 0, { heads, headDim });
      expectSame(buffer, expected, kind);

      const before = buffer.slice();
      const right = buffer.subarray(8, 8 + n);
      const left = buffer.subarray(0, n);
      expect(() => gatherSlots(left, slots, keepArray([0, 1]), 2, right, slots, 0, { heads, headDim })).toThrow(RangeError);
      expectSame(buffer, before, "untouched after throw");
    }
  });

  test("disjoint views of one buffer copy like separate arrays", () => {
    const rng = mulberry32(33);
    const layout = { heads: 3, headDim: 2 };
    const buffer = randomF32(rng, 3 * 8 * 2 + 3 * 5 * 2);
    const src = buffer.subarray(0, 48);
    const dst = buffer.subarray(48);
    const keep = [0, 2, 3, 7];
    const expected = buffer.slice();
    refGather(src, 8, keep, expected.subarray(48), 5, 1, 3, 2);
    gatherSlots(src, 8, keepArray(keep), 4, dst, 5, 1, layout);
    expectSame(buffer, expected);
  });

  test("RangeErrors (and a TypeError for mixed element types), with dst untouched", () => {
    const layout = { heads: 2, headDim: 3 };
    const src = randomF32(mulberry32(41), 2 * 6 * 3);
    const dst = new Float32Array(2 * 6 * 3);
    const bad: [string, () => void][] = [
      ["not ascending", () => gatherSlots(src, 6, Int32Array.of(3, 2), 2, dst, 6, 0, layout)],
      ["duplicate", () => gatherSlots(src, 6, Int32Array.of(2, 2), 2, dst, 6, 0, layout)],
      ["slot past the end", () => gatherSlots(src, 6, Int32Array.of(1, 6), 2, dst, 6, 0, layout)],
      ["negative slot", () => gatherSlots(src, 6, Int32Array.of(-1, 2), 2, dst, 6, 0, layout)],
      ["dst range past the end", () => gatherSlots(src, 6, Int32Array.of(0, 1), 2, dst, 6, 5, layout)],
      ["negative dstStart", () => gatherSlots(src, 6, Int32Array.of(0), 1, dst, 6, -1, layout)],
      ["keepCount past keep", () => gatherSlots(src, 6, Int32Array.of(0, 1), 3, dst, 6, 0, layout)],
      ["src shorter than its shape", () => gatherSlots(src, 7, Int32Array.of(0), 1, dst, 6, 0, layout)],
      ["dst shorter than its shape", () => gatherSlots(src, 6, Int32Array.of(0), 1, dst, 7, 0, layout)],
      ["fractional keepCount", () => gatherSlots(src, 6, Int32Array.of(0, 1), 1.5, dst, 6, 0, layout)],
      ["in place, first write ahead of its read", () => gatherSlots(src, 6, Int32Array.of(0, 4), 2, src, 6, 1, layout)],
      // (With keep strictly ascending, only i = 0 can break dstStart + i <= keep[i].)
      ["in place, write ahead of its read, later slots fine", () => gatherSlots(src, 6, Int32Array.of(2, 4, 5), 3, src, 6, 3, layout)],
      // Head 1's slots move right (5 -> 6 per head), over its own unread slots.
      ["in place into more slots per head", () => gatherSlots(src, 5, Int32Array.of(0, 1), 2, src, 6, 0, layout)],
    ];
    const srcBefore = src.slice();
    for (const [name, call] of bad) {
      let error: unknown;
      try {
        call();
      } catch (e) {
        error = e;
      }
      expect(`${name}: ${error instanceof RangeError}`).toBe(`${name}: true`);
      expectSame(dst, new Float32Array(dst.length), name);
      expectSame(src, srcBefore, name);
    }
    expect(() => gatherSlots(src, 6, Int32Array.of(0), 1, new Uint16Array(36), 6, 0, layout)).toThrow(TypeError);
    // In place into more slots per head is fine when the kept slots sit far enough right.
    const arr = randomF32(mulberry32(42), 2 * 6 * 3);
    const expected = arr.slice();
    refGather(arr, 5, [2, 3], expected, 6, 0, 2, 3);
    gatherSlots(arr, 5, Int32Array.of(2, 3), 2, arr, 6, 0, layout);
    expectSame(arr, expected);
  });

  test("edge shapes: 0 slots, 0 heads, headDim 0", () => {
    gatherSlots(new Float32Array(0), 0, new Int32Array(0), 0, new Float32Array(0), 0, 0, { heads: 4, headDim: 8 });
    gatherSlots(new Uint16Array(0), 5, Int32Array.of(0, 3), 2, new Uint16Array(0), 2, 0, { heads: 0, headDim: 8 });
    gatherSlots(new Uint16Array(0), 5, Int32Array.of(0, 3), 2, new Uint16Array(0), 2, 0, { heads: 3, headDim: 0 });
    expect(() => gatherSlots(new Float32Array(0), 0, Int32Array.of(0), 1, new Float32Array(8), 1, 0, { heads: 1, headDim: 8 })).toThrow(RangeError);
    // The in-place rule holds even when there is nothing to move.
    const empty = new Float32Array(0);
    expect(() => gatherSlots(empty, 3, Int32Array.of(0), 1, empty, 3, 1, { heads: 2, headDim: 0 })).toThrow(RangeError);
  });
});

// ---------------------------------------------------------------------------------------------------------

const f32Bits = new Float32Array(1);
const u32Bits = new Uint32Array(f32Bits.buffer);
function stepFloat32(x: number, by: 1 | -1): number {
  f32Bits[0] = x;
  u32Bits[0]! += by;
  return f32Bits[0]!;
}

/** The smallest float32 s with s * 127 >= absmax (exact in float64), found by stepping. */
function refScale(absmax: number): number {
  let s = Math.fround(absmax / 127);
  while (s * 127 < absmax) s = stepFloat32(s, 1);
  while (s > 0 && stepFloat32(s, -1) * 127 >= absmax) s = stepFloat32(s, -1);
  return s;
}

/** Data whose groups have very different magnitudes, including float32 subnormals and huge values. */
function groupedData(rng: () => number, n: number, group: number): Float32Array {
  const out = new Float32Array(n);
  const magnitudes = [1, 1e-3, 1e3, 1e30, 1e-40, 3e38, 0];
  for (let start = 0; start < n; start += group) {
    const m = magnitudes[Math.floor(rng() * magnitudes.length)]!;
    for (let i = start; i < Math.min(n, start + group); i++) out[i] = (rng() * 2 - 1) * m;
  }
  return out;
}

describe("int8 group quantization", () => {
  test("round trip error <= int8ErrorBound(scale) per element; scale and q match the reference", () => {
    const rng = mulberry32(51);
    for (const group of [1, 3, 7, 32, 64, 128]) {
      for (const n of [0, 1, 5, 100, 1000, 4099]) {
        const x = groupedData(rng, n, group);
        const groups = Math.ceil(n / group);
        const q = new Int8Array(n);
        const scales = new Float32Array(groups);
        quantizeInt8(x, group, q, scales);
        const out = new Float32Array(n);
        dequantizeInt8(q, scales, group, out);
        for (let g = 0; g < groups; g++) {
          const start = g * group;
          const end = Math.min(n, start + group);
          let absmax = 0;
          for (let i = start; i < end; i++) absmax = Math.max(absmax, Math.abs(x[i]!));
          const s = scales[g]!;
          // scale is absmax / 127 as a float32, rounded up so that nothing clips.
          expect(s).toBe(absmax === 0 ? 0 : refScale(absmax));
          const bound = int8ErrorBound(s);
          for (let i = start; i < end; i++) {
            let ref = 0;
            if (s !== 0) {
              const v = x[i]! / s;
              ref = Math.max(-127, Math.min(127, v < 0 ? -Math.round(-v) : Math.round(v)));
            }
            if (q[i] !== ref) expect(`q[${i}] = ${q[i]}`).toBe(`q[${i}] = ${ref}`);
            if (out[i] !== Math.fround(q[i]! * s)) expect(out[i]).toBe(Math.fround(q[i]! * s));
            const err = Math.abs(x[i]! - out[i]!);
            if (!(err <= bound)) expect(`|err| at ${i} = ${err}`).toBe(`<= ${bound}`);
            // Subnormal scales are too coarse for the largest value to land exactly on 127.
            if (Math.abs(x[i]!) === absmax && s >= 2 ** -126) expect(Math.abs(q[i]!)).toBe(127);
          }
        }
      }
    }
  });

  test("near-tie values: q * scale rounded to float32 can pass scale / 2, never int8ErrorBound", () => {
    const rng = mulberry32(52);
    const n = 20000;
    const x = new Float32Array(2 * n);
    for (let i = 0; i < n; i++) {
      // Group [absmax, a value within 1e-5 * scale of a half-way point of the int8 grid].
      const absmax = Math.fround(1 + rng() * 1000);
      const scale = refScale(absmax);
      x[2 * i] = absmax;
      x[2 * i + 1] = (Math.floor(rng() * 126) + 0.5 + (rng() - 0.5) * 1e-5) * scale;
    }
    const q = new Int8Array(2 * n);
    const scales = new Float32Array(n);
    quantizeInt8(x, 2, q, scales);
    const out = new Float32Array(2 * n);
    dequantizeInt8(q, scales, 2, out);
    let pastHalf = 0;
    for (let i = 0; i < 2 * n; i++) {
      const s = scales[i >> 1]!;
      const err = Math.abs(x[i]! - out[i]!);
      if (err > s / 2) pastHalf++;
      if (!(err <= int8ErrorBound(s))) expect(`|err| at ${i} = ${err}`).toBe(`<= ${int8ErrorBound(s)}`);
    }
    expect(pastHalf).toBeGreaterThan(0); // why the bound is not exactly scale / 2
  });

  test("int8ErrorBound is scale / 2 plus float32 rounding slack", () => {
    for (const s of [0, 1, 1e-3, 1e30, 2 ** -149]) {
      expect(int8ErrorBound(s) >= s / 2).toBe(true);
      expect(int8ErrorBound(s) <= s * (0.5 + 1e-5)).toBe(true);
    }
  });

  test("all-zero group (and -0) gets scale 0 and q 0, next to a non-zero group", () => {
    const x = Float32Array.of(0, -0, 0, 0, 1, -2, 0.6, 0);
    const q = new Int8Array(8).fill(99);
    const scales = new Float32Array(2).fill(99);
    quantizeInt8(x, 4, q, scales);
    expectSame(scales, [0, refScale(2)]);
    expectSame(q, [0, 0, 0, 0, 63, -127, 38, 0]); // 1 / scale is just under 63.5: the scale was rounded up
    const out = new Float32Array(8);
    dequantizeInt8(q, scales, 4, out);
    expectSame(out.subarray(0, 4), [0, 0, 0, 0]);
  });

  test("last short group has its own scale", () => {
    // absmax 127 and 254 give exact scales 1 and 2, so -63.5 and 2.5 are true ties.
    const x = Float32Array.of(127, -63.5, 2.5, 254, -127);
    const q = new Int8Array(5);
    const scales = new Float32Array(2);
    quantizeInt8(x, 3, q, scales);
    expectSame(scales, [1, 2]);
    expectSame(q, [127, -64, 3, 127, -64]); // ties round away from zero
    const out = new Float32Array(5);
    dequantizeInt8(q, scales, 3, out);
    for (let i = 0; i < 5; i++) expect(Math.abs(out[i]! - x[i]!) <= int8ErrorBound(scales[i < 3 ? 0 : 1]!)).toBe(true);
  });

  test("storage is exactly 1 byte per value + 4 bytes per group", () => {
    for (const [n, group] of [[4099, 64], [128, 128], [1, 32], [100, 7]] as const) {
      const q = new Int8Array(n);
      const scales = new Float32Array(Math.ceil(n / group));
      quantizeInt8(groupedData(mulberry32(n), n, group), group, q, scales); // exactly this much suffices
      expect(q.byteLength + scales.byteLength).toBe(n + 4 * Math.ceil(n / group));
      expect(() => quantizeInt8(new Float32Array(n), group, new Int8Array(n - 1), scales)).toThrow(RangeError);
      expect(() => quantizeInt8(new Float32Array(n), group, q, new Float32Array(Math.ceil(n / group) - 1))).toThrow(RangeError);
    }
  });

  test("dequantize writes out.length values, reading only what it needs", () => {
    const q = Int8Array.of(1, 2, 3, 4, 5, 6, 7);
    const scales = Float32Array.of(0.5, 2); // 3 scales would be needed for all 7 values at group 3
    const out = new Float32Array(5);
    dequantizeInt8(q, scales, 3, out);
    expectSame(out, [0.5, 1, 1.5, 8, 10]);
    expect(() => dequantizeInt8(q, scales, 3, new Float32Array(7))).toThrow(RangeError);
    expect(() => dequantizeInt8(q, scales, 3, new Float32Array(8))).toThrow(RangeError);
  });

  test("non-finite input and a bad group size throw RangeError", () => {
    for (const bad of [NaN, Infinity, -Infinity]) {
      expect(() => quantizeInt8(Float32Array.of(1, bad, 2), 2, new Int8Array(3), new Float32Array(2))).toThrow(RangeError);
    }
    expect(() => quantizeInt8(Float32Array.of(1), 0, new Int8Array(1), new Float32Array(1))).toThrow(RangeError);
    expect(() => dequantizeInt8(new Int8Array(1), new Float32Array(1), 0, new Float32Array(1))).toThrow(RangeError);
  });
});

// ---------------------------------------------------------------------------------------------------------

describe("accumulateScores", () => {
  test("scores = scores * decay + mass for i < n, the rest untouched; default decay 1", () => {
    const rng = mulberry32(61);
    for (const decay of [undefined, 1, 0.9, 0.5, 0]) {
      for (const [len, n] of [[0, 0], [1, 1], [100, 73], [1000, 1000]] as const) {
        const scores = randomF32(rng, len, 10);
        const mass = randomF32(rng, len);
        const expected = scores.slice();
        const d = decay ?? 1;
        for (let i = 0; i < n; i++) expected[i] = scores[i]! * d + mass[i]!;
        accumulateScores(scores, mass, n, decay);
        expectSame(scores, expected, `decay ${decay}`);
      }
    }
    expect(() => accumulateScores(new Float32Array(3), new Float32Array(2), 3)).toThrow(RangeError);
  });
});

// ---------------------------------------------------------------------------------------------------------

function refSummary(keys: Float32Array, slots: number, start: number, count: number, heads: number, headDim: number) {
  const mins = new Float32Array(heads * headDim);
  const maxs = new Float32Array(heads * headDim);
  for (let h = 0; h < heads; h++) {
    for (let d = 0; d < headDim; d++) {
      let mn = Infinity;
      let mx = -Infinity;
      for (let s = start; s < start + count; s++) {
        mn = Math.min(mn, keys[(h * slots + s) * headDim + d]!);
        mx = Math.max(mx, keys[(h * slots + s) * headDim + d]!);
      }
      mins[h * headDim + d] = mn;
      maxs[h * headDim + d] = mx;
    }
  }
  return { mins, maxs };
}

describe("blockSummary", () => {
  test("per head and channel min/max over the slot range, at the offset, nothing else written", () => {
    const rng = mulberry32(71);
    for (const [heads, headDim, slots] of [[1, 1, 1], [2, 5, 13], [8, 16, 64]] as const) {
      const keys = randomF32(rng, heads * slots * headDim);
      for (const [start, count] of [[0, slots], [0, 1], [slots - 1, 1], [Math.floor(slots / 3), Math.ceil(slots / 2)], [slots, 0]]) {
        const offset = 7;
        const outMin = new Float32Array(offset + heads * headDim + 3).fill(42);
        const outMax = outMin.slice();
        blockSummary(keys, slots, start!, count!, { heads, headDim }, outMin, outMax, offset);
        const ref = refSummary(keys, slots, start!, count!, heads, headDim);
        expectSame(outMin.subarray(offset, offset + heads * headDim), ref.mins, "min");
        expectSame(outMax.subarray(offset, offset + heads * headDim), ref.maxs, "max");
        expectSame([...outMin.subarray(0, offset), ...outMin.subarray(offset + heads * headDim)], new Array(offset + 3).fill(42));
        expectSame([...outMax.subarray(0, offset), ...outMax.subarray(offset + heads * headDim)], new Array(offset + 3).fill(42));
      }
    }
    expect(() => blockSummary(new Float32Array(10), 5, 3, 3, { heads: 2, headDim: 1 }, new Float32Array(2), new Float32Array(2))).toThrow(RangeError);
  });
});

// ---------------------------------------------------------------------------------------------------------

describe("Quest block bounds", () => {
  const configs = [
    { qHeads: 1, kvHeads: 1, rows: 1, headDim: 1, slots: 1, block: 1 },
    { qHeads: 4, kvHeads: 1, rows: 2, headDim: 5, slots: 37, block: 8 }, // last block of 5
    { qHeads: 8, kvHeads: 2, rows: 3, headDim: 16, slots: 64, block: 16 },
    { qHeads: 6, kvHeads: 3, rows: 1, headDim: 7, slots: 10, block: 1 },
    { qHeads: 2, kvHeads: 2, rows: 2, headDim: 4, slots: 11, block: 11 },
  ];

  for (const c of configs) {
    test(`qHeads ${c.qHeads}, kvHeads ${c.kvHeads}, rows ${c.rows}, headDim ${c.headDim}, ${c.slots} slots in blocks of ${c.block}`, () => {
      const { qHeads, kvHeads, rows, headDim, slots, block } = c;
      const rng = mulberry32(qHeads * 1000 + slots);
      const keys = randomF32(rng, kvHeads * slots * headDim, 3);
      const queries = randomF32(rng, qHeads * rows * headDim);
      for (let i = 0; i < queries.length; i += 5) queries[i] = 0; // zeros take neither end
      const blocks = Math.ceil(slots / block);
      const mins = new Float32Array(blocks * kvHeads * headDim);
      const maxs = new Float32Array(blocks * kvHeads * headDim);
      for (let b = 0; b < blocks; b++) {
        const count = Math.min(block, slots - b * block);
        blockSummary(keys, slots, b * block, count, { heads: kvHeads, headDim }, mins, maxs, b * kvHeads * headDim);
      }
      const bounds = new Float32Array(blocks * qHeads * rows + 2).fill(-1);
      blockUpperBounds(queries, qHeads, rows, headDim, kvHeads, mins, maxs, blocks, bounds);
      expectSame(bounds.subarray(blocks * qHeads * rows), [-1, -1], "past the end");

      const group = qHeads / kvHeads;
      for (let b = 0; b < blocks; b++) {
        const start = b * block;
        const count = Math.min(block, slots - start);
        // This block's keys as their own [kvHeads, count, headDim] array.
        const blockKeys = new Float32Array(kvHeads * count * headDim);
        for (let kv = 0; kv < kvHeads; kv++) {
          for (let s = 0; s < count; s++) {
            for (let d = 0; d < headDim; d++) blockKeys[(kv * count + s) * headDim + d] = keys[(kv * slots + start + s) * headDim + d]!;
          }
        }
        const dots = new Float32Array(qHeads * rows);
        blockMaxDots(queries, qHeads, rows, headDim, kvHeads, blockKeys, count, dots);
        for (let h = 0; h < qHeads; h++) {
          const kv = Math.floor(h / group);
          for (let r = 0; r < rows; r++) {
            let ub = 0;
            let best = -Infinity;
            for (let d = 0; d < headDim; d++) {
              const qv = queries[(h * rows + r) * headDim + d]!;
              ub += Math.max(qv * mins[(b * kvHeads + kv) * headDim + d]!, qv * maxs[(b * kvHeads + kv) * headDim + d]!);
            }
            for (let s = start; s < start + count; s++) {
              let dot = 0;
              for (let d = 0; d < headDim; d++) dot += queries[(h * rows + r) * headDim + d]! * keys[(kv * slots + s) * headDim + d]!;
              best = Math.max(best, dot);
            }
            const got = bounds[(b * qHeads + h) * rows + r]!;
            const label = `block ${b} head ${h} row ${r}`;
            expect(`${label}: ${got}`).toBe(`${label}: ${Math.fround(ub)}`);
            expect(`${label}: ${dots[h * rows + r]}`).toBe(`${label}: ${Math.fround(best)}`);
            expect(`${label}: ${got >= dots[h * rows + r]!}`).toBe(`${label}: true`); // Quest's guarantee
            if (count === 1) expect(got).toBe(dots[h * rows + r]!); // one slot: min = max = k, the bound is the dot
          }
        }
      }
    });
  }

  test("an empty block's max dot is -Inf; qHeads must be a multiple of kvHeads", () => {
    const out = new Float32Array(2);
    blockMaxDots(Float32Array.of(1, 2, 3, 4), 2, 1, 2, 1, new Float32Array(0), 0, out);
    expectSame(out, [-Infinity, -Infinity]);
    expect(() => blockMaxDots(new Float32Array(6), 3, 1, 2, 2, new Float32Array(8), 2, new Float32Array(3))).toThrow(RangeError);
    expect(() => blockUpperBounds(new Float32Array(6), 3, 1, 2, 2, new Float32Array(4), new Float32Array(4), 1, new Float32Array(3))).toThrow(RangeError);
    expect(() => blockUpperBounds(new Float32Array(4), 2, 1, 2, 1, new Float32Array(4), new Float32Array(4), 2, new Float32Array(3))).toThrow(RangeError);
  });
});

// ---------------------------------------------------------------------------------------------------------

/** Full sort: score descending (NaN last), index ascending on ties; the first k, ascending by index. */
function refTopK(scores: Float32Array, n: number, k: number): number[] {
  const order = Array.from({ length: n }, (_, i) => i);
  order.sort((a, b) => {
    const x = scores[a]!;
    const y = scores[b]!;
    if (Number.isNaN(x) !== Number.isNaN(y)) return Number.isNaN(x) ? 1 : -1;
    if (x !== y && !Number.isNaN(x)) return x > y ? -1 : 1;
    return a - b;
  });
  return order.slice(0, k).sort((a, b) => a - b);
}

describe("topK", () => {
  test("matches a full sort, with ties, NaN, infinities and signed zeros", () => {
    const rng = mulberry32(81);
    for (const n of [0, 1, 2, 10, 257, 2000]) {
      for (const kind of ["distinct", "ties", "special"] as const) {
        const scores = new Float32Array(n + 3).fill(1e9); // past n: must be ignored
        for (let i = 0; i < n; i++) {
          if (kind === "distinct") scores[i] = rng();
          else if (kind === "ties") scores[i] = Math.floor(rng() * 4);
          else scores[i] = [NaN, Infinity, -Infinity, 0, -0, 1, 1][Math.floor(rng() * 7)]!;
        }
        for (const k of new Set([0, 1, 2, Math.floor(n / 3), n - 1, n, n + 5].filter((v) => v >= 0))) {
          const got = topK(scores, n, k);
          expect(got).toBeInstanceOf(Int32Array);
          expectSame(got, refTopK(scores, n, k), `n ${n} k ${k} ${kind}`);
        }
      }
    }
  });

  test("ties go to the lower index", () => {
    expectSame(topK(Float32Array.of(5, 1, 5, 5, 1), 5, 2), [0, 2]);
    expectSame(topK(Float32Array.of(1, 1, 1, 1), 4, 3), [0, 1, 2]);
    expectSame(topK(Float32Array.of(0, 9, 1, 9), 4, 1), [1]);
    expect(() => topK(new Float32Array(3), 4, 1)).toThrow(RangeError);
  });
});

test("cpuKernels carries every kernel", () => {
  expect(cpuKernels).toEqual({
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
  });
});

describe("rotateSlots", () => {
  const llama3 = { rope_type: "llama3", factor: 128, low_freq_factor: 1, high_freq_factor: 4, original_max_position_embeddings: 8192 };

  test("a key embedded at p, turned by s, equals the key embedded at p + s", () => {
    const rng = mulberry32(41);
    for (const [heads, headDim, config] of [
      [2, 32, { head_dim: 32, rope_theta: 500000, rope_scaling: llama3 }],
      [3, 8, { head_dim: 8 }],
      [1, 128, { head_dim: 128, rope_theta: 500000, rope_scaling: llama3 }],
    ] as const) {
      const invFreq = ropeInvFreq(config)!;
      const slots = 7;
      const raw = randomF32(rng, heads * slots * headDim);
      const positions = [0, 5, 63, 4096, 349526, 1048000, 3];
      const shifts = Int32Array.of(0, 1, 700000, 12, 698000, 0, 2 ** 21);
      const keys = new Float32Array(heads * slots * headDim);
      for (let h = 0; h < heads; h++) {
        for (let s = 0; s < slots; s++) {
          const o = (h * slots + s) * headDim;
          keys.set(refRope(raw.subarray(o, o + headDim), positions[s]!, invFreq), o);
        }
      }
      const before = keys.slice();
      rotateSlots(keys, slots, { heads, headDim }, shifts, invFreq);
      for (let h = 0; h < heads; h++) {
        for (let s = 0; s < slots; s++) {
          const o = (h * slots + s) * headDim;
          const want = refRope(raw.subarray(o, o + headDim), positions[s]! + shifts[s]!, invFreq);
          for (let i = 0; i < headDim; i++) {
            if (shifts[s] === 0) expect(keys[o + i]).toBe(before[o + i]!);
            else expect(Math.abs(keys[o + i]! - want[i]!)).toBeLessThan(1e-5);
          }
        }
      }
    }
  });

  test("a turn and its inverse give the key back; bad shapes are refused", () => {
    const rng = mulberry32(43);
    const invFreq = ropeInvFreq({ head_dim: 16, rope_theta: 10000 })!;
    const keys = randomF32(rng, 2 * 5 * 16);
    const start = keys.slice();
    const shifts = Int32Array.of(3, -3, 100000, 0, 17);
    rotateSlots(keys, 5, { heads: 2, headDim: 16 }, shifts, invFreq);
    expect(Array.from(keys)).not.toEqual(Array.from(start));
    rotateSlots(keys, 5, { heads: 2, headDim: 16 }, shifts.map((x) => -x), invFreq);
    for (let i = 0; i < keys.length; i++) expect(Math.abs(keys[i]! - start[i]!)).toBeLessThan(1e-5);
    expect(() => rotateSlots(keys, 6, { heads: 2, headDim: 16 }, new Int32Array(6), invFreq)).toThrow(RangeError);
    expect(() => rotateSlots(keys, 5, { heads: 2, headDim: 16 }, new Int32Array(4), invFreq)).toThrow(RangeError);
    expect(() => rotateSlots(keys, 5, { heads: 2, headDim: 15 }, shifts, invFreq)).toThrow(RangeError);
    expect(() => rotateSlots(keys, 5, { heads: 2, headDim: 16 }, shifts, invFreq.subarray(0, 7))).toThrow(RangeError);
  });

  test("ropeInvFreq: default, linear, llama3 and yarn frequencies (ropeSpec's, what the graph uses); none for rope types that depend on the sequence", () => {
    // The values themselves are checked against PyTorch in tests/rope.test.ts; here, their shape and agreement.
    const base = ropeInvFreq({ head_dim: 32, rope_theta: 500000 })!;
    for (let i = 0; i < 16; i++) expect(Math.abs(base[i]! / (1 / 500000 ** ((2 * i) / 32)) - 1)).toBeLessThan(1e-6);
    const linear = ropeInvFreq({ head_dim: 32, rope_theta: 500000, rope_scaling: { type: "linear", factor: 4 } })!;
    for (let i = 0; i < 16; i++) expect(Math.abs(linear[i]! / (base[i]! / 4) - 1)).toBeLessThan(1e-6);
    const scaled = ropeInvFreq({ head_dim: 32, rope_theta: 500000, rope_scaling: llama3 })!;
    // Wavelengths under 8192 / 4 positions stay; over 8192 are divided by the factor; between, blended.
    for (let i = 0; i < 16; i++) {
      const wavelen = (2 * Math.PI) / (1 / 500000 ** ((2 * i) / 32));
      if (wavelen < 2048) expect(scaled[i]).toBe(base[i]!);
      else if (wavelen > 8192) expect(Math.abs(scaled[i]! / (base[i]! / 128) - 1)).toBeLessThan(1e-6);
      else expect(scaled[i]! < base[i]! && scaled[i]! > base[i]! / 128).toBe(true);
    }
    for (const config of [{ head_dim: 32, rope_theta: 500000 }, { head_dim: 32, rope_theta: 500000, rope_scaling: llama3 }]) {
      expect(ropeInvFreq(config)).toEqual(ropeSpec(config).kind === "static" ? (ropeSpec(config) as { invFreq: Float32Array }).invFreq : null);
    }
    const yarn = { head_dim: 32, rope_theta: 500000, max_position_embeddings: 32768, rope_scaling: { rope_type: "yarn", factor: 4, original_max_position_embeddings: 8192 } };
    expect(ropeInvFreq(yarn)).toEqual((ropeSpec(yarn) as { invFreq: Float32Array }).invFreq);
    expect(ropeInvFreq({ head_dim: 32, max_position_embeddings: 8192, rope_scaling: { rope_type: "dynamic", factor: 2 } })).toBeNull();
    expect(() => ropeInvFreq({ head_dim: 32, rope_scaling: { rope_type: "llama3", factor: 8 } })).toThrow(RangeError);
  });
});
