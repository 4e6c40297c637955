/**
 * Hugging Face checkpoints in safetensors, read without holding them: a header parse, then any run of a
 * tensor's rows read from disk and widened to float32 (BF16, F16 or F32 on disk). A checkpoint is one
 * `model.safetensors` or shards listed by `model.safetensors.index.json`, as `save_pretrained` writes them.
 *
 * Also the writer the tests use to make such checkpoints (sharded, with the index, in BF16/F16/F32).
 *
 * Format (https://github.com/huggingface/safetensors): u64 little-endian header length, a JSON header
 * {name: {dtype, shape, data_offsets: [begin, end]}, __metadata__?: {..}}, then the data, row-major,
 * little-endian; offsets count from the end of the header.
 */
import { closeSync, existsSync, fstatSync, openSync, readSync, writeSync } from "node:fs";
import { join } from "node:path";
import { float16BitsToFloat32, float32ToFloat16Bits } from "./fp16.ts";

export type SafetensorsDtype = "F32" | "F16" | "BF16";
const BYTES: Record<SafetensorsDtype, number> = { F32: 4, F16: 2, BF16: 2 };

/** One tensor of a checkpoint: where its bytes are, never the bytes themselves. */
export interface TensorEntry {
  name: string;
  /** The shard file it lives in. */
  file: string;
  dtype: SafetensorsDtype;
  shape: number[];
  /** Absolute byte offset of the data in `file`. */
  offset: number;
  byteLength: number;
}

export class CheckpointError extends Error {
  override name = "CheckpointError";
}

const MAX_HEADER = 100 * 2 ** 20; // safetensors caps the header at 100 MB

/** Reads a safetensors file's header: its tensors (with absolute offsets) and metadata. */
export function readSafetensorsHeader(file: string): { tensors: TensorEntry[]; metadata: Record<string, string> } {
  let fd: number;
  try {
    fd = openSync(file, "r");
  } catch (e) {
    throw new CheckpointError(`cannot open ${file}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`);
  }
  try {
    const size = fstatSync(fd).size;
    const head = Buffer.alloc(8);
    if (size < 8 || readSync(fd, head, 0, 8, 0) !== 8) throw new CheckpointError(`${file} is too short to be a safetensors file`);
    const headerLength = Number(head.readBigUInt64LE(0));
    if (headerLength > MAX_HEADER || 8 + headerLength > size) throw new CheckpointError(`${file}: header length ${headerLength} runs past the end of the file (${size} bytes)`);
    const text = Buffer.alloc(headerLength);
    readSync(fd, text, 0, headerLength, 8);
    let header: Record<string, unknown>;
    try {
      header = JSON.parse(text.toString("utf8")) as Record<string, unknown>;
    } catch (e) {
      throw new CheckpointError(`${file}: header is not JSON (${(e as Error).message})`);
    }
    const base = 8 + headerLength;
    const tensors: TensorEntry[] = [];
    let metadata: Record<string, string> = {};
    for (const [name, raw] of Object.entries(header)) {
      if (name === "__metadata__") {
        metadata = (raw ?? {}) as Record<string, string>;
        continue;
      }
      const entry = raw as { dtype?: string; shape?: number[]; data_offsets?: [number, number] };
      const dtype = entry.dtype as SafetensorsDtype;
      if (!(dtype in BYTES)) {
        throw new CheckpointError(`${file}: tensor ${name} has dtype ${entry.dtype}; supported: BF16, F16, F32`);
      }
      const shape = entry.shape ?? [];
      const [begin, end] = entry.data_offsets ?? [0, -1];
      const count = shape.reduce((a, b) => a * b, 1);
      if (end - begin !== count * BYTES[dtype] || base + end > size) {
        throw new CheckpointError(`${file}: tensor ${name} (${dtype} [${shape}]) has data_offsets [${begin}, ${end}] that do not fit its shape or the file`);
      }
      tensors.push({ name, file, dtype, shape, offset: base + begin, byteLength: end - begin });
    }
    return { tensors, metadata };
  } finally {
    closeSync(fd);
  }
}

/** A checkpoint folder's tensors by name, over one file or an index's shards. Opens shards lazily. */
export class Checkpoint {
  readonly tensors = new Map<string, TensorEntry>();
  private readonly fds = new Map<string, number>();

  constructor(readonly dir: string) {
    const index = join(dir, "model.safetensors.index.json");
    const single = join(dir, "model.safetensors");
    if (existsSync(index)) {
      let weightMap: Record<string, string>;
      try {
        weightMap = (JSON.parse(require_text(index)) as { weight_map?: Record<string, string> }).weight_map ?? {};
      } catch (e) {
        throw new CheckpointError(`${index} is not valid JSON (${(e as Error).message})`);
      }
      const shards = [...new Set(Object.values(weightMap))].sort();
      if (shards.length === 0) throw new CheckpointError(`${index} has an empty weight_map`);
      for (const shard of shards) {
        const file = join(dir, shard);
        if (!existsSync(file)) throw new CheckpointError(`missing shard ${file} (listed in ${index})`);
        for (const t of readSafetensorsHeader(file).tensors) this.tensors.set(t.name, t);
      }
      for (const [name, shard] of Object.entries(weightMap)) {
        const t = this.tensors.get(name);
        if (!t) throw new CheckpointError(`${index} maps ${name} to ${shard}, which does not hold it`);
      }
    } else if (existsSync(single)) {
      for (const t of readSafetensorsHeader(single).tensors) this.tensors.set(t.name, t);
    } else {
      throw new CheckpointError(`${dir} has neither model.safetensors nor model.safetensors.index.json`);
    }
  }

  get(name: string): TensorEntry {
    const t = this.tensors.get(name);
    if (!t) throw new CheckpointError(`checkpoint ${this.dir} has no tensor ${name}`);
    return t;
  }

  /** Rows [r0, r1) of a tensor viewed as [shape[0], rest], as float32. A 1-D tensor has one value per row. */
  readRows(t: TensorEntry, r0: number, r1: number): Float32Array {
    const rows = t.shape[0] ?? 1;
    if (r0 < 0 || r1 > rows || r0 > r1) throw new RangeError(`${t.name}: rows [${r0}, ${r1}) outside [0, ${rows})`);
    const cols = t.shape.length === 0 ? 1 : t.shape.slice(1).reduce((a, b) => a * b, 1);
    const width = BYTES[t.dtype];
    const bytes = Buffer.allocUnsafe((r1 - r0) * cols * width);
    const position = t.offset + r0 * cols * width;
    let done = 0;
    const fd = this.fd(t.file);
    while (done < bytes.length) {
      const n = readSync(fd, bytes, done, bytes.length - done, position + done);
      if (n === 0) throw new CheckpointError(`${t.file}: unexpected end of file reading ${t.name}`);
      done += n;
    }
    return widen(bytes, t.dtype);
  }

  close(): void {
    for (const fd of this.fds.values()) closeSync(fd);
    this.fds.clear();
  }

  private fd(file: string): number {
    let fd = this.fds.get(file);
    if (fd === undefined) {
      fd = openSync(file, "r");
      this.fds.set(file, fd);
    }
    return fd;
  }
}

function require_text(file: string): string {
  const fd = openSync(file, "r");
  try {
    const buf = Buffer.alloc(fstatSync(fd).size);
    readSync(fd, buf, 0, buf.length, 0);
    return buf.toString("utf8");
  } finally {
    closeSync(fd);
  }
}

/** Little-endian BF16 / F16 / F32 bytes as float32 values. */
export function widen(bytes: Uint8Array, dtype: SafetensorsDtype): Float32Array {
  const n = bytes.length / BYTES[dtype];
  if (dtype === "F32") {
    const out = new Float32Array(n);
    new Uint8Array(out.buffer).set(bytes);
    return out;
  }
  const halves = new Uint16Array(n);
  new Uint8Array(halves.buffer).set(bytes);
  if (dtype === "BF16") {
    const bits = new Uint32Array(n);
    for (let i = 0; i < n; i++) bits[i] = halves[i]! << 16;
    return new Float32Array(bits.buffer);
  }
  const out = new Float32Array(n);
  for (let i = 0; i < n; i++) out[i] = float16BitsToFloat32(halves[i]!);
  return out;
}

/** float32 -> bfloat16 bits, round to nearest even (as torch's `.to(torch.bfloat16)`); NaN stays NaN. */
export function toBfloat16Bits(values: Float32Array): Uint16Array {
  const bits = new Uint32Array(values.buffer, values.byteOffset, values.length);
  const out = new Uint16Array(values.length);
  for (let i = 0; i < values.length; i++) {
    const x = bits[i]!;
    if ((x & 0x7f800000) === 0x7f800000 && (x & 0x7fffff) !== 0) out[i] = (x >>> 16) | 0x40;
    else out[i] = (x + 0x7fff + ((x >>> 16) & 1)) >>> 16;
  }
  return out;
}

/** Values rounded to `dtype` and back: what a checkpoint written in that dtype holds. */
export function roundTo(values: Float32Array, dtype: SafetensorsDtype): Float32Array {
  return widen(encode(values, dtype), dtype);
}

function encode(values: Float32Array, dtype: SafetensorsDtype): Uint8Array {
  if (dtype === "F32") return new Uint8Array(values.buffer, values.byteOffset, values.byteLength);
  const halves = dtype === "BF16" ? toBfloat16Bits(values) : Uint16Array.from(values, (v) => float32ToFloat16Bits(v));
  return new Uint8Array(halves.buffer);
}

export interface TensorToWrite {
  name: string;
  shape: number[];
  data: Float32Array;
}

/** Writes one safetensors file (tensors in the given order, each converted to `dtype`). */
export function writeSafetensors(file: string, tensors: TensorToWrite[], dtype: SafetensorsDtype, metadata: Record<string, string> = {}): number {
  const header: Record<string, unknown> = Object.keys(metadata).length ? { __metadata__: metadata } : {};
  let offset = 0;
  for (const t of tensors) {
    const count = t.shape.reduce((a, b) => a * b, 1);
    if (count !== t.data.length) throw new Error(`${t.name}: ${t.data.length} values for shape [${t.shape}]`);
    header[t.name] = { dtype, shape: t.shape, data_offsets: [offset, offset + count * BYTES[dtype]] };
    offset += count * BYTES[dtype];
  }
  let json = JSON.stringify(header);
  json += " ".repeat((8 - ((json.length + 8) % 8)) % 8); // data starts 8-aligned, as the reference writer pads
  const fd = openSync(file, "w");
  try {
    const len = Buffer.alloc(8);
    len.writeBigUInt64LE(BigInt(Buffer.byteLength(json)));
    writeSync(fd, len);
    writeSync(fd, Buffer.from(json, "utf8"));
    for (const t of tensors) writeSync(fd, encode(t.data, dtype));
  } finally {
    closeSync(fd);
  }
  return 8 + Buffer.byteLength(json) + offset;
}

/**
 * Writes a checkpoint as `save_pretrained` shards it: model-0000i-of-0000n.safetensors files of at most
 * `maxShardBytes` of data each (a tensor is never split) and model.safetensors.index.json.
 */
export function writeShardedSafetensors(dir: string, tensors: TensorToWrite[], dtype: SafetensorsDtype, maxShardBytes: number): string[] {
  const shards: TensorToWrite[][] = [[]];
  let used = 0;
  for (const t of tensors) {
    const bytes = t.data.length * BYTES[dtype];
    if (used > 0 && used + bytes > maxShardBytes) {
      shards.push([]);
      used = 0;
    }
    shards[shards.length - 1]!.push(t);
    used += bytes;
  }
  const n = shards.length;
  const pad = (i: number) => String(i).padStart(5, "0");
  const weightMap: Record<string, string> = {};
  let total = 0;
  const names = shards.map((shard, i) => {
    const name = `model-${pad(i + 1)}-of-${pad(n)}.safetensors`;
    writeSafetensors(join(dir, name), shard, dtype, { format: "pt" });
    for (const t of shard) {
      weightMap[t.name] = name;
      total += t.data.length * BYTES[dtype];
    }
    return name;
  });
  const index = { metadata: { total_size: total }, weight_map: weightMap };
  const fd = openSync(join(dir, "model.safetensors.index.json"), "w");
  writeSync(fd, `${JSON.stringify(index, null, 2)}\n`);
  closeSync(fd);
  return names;
}
