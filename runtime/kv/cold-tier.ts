/**
 * The recall tier: KV that compaction archived, in blocks of consecutive tokens, each stored once as
 * int8 (one float32 scale per head and slot, i.e. per headDim values) or float32, with a Quest summary
 * (per layer, kv head and channel: the min and max of the block's keys) kept in memory for scoring.
 * Block bytes live in a ColdStorage: in memory, or appended to a file (so that a million-token request
 * does not hold its archive in the process's memory). Blocks are never changed after they are written,
 * so clones of a cache share the storage and copy only the block index.
 */
import { closeSync, openSync, readSync, unlinkSync, writeSync } from "node:fs";
import { cpuKernels as K } from "../../kernels/compaction.ts";
import type { KvArray } from "../../kernels/kv-slots.ts";
import type { CompactionShape } from "./compaction.ts";

/** Where archived block bytes go; append-only. */
export interface ColdStorage {
  append(bytes: Uint8Array): number;
  read(offset: number, out: Uint8Array): void;
  readonly bytes: number;
  dispose(): void;
}

export class MemoryColdStorage implements ColdStorage {
  private readonly chunks: Uint8Array[] = [];
  private readonly offsets: number[] = [];
  bytes = 0;
  append(data: Uint8Array): number {
    const offset = this.bytes;
    this.chunks.push(data.slice());
    this.offsets.push(offset);
    this.bytes += data.length;
    return offset;
  }
  read(offset: number, out: Uint8Array): void {
    // Blocks are read whole, as written: find the chunk by binary search.
    let lo = 0;
    let hi = this.offsets.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.offsets[mid]! <= offset) lo = mid;
      else hi = mid - 1;
    }
    const chunk = this.chunks[lo]!;
    out.set(chunk.subarray(offset - this.offsets[lo]!, offset - this.offsets[lo]! + out.length));
  }
  dispose(): void {
    this.chunks.length = 0;
  }
}

/** Closes the descriptors of file storage nobody disposed (a session state replaced, a dropped clone). */
const closeLater = new FinalizationRegistry<number>((fd) => {
  try {
    closeSync(fd);
  } catch {
    // closed already
  }
});

/**
 * Appends to a file, which is unlinked as soon as it is open (nothing is left on disk after a crash, and
 * only the descriptor keeps it); reads with pread. The descriptor is closed by dispose (once every holder
 * has disposed), or when the storage is garbage-collected.
 */
export class FileColdStorage implements ColdStorage {
  private readonly fd: number;
  bytes = 0;
  private users = 1;
  constructor(readonly path: string) {
    this.fd = openSync(path, "wx+");
    try {
      unlinkSync(path);
    } catch {
      // a platform that cannot unlink an open file keeps it until dispose
    }
    closeLater.register(this, this.fd, this);
  }
  append(data: Uint8Array): number {
    const offset = this.bytes;
    for (let done = 0; done < data.length; ) done += writeSync(this.fd, data, done, data.length - done, offset + done);
    this.bytes += data.length;
    return offset;
  }
  read(offset: number, out: Uint8Array): void {
    for (let done = 0; done < out.length; ) {
      const n = readSync(this.fd, out, done, out.length - done, offset + done);
      if (n <= 0) throw new Error(`cold tier file ${this.path} ends before offset ${offset + out.length}`);
      done += n;
    }
  }
  share(): this {
    this.users++;
    return this;
  }
  dispose(): void {
    if (--this.users > 0) return;
    closeLater.unregister(this);
    closeSync(this.fd);
    try {
      unlinkSync(this.path);
    } catch {
      // already gone (the usual case: unlinked at open)
    }
  }
}

/** An archived block as stored: its bytes, positions, token ids and, per layer, its key summary. */
export interface RawColdBlock {
  data: Uint8Array;
  positions: Int32Array;
  tokens: Int32Array;
  mins: Float32Array[];
  maxs: Float32Array[];
}

interface BlockRecord {
  offset: number;
  bytes: number;
  positions: Int32Array;
  tokens: Int32Array;
}

/** Token ids are below 2^17 (Llama-3's 128,256); a pair of them is one number past every id. */
const PAIR_BASE = 2 ** 34;
export const bigramKey = (a: number, b: number) => PAIR_BASE + a * 2 ** 17 + b;

/**
 * Which archived blocks hold which token ids and which adjacent pairs of them (an inverted index), for
 * lexical recall: a question's rare tokens and its word pairs ("for table") point to the blocks that hold
 * them. A pair that spans two blocks belongs to the second. Append-only like the blocks.
 */
class TokenIndex {
  /** token id or bigramKey -> ascending block numbers holding it. */
  postings = new Map<number, number[]>();
  /** The last token of the last block added (-1: none), for the pair that spans into the next block. */
  private lastToken = -1;
  add(block: number, tokens: Int32Array): void {
    const keys = new Set<number>();
    let previous = this.lastToken;
    for (const t of tokens) {
      if (t >= 0) {
        keys.add(t);
        if (previous >= 0) keys.add(bigramKey(previous, t));
      }
      previous = t;
    }
    this.lastToken = previous;
    for (const key of keys) {
      const list = this.postings.get(key);
      if (list) list.push(block);
      else this.postings.set(key, [block]);
    }
  }
  clone(): TokenIndex {
    const copy = new TokenIndex();
    for (const [t, list] of this.postings) copy.postings.set(t, [...list]);
    copy.lastToken = this.lastToken;
    return copy;
  }
}

export class ColdTier {
  private blocks: BlockRecord[] = [];
  private index = new TokenIndex();
  /** Per layer: [blocks, kvHeads, headDim] mins and maxs of each block's keys. */
  mins: Float32Array[];
  maxs: Float32Array[];
  /** Every token before this position is archived. */
  archivedUpTo = 0;
  /**
   * Names the archive: clones share it (and its first blocks), a new tier gets a new one. A session's
   * snapshot log appends a turn's new blocks only to the archive it already holds.
   */
  archiveId: string = crypto.randomUUID();

  constructor(
    private readonly shape: CompactionShape,
    readonly format: "int8" | "float32",
    private readonly storage: ColdStorage = new MemoryColdStorage(),
  ) {
    this.mins = Array.from({ length: shape.layers }, () => new Float32Array(0));
    this.maxs = Array.from({ length: shape.layers }, () => new Float32Array(0));
  }

  get blockCount(): number {
    return this.blocks.length;
  }

  /** Bytes of archived KV (without summaries). */
  get bytes(): number {
    let n = 0;
    for (const b of this.blocks) n += b.bytes;
    return n;
  }

  /** Bytes of the summaries, token index and block records kept in memory (about). */
  get summaryBytes(): number {
    let postings = 0;
    for (const list of this.index.postings.values()) postings += 8 * list.length + 16;
    return this.mins.reduce((n, a) => n + a.byteLength * 2, 0) + this.blocks.length * (16 + (this.blocks[0]?.positions.byteLength ?? 0)) + postings;
  }

  blockPositions(b: number): Int32Array {
    return this.blocks[b]!.positions;
  }

  clone(): ColdTier {
    const storage = this.storage instanceof FileColdStorage ? this.storage.share() : this.storage;
    const copy = new ColdTier(this.shape, this.format, storage);
    copy.blocks = [...this.blocks];
    copy.index = this.index.clone();
    copy.mins = this.mins.map((a) => a.slice());
    copy.maxs = this.maxs.map((a) => a.slice());
    copy.archivedUpTo = this.archivedUpTo;
    copy.archiveId = this.archiveId;
    return copy;
  }

  async dispose(): Promise<void> {
    this.storage.dispose();
  }

  /**
   * Scores every block by the probe's tokens (and `pairs`: bigramKey of its adjacent tokens) it and the
   * block before it hold, each weighted by its rarity among the blocks (BM25's idf, log((N + 1) / (df +
   * 0.5))), each distinct token or pair once: out[b] for block b.
   */
  lexicalScores(probe: ArrayLike<number>, out: Float32Array, pairs: ArrayLike<number> = []): void {
    const n = this.blocks.length;
    for (const t of new Set([...Array.from(probe), ...Array.from(pairs)])) {
      const list = this.index.postings.get(t);
      if (!list) continue;
      const idf = Math.log((n + 1) / (list.length + 0.5));
      // Block b stands for itself and the block before it (recall brings both: a needle may straddle
      // them), so a token counts once for b if either holds it.
      let last = -1;
      for (const b of list) {
        for (const end of [b, b + 1]) {
          if (end > last && end < n) {
            out[end]! += idf;
            last = end;
          }
        }
      }
    }
  }

  /** Archives one block: per layer [kvHeads, count, headDim] keys and values (cache dtype), their positions and token ids. */
  add(keys: KvArray[], values: KvArray[], positions: Int32Array, tokens: Int32Array, count: number): void {
    const { layers, kvHeads, headDim } = this.shape;
    const per = kvHeads * count * headDim;
    const floats = [...keys, ...values].map((a) => K.toFloat32(a));
    const mins = Array.from({ length: layers }, () => new Float32Array(kvHeads * headDim));
    const maxs = Array.from({ length: layers }, () => new Float32Array(kvHeads * headDim));
    for (let l = 0; l < layers; l++) K.blockSummary(floats[l]!, count, 0, count, { heads: kvHeads, headDim }, mins[l]!, maxs[l]!);
    let data: Uint8Array;
    if (this.format === "int8") {
      const groups = per / headDim;
      data = new Uint8Array(floats.length * (per + groups * 4));
      floats.forEach((f, i) => {
        const base = i * (per + groups * 4);
        const q = new Int8Array(data.buffer, base, per);
        const scales = new Float32Array(groups);
        K.quantizeInt8(f, headDim, q, scales);
        data.set(new Uint8Array(scales.buffer), base + per);
      });
    } else {
      data = new Uint8Array(floats.length * per * 4);
      floats.forEach((f, i) => data.set(new Uint8Array(f.buffer, f.byteOffset, per * 4), i * per * 4));
    }
    this.addRaw({ data, positions: positions.subarray(0, count), tokens: tokens.subarray(0, count), mins, maxs });
  }

  /** Room in the summary arrays for block b (they grow by doubling). */
  private reserveSummaries(b: number): void {
    const n = this.shape.kvHeads * this.shape.headDim;
    for (let l = 0; l < this.shape.layers; l++) {
      if (this.mins[l]!.length >= (b + 1) * n) continue;
      const cap = Math.max(16, 2 * (b + 1)) * n;
      const m = new Float32Array(cap);
      m.set(this.mins[l]!);
      const x = new Float32Array(cap);
      x.set(this.maxs[l]!);
      this.mins[l] = m;
      this.maxs[l] = x;
    }
  }

  /** Bytes one block of `count` tokens takes in storage (the snapshot reader checks frames against it). */
  static blockBytes(shape: Pick<CompactionShape, "layers" | "kvHeads" | "headDim">, format: "int8" | "float32", count: number): number {
    const per = shape.kvHeads * count * shape.headDim;
    return 2 * shape.layers * (format === "int8" ? per + (per / shape.headDim) * 4 : per * 4);
  }

  /** Block b as stored (for snapshots): its bytes, positions, token ids and, per layer, its key summary. */
  rawBlock(b: number): RawColdBlock {
    const record = this.blocks[b]!;
    const data = new Uint8Array(record.bytes);
    this.storage.read(record.offset, data);
    const n = this.shape.kvHeads * this.shape.headDim;
    return {
      data,
      positions: record.positions,
      tokens: record.tokens,
      mins: this.mins.map((a) => a.subarray(b * n, (b + 1) * n)),
      maxs: this.maxs.map((a) => a.subarray(b * n, (b + 1) * n)),
    };
  }

  /** Appends a block as rawBlock gave it (add's quantized block, or a restored snapshot's, checked by its reader). */
  addRaw(block: RawColdBlock): void {
    const { layers, kvHeads, headDim } = this.shape;
    const b = this.blocks.length;
    const n = kvHeads * headDim;
    this.reserveSummaries(b);
    for (let l = 0; l < layers; l++) {
      this.mins[l]!.set(block.mins[l]!, b * n);
      this.maxs[l]!.set(block.maxs[l]!, b * n);
    }
    const offset = this.storage.append(block.data);
    this.index.add(b, block.tokens);
    this.blocks.push({ offset, bytes: block.data.length, positions: block.positions.slice(), tokens: block.tokens.slice() });
    this.archivedUpTo = block.positions[block.positions.length - 1]! + 1;
  }

  /** Block b's KV, per layer [kvHeads, count, headDim] in the cache's dtype, and its positions. */
  read(b: number): { keys: KvArray[]; values: KvArray[]; positions: Int32Array; tokens: Int32Array } {
    const { layers, kvHeads, headDim, dtype } = this.shape;
    const record = this.blocks[b]!;
    const count = record.positions.length;
    const per = kvHeads * count * headDim;
    const data = new Uint8Array(record.bytes);
    this.storage.read(record.offset, data);
    const arrays: KvArray[] = [];
    for (let i = 0; i < 2 * layers; i++) {
      let f: Float32Array;
      if (this.format === "int8") {
        const groups = per / headDim;
        const base = i * (per + groups * 4);
        const scales = new Float32Array(data.slice(base + per, base + per + groups * 4).buffer);
        f = new Float32Array(per);
        K.dequantizeInt8(new Int8Array(data.buffer, base, per), scales, headDim, f);
      } else {
        f = new Float32Array(data.slice(i * per * 4, (i + 1) * per * 4).buffer);
      }
      arrays.push(dtype === "float16" ? K.toFloat16Bits(f) : f);
    }
    return { keys: arrays.slice(0, layers), values: arrays.slice(layers), positions: record.positions, tokens: record.tokens };
  }
}
