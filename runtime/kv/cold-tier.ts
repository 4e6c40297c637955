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

/** An archived block as stored: its bytes, positions, token ids and, per layer, its key summary (none where the tier keeps none). */
export interface RawColdBlock {
  data: Uint8Array;
  positions: Int32Array;
  tokens: Int32Array;
  mins: Float32Array[];
  maxs: Float32Array[];
}

/** Where an archived block is: its bytes in storage, its positions and then its token ids in the tier's Int32Pages. */
interface BlockRecord {
  offset: number;
  bytes: number;
  page: number;
  at: number;
  count: number;
}

/**
 * Append-only int32 storage in pages of fixed size, for the archive's positions and token ids: a million
 * tokens take two flat arrays' worth instead of two small typed arrays per block, and growing never copies.
 * A run of values lies in one page. Stored values never change, so a clone shares the full pages and
 * copies only the one still being filled (which both sides go on appending to).
 */
class Int32Pages {
  private static readonly PAGE = 1 << 16;
  private pages: Int32Array[] = [];
  /** Values used in the last page. */
  private used = 0;

  /** Room for `count` consecutive values: the page and index they start at. */
  alloc(count: number): { page: number; at: number } {
    const last = this.pages.length - 1;
    if (last < 0 || this.used + count > this.pages[last]!.length) {
      this.pages.push(new Int32Array(Math.max(Int32Pages.PAGE, count)));
      this.used = 0;
    }
    const at = this.used;
    this.used += count;
    return { page: this.pages.length - 1, at };
  }

  view(page: number, at: number, count: number): Int32Array {
    return this.pages[page]!.subarray(at, at + count);
  }

  get byteLength(): number {
    return this.pages.length * Int32Pages.PAGE * 4;
  }

  clone(): Int32Pages {
    const copy = new Int32Pages();
    copy.pages = this.pages.map((p, i) => (i === this.pages.length - 1 ? p.slice() : p));
    copy.used = this.used;
    return copy;
  }
}

/** Token ids are below 2^17 (Llama-3's 128,256); a pair of them is one number past every id. */
const PAIR_BASE = 2 ** 34;
const PAIR_SHIFT = 2 ** 17;
export const bigramKey = (a: number, b: number) => PAIR_BASE + a * PAIR_SHIFT + b;

/**
 * Which archived blocks hold which token ids and which adjacent pairs of them (an inverted index), for
 * lexical recall: a question's rare tokens and its word pairs ("for table") point to the blocks that hold
 * them. A pair that spans two blocks belongs to the second. Append-only like the blocks.
 *
 * Only token ids have posting lists (one Int32Array per id, grown by doubling). A million tokens hold
 * hundreds of thousands of distinct pairs, most of them once, and a list per pair took more memory than
 * everything else the tier keeps; a pair's blocks are found instead among those holding its second token,
 * by reading their token ids (kept in memory anyway), which gives the same blocks in the same order.
 */
class TokenIndex {
  /** Per token id: ascending numbers of the blocks holding it, the first counts[id] entries of lists[id]. */
  private lists: (Int32Array | undefined)[] = [];
  private counts = new Int32Array(0);
  /** Per block: the token before its first one (the last token of the blocks before it; -1: none). */
  private before = new Int32Array(0);
  /** The last token of the last block added (-1: none), for the pair that spans into the next block. */
  private lastToken = -1;

  add(block: number, tokens: Int32Array): void {
    if (block >= this.before.length) this.before = grown(this.before, block + 1);
    this.before[block] = this.lastToken;
    for (const t of tokens) {
      if (t < 0) continue;
      if (t >= this.counts.length) {
        this.counts = grown(this.counts, t + 1);
        while (this.lists.length < this.counts.length) this.lists.push(undefined);
      }
      const n = this.counts[t]!;
      let list = this.lists[t];
      if (list && n > 0 && list[n - 1] === block) continue; // counted for this block already
      if (!list || n === list.length) this.lists[t] = list = grown(list ?? new Int32Array(0), n + 1);
      list[n] = block;
      this.counts[t] = n + 1;
    }
    if (tokens.length > 0) this.lastToken = tokens[tokens.length - 1]!;
  }

  /**
   * Ascending numbers of the blocks holding `key` (a token id or a bigramKey), or null if none does.
   * `tokensOf(b)` gives block b's token ids.
   */
  blocksWith(key: number, tokensOf: (b: number) => Int32Array): Int32Array | null {
    if (!Number.isInteger(key) || key < 0) return null;
    if (key < PAIR_BASE) return this.blocksWithToken(key);
    const a = Math.floor((key - PAIR_BASE) / PAIR_SHIFT);
    const b = key - PAIR_BASE - a * PAIR_SHIFT;
    const candidates = this.blocksWithToken(b);
    if (!candidates || this.blocksWithToken(a) === null) return null;
    const out = new Int32Array(candidates.length);
    let n = 0;
    for (const block of candidates) {
      const tokens = tokensOf(block);
      let previous = this.before[block]!;
      for (const t of tokens) {
        if (t === b && previous === a) {
          out[n++] = block;
          break;
        }
        previous = t;
      }
    }
    return n > 0 ? out.subarray(0, n) : null;
  }

  private blocksWithToken(t: number): Int32Array | null {
    const n = t < this.counts.length ? this.counts[t]! : 0;
    return n > 0 ? this.lists[t]!.subarray(0, n) : null;
  }

  /** Bytes of the lists and tables (about). */
  get byteLength(): number {
    let n = this.counts.byteLength + this.before.byteLength + 8 * this.lists.length;
    for (const list of this.lists) if (list) n += list.byteLength + 64;
    return n;
  }

  clone(): TokenIndex {
    const copy = new TokenIndex();
    copy.lists = this.lists.map((list) => list?.slice());
    copy.counts = this.counts.slice();
    copy.before = this.before.slice();
    copy.lastToken = this.lastToken;
    return copy;
  }
}

/** A copy of `a` with room for at least `length` values (twice as many as before, at least 4). */
function grown(a: Int32Array, length: number): Int32Array<ArrayBuffer> {
  const out = new Int32Array(Math.max(length, 2 * a.length, 4));
  out.set(a);
  return out;
}

export class ColdTier {
  private blocks: BlockRecord[] = [];
  /** Every block's positions and token ids (BlockRecord.page and .at). */
  private ids = new Int32Pages();
  private index = new TokenIndex();
  /**
   * Per layer: [blocks, kvHeads, headDim] mins and maxs of each block's keys (Quest's summary), kept only
   * with `summaries` (the keys scorer reads them; lexical recall does not, and at 1M tokens they would be
   * 16 MB on the fixture, 4 GiB on an 8B model): else empty.
   */
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
    readonly summaries = true,
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
    return this.mins.reduce((n, a) => n + a.byteLength * 2, 0) + this.blocks.length * 48 + this.ids.byteLength + this.index.byteLength;
  }

  blockPositions(b: number): Int32Array {
    const r = this.blocks[b]!;
    return this.ids.view(r.page, r.at, r.count);
  }

  private blockTokens(b: number): Int32Array {
    const r = this.blocks[b]!;
    return this.ids.view(r.page, r.at + r.count, r.count);
  }

  clone(): ColdTier {
    const storage = this.storage instanceof FileColdStorage ? this.storage.share() : this.storage;
    const copy = new ColdTier(this.shape, this.format, storage, this.summaries);
    copy.blocks = [...this.blocks];
    copy.ids = this.ids.clone();
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
    const tokensOf = (b: number) => this.blockTokens(b);
    for (const t of new Set([...Array.from(probe), ...Array.from(pairs)])) {
      const list = this.index.blocksWith(t, tokensOf);
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
    const summary = () => Array.from({ length: this.summaries ? layers : 0 }, () => new Float32Array(kvHeads * headDim));
    const [mins, maxs] = [summary(), summary()];
    for (let l = 0; l < mins.length; l++) K.blockSummary(floats[l]!, count, 0, count, { heads: kvHeads, headDim }, mins[l]!, maxs[l]!);
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

  /** Block b as stored (for snapshots): its bytes, positions, token ids and, per layer, its key summary (if kept). */
  rawBlock(b: number): RawColdBlock {
    const record = this.blocks[b]!;
    const data = new Uint8Array(record.bytes);
    this.storage.read(record.offset, data);
    const n = this.shape.kvHeads * this.shape.headDim;
    return {
      data,
      positions: this.blockPositions(b),
      tokens: this.blockTokens(b),
      mins: this.summaries ? this.mins.map((a) => a.subarray(b * n, (b + 1) * n)) : [],
      maxs: this.summaries ? this.maxs.map((a) => a.subarray(b * n, (b + 1) * n)) : [],
    };
  }

  /** Appends a block as rawBlock gave it (add's quantized block, or a restored snapshot's, checked by its reader). */
  addRaw(block: RawColdBlock): void {
    const { layers, kvHeads, headDim } = this.shape;
    const b = this.blocks.length;
    const n = kvHeads * headDim;
    if (this.summaries) {
      if (block.mins.length !== layers) throw new Error("addRaw: the block has no key summary, and this tier keeps them");
      this.reserveSummaries(b);
      for (let l = 0; l < layers; l++) {
        this.mins[l]!.set(block.mins[l]!, b * n);
        this.maxs[l]!.set(block.maxs[l]!, b * n);
      }
    }
    const offset = this.storage.append(block.data);
    this.index.add(b, block.tokens);
    const count = block.positions.length;
    const { page, at } = this.ids.alloc(2 * count);
    this.ids.view(page, at, count).set(block.positions);
    this.ids.view(page, at + count, count).set(block.tokens);
    this.blocks.push({ offset, bytes: block.data.length, page, at, count });
    this.archivedUpTo = block.positions[block.positions.length - 1]! + 1;
  }

  /** Block b's KV, per layer [kvHeads, count, headDim] in the cache's dtype, and its positions. */
  read(b: number): { keys: KvArray[]; values: KvArray[]; positions: Int32Array; tokens: Int32Array } {
    const { layers, kvHeads, headDim, dtype } = this.shape;
    const record = this.blocks[b]!;
    const count = record.count;
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
    return { keys: arrays.slice(0, layers), values: arrays.slice(layers), positions: this.blockPositions(b), tokens: this.blockTokens(b) };
  }
}
