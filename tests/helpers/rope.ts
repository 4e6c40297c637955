/** Rotary embedding of one head vector at `position`, from its definition (rotate-half layout), in float64: the tests' reference. */
export function refRope(x: ArrayLike<number>, position: number, invFreq: Float32Array): Float32Array {
  const half = x.length / 2;
  const out = new Float32Array(x.length);
  for (let i = 0; i < half; i++) {
    const a = position * invFreq[i]!;
    out[i] = x[i]! * Math.cos(a) - x[half + i]! * Math.sin(a);
    out[half + i] = x[half + i]! * Math.cos(a) + x[i]! * Math.sin(a);
  }
  return out;
}
