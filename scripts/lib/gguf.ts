/**
 * A minimal GGUF (version 3) writer: llama.cpp's model file format, written from TypeScript so the
 * benchmark's llama.cpp peer runs the same weights as our ONNX graphs (see gguf-llama.ts).
 *
 * Layout (little-endian), as gguf-py's GGUFWriter writes it:
 *   "GGUF" magic, u32 version 3, u64 tensor count, u64 metadata count,
 *   metadata: key (u64 length + UTF-8), u32 value type, value (arrays: u32 element type, u64 count, elements),
 *   tensor infos: name, u32 n_dims, u64 dims (innermost first: the reverse of a row-major shape),
 *                 u32 ggml type, u64 offset into the data section,
 *   zero padding to `general.alignment` (32), then each tensor's bytes, each padded to the alignment.
 */

export const GGUF_ALIGNMENT = 32;

/** gguf_type values (gguf-py GGUFValueType). */
const T = { UINT8: 0, INT8: 1, UINT16: 2, INT16: 3, UINT32: 4, INT32: 5, FLOAT32: 6, BOOL: 7, STRING: 8, ARRAY: 9, UINT64: 10, INT64: 11, FLOAT64: 12 } as const;

/** ggml tensor types this writer emits. */
export const GGML_TYPE = { F32: 0, F16: 1 } as const;
export type GgmlType = (typeof GGML_TYPE)[keyof typeof GGML_TYPE];

export type GgufValue =
  | { type: "u32"; value: number }
  | { type: "i32"; value: number }
  | { type: "f32"; value: number }
  | { type: "bool"; value: boolean }
  | { type: "string"; value: string }
  | { type: "string[]"; value: readonly string[] }
  | { type: "i32[]"; value: readonly number[] | Int32Array }
  | { type: "f32[]"; value: readonly number[] };

export interface GgufTensor {
  name: string;
  /** Row-major shape as in PyTorch/HF (outermost first); written reversed, as GGUF wants. */
  shape: readonly number[];
  type: GgmlType;
  /** The tensor's bytes in row-major order, already in `type`'s encoding. */
  data: Uint8Array;
}

/** Grows as it is written; bytes() returns exactly what was written. */
class ByteSink {
  private buf = new Uint8Array(1 << 16);
  private view = new DataView(this.buf.buffer);
  length = 0;
  private reserve(n: number): void {
    if (this.length + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.length + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.length));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }
  u8(v: number): void {
    this.reserve(1);
    this.view.setUint8(this.length, v);
    this.length += 1;
  }
  u32(v: number): void {
    this.reserve(4);
    this.view.setUint32(this.length, v, true);
    this.length += 4;
  }
  i32(v: number): void {
    this.reserve(4);
    this.view.setInt32(this.length, v, true);
    this.length += 4;
  }
  f32(v: number): void {
    this.reserve(4);
    this.view.setFloat32(this.length, v, true);
    this.length += 4;
  }
  u64(v: number): void {
    if (!Number.isSafeInteger(v) || v < 0) throw new Error(`GGUF u64 out of range: ${v}`);
    this.reserve(8);
    this.view.setBigUint64(this.length, BigInt(v), true);
    this.length += 8;
  }
  bytes(b: Uint8Array): void {
    this.reserve(b.length);
    this.buf.set(b, this.length);
    this.length += b.length;
  }
  string(s: string): void {
    const b = new TextEncoder().encode(s);
    this.u64(b.length);
    this.bytes(b);
  }
  padTo(alignment: number): void {
    while (this.length % alignment) this.u8(0);
  }
  result(): Uint8Array {
    return this.buf.slice(0, this.length);
  }
}

function writeValue(out: ByteSink, v: GgufValue): void {
  switch (v.type) {
    case "u32":
      out.u32(T.UINT32);
      out.u32(v.value);
      return;
    case "i32":
      out.u32(T.INT32);
      out.i32(v.value);
      return;
    case "f32":
      out.u32(T.FLOAT32);
      out.f32(v.value);
      return;
    case "bool":
      out.u32(T.BOOL);
      out.u8(v.value ? 1 : 0);
      return;
    case "string":
      out.u32(T.STRING);
      out.string(v.value);
      return;
    case "string[]":
      out.u32(T.ARRAY);
      out.u32(T.STRING);
      out.u64(v.value.length);
      for (const s of v.value) out.string(s);
      return;
    case "i32[]":
      out.u32(T.ARRAY);
      out.u32(T.INT32);
      out.u64(v.value.length);
      for (const x of v.value) out.i32(x);
      return;
    case "f32[]":
      out.u32(T.ARRAY);
      out.u32(T.FLOAT32);
      out.u64(v.value.length);
      for (const x of v.value) out.f32(x);
      return;
  }
}

const BYTES_PER_ELEMENT: Record<GgmlType, number> = { [GGML_TYPE.F32]: 4, [GGML_TYPE.F16]: 2 };

/**
 * The header (magic, counts, metadata, tensor infos, padding) and the tensors' data section as separate
 * chunks, so a caller can stream them to a file without one more copy of the weights. Deterministic:
 * metadata and tensors are written in the order given.
 */
export function encodeGguf(metadata: ReadonlyArray<readonly [string, GgufValue]>, tensors: readonly GgufTensor[]): Uint8Array[] {
  const keys = new Set<string>();
  for (const [key] of metadata) {
    if (keys.has(key)) throw new Error(`GGUF metadata key ${key} given twice`);
    keys.add(key);
  }
  const head = new ByteSink();
  head.bytes(new TextEncoder().encode("GGUF"));
  head.u32(3);
  head.u64(tensors.length);
  head.u64(metadata.length + (keys.has("general.alignment") ? 0 : 1));
  if (!keys.has("general.alignment")) {
    head.string("general.alignment");
    writeValue(head, { type: "u32", value: GGUF_ALIGNMENT });
  }
  for (const [key, value] of metadata) {
    head.string(key);
    writeValue(head, value);
  }
  let offset = 0;
  const chunks: Uint8Array[] = [];
  for (const t of tensors) {
    const count = t.shape.reduce((a, b) => a * b, 1);
    if (t.data.length !== count * BYTES_PER_ELEMENT[t.type]) throw new Error(`GGUF tensor ${t.name}: ${t.data.length} bytes for shape [${t.shape}]`);
    head.string(t.name);
    head.u32(t.shape.length);
    for (let i = t.shape.length - 1; i >= 0; i--) head.u64(t.shape[i]!);
    head.u32(t.type);
    head.u64(offset);
    chunks.push(t.data);
    const padded = Math.ceil(t.data.length / GGUF_ALIGNMENT) * GGUF_ALIGNMENT;
    if (padded > t.data.length) chunks.push(new Uint8Array(padded - t.data.length));
    offset += padded;
  }
  head.padTo(GGUF_ALIGNMENT);
  return [head.result(), ...chunks];
}
