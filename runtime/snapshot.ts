/**
 * Context snapshots: a session's token history, its KV cache (with every slot's original position), its
 * messages and room for compaction state, in a format that streams both ways.
 *
 *   file    = MAGIC (8 bytes "ULS-SNAP") frame*
 *   frame   = u32le payload length, u32le CRC-32 of payload, payload (one msgpack map)
 *   frames  = header, tokens chunks, positions chunks, KV chunks (per token chunk: every layer's key and
 *             value), end
 *
 * Tensors travel as raw little-endian bytes in msgpack bin fields, a chunk of at most `chunkTokens`
 * slots per frame, so neither writing nor reading ever holds more than one frame beyond the cache itself.
 * The reader trusts nothing: every frame's size is bounded before it is read, its checksum verified, its
 * msgpack checked for plain data (msgpack-guard.ts) before msgpackr decodes it, its fields validated, and
 * the frame sequence must be exactly the one the header implies. Each refusal names its cause.
 */
import { Packr, Unpackr } from "msgpackr";
import { crc32 } from "node:zlib";
import { z } from "zod";
import { sliceSlots, writeSlots, type KvArray } from "../kernels/kv-slots.ts";
import { RuntimeError } from "./errors.ts";
import type { KvDtype } from "./kv-cache.ts";
import { ColdTier, type RawColdBlock } from "./kv/cold-tier.ts";
import { compactionSettings, compactionStateSchema, PINNED, type CompactionState } from "./kv/compaction.ts";
import { storedMessageSchema, templateKwargsSchema, SNAPSHOT_NESTING_DEPTH } from "./message-schema.ts";
import { assertPlainMsgpack } from "./msgpack-guard.ts";

export const SNAPSHOT_MAGIC = new TextEncoder().encode("ULS-SNAP");
/** Version 2: a compacted cache (its slots' tokens and scores, the compactor's state, the archived blocks); version 1 otherwise. */
export const SNAPSHOT_VERSION = 2;
const READABLE_VERSIONS = [1, 2];
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
}

export interface SnapshotCompaction {
  state: CompactionState;
  /** Per resident slot: its token id (-1 unknown) and its attention score. */
  slotTokens: Int32Array;
  slotScores: Float32Array;
  /** Writing: archived block b as stored. Reading: unset (blocks go to SnapshotExpectation.coldBlock). */
  block?: (b: number) => RawColdBlock;
}

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
  meta: z.object({
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
  }),
});
type Header = z.infer<typeof headerSchema>;

const dataFrameSchema = z.object({
  t: z.enum(["tokens", "positions", "kv", "slot_tokens", "slot_scores", "cold"]),
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

type FramePlan = { t: "tokens" | "positions" | "kv" | "slot_tokens" | "slot_scores" | "cold"; start: number; count: number; layer?: number; kind?: "key" | "value" };

/** The planned data frames for a header: what the writer writes and the reader expects, in order. */
function* plan(h: Pick<Header, "tokenCount" | "length" | "chunkTokens" | "layers" | "compaction">): Generator<FramePlan> {
  for (let start = 0; start < h.tokenCount; start += h.chunkTokens) yield { t: "tokens", start, count: Math.min(h.chunkTokens, h.tokenCount - start) };
  for (let start = 0; start < h.length; start += h.chunkTokens) yield { t: "positions", start, count: Math.min(h.chunkTokens, h.length - start) };
  for (let start = 0; start < h.length; start += h.chunkTokens) {
    const count = Math.min(h.chunkTokens, h.length - start);
    for (let layer = 0; layer < h.layers; layer++) {
      yield { t: "kv", start, count, layer, kind: "key" };
      yield { t: "kv", start, count, layer, kind: "value" };
    }
  }
  const c = h.compaction;
  if (!c) return;
  for (let start = 0; start < h.length; start += h.chunkTokens) yield { t: "slot_tokens", start, count: Math.min(h.chunkTokens, h.length - start) };
  for (let start = 0; start < h.length; start += h.chunkTokens) yield { t: "slot_scores", start, count: Math.min(h.chunkTokens, h.length - start) };
  // One frame per archived block: its positions, token ids, key summary (per layer mins, then maxs) and bytes.
  for (let b = 0; b < c.blocks; b++) yield { t: "cold", start: b, count: c.settings.blockTokens };
}

/** A cold block's frame payload: positions, tokens (int32 each), per layer mins then maxs (float32), then its bytes. */
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
  // The reader's checks, run on what is about to be written: a snapshot this server writes always loads again.
  const headerBody = packr.pack(header);
  try {
    assertPlainMsgpack(headerBody, SNAPSHOT_NESTING_DEPTH);
  } catch (e) {
    throw new SnapshotError("malformed", `the session cannot be stored: ${(e as Error).message}`);
  }
  const check = headerSchema.safeParse(unpackr.unpack(headerBody));
  if (!check.success) throw new SnapshotError("malformed", `the session cannot be stored: header field ${check.error.issues[0]!.path.join(".")}: ${check.error.issues[0]!.message}`);
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
   * throws to refuse (the memory budget).
   */
  reserveKv?: (bytes: number) => void;
  /**
   * Where to write the KV once the header is read: per layer [kvHeads, slots, headDim] arrays with
   * slots >= length (a cache's own storage, so a restore copies the KV once). Default: new arrays of
   * exactly `length` slots.
   */
  kvArrays?: (length: number) => { keys: KvArray[]; values: KvArray[]; slots: number };
  /**
   * The snapshot is one this server wrote to its own store (from KV it computed, or from an upload it
   * checked): its KV values are not checked again for being finite, the slowest check (CRC-32 still
   * catches corruption). Never set for an upload.
   */
  ownStore?: boolean;
  /**
   * Called once with a compacted snapshot's compaction state (after the header is checked); returns where
   * its archived blocks go, one at a time, each checked (the reader keeps none).
   */
  onCompaction?: (state: CompactionState) => (block: RawColdBlock) => void;
}

/**
 * One archived block from its frame: positions strictly increasing and after the previous block's, before
 * the archive's end; token ids in the vocabulary (or -1); key summaries finite with min <= max; its bytes
 * (copied out of the read buffer) finite where `checkValues` (int8: the scales; float32: every value).
 */
function readColdBlock(payload: Uint8Array, h: Header, c: CompactionState, expect: SnapshotExpectation, checkValues: boolean, what: string, lastArchived: number): RawColdBlock {
  const B = c.settings.blockTokens;
  const n = h.kvHeads * h.headDim;
  const bytes = payload.slice(); // aligned, and owned: the read buffer is reused
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
  const mins = Array.from({ length: h.layers }, () => floats(n));
  const maxs = Array.from({ length: h.layers }, () => floats(n));
  const data = bytes.subarray(at);
  let previous = lastArchived;
  for (let i = 0; i < B; i++) {
    const p = positions[i]!;
    if (p <= previous || p >= c.archivedUpTo) throw new SnapshotError("malformed", `${what}: position ${p} is out of order or past the archive's end`);
    previous = p;
    if (tokens[i]! < -1 || tokens[i]! >= expect.vocabSize) throw new SnapshotError("malformed", `${what}: token id ${tokens[i]} is outside the vocabulary`);
  }
  for (let l = 0; l < h.layers; l++) {
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
  const head = await source.read(FRAME_HEAD);
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
export async function decodeSnapshot(source: ByteSource, expect: SnapshotExpectation): Promise<SnapshotData> {
  const magic = await source.read(SNAPSHOT_MAGIC.length);
  if (magic.length < SNAPSHOT_MAGIC.length || magic.some((b, i) => b !== SNAPSHOT_MAGIC[i])) {
    throw new SnapshotError("not_a_snapshot", "the data does not start with the snapshot magic bytes");
  }
  const rawHeader = await readFrame(source, 0, MAX_HEADER_BYTES);
  if (rawHeader.t === "header" && typeof rawHeader.version === "number" && !READABLE_VERSIONS.includes(rawHeader.version)) {
    throw new SnapshotError("unsupported_version", `format version ${rawHeader.version}; this server reads versions ${READABLE_VERSIONS.join(" and ")}`);
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
  if (h.length > h.tokenCount || h.tokenCount > expect.maxTokens) {
    throw new SnapshotError("too_large", `it holds ${h.tokenCount} tokens (${h.length} resident); this server takes at most ${expect.maxTokens}`);
  }
  const c = h.compaction;
  if (c) {
    if (h.version < 2) throw new SnapshotError("malformed", "a version 1 snapshot cannot hold a compacted cache");
    try {
      compactionSettings(c.settings.policy, c.settings.budget, c.settings);
    } catch (e) {
      throw new SnapshotError("malformed", `compaction settings: ${(e as Error).message}`);
    }
    if (c.blocks > 0 && !c.settings.recall) throw new SnapshotError("malformed", "archived KV blocks without a recall tier");
    if (c.archivedUpTo > h.nextPosition || c.pinned > h.length) throw new SnapshotError("malformed", "compaction state is inconsistent with the cache");
  }
  const blockBytes = c ? ColdTier.blockBytes({ layers: h.layers, kvHeads: h.kvHeads, headDim: h.headDim }, c.settings.coldFormat, c.settings.blockTokens) : 0;

  const bytesPerElement = h.kvDtype === "float16" ? 2 : 4;
  const layout = { heads: h.kvHeads, headDim: h.headDim };
  const slotValues = h.kvHeads * h.headDim;
  // A short file with a header that claims a huge cache must not make us allocate that cache first.
  const payloadBytes = h.tokenCount * 4 + h.length * 4 + h.length * slotValues * bytesPerElement * h.layers * 2 + (c ? h.length * 8 + c.blocks * blockBytes : 0);
  if (source.size !== undefined && source.size < payloadBytes) {
    throw new SnapshotError("truncated", `the header promises ${payloadBytes} bytes of tokens and tensors but the data holds ${source.size} bytes in all`);
  }
  expect.reserveKv?.(h.length * slotValues * bytesPerElement * h.layers * 2);
  const tokens = new Int32Array(h.tokenCount);
  const positions = new Int32Array(h.length);
  const alloc = () => (h.kvDtype === "float16" ? new Uint16Array(h.length * slotValues) : new Float32Array(h.length * slotValues));
  const target = expect.kvArrays?.(h.length) ?? { keys: Array.from({ length: h.layers }, alloc), values: Array.from({ length: h.layers }, alloc), slots: h.length };
  const { keys, values, slots } = target;
  if (slots < h.length || keys.length !== h.layers || values.length !== h.layers) throw new Error("decodeSnapshot: kvArrays gave arrays that cannot hold the snapshot");
  const coldFrameBytes = c ? c.settings.blockTokens * 8 + 2 * h.layers * slotValues * 4 + blockBytes : 0;
  const maxFrame = Math.max(h.chunkTokens * slotValues * bytesPerElement, h.chunkTokens * 4, coldFrameBytes) + 256;
  const slotTokens = new Int32Array(c ? h.length : 0);
  const slotScores = new Float32Array(c ? h.length : 0);
  let lastArchived = -1;
  const coldSink = c ? expect.onCompaction?.(c) : undefined;
  if (c && c.blocks > 0 && !coldSink) throw new SnapshotError("malformed", "this reader cannot take archived KV blocks");

  // KV regions are prefaulted (where the source can) a few frames ahead of the decoder, which waits for a
  // frame's regions before writing them: faulting 33 MB of fresh pages costs ~20 ms on one thread here.
  const kvFrames = [...plan(h)].filter((p) => p.t === "kv");
  const prefaulted: (Promise<unknown> | undefined)[] = [];
  const headBytes = (count: number) => count * h.headDim * bytesPerElement;
  const prefault = (k: number) => {
    const p = kvFrames[k];
    if (!source.prefault || !p || prefaulted[k]) return;
    const a = (p.kind === "key" ? keys : values)[p.layer!]!;
    const regions = Array.from({ length: h.kvHeads }, (_, head) => new Uint8Array(a.buffer, a.byteOffset + headBytes(head * slots + p.start), headBytes(p.count)));
    prefaulted[k] = Promise.all(regions.map((r) => source.prefault!(r)));
  };
  for (let k = 0; k < PREFAULT_AHEAD; k++) prefault(k);
  let kvFrame = 0;

  let realign = new Uint8Array(0);
  let index = 1;
  for (const expected of plan(h)) {
    const raw = await readFrame(source, index, maxFrame, true); // its data is copied out before the next read
    const f = dataFrameSchema.safeParse(raw);
    const what = `frame ${index} (${expected.t}${expected.layer !== undefined ? ` layer ${expected.layer} ${expected.kind}` : ""} at slot ${expected.start})`;
    if (!f.success || f.data.t !== expected.t || f.data.start !== expected.start || f.data.count !== expected.count || f.data.layer !== expected.layer || f.data.kind !== expected.kind) {
      throw new SnapshotError("malformed", `${what} is missing or out of order`);
    }
    const { data, count, start } = f.data;
    const elementBytes = expected.t === "kv" ? slotValues * bytesPerElement : expected.t === "cold" ? coldFrameBytes / count : 4;
    if (data.byteLength !== count * elementBytes) throw new SnapshotError("malformed", `${what} holds ${data.byteLength} bytes, expected ${count * elementBytes}`);
    // The frame's bytes as they lie in the read buffer when aligned for their element type, else a copy in
    // a buffer reused from frame to frame (fresh memory for every frame costs a page fault per 4 KB).
    let aligned = data;
    if (data.byteOffset % 4 !== 0) {
      if (realign.length < data.length) realign = new Uint8Array(data.length);
      realign.set(data);
      aligned = realign.subarray(0, data.length);
    }
    const elements = aligned.byteLength / (expected.t === "kv" ? bytesPerElement : 4);
    if (expected.t === "tokens") tokens.set(new Int32Array(aligned.buffer, aligned.byteOffset, elements), start);
    else if (expected.t === "positions") positions.set(new Int32Array(aligned.buffer, aligned.byteOffset, elements), start);
    else if (expected.t === "slot_tokens") slotTokens.set(new Int32Array(aligned.buffer, aligned.byteOffset, elements), start);
    else if (expected.t === "slot_scores") slotScores.set(new Float32Array(aligned.buffer, aligned.byteOffset, elements), start);
    else if (expected.t === "cold") {
      const block = readColdBlock(aligned, h, c!, expect, !expect.ownStore, what, lastArchived);
      lastArchived = block.positions[block.positions.length - 1]!;
      coldSink!(block);
    } else {
      const block = bytesPerElement === 2 ? new Uint16Array(aligned.buffer, aligned.byteOffset, elements) : new Float32Array(aligned.buffer, aligned.byteOffset, elements);
      prefault(kvFrame + PREFAULT_AHEAD);
      await prefaulted[kvFrame++];
      if (!expect.ownStore && !allFinite(block)) throw new SnapshotError("malformed", `${what} holds KV values that are not finite (NaN or infinity)`);
      writeSlots((expected.kind === "key" ? keys : values)[expected.layer!]!, slots, start, block, count, layout);
    }
    index++;
  }
  const end = endFrameSchema.safeParse(await readFrame(source, index, 1024));
  if (!end.success || end.data.frames !== index - 1) throw new SnapshotError("malformed", `frame ${index} should end the snapshot after ${index - 1} data frames`);
  if ((await source.read(1)).length > 0) throw new SnapshotError("malformed", "data continues after the end frame");
  for (let i = 0; i < h.tokenCount; i++) {
    if (tokens[i]! < 0 || tokens[i]! >= expect.vocabSize) throw new SnapshotError("malformed", `token ${i} is id ${tokens[i]}, outside the vocabulary (0..${expect.vocabSize - 1})`);
  }
  if (!c) {
    if (h.length > 0 && positions[0]! < 0) throw new SnapshotError("malformed", `slot 0 has the negative position ${positions[0]}`);
    for (let i = 1; i < h.length; i++) {
      if (positions[i]! <= positions[i - 1]!) throw new SnapshotError("malformed", `slot positions are not increasing at slot ${i}`);
    }
    if (h.length > 0 && positions[h.length - 1]! >= h.nextPosition) throw new SnapshotError("malformed", "nextPosition is not past the last slot's position");
  } else {
    // A compacted cache's slots are in no particular order (recalled blocks come last), but each position
    // is one token's: distinct, and before nextPosition.
    const seen = new Set<number>();
    let pinned = 0;
    for (let i = 0; i < h.length; i++) {
      const p = positions[i]!;
      if (p < 0 || p >= h.nextPosition || seen.has(p)) throw new SnapshotError("malformed", `slot ${i} has position ${p}, negative, repeated or not before nextPosition`);
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
    length: h.length,
    nextPosition: h.nextPosition,
    positions,
    keys,
    values,
    arraySlots: slots,
    meta: h.meta as SnapshotMeta,
    compaction: c ? { state: c, slotTokens, slotScores } : null,
  };
}

/** Reads the header only (for listing stored sessions without loading their tensors). */
export async function readSnapshotHeader(source: ByteSource): Promise<Pick<Header, "modelId" | "tokenCount" | "length" | "meta" | "kvDtype" | "layers" | "kvHeads" | "headDim" | "compaction">> {
  const magic = await source.read(SNAPSHOT_MAGIC.length);
  if (magic.length < SNAPSHOT_MAGIC.length || magic.some((b, i) => b !== SNAPSHOT_MAGIC[i])) throw new SnapshotError("not_a_snapshot", "bad magic bytes");
  const parsed = headerSchema.safeParse(await readFrame(source, 0, MAX_HEADER_BYTES));
  if (!parsed.success) throw new SnapshotError("malformed", "unreadable header");
  return parsed.data;
}
