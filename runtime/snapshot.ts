/**
 * Context snapshots: a session's token history, its KV cache (with every slot's original position), its
 * messages and its compaction state, in a format that streams both ways.
 *
 *   file    = MAGIC (8 bytes "ULS-SNAP") segment delta*
 *   frame   = u32le payload length, u32le CRC-32 of payload, payload (one msgpack map)
 *   segment = header, tokens chunks, positions chunks, KV chunks (per token chunk: every layer's key and
 *             value), [slot tokens, slot scores, archived blocks], end [trailer]
 *   delta   = delta header, the tokens after those it keeps, the resident set (positions, a slot map, the
 *             KV of new slots only, slot tokens and scores), the blocks archived since, end, trailer
 *   trailer = "ULS-SEGM", u64le offset of its segment's first frame (version 3)
 *
 * A compacted session's snapshot (version 3) is an append-only log: the first segment is a whole snapshot,
 * and each later turn appends a delta that says what changed. Tokens and messages grow by what they keep
 * of the state before plus what they add; archived blocks were written once, when they were archived; the
 * resident set (bounded by the KV budget) is written whole, except that a slot holding the same position
 * and the same bytes as a slot of the state before is a reference to it, not a copy. So a turn of a
 * session that has read a million tokens writes about what a turn of a short one does. The trailer lets a
 * reader find the last segment's header from the end of the file (a session's listing). The store
 * rewrites the log as one segment once its deltas outweigh it (sessions.ts).
 *
 * Tensors travel as raw little-endian bytes in msgpack bin fields, a chunk of at most `chunkTokens`
 * slots per frame, so neither writing nor reading ever holds more than one frame beyond the cache itself.
 * The reader trusts nothing: every frame's size is bounded before it is read, its checksum verified, its
 * msgpack checked for plain data (msgpack-guard.ts) before msgpackr decodes it, its fields validated, and
 * the frame sequence must be exactly the one the header implies. Each refusal names its cause. A delta
 * the writer did not finish (a crash while appending) is found as such when the store reads its own
 * log (SnapshotLogTail): the log is cut back to the segments before it.
 */
import { Packr, Unpackr } from "msgpackr";
import { crc32 } from "node:zlib";
import { z } from "zod";
import { gatherSlots } from "../kernels/compaction.ts";
import { sliceSlots, writeSlots, type KvArray } from "../kernels/kv-slots.ts";
import { RuntimeError } from "./errors.ts";
import type { KvDtype } from "./kv-cache.ts";
import { ColdTier, type RawColdBlock } from "./kv/cold-tier.ts";
import { compactionSettings, compactionStateSchema, PINNED, type CompactionState } from "./kv/compaction.ts";
import { storedMessageSchema, templateKwargsSchema, SNAPSHOT_NESTING_DEPTH } from "./message-schema.ts";
import { assertPlainMsgpack } from "./msgpack-guard.ts";

export const SNAPSHOT_MAGIC = new TextEncoder().encode("ULS-SNAP");
/**
 * Version 3: a compacted cache (its slots' tokens and scores, the compactor's state, the archived blocks)
 * as a log of segments; version 1 otherwise. Version 2 (a compacted cache in one segment, no trailer) is read.
 */
export const SNAPSHOT_VERSION = 3;
const READABLE_VERSIONS = [1, 2, 3];
/** Ends every segment of a version-3 file: the magic, then the segment's offset (u64le). */
const TRAILER_MAGIC = new TextEncoder().encode("ULS-SEGM");
const TRAILER_BYTES = 16;
const FRAME_HEAD = 8;
const MAX_HEADER_BYTES = 256 * 1024 * 1024;
const MAX_CHUNK_TOKENS = 1 << 16;

if (new Uint8Array(new Uint16Array([1]).buffer)[0] !== 1) {
  throw new Error("snapshots store tensors little-endian; this platform is big-endian");
}

export type SnapshotErrorCause =
  | "not_a_snapshot"
  | "unsupported_version"
  | "model_mismatch"
  | "checksum_mismatch"
  | "truncated"
  | "malformed"
  | "too_large";

export class SnapshotError extends RuntimeError {
  constructor(
    readonly reason: SnapshotErrorCause,
    message: string,
  ) {
    super("invalid_snapshot", `snapshot refused (${reason}): ${message}`);
    this.name = "SnapshotError";
  }
}

/**
 * What a reader of its own store finds when a delta at the end of the log is unfinished or unreadable (a
 * crash while appending): the log is whole up to `validBytes`, and `damage` says what was wrong after it.
 */
export class SnapshotLogTail extends SnapshotError {
  constructor(
    readonly validBytes: number,
    readonly damage: SnapshotError,
  ) {
    super(damage.reason, `the log's last segment, from byte ${validBytes}, is unfinished or damaged: ${damage.message}`);
    this.name = "SnapshotLogTail";
  }
}

/**
 * Where a session's KV came from: computed by this server from its tokens, or uploaded (only checked for
 * shape, so never lent to another session or request). Snapshots written before the field existed read
 * as "uploaded".
 */
export type KvOrigin = "computed" | "uploaded";

/** What a session carries besides tensors. `compaction` is reserved for the compaction state of a later issue. */
export interface SnapshotMeta {
  id: string;
  createdAt: number;
  updatedAt: number;
  messages: unknown[];
  templateKwargs: Record<string, unknown>;
  compaction: unknown;
  origin: KvOrigin;
  /** Where the long text pieces of the session's last render lie in its tokens (see Engine.encodeChatPieces). */
  pieces: { hash: string; start: number; count: number }[];
}

export interface SnapshotModel {
  fingerprint: string;
  modelId: string;
  kvDtype: KvDtype;
  layers: number;
  kvHeads: number;
  headDim: number;
}

export interface SnapshotData extends SnapshotModel {
  /** Every token read, in order (may be longer than the resident KV). */
  tokens: Int32Array;
  /** Resident KV slots and their original positions. */
  length: number;
  nextPosition: number;
  positions: Int32Array;
  /** Per layer [kvHeads, arraySlots, headDim]; the first `length` slots are the KV. */
  keys: KvArray[];
  values: KvArray[];
  /** Slot dimension of the arrays when they hold spare capacity (runtime-owned storage); default `length`. */
  arraySlots?: number;
  meta: SnapshotMeta;
  /** A compacted cache: null or absent for one that holds every token it read. */
  compaction?: SnapshotCompaction | null;
  /** Reading: the log the snapshot was read from (version 3), null for a single-segment format. */
  log?: SnapshotLog | null;
}

/** A version-3 file as read: its bytes, those of its first (whole) segment, and how many deltas follow. */
export interface SnapshotLog {
  bytes: number;
  baseBytes: number;
  deltas: number;
}

export interface SnapshotCompaction {
  state: CompactionState;
  /** Per resident slot: its token id (-1 unknown) and its attention score. */
  slotTokens: Int32Array;
  slotScores: Float32Array;
  /** Writing: archived block b as stored. Reading: unset (blocks go to SnapshotExpectation.coldBlock). */
  block?: (b: number) => RawColdBlock;
  /** Writing: the archive's name (ColdTier.archiveId): a delta appends blocks only to the archive it extends. */
  archiveId?: string;
}

const metaSchema = z.object({
  id: z.string().max(256),
  createdAt: z.number(),
  updatedAt: z.number(),
  messages: z.array(storedMessageSchema),
  templateKwargs: templateKwargsSchema,
  compaction: z.unknown(),
  origin: z.enum(["computed", "uploaded"]).default("uploaded"),
  pieces: z
    .array(z.object({ hash: z.string().regex(/^[0-9a-f]{64}$/), start: z.number().int().min(0), count: z.number().int().min(1) }))
    .max(100_000)
    .default([]),
});

const headerSchema = z.object({
  t: z.literal("header"),
  version: z.number().int(),
  fingerprint: z.string().max(256),
  modelId: z.string().max(1024),
  kvDtype: z.enum(["float32", "float16"]),
  layers: z.number().int().min(1).max(4096),
  kvHeads: z.number().int().min(1).max(4096),
  headDim: z.number().int().min(1).max(65536),
  tokenCount: z.number().int().min(0),
  length: z.number().int().min(0),
  nextPosition: z.number().int().min(0).max(2 ** 31 - 1),
  chunkTokens: z.number().int().min(1).max(MAX_CHUNK_TOKENS),
  compaction: compactionStateSchema.nullable().default(null),
  meta: metaSchema,
});
type Header = z.infer<typeof headerSchema>;

/** A delta's header: the state after it, and what it keeps of the state before (see the file comment). */
const deltaSchema = z.object({
  t: z.literal("delta"),
  /** 1 for the first delta after the whole segment, then 2, 3, ... */
  seq: z.number().int().min(1),
  tokenCount: z.number().int().min(0),
  tokensKeep: z.number().int().min(0),
  length: z.number().int().min(0),
  nextPosition: z.number().int().min(0).max(2 ** 31 - 1),
  chunkTokens: z.number().int().min(1).max(MAX_CHUNK_TOKENS),
  /** Slots whose KV this delta holds (the slot map's -1 entries); the others refer to slots before. */
  newSlots: z.number().int().min(0),
  compaction: compactionStateSchema,
  meta: metaSchema.omit({ messages: true }).extend({ messagesKeep: z.number().int().min(0), messages: z.array(storedMessageSchema) }),
});
type DeltaHeader = z.infer<typeof deltaSchema>;

const dataFrameSchema = z.object({
  t: z.enum(["tokens", "positions", "kv", "slot_tokens", "slot_scores", "slot_map", "cold"]),
  start: z.number().int().min(0),
  count: z.number().int().min(1),
  layer: z.number().int().min(0).optional(),
  kind: z.enum(["key", "value"]).optional(),
  data: z.instanceof(Uint8Array),
});
const endFrameSchema = z.object({ t: z.literal("end"), frames: z.number().int().min(0) });

const packr = new Packr({ useRecords: false, structuredClone: false });
// Plain data only (see msgpack-guard.ts); 64-bit integers stay numbers so they fail validation, not pass as BigInt.
const unpackr = new Unpackr({ useRecords: false, structuredClone: false, mapsAsObjects: true, int64AsType: "number" });

const bytesOf = (a: ArrayBufferView) => new Uint8Array(a.buffer, a.byteOffset, a.byteLength);

function frame(payload: Record<string, unknown>): Uint8Array {
  return frameOf(packr.pack(payload));
}

function frameOf(body: Uint8Array): Uint8Array {
  const out = new Uint8Array(FRAME_HEAD + body.length);
  const view = new DataView(out.buffer);
  view.setUint32(0, body.length, true);
  view.setUint32(4, crc32(body), true);
  out.set(body, FRAME_HEAD);
  return out;
}

type FramePlan = { t: "tokens" | "positions" | "kv" | "slot_tokens" | "slot_scores" | "slot_map" | "cold"; start: number; count: number; layer?: number; kind?: "key" | "value" };

/** Frames of `count` slots from `start` on, `chunk` at a time. */
function* chunks(t: FramePlan["t"], start: number, end: number, chunk: number): Generator<FramePlan> {
  for (let at = start; at < end; at += chunk) yield { t, start: at, count: Math.min(chunk, end - at) };
}

/** Per chunk of `slots` KV slots, every layer's key and value frames. */
function* kvFrames(slots: number, chunk: number, layers: number): Generator<FramePlan> {
  for (const { start, count } of chunks("kv", 0, slots, chunk)) {
    for (let layer = 0; layer < layers; layer++) {
      yield { t: "kv", start, count, layer, kind: "key" };
      yield { t: "kv", start, count, layer, kind: "value" };
    }
  }
}

/** The planned data frames for a header: what the writer writes and the reader expects, in order. */
function* plan(h: Pick<Header, "tokenCount" | "length" | "chunkTokens" | "layers" | "compaction">): Generator<FramePlan> {
  yield* chunks("tokens", 0, h.tokenCount, h.chunkTokens);
  yield* chunks("positions", 0, h.length, h.chunkTokens);
  yield* kvFrames(h.length, h.chunkTokens, h.layers);
  const c = h.compaction;
  if (!c) return;
  yield* chunks("slot_tokens", 0, h.length, h.chunkTokens);
  yield* chunks("slot_scores", 0, h.length, h.chunkTokens);
  yield* coldFrames(0, c);
}

/**
 * One frame per archived block from `first` on: its positions, token ids, key summary (per layer mins,
 * then maxs; in version 3 only under the keys scorer, which reads them: hasSummaries) and bytes.
 */
function* coldFrames(first: number, c: CompactionState): Generator<FramePlan> {
  for (let b = first; b < c.blocks; b++) yield { t: "cold", start: b, count: c.settings.blockTokens };
}

/** A delta's data frames; `blocksBefore`: the archive's blocks in the state before. */
function* deltaPlan(d: DeltaHeader, blocksBefore: number, layers: number): Generator<FramePlan> {
  yield* chunks("tokens", d.tokensKeep, d.tokenCount, d.chunkTokens);
  yield* chunks("positions", 0, d.length, d.chunkTokens);
  yield* chunks("slot_map", 0, d.length, d.chunkTokens);
  yield* kvFrames(d.newSlots, d.chunkTokens, layers);
  yield* chunks("slot_tokens", 0, d.length, d.chunkTokens);
  yield* chunks("slot_scores", 0, d.length, d.chunkTokens);
  yield* coldFrames(blocksBefore, d.compaction);
}

function trailer(segmentStart: number): Uint8Array {
  const out = new Uint8Array(TRAILER_BYTES);
  out.set(TRAILER_MAGIC);
  new DataView(out.buffer).setBigUint64(8, BigInt(segmentStart), true);
  return out;
}

/** The segment offset a trailer names, or null when the bytes are no trailer. */
export function parseTrailer(bytes: Uint8Array): number | null {
  if (bytes.length !== TRAILER_BYTES || TRAILER_MAGIC.some((b, i) => bytes[i] !== b)) return null;
  const at = new DataView(bytes.buffer, bytes.byteOffset, TRAILER_BYTES).getBigUint64(8, true);
  return at <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(at) : null;
}

/** Whether a snapshot's archived blocks carry key summaries: always before version 3, then only where the keys scorer reads them. */
function hasSummaries(version: number, c: CompactionState): boolean {
  return version < 3 || c.settings.recallScorer === "keys";
}

/** A cold block's frame payload: positions, tokens (int32 each), per layer mins then maxs (float32) if kept, then its bytes. */
function coldPayload(block: RawColdBlock): Uint8Array {
  const parts = [bytesOf(block.positions), bytesOf(block.tokens), ...block.mins.map(bytesOf), ...block.maxs.map(bytesOf), block.data];
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Encodes a snapshot as a sequence of byte chunks (the magic, then one frame each). */
export function* encodeSnapshot(data: SnapshotData, chunkTokens = 4096): Generator<Uint8Array> {
  const header: Header = {
    t: "header",
    version: data.compaction ? SNAPSHOT_VERSION : 1,
    fingerprint: data.fingerprint,
    modelId: data.modelId,
    kvDtype: data.kvDtype,
    layers: data.layers,
    kvHeads: data.kvHeads,
    headDim: data.headDim,
    tokenCount: data.tokens.length,
    length: data.length,
    nextPosition: data.nextPosition,
    chunkTokens,
    compaction: data.compaction?.state ?? null,
    meta: { ...data.meta, messages: data.meta.messages as Header["meta"]["messages"] },
  };
  const headerBody = checkedHeader(header, headerSchema);
  yield SNAPSHOT_MAGIC;
  yield frameOf(headerBody);
  const layout = { heads: data.kvHeads, headDim: data.headDim };
  let frames = 0;
  for (const p of plan(header)) {
    let payload: Uint8Array;
    if (p.t === "tokens") payload = bytesOf(data.tokens.subarray(p.start, p.start + p.count));
    else if (p.t === "positions") payload = bytesOf(data.positions.subarray(p.start, p.start + p.count));
    else if (p.t === "slot_tokens") payload = bytesOf(data.compaction!.slotTokens.subarray(p.start, p.start + p.count));
    else if (p.t === "slot_scores") payload = bytesOf(data.compaction!.slotScores.subarray(p.start, p.start + p.count));
    else if (p.t === "cold") payload = coldPayload(data.compaction!.block!(p.start));
    else {
      const source = (p.kind === "key" ? data.keys : data.values)[p.layer!]!;
      payload = bytesOf(sliceSlots(source, data.arraySlots ?? data.length, p.start, p.count, layout));
    }
    yield frame({ ...p, data: payload });
    frames++;
  }
  yield frame({ t: "end", frames });
  if (header.version >= 3) yield trailer(SNAPSHOT_MAGIC.length);
}

/** A header packed, after the reader's checks ran on it: a snapshot this server writes always loads again. */
function checkedHeader(header: Record<string, unknown>, schema: z.ZodType): Uint8Array {
  const body = packr.pack(header);
  try {
    assertPlainMsgpack(body, SNAPSHOT_NESTING_DEPTH);
  } catch (e) {
    throw new SnapshotError("malformed", `the session cannot be stored: ${(e as Error).message}`);
  }
  const check = schema.safeParse(unpackr.unpack(body));
  if (!check.success) throw new SnapshotError("malformed", `the session cannot be stored: header field ${check.error.issues[0]!.path.join(".")}: ${check.error.issues[0]!.message}`);
  return body;
}

/** How a state is written as a delta after the state before it (planSnapshotDelta). */
export interface SnapshotDeltaPlan {
  tokensKeep: number;
  messagesKeep: number;
  /** Archived blocks of the state before (the delta writes those after them). */
  blocksBefore: number;
  /** Per slot of the new state: the slot of the state before that holds the same position and bytes, or -1. */
  slotMap: Int32Array;
  newSlots: number;
  /** About what the delta will take (its tensors, tokens and blocks; not its messages). */
  bytes: number;
}

const sameJson = (a: unknown, b: unknown) => a === b || JSON.stringify(a) === JSON.stringify(b);

/**
 * Whether `next` can be written as a delta after `previous` (the state the log holds now), and how: both
 * compacted under the same settings, and `next`'s archive the same archive grown (or `previous` had none).
 * Null when not: the caller writes the whole snapshot. Cost: a pass over the resident slots that share a
 * position (their bytes compared), none over what was read.
 */
export function planSnapshotDelta(previous: SnapshotData, next: SnapshotData): SnapshotDeltaPlan | null {
  const pc = previous.compaction;
  const nc = next.compaction;
  if (!pc || !nc || !sameJson(pc.state.settings, nc.state.settings)) return null;
  const blocksBefore = pc.state.blocks;
  if (blocksBefore > 0 && (pc.archiveId === undefined || pc.archiveId !== nc.archiveId || nc.state.blocks < blocksBefore)) return null;
  let tokensKeep = 0;
  const limit = Math.min(previous.tokens.length, next.tokens.length);
  while (tokensKeep < limit && previous.tokens[tokensKeep] === next.tokens[tokensKeep]) tokensKeep++;
  let messagesKeep = 0;
  const pm = previous.meta.messages;
  const nm = next.meta.messages;
  while (messagesKeep < Math.min(pm.length, nm.length) && sameJson(pm[messagesKeep], nm[messagesKeep])) messagesKeep++;

  const bySlot = new Map<number, number>();
  for (let j = 0; j < previous.length; j++) bySlot.set(previous.positions[j]!, j);
  const slotMap = new Int32Array(next.length).fill(-1);
  const d = next.headDim;
  const prevSlots = previous.arraySlots ?? previous.length;
  const nextSlots = next.arraySlots ?? next.length;
  let newSlots = 0;
  for (let i = 0; i < next.length; i++) {
    const j = bySlot.get(next.positions[i]!);
    let same = j !== undefined;
    for (let l = 0; same && l < next.layers; l++) {
      for (const [a, b] of [[previous.keys[l]!, next.keys[l]!], [previous.values[l]!, next.values[l]!]] as const) {
        for (let h = 0; same && h < next.kvHeads; h++) {
          const x = (h * prevSlots + j!) * d;
          const y = (h * nextSlots + i) * d;
          for (let e = 0; e < d; e++) {
            if (a[x + e] !== b[y + e]) {
              same = false;
              break;
            }
          }
        }
      }
    }
    if (same) slotMap[i] = j!;
    else newSlots++;
  }
  const c = nc.state.settings;
  const blockFrame = c.blockTokens * 8 + ColdTier.blockBytes(next, c.coldFormat, c.blockTokens);
  const slotBytes = 2 * next.layers * next.kvHeads * d * (next.kvDtype === "float16" ? 2 : 4);
  const bytes = (next.tokens.length - tokensKeep) * 4 + next.length * 16 + newSlots * slotBytes + (nc.state.blocks - blocksBefore) * blockFrame;
  return { tokensKeep, messagesKeep, blocksBefore, slotMap, newSlots, bytes };
}

/**
 * Encodes `next` as a delta segment (numbered `seq`, starting at byte `at` of the log) after the state the
 * plan was made against.
 */
export function* encodeSnapshotDelta(next: SnapshotData, p: SnapshotDeltaPlan, seq: number, at: number, chunkTokens = 4096): Generator<Uint8Array> {
  const c = next.compaction!;
  const header: DeltaHeader = {
    t: "delta",
    seq,
    tokenCount: next.tokens.length,
    tokensKeep: p.tokensKeep,
    length: next.length,
    nextPosition: next.nextPosition,
    chunkTokens,
    newSlots: p.newSlots,
    compaction: c.state,
    meta: { ...next.meta, messagesKeep: p.messagesKeep, messages: next.meta.messages.slice(p.messagesKeep) as DeltaHeader["meta"]["messages"] },
  };
  yield frameOf(checkedHeader(header, deltaSchema));
  const layout = { heads: next.kvHeads, headDim: next.headDim };
  const slots = next.arraySlots ?? next.length;
  const fresh = new Int32Array(p.newSlots);
  for (let i = 0, k = 0; i < next.length; i++) if (p.slotMap[i] === -1) fresh[k++] = i;
  let frames = 0;
  for (const f of deltaPlan(header, p.blocksBefore, next.layers)) {
    let payload: Uint8Array;
    if (f.t === "tokens") payload = bytesOf(next.tokens.subarray(f.start, f.start + f.count));
    else if (f.t === "positions") payload = bytesOf(next.positions.subarray(f.start, f.start + f.count));
    else if (f.t === "slot_map") payload = bytesOf(p.slotMap.subarray(f.start, f.start + f.count));
    else if (f.t === "slot_tokens") payload = bytesOf(c.slotTokens.subarray(f.start, f.start + f.count));
    else if (f.t === "slot_scores") payload = bytesOf(c.slotScores.subarray(f.start, f.start + f.count));
    else if (f.t === "cold") payload = coldPayload(c.block!(f.start));
    else {
      const source = (f.kind === "key" ? next.keys : next.values)[f.layer!]!;
      const out = source instanceof Float32Array ? new Float32Array(layout.heads * f.count * layout.headDim) : new Uint16Array(layout.heads * f.count * layout.headDim);
      gatherSlots(source, slots, fresh.subarray(f.start, f.start + f.count), f.count, out, f.count, 0, layout);
      payload = bytesOf(out);
    }
    yield frame({ ...f, data: payload });
    frames++;
  }
  yield frame({ t: "end", frames });
  yield trailer(at);
}

/** KV frames whose regions are prefaulted ahead of the decoder (see ByteSource.prefault). */
const PREFAULT_AHEAD = 16;

/** Reads exactly n bytes, or fewer at the end of the data. */
export interface ByteSource {
  read(n: number): Promise<Uint8Array>;
  /** Like read, into a buffer the source reuses: the bytes are valid until the next read (saves allocating every frame). */
  readTemporary?(n: number): Promise<Uint8Array>;
  /** Total bytes, where known: lets the reader refuse a header that promises more than the data holds before allocating for it. */
  readonly size?: number;
  /**
   * Brings fresh memory in (its pages faulted, zero-filled) off the main thread, so that the decoder's
   * writes into a restored cache's new storage do not fault page by page; never rejects.
   */
  prefault?(region: Uint8Array): Promise<void>;
}

export interface SnapshotExpectation extends SnapshotModel {
  /** Most tokens a snapshot may hold (the server's context length bounds what it can use). */
  maxTokens: number;
  /** Token ids must be below this. */
  vocabSize: number;
  /**
   * Called with the KV bytes the snapshot will occupy once its header is read, before they are allocated:
   * throws to refuse (the memory budget). Called again for each delta of a log, with the bytes of the
   * resident set after it (the one before is dropped once the delta is read).
   */
  reserveKv?: (bytes: number) => void;
  /**
   * Where to write the KV once the header is read: per layer [kvHeads, slots, headDim] arrays with
   * slots >= length (a cache's own storage, so a restore copies the KV once). Default: new arrays of
   * exactly `length` slots. Called again for each delta of a log (new arrays: the delta copies slots
   * from the arrays before).
   */
  kvArrays?: (length: number) => { keys: KvArray[]; values: KvArray[]; slots: number };
  /**
   * The snapshot is one this server wrote to its own store (from KV it computed, or from an upload it
   * checked): its KV values are not checked again for being finite, the slowest check (CRC-32 still
   * catches corruption). Never set for an upload.
   */
  ownStore?: boolean;
  /**
   * Called with a compacted snapshot's compaction state (after the header is checked), and again with
   * each delta's; returns where the archived blocks that follow go, one at a time, each checked (the
   * reader keeps none).
   */
  onCompaction?: (state: CompactionState) => (block: RawColdBlock) => void;
  /** Read only this many bytes of the source (a log cut back before a damaged delta: SnapshotLogTail). */
  limitBytes?: number;
}

/** A source that counts what was read from it (a log's segment offsets), and ends at `limit`. */
class CountingSource implements ByteSource {
  offset = 0;
  readonly size?: number;
  constructor(
    private readonly inner: ByteSource,
    private readonly limit = Infinity,
  ) {
    this.size = inner.size === undefined ? undefined : Math.min(inner.size, limit);
    if (inner.prefault) this.prefault = (region) => inner.prefault!(region);
  }
  prefault?: (region: Uint8Array) => Promise<void>;
  async read(n: number): Promise<Uint8Array> {
    const bytes = await this.inner.read(Math.max(0, Math.min(n, this.limit - this.offset)));
    this.offset += bytes.length;
    return bytes;
  }
  async readTemporary(n: number): Promise<Uint8Array> {
    const take = Math.max(0, Math.min(n, this.limit - this.offset));
    const bytes = await (this.inner.readTemporary ? this.inner.readTemporary(take) : this.inner.read(take));
    this.offset += bytes.length;
    return bytes;
  }
}

/**
 * One archived block from its frame: positions strictly increasing and after the previous block's, before
 * the archive's end; token ids in the vocabulary (or -1); key summaries finite with min <= max; its bytes
 * (copied out of the read buffer) finite where `checkValues` (int8: the scales; float32: every value).
 */
function readColdBlock(payload: Uint8Array, h: Header, c: CompactionState, expect: SnapshotExpectation, checkValues: boolean, what: string, lastArchived: number): RawColdBlock {
  const B = c.settings.blockTokens;
  const n = h.kvHeads * h.headDim;
  // Aligned, and owned (the read buffer is reused): a copy at offset 0 of a buffer of its own. Not
  // payload.slice(): on a Node Buffer (a source may yield them) that is a view into the read buffer.
  const bytes = new Uint8Array(payload);
  let at = 0;
  const ints = (count: number) => {
    const a = new Int32Array(bytes.buffer, at, count);
    at += count * 4;
    return a;
  };
  const floats = (count: number) => {
    const a = new Float32Array(bytes.buffer, at, count);
    at += count * 4;
    return a;
  };
  const positions = ints(B);
  const tokens = ints(B);
  const summaryLayers = hasSummaries(h.version, c) ? h.layers : 0;
  const mins = Array.from({ length: summaryLayers }, () => floats(n));
  const maxs = Array.from({ length: summaryLayers }, () => floats(n));
  const data = bytes.subarray(at);
  let previous = lastArchived;
  for (let i = 0; i < B; i++) {
    const p = positions[i]!;
    if (p <= previous || p >= c.archivedUpTo) throw new SnapshotError("malformed", `${what}: position ${p} is out of order or past the archive's end`);
    previous = p;
    if (tokens[i]! < -1 || tokens[i]! >= expect.vocabSize) throw new SnapshotError("malformed", `${what}: token id ${tokens[i]} is outside the vocabulary`);
  }
  for (let l = 0; l < summaryLayers; l++) {
    for (let j = 0; j < n; j++) {
      if (!(mins[l]![j]! <= maxs[l]![j]!) || !Number.isFinite(mins[l]![j]!) || !Number.isFinite(maxs[l]![j]!)) throw new SnapshotError("malformed", `${what}: its key summary is not finite or min > max`);
    }
  }
  if (checkValues) {
    const per = h.kvHeads * B * h.headDim;
    if (c.settings.coldFormat === "int8") {
      const groups = per / h.headDim;
      for (let seg = 0; seg < 2 * h.layers; seg++) {
        const scales = new Float32Array(data.slice(seg * (per + groups * 4) + per, (seg + 1) * (per + groups * 4)).buffer);
        for (const x of scales) if (!(x >= 0) || !Number.isFinite(x)) throw new SnapshotError("malformed", `${what}: a quantization scale is negative or not finite`);
      }
    } else if (!allFinite(new Float32Array(data.slice().buffer))) throw new SnapshotError("malformed", `${what} holds KV values that are not finite`);
  }
  return { data: data.slice(), positions: positions.slice(), tokens: tokens.slice(), mins: mins.map((m) => m.slice()), maxs: maxs.map((m) => m.slice()) };
}

/** Whether every value is finite: float32 directly, float16 by its exponent bits (all ones is Inf or NaN). */
function allFinite(a: KvArray): boolean {
  if (a instanceof Uint16Array) {
    for (let i = 0; i < a.length; i++) if ((a[i]! & 0x7c00) === 0x7c00) return false;
    return true;
  }
  // x * 0 is 0 for every finite x and NaN for Inf and NaN, so one sum tells, without a branch per value.
  let sum = 0;
  for (let i = 0; i < a.length; i++) sum += a[i]! * 0;
  return sum === 0;
}

/** One frame, CRC-checked and unpacked; with `temporary`, binary fields may be views the next read overwrites. */
async function readFrame(source: ByteSource, index: number, maxBytes: number, temporary = false): Promise<Record<string, unknown>> {
  const frame = await readFrameOrEnd(source, index, maxBytes, temporary);
  if (!frame) throw new SnapshotError("truncated", `the data ends before frame ${index}`);
  return frame;
}

/** Like readFrame, but null where the data ends cleanly before the frame. */
async function readFrameOrEnd(source: ByteSource, index: number, maxBytes: number, temporary = false): Promise<Record<string, unknown> | null> {
  const head = await source.read(FRAME_HEAD);
  if (head.length === 0) return null;
  if (head.length < FRAME_HEAD) throw new SnapshotError("truncated", `the data ends before frame ${index}`);
  const view = new DataView(head.buffer, head.byteOffset, FRAME_HEAD);
  const length = view.getUint32(0, true);
  const expectedCrc = view.getUint32(4, true);
  if (length > maxBytes) throw new SnapshotError("malformed", `frame ${index} declares ${length} bytes, more than the ${maxBytes} it can hold`);
  const body = await (temporary && source.readTemporary ? source.readTemporary(length) : source.read(length));
  if (body.length < length) throw new SnapshotError("truncated", `frame ${index} has ${body.length} of its ${length} bytes`);
  if (crc32(body) !== expectedCrc) throw new SnapshotError("checksum_mismatch", `frame ${index} fails its CRC-32 check`);
  try {
    assertPlainMsgpack(body, SNAPSHOT_NESTING_DEPTH);
    const value: unknown = unpackr.unpack(body);
    if (!value || typeof value !== "object" || Array.isArray(value)) throw new Error("not a map");
    return value as Record<string, unknown>;
  } catch (e) {
    throw new SnapshotError("malformed", `frame ${index} is not a plain msgpack map: ${(e as Error).message}`);
  }
}

/** Decodes and validates a snapshot for the model described by `expect`. */
export async function decodeSnapshot(input: ByteSource, expect: SnapshotExpectation): Promise<SnapshotData> {
  const source = new CountingSource(input, expect.limitBytes);
  const magic = await source.read(SNAPSHOT_MAGIC.length);
  if (magic.length < SNAPSHOT_MAGIC.length || magic.some((b, i) => b !== SNAPSHOT_MAGIC[i])) {
    throw new SnapshotError("not_a_snapshot", "the data does not start with the snapshot magic bytes");
  }
  const rawHeader = await readFrame(source, 0, MAX_HEADER_BYTES);
  if (rawHeader.t === "header" && typeof rawHeader.version === "number" && !READABLE_VERSIONS.includes(rawHeader.version)) {
    throw new SnapshotError("unsupported_version", `format version ${rawHeader.version}; this server reads versions ${READABLE_VERSIONS.join(", ")}`);
  }
  const parsed = headerSchema.safeParse(rawHeader);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    throw new SnapshotError("malformed", `header field ${issue.path.join(".") || "(root)"}: ${issue.message}`);
  }
  const h = parsed.data;
  const mismatch = (["fingerprint", "kvDtype", "layers", "kvHeads", "headDim"] as const).find((k) => h[k] !== expect[k]);
  if (mismatch) {
    throw new SnapshotError(
      "model_mismatch",
      `it was made by model ${h.modelId} (${mismatch} ${String(h[mismatch])}); this server runs ${expect.modelId} (${mismatch} ${String(expect[mismatch])})`,
    );
  }
  const checkSize = (tokenCount: number, length: number) => {
    if (length > tokenCount || tokenCount > expect.maxTokens) {
      throw new SnapshotError("too_large", `it holds ${tokenCount} tokens (${length} resident); this server takes at most ${expect.maxTokens}`);
    }
  };
  checkSize(h.tokenCount, h.length);
  let c = h.compaction;
  if (c) {
    if (h.version < 2) throw new SnapshotError("malformed", "a version 1 snapshot cannot hold a compacted cache");
    checkCompaction(c, h.nextPosition, h.length);
  } else if (h.version >= 2) throw new SnapshotError("malformed", `a version ${h.version} snapshot must hold a compacted cache`);
  const blockBytes = c ? ColdTier.blockBytes({ layers: h.layers, kvHeads: h.kvHeads, headDim: h.headDim }, c.settings.coldFormat, c.settings.blockTokens) : 0;

  const bytesPerElement = h.kvDtype === "float16" ? 2 : 4;
  const layout = { heads: h.kvHeads, headDim: h.headDim };
  const slotValues = h.kvHeads * h.headDim;
  const kvBytes = (length: number) => length * slotValues * bytesPerElement * h.layers * 2;
  // A short file with a header that claims a huge cache must not make us allocate that cache first.
  const payloadBytes = h.tokenCount * 4 + h.length * 4 + kvBytes(h.length) + (c ? h.length * 8 + c.blocks * blockBytes : 0);
  if (source.size !== undefined && source.size < payloadBytes) {
    throw new SnapshotError("truncated", `the header promises ${payloadBytes} bytes of tokens and tensors but the data holds ${source.size} bytes in all`);
  }
  expect.reserveKv?.(kvBytes(h.length));
  const alloc = (length: number) => () => (h.kvDtype === "float16" ? new Uint16Array(length * slotValues) : new Float32Array(length * slotValues));
  const kvTarget = (length: number) => {
    const target = expect.kvArrays?.(length) ?? { keys: Array.from({ length: h.layers }, alloc(length)), values: Array.from({ length: h.layers }, alloc(length)), slots: length };
    if (target.slots < length || target.keys.length !== h.layers || target.values.length !== h.layers) throw new Error("decodeSnapshot: kvArrays gave arrays that cannot hold the snapshot");
    return target;
  };

  // The state as read so far: the first segment's, then each delta's.
  let tokens = new Int32Array(h.tokenCount);
  let positions = new Int32Array(h.length);
  let { keys, values, slots } = kvTarget(h.length);
  let length = h.length;
  let nextPosition = h.nextPosition;
  let slotTokens = new Int32Array(c ? h.length : 0);
  let slotScores = new Float32Array(c ? h.length : 0);
  let meta = h.meta as SnapshotMeta;
  let lastArchived = -1;
  let coldSink = c ? expect.onCompaction?.(c) : undefined;
  const coldFrameBytes = c ? c.settings.blockTokens * 8 + (hasSummaries(h.version, c) ? 2 * h.layers * slotValues * 4 : 0) + blockBytes : 0;
  const maxFrame = (chunkTokens: number) => Math.max(chunkTokens * slotValues * bytesPerElement, chunkTokens * 4, coldFrameBytes) + 256;
  const checkSink = () => {
    if (c && c.blocks > 0 && !coldSink) throw new SnapshotError("malformed", "this reader cannot take archived KV blocks");
  };
  checkSink();

  let realign = new Uint8Array(0);
  let index = 1;
  /**
   * Reads the next frame, which must be `expected`: its data checked for size, as a view aligned for its
   * element type (in the read buffer, or a copy in a buffer reused from frame to frame: fresh memory for
   * every frame costs a page fault per 4 KB). Valid until the next read.
   */
  const nextFrame = async (expected: FramePlan, chunkTokens: number): Promise<{ data: Uint8Array; elements: number; what: string }> => {
    const raw = await readFrame(source, index, maxFrame(chunkTokens), true);
    const f = dataFrameSchema.safeParse(raw);
    const what = `frame ${index} (${expected.t}${expected.layer !== undefined ? ` layer ${expected.layer} ${expected.kind}` : ""} at ${expected.t === "cold" ? "block" : "slot"} ${expected.start})`;
    index++;
    if (!f.success || f.data.t !== expected.t || f.data.start !== expected.start || f.data.count !== expected.count || f.data.layer !== expected.layer || f.data.kind !== expected.kind) {
      throw new SnapshotError("malformed", `${what} is missing or out of order`);
    }
    const { data, count } = f.data;
    const elementBytes = expected.t === "kv" ? slotValues * bytesPerElement : expected.t === "cold" ? coldFrameBytes / count : 4;
    if (data.byteLength !== count * elementBytes) throw new SnapshotError("malformed", `${what} holds ${data.byteLength} bytes, expected ${count * elementBytes}`);
    let aligned = data;
    if (data.byteOffset % 4 !== 0) {
      if (realign.length < data.length) realign = new Uint8Array(data.length);
      realign.set(data);
      aligned = realign.subarray(0, data.length);
    }
    return { data: aligned, elements: aligned.byteLength / (expected.t === "kv" ? bytesPerElement : 4), what };
  };
  const ints = (d: Uint8Array, n: number) => new Int32Array(d.buffer, d.byteOffset, n);
  const kvBlock = (d: Uint8Array, n: number, what: string) => {
    const block = bytesPerElement === 2 ? new Uint16Array(d.buffer, d.byteOffset, n) : new Float32Array(d.buffer, d.byteOffset, n);
    if (!expect.ownStore && !allFinite(block)) throw new SnapshotError("malformed", `${what} holds KV values that are not finite (NaN or infinity)`);
    return block;
  };
  const checkTokens = (ids: Int32Array, from: number) => {
    for (let i = 0; i < ids.length; i++) {
      if (ids[i]! < 0 || ids[i]! >= expect.vocabSize) throw new SnapshotError("malformed", `token ${from + i} is id ${ids[i]}, outside the vocabulary (0..${expect.vocabSize - 1})`);
    }
  };
  const coldBlock = (d: Uint8Array, what: string) => {
    const block = readColdBlock(d, h, c!, expect, !expect.ownStore, what, lastArchived);
    lastArchived = block.positions[block.positions.length - 1]!;
    coldSink!(block);
  };
  /**
   * Stores a frame of per-token or per-slot values into the arrays of the state being read (a segment's or
   * a delta's), or takes an archived block; false for a KV frame, which the caller places.
   */
  const storeFrame = (
    f: FramePlan,
    frame: { data: Uint8Array; elements: number; what: string },
    into: { tokens: Int32Array; positions: Int32Array; slotTokens: Int32Array; slotScores: Float32Array; slotMap?: Int32Array },
  ): boolean => {
    const { data, elements, what } = frame;
    if (f.t === "tokens") {
      const ids = ints(data, elements);
      checkTokens(ids, f.start);
      into.tokens.set(ids, f.start);
    } else if (f.t === "positions") into.positions.set(ints(data, elements), f.start);
    else if (f.t === "slot_map") into.slotMap!.set(ints(data, elements), f.start);
    else if (f.t === "slot_tokens") into.slotTokens.set(ints(data, elements), f.start);
    else if (f.t === "slot_scores") into.slotScores.set(new Float32Array(data.buffer, data.byteOffset, elements), f.start);
    else if (f.t === "cold") coldBlock(data, what);
    else return false;
    return true;
  };
  const endSegment = async (frames: number, segmentStart: number | null) => {
    const end = endFrameSchema.safeParse(await readFrame(source, index, 1024));
    if (!end.success || end.data.frames !== frames) throw new SnapshotError("malformed", `frame ${index} should end the segment after ${frames} data frames`);
    index++;
    if (segmentStart === null) return;
    const at = parseTrailer(await source.read(TRAILER_BYTES));
    if (at !== segmentStart) throw new SnapshotError(at === null ? "truncated" : "malformed", `the segment from byte ${segmentStart} lacks its trailer`);
  };

  // KV regions are prefaulted (where the source can) a few frames ahead of the decoder, which waits for a
  // frame's regions before writing them: faulting 33 MB of fresh pages costs ~20 ms on one thread here.
  const baseKvFrames = [...plan(h)].filter((p) => p.t === "kv");
  const prefaulted: (Promise<unknown> | undefined)[] = [];
  const headBytes = (count: number) => count * h.headDim * bytesPerElement;
  const prefault = (k: number) => {
    const p = baseKvFrames[k];
    if (!source.prefault || !p || prefaulted[k]) return;
    const a = (p.kind === "key" ? keys : values)[p.layer!]!;
    const regions = Array.from({ length: h.kvHeads }, (_, head) => new Uint8Array(a.buffer, a.byteOffset + headBytes(head * slots + p.start), headBytes(p.count)));
    prefaulted[k] = Promise.all(regions.map((r) => source.prefault!(r)));
  };
  for (let k = 0; k < PREFAULT_AHEAD; k++) prefault(k);
  let kvFrame = 0;

  let frames = 0;
  for (const expected of plan(h)) {
    const frame = await nextFrame(expected, h.chunkTokens);
    if (!storeFrame(expected, frame, { tokens, positions, slotTokens, slotScores })) {
      prefault(kvFrame + PREFAULT_AHEAD);
      await prefaulted[kvFrame++];
      const block = kvBlock(frame.data, frame.elements, frame.what);
      writeSlots((expected.kind === "key" ? keys : values)[expected.layer!]!, slots, expected.start, block, expected.count, layout);
    }
    frames++;
  }
  await endSegment(frames, h.version >= 3 ? SNAPSHOT_MAGIC.length : null);
  const baseBytes = source.offset;

  /** Reads one delta (its header already read) into the state. */
  const readDelta = async (raw: Record<string, unknown>, seq: number, segmentStart: number) => {
    const parsedDelta = deltaSchema.safeParse(raw);
    if (!parsedDelta.success) {
      const issue = parsedDelta.error.issues[0]!;
      throw new SnapshotError("malformed", `delta ${seq}: header field ${issue.path.join(".") || "(root)"}: ${issue.message}`);
    }
    const d = parsedDelta.data;
    const bad = (message: string) => new SnapshotError("malformed", `delta ${seq}: ${message}`);
    if (d.seq !== seq) throw bad(`it is numbered ${d.seq}`);
    checkSize(d.tokenCount, d.length);
    if (d.tokensKeep > tokens.length || d.tokensKeep > d.tokenCount) throw bad(`it keeps ${d.tokensKeep} tokens of ${tokens.length}`);
    if (d.meta.messagesKeep > meta.messages.length) throw bad(`it keeps ${d.meta.messagesKeep} messages of ${meta.messages.length}`);
    if (d.newSlots > d.length) throw bad(`${d.newSlots} new slots of ${d.length}`);
    if (!sameJson(d.compaction.settings, c!.settings)) throw bad("its compaction settings differ from the log's");
    if (d.compaction.blocks < c!.blocks) throw bad("its archive has fewer blocks than before");
    checkCompaction(d.compaction, d.nextPosition, d.length);
    if (source.size !== undefined && source.size - source.offset < (d.tokenCount - d.tokensKeep) * 4 + d.length * 16 + kvBytes(d.newSlots) + (d.compaction.blocks - c!.blocks) * blockBytes) {
      throw new SnapshotError("truncated", `delta ${seq} promises more bytes than the data holds`);
    }
    expect.reserveKv?.(kvBytes(d.length));
    const before = { keys, values, slots, length };
    const target = kvTarget(d.length);
    const nextTokens = new Int32Array(d.tokenCount);
    nextTokens.set(tokens.subarray(0, d.tokensKeep));
    const nextPositions = new Int32Array(d.length);
    const slotMap = new Int32Array(d.length);
    const nextSlotTokens = new Int32Array(d.length);
    const nextSlotScores = new Float32Array(d.length);
    const blocksBefore = c!.blocks;
    c = d.compaction;
    coldSink = expect.onCompaction?.(c);
    checkSink();
    let fresh: Int32Array | null = null;
    const freshSlots = () => {
      if (fresh) return fresh;
      fresh = new Int32Array(d.newSlots);
      let k = 0;
      for (let i = 0; i < d.length; i++) {
        const j = slotMap[i]!;
        if (j === -1) {
          if (k === d.newSlots) throw bad(`its slot map has more new slots than ${d.newSlots}`);
          fresh[k++] = i;
        } else if (j < 0 || j >= before.length) throw bad(`slot ${i} refers to slot ${j}, not one of the ${before.length} before`);
      }
      if (k !== d.newSlots) throw bad(`its slot map has ${k} new slots, the header says ${d.newSlots}`);
      return fresh;
    };
    let deltaFrames = 0;
    const into = { tokens: nextTokens, positions: nextPositions, slotTokens: nextSlotTokens, slotScores: nextSlotScores, slotMap };
    for (const expected of deltaPlan(d, blocksBefore, h.layers)) {
      const frame = await nextFrame(expected, d.chunkTokens);
      if (!storeFrame(expected, frame, into)) {
        // New slots' KV, [kvHeads, count, headDim], scattered to where the slot map puts them.
        const { start, count } = expected;
        const block = kvBlock(frame.data, frame.elements, frame.what);
        const layer = (expected.kind === "key" ? target.keys : target.values)[expected.layer!]!;
        const at = freshSlots();
        for (let head = 0; head < h.kvHeads; head++) {
          for (let s = 0; s < count; s++) {
            const from = (head * count + s) * h.headDim;
            layer.set(block.subarray(from, from + h.headDim), (head * target.slots + at[start + s]!) * h.headDim);
          }
        }
      }
      deltaFrames++;
    }
    freshSlots();
    await endSegment(deltaFrames, segmentStart);
    // Slots the state before holds with the same bytes.
    for (let l = 0; l < h.layers; l++) {
      for (const [from, into] of [[before.keys[l]!, target.keys[l]!], [before.values[l]!, target.values[l]!]] as const) {
        for (let i = 0; i < d.length; i++) {
          const j = slotMap[i]!;
          if (j < 0) continue;
          for (let head = 0; head < h.kvHeads; head++) {
            const a = (head * before.slots + j) * h.headDim;
            into.set(from.subarray(a, a + h.headDim), (head * target.slots + i) * h.headDim);
          }
        }
      }
    }
    ({ keys, values, slots } = target);
    tokens = nextTokens;
    positions = nextPositions;
    slotTokens = nextSlotTokens;
    slotScores = nextSlotScores;
    length = d.length;
    nextPosition = d.nextPosition;
    const { messagesKeep, messages, ...rest } = d.meta;
    meta = { ...rest, messages: [...meta.messages.slice(0, messagesKeep), ...messages] } as SnapshotMeta;
  };

  let deltas = 0;
  if (h.version >= 3) {
    for (;;) {
      const segmentStart = source.offset;
      try {
        const raw = await readFrameOrEnd(source, index, MAX_HEADER_BYTES);
        if (!raw) break;
        index++;
        await readDelta(raw, deltas + 1, segmentStart);
      } catch (e) {
        // This server's own log, damaged from this delta on (a crash while it was appended): the caller
        // cuts it back to the deltas before. Size and model refusals are about the server, not the log.
        if (expect.ownStore && e instanceof SnapshotError && e.reason !== "too_large" && e.reason !== "model_mismatch") throw new SnapshotLogTail(segmentStart, e);
        throw e;
      }
      deltas++;
    }
  } else if ((await source.read(1)).length > 0) throw new SnapshotError("malformed", "data continues after the end frame");

  if (!c) {
    if (length > 0 && positions[0]! < 0) throw new SnapshotError("malformed", `slot 0 has the negative position ${positions[0]}`);
    for (let i = 1; i < length; i++) {
      if (positions[i]! <= positions[i - 1]!) throw new SnapshotError("malformed", `slot positions are not increasing at slot ${i}`);
    }
    if (length > 0 && positions[length - 1]! >= nextPosition) throw new SnapshotError("malformed", "nextPosition is not past the last slot's position");
  } else {
    // A compacted cache's slots are in no particular order (recalled blocks come last), but each position
    // is one token's: distinct, and before nextPosition.
    const seen = new Set<number>();
    let pinned = 0;
    for (let i = 0; i < length; i++) {
      const p = positions[i]!;
      if (p < 0 || p >= nextPosition || seen.has(p)) throw new SnapshotError("malformed", `slot ${i} has position ${p}, negative, repeated or not before nextPosition`);
      seen.add(p);
      const t = slotTokens[i]!;
      if (t < -1 || t >= expect.vocabSize) throw new SnapshotError("malformed", `slot ${i} has token id ${t}, outside the vocabulary`);
      const score = slotScores[i]!;
      if (!(score >= 0 && score <= PINNED)) throw new SnapshotError("malformed", `slot ${i} has the score ${score}`);
      if (score >= PINNED) pinned++;
    }
    if (pinned !== c.pinned) throw new SnapshotError("malformed", `${pinned} slots are pinned, the compaction state says ${c.pinned}`);
    if (c.blocks > 0 && lastArchived + 1 !== c.archivedUpTo) throw new SnapshotError("malformed", "the archived blocks end elsewhere than the compaction state says");
  }

  return {
    fingerprint: h.fingerprint,
    modelId: h.modelId,
    kvDtype: h.kvDtype,
    layers: h.layers,
    kvHeads: h.kvHeads,
    headDim: h.headDim,
    tokens,
    length,
    nextPosition,
    positions,
    keys,
    values,
    arraySlots: slots,
    meta,
    compaction: c ? { state: c, slotTokens, slotScores } : null,
    log: h.version >= 3 ? { bytes: source.offset, baseBytes, deltas } : null,
  };
}

/** Compaction state a segment may hold: settings that can work, consistent with its cache. */
function checkCompaction(c: CompactionState, nextPosition: number, length: number): void {
  try {
    compactionSettings(c.settings.policy, c.settings.budget, c.settings);
  } catch (e) {
    throw new SnapshotError("malformed", `compaction settings: ${(e as Error).message}`);
  }
  if (c.blocks > 0 && !c.settings.recall) throw new SnapshotError("malformed", "archived KV blocks without a recall tier");
  if (c.archivedUpTo > nextPosition || c.pinned > length) throw new SnapshotError("malformed", "compaction state is inconsistent with the cache");
}

/** What a session's listing shows, from a snapshot's headers alone. */
export interface SnapshotSummary {
  modelId: string;
  kvDtype: KvDtype;
  layers: number;
  kvHeads: number;
  headDim: number;
  tokenCount: number;
  length: number;
  compaction: CompactionState | null;
  createdAt: number;
  updatedAt: number;
  messages: number;
  /** False when the file ends in an unfinished delta (a crash while appending: the next read cuts it off). */
  whole: boolean;
}

/**
 * Reads a snapshot's headers only (for listing stored sessions without loading their tensors): the first
 * segment's, and for a log the last delta's, found through the trailer at the end of the file. A log whose
 * end is damaged (the next read of the session cuts it back) shows its last readable state or its first.
 */
export async function readSnapshotSummary(readAt: (offset: number, n: number) => Promise<Uint8Array>, size: number): Promise<SnapshotSummary> {
  const at = (offset: number): ByteSource => ({
    read: async (n) => {
      const bytes = await readAt(offset, n);
      offset += bytes.length;
      return bytes;
    },
  });
  const base = at(0);
  const magic = await base.read(SNAPSHOT_MAGIC.length);
  if (magic.length < SNAPSHOT_MAGIC.length || magic.some((b, i) => b !== SNAPSHOT_MAGIC[i])) throw new SnapshotError("not_a_snapshot", "bad magic bytes");
  const parsed = headerSchema.safeParse(await readFrame(base, 0, MAX_HEADER_BYTES));
  if (!parsed.success) throw new SnapshotError("malformed", "unreadable header");
  const h = parsed.data;
  const summary: SnapshotSummary = { ...h, createdAt: h.meta.createdAt, updatedAt: h.meta.updatedAt, messages: h.meta.messages.length, whole: true };
  if (h.version < 3) return summary;
  const last = size >= TRAILER_BYTES ? parseTrailer(await readAt(size - TRAILER_BYTES, TRAILER_BYTES)) : null;
  if (last === SNAPSHOT_MAGIC.length) return summary;
  if (last === null || last >= size) return { ...summary, whole: false };
  try {
    const d = deltaSchema.parse(await readFrame(at(last), 0, MAX_HEADER_BYTES));
    return { ...summary, tokenCount: d.tokenCount, length: d.length, compaction: d.compaction, updatedAt: d.meta.updatedAt, messages: d.meta.messagesKeep + d.meta.messages.length };
  } catch {
    return { ...summary, whole: false };
  }
}
