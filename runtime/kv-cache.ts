/**
 * The KV cache of one sequence. Every resident slot keeps the original position id of its token, so a
 * later compaction can drop slots without renumbering what remains. Two storage modes, one per graph
 * contract (runtime/llama-model.ts picks):
 *
 * - "present" (graphs in the Optimum layout, present = Concat(past, new)): per layer the arrays the graph
 *   returned, [kvHeads, length, headDim], fed back whole every step. They are never written in place:
 *   forward() puts new arrays in their place, so clone() can share them.
 *
 * - "inplace" (graphs that return only the new tokens' KV): the runtime owns per-layer storage
 *   [kvHeads, capacity, headDim] with spare capacity; a step writes only the new slots, and the graph
 *   reads the whole storage with a per-cache slot mask (1 = live slot). Storage is shared between a cache
 *   and its clones; slots below a cache's length are never written again, and a cache may append in place
 *   only at the storage's frontier (no other cache has written at or past it); otherwise it first copies
 *   its slots into storage of its own. So a working copy taken for a turn that may fail still leaves the
 *   original intact. Storage that only one cache holds grows in place (resizable buffers), so a long
 *   prefill leaves no trail of outgrown copies for the garbage collector.
 */
import { gatherSlots } from "../kernels/compaction.ts";
import { sliceSlots, writeSlots, type KvArray } from "../kernels/kv-slots.ts";
import type { KvCompactor } from "./kv/compaction.ts";

export type KvDtype = "float32" | "float16";
export type KvMode = "present" | "inplace";
export type { KvArray };

/** Runtime-owned KV storage of the in-place mode, possibly shared by a cache and its clones. */
class KvStore {
  /** Slots at and past the frontier hold no cache's data; the cache whose length equals it may append in place. */
  frontier = 0;
  /**
   * Caches that hold this storage (clones add one, a cache moving to storage of its own takes one away;
   * a cache dropped without moving never does, so this may overcount, never undercount). At 1 the one
   * cache may grow the storage in place (growInPlace).
   */
  refs = 1;
  constructor(
    /** keys[i] / values[i]: layer i, [kvHeads, capacity, headDim]. */
    readonly keys: KvArray[],
    readonly values: KvArray[],
    public capacity: number,
  ) {}
}

/** How far a storage buffer may grow in place (see KvCache.newStorageArray), and at least how many bytes. */
const GROWTH_RESERVE = 8;
const MIN_RESERVE_BYTES = 16 * 2 ** 20;

/**
 * Capacity for `needed` slots: a 64th more (at least 256 slots), rounded up to 256 slots. Every step
 * computes over (and onnxruntime-web copies) the whole capacity, so spare slots cost each step; growing
 * copies the cache once per 64th of its length, about 64 slots copied per slot appended, a small fraction
 * of what the steps in between read. (A prefill does not reserve its whole prompt up front: every
 * chunk would then compute over the whole prompt's slots.)
 */
export function capacityFor(needed: number): number {
  return Math.ceil((needed + Math.max(256, Math.floor(needed / 64))) / 256) * 256;
}

export class KvCache {
  /** "present" mode: layer i, [kvHeads, length, headDim]. */
  private presentKeys: KvArray[];
  private presentValues: KvArray[];
  /** "inplace" mode: the storage, and which of its slots are live for this cache (capacity bytes). */
  private store: KvStore | null = null;
  private mask: Uint8Array = new Uint8Array(0);
  /** Live slots masked out by maskSlot (still resident and counted in length). */
  private masked = 0;
  /** Number of resident slots. */
  length = 0;
  /** Original position id of each resident slot (first `length` entries are valid). */
  positions: Int32Array;
  /** Position id the next token will get (one past the last token read, whatever was dropped). */
  nextPosition = 0;
  /**
   * Tokens of the sequence this cache has read: the prompt prefix it stands for. Equal to length until
   * compaction drops slots (recalled slots are old tokens and do not count).
   */
  tokensRead = 0;
  /**
   * Attention each resident slot has received (summed over the runs that reported it: the graph's
   * slot_attention), for attention-informed compaction; first `length` entries valid.
   */
  scores: Float32Array;
  /** Token id of each resident slot (-1 where unknown: restored snapshots), for lexical recall; first `length` valid. */
  tokens: Int32Array;
  /**
   * Keeps this cache within a slot budget (runtime/kv/compaction.ts); null: every slot stays. Once it has
   * dropped slots, slot i no longer holds token i: such a cache is never truncated or lent as a prefix.
   */
  compactor: KvCompactor | null = null;

  constructor(
    readonly dtype: KvDtype,
    readonly layers: number,
    readonly kvHeads: number,
    readonly headDim: number,
    readonly mode: KvMode = "present",
  ) {
    const empty = () => this.newArray(0);
    this.presentKeys = Array.from({ length: layers }, empty);
    this.presentValues = Array.from({ length: layers }, empty);
    this.positions = new Int32Array(256);
    this.scores = new Float32Array(256);
    this.tokens = new Int32Array(256).fill(-1);
  }

  private newArray(slots: number): KvArray {
    const n = this.kvHeads * slots * this.headDim;
    return this.dtype === "float16" ? new Uint16Array(n) : new Float32Array(n);
  }

  /**
   * Storage for `slots` slots over a resizable ArrayBuffer that may grow in place to GROWTH_RESERVE times
   * its size (address space is reserved, memory is not): growing then leaves no old copy behind for the
   * garbage collector, which under Bun let a 32K-token prefill's discarded copies reach 600 MB.
   */
  private newStorageArray(slots: number): KvArray {
    const bytes = this.kvHeads * slots * this.headDim * this.bytesPerElement;
    const buffer = new ArrayBuffer(bytes, { maxByteLength: Math.max(bytes * GROWTH_RESERVE, MIN_RESERVE_BYTES) });
    const n = bytes / this.bytesPerElement;
    return this.dtype === "float16" ? new Uint16Array(buffer, 0, n) : new Float32Array(buffer, 0, n); // fixed-length views
  }

  private get layout() {
    return { heads: this.kvHeads, headDim: this.headDim };
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

  /** Slots the in-place storage holds (live or not); 0 in "present" mode. */
  get capacity(): number {
    return this.store?.capacity ?? 0;
  }

  private ensurePositionCapacity(needed: number): void {
    if (needed <= this.positions.length) return;
    let capacity = this.positions.length;
    while (capacity < needed) capacity *= 2;
    const grown = new Int32Array(capacity);
    grown.set(this.positions.subarray(0, this.length));
    this.positions = grown;
    const scores = new Float32Array(capacity);
    scores.set(this.scores.subarray(0, this.length));
    this.scores = scores;
    const tokens = new Int32Array(capacity).fill(-1);
    tokens.set(this.tokens.subarray(0, this.length));
    this.tokens = tokens;
  }

  /** Records `count` new slots (token ids `ids`) at consecutive positions starting at nextPosition (and marks them live). */
  appendPositions(count: number, ids?: ArrayLike<number>): void {
    this.ensurePositionCapacity(this.length + count);
    for (let i = 0; i < count; i++) this.positions[this.length + i] = this.nextPosition + i;
    this.scores.fill(0, this.length, this.length + count);
    for (let i = 0; i < count; i++) this.tokens[this.length + i] = ids ? ids[i]! : -1;
    if (this.mode === "inplace") this.mask.fill(1, this.length, this.length + count);
    this.length += count;
    this.tokensRead += count;
    this.nextPosition += count;
  }

  /**
   * Every layer's keys and values as [kvHeads, length, headDim] arrays (the snapshot layout): the arrays
   * themselves in "present" mode, copies in "inplace" mode.
   */
  layerArrays(): { keys: KvArray[]; values: KvArray[] } {
    // Snapshots do not record the slot mask yet (the compaction issue will): refuse rather than revive slots.
    if (this.masked > 0) throw new Error(`layerArrays: ${this.masked} slots are masked; snapshots cannot hold masked slots yet`);
    const store = this.store;
    if (this.mode === "present") return { keys: this.presentKeys, values: this.presentValues };
    if (!store) return { keys: this.presentKeys, values: this.presentValues }; // empty arrays
    const slice = (a: KvArray) => sliceSlots(a, store.capacity, 0, this.length, this.layout);
    return { keys: store.keys.map(slice), values: store.values.map(slice) };
  }

  /**
   * The arrays that hold every layer's KV, without copying: [kvHeads, slots, headDim] where `slots` is
   * the length ("present") or the storage's capacity ("inplace"; the first `length` slots are this
   * cache's and are never written again, so a snapshot can be encoded from them while others append).
   * This cache itself must not append while the views are in use: storage only it holds may grow in
   * place, which moves its slots (sessions never append to a cache they persist or lend).
   */
  layerViews(): { keys: KvArray[]; values: KvArray[]; slots: number } {
    if (this.masked > 0) throw new Error(`layerViews: ${this.masked} slots are masked; snapshots cannot hold masked slots yet`);
    const store = this.store;
    if (this.mode === "present" || !store) return { keys: this.presentKeys, values: this.presentValues, slots: this.length };
    return { keys: [...store.keys], values: [...store.values], slots: store.capacity };
  }

  /**
   * Arrays a snapshot of `length` slots can be decoded into so that assign() takes them without copying:
   * new storage of this cache's own ("inplace"; its capacity as slots) or new exact arrays ("present").
   */
  restoreTarget(length: number): { keys: KvArray[]; values: KvArray[]; slots: number } {
    if (this.mode === "present") {
      return { keys: Array.from({ length: this.layers }, () => this.newArray(length)), values: Array.from({ length: this.layers }, () => this.newArray(length)), slots: length };
    }
    if (this.store) this.store.refs--;
    this.store = null;
    this.length = 0;
    this.moveToOwnStore(length);
    const store = this.store!;
    return { keys: [...store.keys], values: [...store.values], slots: store.capacity };
  }

  /**
   * Replaces the whole content (a restored snapshot); arrays are [kvHeads, slots, headDim] (slots defaults to
   * length) and are taken as they are ("present", when slots = length; the storage restoreTarget gave) or copied.
   */
  assign(keys: KvArray[], values: KvArray[], positions: Int32Array, length: number, nextPosition: number, slots = length): void {
    if (this.mode === "present") {
      const exact = (a: KvArray) => (slots === length ? a : sliceSlots(a, slots, 0, length, this.layout));
      this.presentKeys = keys.map(exact);
      this.presentValues = values.map(exact);
    } else {
      const adopted = this.store !== null && this.store.keys[0] === keys[0] && this.store.capacity === slots;
      if (!adopted) {
        if (this.store) this.store.refs--;
        this.store = null;
        this.length = 0;
        this.moveToOwnStore(length);
        const store = this.store!;
        for (let i = 0; i < this.layers; i++) {
          const own = (a: KvArray) => (slots === length ? a : sliceSlots(a, slots, 0, length, this.layout));
          writeSlots(store.keys[i]!, store.capacity, 0, own(keys[i]!), length, this.layout);
          writeSlots(store.values[i]!, store.capacity, 0, own(values[i]!), length, this.layout);
        }
      }
      const store = this.store!;
      store.frontier = length;
      this.mask.fill(1, 0, length);
      this.masked = 0;
    }
    this.ensurePositionCapacity(length);
    this.positions.set(positions.subarray(0, length));
    this.length = length;
    this.tokensRead = length;
    this.nextPosition = nextPosition;
  }

  // ---- "present" mode ----

  /** Layer i's past keys and values to feed ("present" mode). */
  presentLayer(i: number): { keys: KvArray; values: KvArray } {
    return { keys: this.presentKeys[i]!, values: this.presentValues[i]! };
  }

  /** Puts the graph's present arrays in place of layer i's ("present" mode; call appendPositions after all layers). */
  setPresentLayer(i: number, keys: KvArray, values: KvArray): void {
    this.presentKeys[i] = keys;
    this.presentValues[i] = values;
  }

  // ---- "inplace" mode ----

  /**
   * Grows storage that only this cache holds to `capacity` slots without copying it elsewhere: each
   * array's buffer is resized and its heads moved apart (highest first, so no head overwrites another
   * before it has moved). False when a buffer cannot grow that far. Views taken before (layerViews) are
   * stale afterwards; the only cache that could grow this storage is the one they were taken from.
   */
  private growInPlace(store: KvStore, capacity: number): boolean {
    const arrays = [...store.keys, ...store.values];
    const bytes = this.kvHeads * capacity * this.headDim * this.bytesPerElement;
    const buffers = arrays.map((a) => a.buffer as ArrayBuffer);
    if (buffers.some((b) => !b.resizable || b.maxByteLength < bytes || b.byteLength !== this.kvHeads * store.capacity * this.headDim * this.bytesPerElement)) return false;
    const grown = buffers.map((buffer) => {
      buffer.resize(bytes);
      const n = bytes / this.bytesPerElement;
      const view = this.dtype === "float16" ? new Uint16Array(buffer, 0, n) : new Float32Array(buffer, 0, n);
      const { headDim: d } = this;
      for (let h = this.kvHeads - 1; h > 0; h--) view.copyWithin(h * capacity * d, h * store.capacity * d, (h * store.capacity + this.length) * d);
      return view;
    });
    store.keys.splice(0, this.layers, ...grown.slice(0, this.layers));
    store.values.splice(0, this.layers, ...grown.slice(this.layers));
    store.capacity = capacity;
    const mask = new Uint8Array(capacity);
    mask.set(this.mask.subarray(0, this.length));
    this.mask = mask;
    return true;
  }

  /**
   * Shrinks storage only this cache holds to `capacity` slots (>= its first `count` live slots): each
   * array's heads move down (lowest first, so none overwrites another before it has moved) and its buffer
   * is resized. The reverse of growInPlace.
   */
  private shrinkInPlace(store: KvStore, capacity: number, count: number): void {
    const { headDim: d } = this;
    const bytes = this.kvHeads * capacity * d * this.bytesPerElement;
    const shrunk = [...store.keys, ...store.values].map((view) => {
      for (let h = 1; h < this.kvHeads; h++) view.copyWithin(h * capacity * d, h * store.capacity * d, (h * store.capacity + count) * d);
      const buffer = view.buffer as ArrayBuffer;
      const n = bytes / this.bytesPerElement;
      if (!buffer.resizable) return view.subarray(0, n);
      buffer.resize(bytes);
      return this.dtype === "float16" ? new Uint16Array(buffer, 0, n) : new Float32Array(buffer, 0, n);
    });
    store.keys.splice(0, this.layers, ...shrunk.slice(0, this.layers));
    store.values.splice(0, this.layers, ...shrunk.slice(this.layers));
    store.capacity = capacity;
    this.mask = this.mask.slice(0, capacity);
  }

  /**
   * Gives this cache storage of its own, at the frontier, with room for `needed` slots: grown in place
   * when no other cache holds the current storage, else a copy of this cache's live slots.
   */
  private moveToOwnStore(needed: number): void {
    const old = this.store;
    if (old && old.refs === 1) {
      old.frontier = this.length; // slots a failed step claimed past it belong to no one
      if (old.capacity >= needed || this.growInPlace(old, capacityFor(needed))) return;
    }
    const capacity = capacityFor(needed);
    const keys = Array.from({ length: this.layers }, () => this.newStorageArray(capacity));
    const values = Array.from({ length: this.layers }, () => this.newStorageArray(capacity));
    if (old && this.length > 0) {
      for (let i = 0; i < this.layers; i++) {
        writeSlots(keys[i]!, capacity, 0, sliceSlots(old.keys[i]!, old.capacity, 0, this.length, this.layout), this.length, this.layout);
        writeSlots(values[i]!, capacity, 0, sliceSlots(old.values[i]!, old.capacity, 0, this.length, this.layout), this.length, this.layout);
      }
    }
    const mask = new Uint8Array(capacity);
    mask.set(this.mask.subarray(0, this.length));
    if (old) old.refs--;
    this.store = new KvStore(keys, values, capacity);
    this.store.frontier = this.length;
    this.mask = mask;
  }

  /** Makes the storage this cache's own (copying if shared past its end) with room for `count` more slots. */
  private reserveCapacity(count: number): void {
    const needed = this.length + count;
    const store = this.store;
    if (!store || store.frontier !== this.length || store.capacity < needed) this.moveToOwnStore(needed);
  }

  /**
   * Makes slots [length, length + count) this cache's to write ("inplace" mode): copies into storage of
   * its own first if the storage is too small or another cache has written at or past this cache's end.
   * Returns the storage to feed: per layer [kvHeads, capacity, headDim] and the slot mask.
   */
  reserveSlots(count: number): { keys: KvArray[]; values: KvArray[]; mask: Uint8Array; capacity: number } {
    if (this.mode !== "inplace") throw new Error("reserveSlots: not an in-place cache");
    this.reserveCapacity(count);
    const own = this.store!;
    const needed = this.length + count;
    own.frontier = needed; // claimed now, so no clone writes here even if this step fails
    return { keys: own.keys, values: own.values, mask: this.mask, capacity: own.capacity };
  }

  /** Writes the new tokens' KV ([kvHeads, count, headDim]) of layer i after the live slots; call appendPositions(count) after all layers. */
  writeNewSlots(i: number, keys: KvArray, values: KvArray, count: number): void {
    const store = this.store;
    if (!store || store.frontier < this.length + count) throw new Error("writeNewSlots: slots not reserved");
    writeSlots(store.keys[i]!, store.capacity, this.length, keys, count, this.layout);
    writeSlots(store.values[i]!, store.capacity, this.length, values, count, this.layout);
  }

  /**
   * Hides slot `slot` from every later step ("inplace" mode): the graph's slot_mask excludes it, the
   * storage and the other slots' positions stay as they are. The hook the compaction issue builds on.
   */
  maskSlot(slot: number): void {
    if (this.mode !== "inplace" || slot < 0 || slot >= this.length) throw new RangeError(`maskSlot: slot ${slot} is not a live slot of an in-place cache`);
    if (this.mask[slot]) this.masked++;
    this.mask[slot] = 0;
  }

  /** Position the next token gets when only the first `n` slots are kept. */
  private positionAfter(n: number): number {
    return n >= this.length ? this.nextPosition : n > 0 ? this.positions[n - 1]! + 1 : 0;
  }

  /**
   * An independent cache holding the first `n` slots (all by default): nothing done to the copy changes
   * this cache. "present": arrays shared when every slot is kept, copied otherwise. "inplace": the storage
   * is shared; whichever of the two appends second copies (see reserveSlots).
   */
  clone(n = this.length): KvCache {
    const copy = new KvCache(this.dtype, this.layers, this.kvHeads, this.headDim, this.mode);
    const count = Math.min(n, this.length);
    if (count < this.length && this.compactor?.hasDropped) throw new Error("clone: a compacted cache's slots are not a prefix of its tokens");
    if (this.mode === "present") {
      const keep = (a: KvArray) => (count === this.length ? a : sliceSlots(a, this.length, 0, count, this.layout));
      copy.assign(this.presentKeys.map(keep), this.presentValues.map(keep), this.positions, count, this.positionAfter(count));
      copy.scores.set(this.scores.subarray(0, count));
      copy.tokens.set(this.tokens.subarray(0, count));
      copy.tokensRead = count === this.length ? this.tokensRead : count;
      copy.compactor = this.compactor?.clone() ?? null;
      return copy;
    }
    copy.store = this.store;
    if (this.store) this.store.refs++;
    copy.mask = new Uint8Array(this.mask.length);
    copy.mask.set(this.mask.subarray(0, count));
    for (let i = 0; i < count; i++) if (!copy.mask[i]) copy.masked++;
    copy.ensurePositionCapacity(count);
    copy.positions.set(this.positions.subarray(0, count));
    copy.scores.set(this.scores.subarray(0, count));
    copy.tokens.set(this.tokens.subarray(0, count));
    copy.length = count;
    copy.tokensRead = count === this.length ? this.tokensRead : count;
    copy.nextPosition = this.positionAfter(count);
    copy.compactor = this.compactor?.clone() ?? null;
    return copy;
  }

  // ---- compaction (runtime/kv/compaction.ts decides; these move the slots) ----

  /**
   * Adds a run's slot_attention ([capacity + count]: the cache part by storage slot, then the `count` new
   * tokens) to the slots' scores; call after the run's appendPositions.
   */
  addAttention(mass: Float32Array, capacity: number, count: number): void {
    const before = this.length - count;
    const scores = this.scores;
    for (let i = 0; i < before; i++) scores[i]! += mass[i]!;
    for (let j = 0; j < count; j++) scores[before + j]! += mass[capacity + j]!;
  }

  /**
   * Keeps only slots keep[0..count) (ascending slot indices), in that order, as slots 0..count-1: their
   * KV, positions and scores move down; nextPosition stays. Storage only this cache holds is compacted in
   * place; shared storage is left to its other holders and this cache copies the kept slots out.
   */
  compact(keep: Int32Array, count: number): void {
    for (let i = 0; i < count; i++) {
      if (keep[i]! < 0 || keep[i]! >= this.length || (i > 0 && keep[i]! <= keep[i - 1]!)) throw new RangeError("compact: keep must be ascending live slots");
    }
    if (this.masked > 0) throw new Error("compact: masked slots cannot be compacted");
    const layout = this.layout;
    if (this.mode === "present") {
      const gather = (a: KvArray) => {
        const out = this.newArray(count);
        gatherSlots(a, this.length, keep, count, out, count, 0, layout);
        return out;
      };
      this.presentKeys = this.presentKeys.map(gather);
      this.presentValues = this.presentValues.map(gather);
    } else {
      const store = this.store!;
      if (store.refs === 1) {
        for (const a of [...store.keys, ...store.values]) gatherSlots(a, store.capacity, keep, count, a, store.capacity, 0, layout);
        // Every run computes over the whole capacity: storage far larger than what is left shrinks.
        if (store.capacity > 2 * capacityFor(count)) this.shrinkInPlace(store, capacityFor(2 * count), count);
      } else {
        const capacity = capacityFor(count);
        const keys = Array.from({ length: this.layers }, () => this.newStorageArray(capacity));
        const values = Array.from({ length: this.layers }, () => this.newStorageArray(capacity));
        for (let i = 0; i < this.layers; i++) {
          gatherSlots(store.keys[i]!, store.capacity, keep, count, keys[i]!, capacity, 0, layout);
          gatherSlots(store.values[i]!, store.capacity, keep, count, values[i]!, capacity, 0, layout);
        }
        store.refs--;
        this.store = new KvStore(keys, values, capacity);
        this.mask = new Uint8Array(capacity);
      }
      this.store!.frontier = count;
      this.mask.fill(1, 0, count).fill(0, count);
    }
    for (let i = 0; i < count; i++) {
      this.positions[i] = this.positions[keep[i]!]!;
      this.scores[i] = this.scores[keep[i]!]!;
      this.tokens[i] = this.tokens[keep[i]!]!;
    }
    this.length = count;
  }

  /**
   * Appends `count` slots brought back from elsewhere (recall): per layer [kvHeads, count, headDim] keys and
   * values, their original positions, token ids and scores. nextPosition stays: the slots are old tokens.
   */
  appendSlots(keys: KvArray[], values: KvArray[], positions: Int32Array, tokens: Int32Array, scores: Float32Array, count: number): void {
    if (count === 0) return;
    if (this.mode === "present") {
      // New arrays of length + count (the old ones may be shared with clones, and are never written).
      const grow = (old: KvArray, added: KvArray) => {
        const out = this.newArray(this.length + count);
        writeSlots(out, this.length + count, 0, old, this.length, this.layout);
        writeSlots(out, this.length + count, this.length, added, count, this.layout);
        return out;
      };
      this.presentKeys = this.presentKeys.map((a, i) => grow(a, keys[i]!));
      this.presentValues = this.presentValues.map((a, i) => grow(a, values[i]!));
    } else {
      this.reserveSlots(count);
      for (let i = 0; i < this.layers; i++) this.writeNewSlots(i, keys[i]!, values[i]!, count);
      this.mask.fill(1, this.length, this.length + count);
    }
    this.ensurePositionCapacity(this.length + count);
    this.positions.set(positions.subarray(0, count), this.length);
    this.scores.set(scores.subarray(0, count), this.length);
    this.tokens.set(tokens.subarray(0, count), this.length);
    this.length += count;
  }

  /**
   * Replaces the keys of slots `slots` (per layer [kvHeads, slots.length, headDim], this cache's dtype);
   * values, positions and scores stay. Storage or arrays shared with another cache are copied first.
   */
  rewriteKeys(slots: Int32Array, keys: KvArray[]): void {
    const count = slots.length;
    for (const s of slots) if (s < 0 || s >= this.length) throw new RangeError(`rewriteKeys: slot ${s} is not live`);
    if (count === 0) return;
    const layout = this.layout;
    const write = (dst: KvArray, capacity: number, i: number) => {
      for (let j = 0; j < count; j++) writeSlots(dst, capacity, slots[j]!, sliceSlots(keys[i]!, count, j, 1, layout), 1, layout);
    };
    if (this.mode === "present") {
      this.presentKeys = this.presentKeys.map((a, i) => {
        const out = a.slice();
        write(out, this.length, i);
        return out;
      });
      return;
    }
    if (this.store!.refs !== 1) this.moveToOwnStore(this.length);
    const store = this.store!;
    for (let i = 0; i < this.layers; i++) write(store.keys[i]!, store.capacity, i);
  }

  /**
   * Drops the last `count` slots, which a run just appended ("inplace" mode, storage of this cache's own):
   * a probe run whose KV is not kept (recall scores a turn's queries before reading it for real).
   */
  dropLast(count: number): void {
    const store = this.store;
    if (this.mode !== "inplace" || !store || count > this.length || store.frontier !== this.length) throw new Error("dropLast: only slots this cache just appended can be dropped");
    this.length -= count;
    this.tokensRead -= count;
    this.nextPosition -= count;
    this.mask.fill(0, this.length, this.length + count);
    store.frontier = this.length;
  }

  /** Slot i's KV, all layers, as float arrays [kvHeads, count, headDim] for slots keep[0..count) (for archiving). */
  readSlots(keep: Int32Array, count: number): { keys: KvArray[]; values: KvArray[] } {
    const slots = this.mode === "present" ? this.length : this.store!.capacity;
    const read = (a: KvArray) => {
      const out = this.newArray(count);
      gatherSlots(a, slots, keep, count, out, count, 0, this.layout);
      return out;
    };
    const views = this.mode === "present" ? { keys: this.presentKeys, values: this.presentValues } : this.store!;
    return { keys: views.keys.map(read), values: views.values.map(read) };
  }
}
