/**
 * Sessions in Deno KV (`--session-store denokv:[path]`): Deno Deploy's KV, or locally the Deno CLI's
 * SQLite-backed KV (`deno run --unstable-kv`; several processes may open the same file). Only under Deno:
 * elsewhere open() throws "denokv: needs Deno".
 *
 * Deno KV keeps values of at most 64 KiB and commits atomic operations of at most 1000 mutations, 100
 * checks, 800 KiB of keys and values together and 80 KiB of keys. So a snapshot is stored as chunks of
 * immutable *blobs*, and a session's version is a list of pieces of blobs:
 *
 *   ["ulsess", tenant, "head", id]         {tag, bytes, segments: [{blob, bytes, chunk}]}  the current version
 *   ["ulsess", tenant, "blob", blob, n]    Uint8Array, `chunk` bytes (the last shorter)     a blob's n-th chunk
 *   ["ulsess", tenant, "meta", blob]       {pending, touchedAt, bytes, chunk, chunks}       a blob's size; pending until adopted
 *   ["ulsess", tenant, "ref", blob]        KvU64: how many heads list the blob
 *   ["ulsess", tenant, "pin", blob, pin]   {expiresAt}                                      a reader's hold on a blob it reads
 *   ["ulsess", tenant, "lease", id]        {token, expiresAt}                               the session's lease (token survives release)
 *   ["ulsess", tenant, "sweep"]            {at}                                             when this tenant was last swept
 *
 * A segment is the first `bytes` of a blob (a truncated log keeps a prefix of its last blob). A save writes
 * one new blob; an append writes the delta as a new blob and lists it after the version's segments (past
 * MAX_SEGMENTS the deltas are merged into one blob); a fork copies the head, not the chunks.
 *
 * Writing: the blob's meta record is written first (pending, with the time), then its chunks in atomic
 * batches that fit the limits; the writer refreshes `touchedAt` while it writes. The commit is one atomic
 * operation: it checks the head's versionstamp (and the lease record's, and the pending meta's), sets or
 * deletes the head, marks the new blob adopted and adds +1/-1 (a wrapping KvU64 sum) to the refcount of
 * each blob the head gains or loses. A blob whose count reaches 0 is listed by no head and can never be
 * listed again (forks and readers take a blob only through a head they check is current), so its chunks
 * are deleted right after the commit, in as many operations as that takes, unless a reader pins it.
 * What a crash leaves (a pending blob that is no longer touched, a blob at count 0 whose chunks were not
 * all deleted) is found by a sweep that each handle starts on a tenant's first use, at most once per
 * SWEEP_EVERY_MS per tenant across every process. Chunks are not written with `expireIn`: adopting them
 * would mean writing every chunk again, and the SQLite backend applies expiry only once a minute anyway.
 *
 * Readers: open() pins each blob of the version it reads (set atomically with a check that the head is
 * still the one read), so a later commit that drops the blobs leaves them until the reader closes (the
 * last one out collects them). Pins carry their expiry (PIN_TTL_MS, renewed as the reader reads, and
 * `expireIn` as well), so a reader that died does not hold a blob for ever.
 *
 * Leases: a record per session; a grant checks the record's versionstamp and takes token = previous + 1.
 * Expiry is by the wall clock (Date.now()) in the record; the holder renews every ttlMs / 3. Commits under
 * a lease check that the record still holds its token, unexpired, and check its versionstamp.
 */
import { invalidRequest } from "../errors.ts";
import {
  Exists,
  LeaseLost,
  NotFound,
  poll,
  SessionBusy,
  StaleVersion,
  type CommitOptions,
  type Lease,
  type LeaseOptions,
  type SaveOptions,
  type SessionStore,
  type SnapshotReader,
  type StagedSnapshot,
  type StoreVersion,
  type TenantStore,
  NAME_PATTERN,
} from "../session-store.ts";
import { readSnapshotSummary, SnapshotError, type SnapshotSummary } from "../snapshot.ts";

// --- The part of Deno's KV API used here (Deno's own types are not loaded under Bun/Node/tsc). ---
type KvKeyPart = string | number | bigint | boolean | Uint8Array;
type KvKey = readonly KvKeyPart[];
interface KvEntryMaybe<T = unknown> {
  key: KvKey;
  value: T | null;
  versionstamp: string | null;
}
interface KvEntry<T = unknown> {
  key: KvKey;
  value: T;
  versionstamp: string;
}
type KvCommit = { ok: true; versionstamp: string } | { ok: false };
interface KvAtomic {
  check(...checks: { key: KvKey; versionstamp: string | null }[]): KvAtomic;
  set(key: KvKey, value: unknown, options?: { expireIn?: number }): KvAtomic;
  delete(key: KvKey): KvAtomic;
  sum(key: KvKey, n: bigint): KvAtomic;
  commit(): Promise<KvCommit>;
}
interface Kv {
  get<T = unknown>(key: KvKey): Promise<KvEntryMaybe<T>>;
  getMany(keys: KvKey[]): Promise<KvEntryMaybe[]>;
  list<T = unknown>(selector: { prefix: KvKey }, options?: { limit?: number; batchSize?: number }): AsyncIterableIterator<KvEntry<T>>;
  atomic(): KvAtomic;
  close(): void;
}

// --- Limits (Deno 2.x KV: value 64 KiB; per atomic op 1000 mutations, 100 checks, 800 KiB in all, 80 KiB of keys; getMany 10 keys). ---
const PREFIX = "ulsess";
const MAX_VALUE_BYTES = 65536;
export const DEFAULT_CHUNK_BYTES = 60 * 1024;
/** Budget of one atomic operation that writes chunks (values and keys; the hard limit is 819200). */
const OP_BYTES = 760_000;
/** Budget of keys in one atomic operation (the hard limit is 81920). */
const OP_KEY_BYTES = 60_000;
/** Mutations in one operation (the hard limit is 1000). */
const OP_MUTATIONS = 500;
const GET_MANY = 10;
/** Segments a version may list before an append merges its deltas into one blob (keeps a commit's refcount sums, and a reader's pins, well inside one operation). */
const MAX_SEGMENTS = 200;
/** A pending blob not touched for this long belongs to a writer that is gone (writers touch it every TOUCH_EVERY_MS). */
const STALE_PENDING_MS = 30 * 60_000;
const TOUCH_EVERY_MS = 30_000;
const PIN_TTL_MS = 10 * 60_000;
const SWEEP_EVERY_MS = 10 * 60_000;
/** KvU64 sum of this subtracts one (sums wrap around at 2^64). */
const MINUS_ONE = (1n << 64n) - 1n;
const WRITES_IN_FLIGHT = 4;
const READS_IN_FLIGHT = 8;

function checkName(name: string, what: "id" | "tenant"): void {
  if (!NAME_PATTERN.test(name)) throw invalidRequest(`a session ${what} is 1-64 letters, digits, '_' or '-'`, what === "id" ? "id" : null);
}

interface Segment {
  blob: string;
  /** The first `bytes` of the blob. */
  bytes: number;
  /** Bytes per chunk of the blob (the last chunk may be shorter). */
  chunk: number;
}
interface HeadRecord {
  tag: string;
  bytes: number;
  segments: Segment[];
}
interface MetaRecord {
  pending: boolean;
  touchedAt: number;
  bytes: number;
  chunk: number;
  chunks: number;
}
interface LeaseRecord {
  token: number;
  expiresAt: number;
}
interface PinRecord {
  expiresAt: number;
}

function newId(): string {
  const b = crypto.getRandomValues(new Uint8Array(16));
  let s = "";
  for (const x of b) s += String.fromCharCode(x);
  return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

/** Rough serialized size of a key (for the operation budgets). */
function keyBytes(key: KvKey): number {
  let n = 4;
  for (const p of key) n += (typeof p === "string" ? p.length * 3 : p instanceof Uint8Array ? p.length : 9) + 2;
  return n;
}

const version = (h: HeadRecord): StoreVersion => ({ tag: h.tag, bytes: h.bytes });

/** A chunk that should be there is not: the version was collected (a reader past its pin's expiry, or a summary racing a commit). */
class ChunkMissing extends Error {
  override name = "ChunkMissing";
}

/** The distinct blobs of a version. */
function blobsOf(h: HeadRecord | null): Set<string> {
  return new Set(h ? h.segments.map((s) => s.blob) : []);
}

/** The first `bytes` of the segments. */
function cutSegments(segments: Segment[], bytes: number): Segment[] {
  const out: Segment[] = [];
  let left = bytes;
  for (const s of segments) {
    if (left <= 0) break;
    const take = Math.min(s.bytes, left);
    out.push({ ...s, bytes: take });
    left -= take;
  }
  return out;
}

interface Piece {
  key: KvKey;
  /** Bytes of the chunk this piece uses (its first `len`). */
  len: number;
}

/**
 * The local (SQLite) backend answers "database is locked" when another process holds the file's write lock
 * a moment too long (several workers on one file, or one killed mid-transaction, whose lock the next opener
 * recovers): such a call is tried again, for up to LOCKED_RETRY_MS, with backoff. An atomic operation is
 * replayed on a new builder, so a retry commits exactly the operations asked for; a listing is retried only
 * before it has yielded anything.
 */
const LOCKED_RETRY_MS = 15_000;
const isLocked = (e: unknown) => e instanceof Error && /database (table )?is locked|SQLITE_BUSY/i.test(e.message);

async function whileLocked<T>(attempt: () => Promise<T>): Promise<T> {
  const deadline = Date.now() + LOCKED_RETRY_MS;
  for (let delay = 5; ; delay = Math.min(200, delay * 2)) {
    try {
      return await attempt();
    } catch (e) {
      if (!isLocked(e) || Date.now() > deadline) throw e;
      await new Promise((resolve) => setTimeout(resolve, delay));
    }
  }
}

function retryingWhileLocked(kv: Kv): Kv {
  return {
    get: (key) => whileLocked(() => kv.get(key)),
    getMany: (keys) => whileLocked(() => kv.getMany(keys)),
    async *list(selector, options) {
      let yielded = false;
      for (const deadline = Date.now() + LOCKED_RETRY_MS; ; ) {
        try {
          for await (const entry of kv.list(selector, options)) {
            yielded = true;
            yield entry as never;
          }
          return;
        } catch (e) {
          if (yielded || !isLocked(e) || Date.now() > deadline) throw e;
          await new Promise((resolve) => setTimeout(resolve, 20));
        }
      }
    },
    atomic() {
      const ops: ((op: KvAtomic) => KvAtomic)[] = [];
      const builder: KvAtomic = {
        check: (...checks) => (ops.push((op) => op.check(...checks)), builder),
        set: (key, value, options) => (ops.push((op) => op.set(key, value, options)), builder),
        delete: (key) => (ops.push((op) => op.delete(key)), builder),
        sum: (key, n) => (ops.push((op) => op.sum(key, n)), builder),
        commit: () => whileLocked(() => ops.reduce((op, apply) => apply(op), kv.atomic()).commit()),
      };
      return builder;
    },
    close: () => kv.close(),
  };
}

export interface DenoKvStoreOptions {
  /** Bytes per stored chunk (default 60 KiB, at most 64 KiB). */
  chunkBytes?: number;
}

export class DenoKvSessionStore implements SessionStore {
  readonly description: string;
  private readonly tenants = new Map<string, DenoKvTenant>();
  private readonly tasks = new Set<Promise<unknown>>();
  readonly leases = new Set<KvLease>();
  private closed = false;

  private constructor(
    readonly kv: Kv,
    readonly chunkBytes: number,
    path: string | undefined,
  ) {
    this.description = `denokv:${path ? redact(path) : ""}`;
  }

  /** Opens the KV at `path` (a SQLite file, ":memory:", or a KV URL; Deno's default when omitted). */
  static async open(path?: string, options: DenoKvStoreOptions = {}): Promise<DenoKvSessionStore> {
    const deno = (globalThis as { Deno?: { openKv?: (path?: string) => Promise<Kv>; version?: { deno?: string } } }).Deno;
    if (!deno?.version?.deno) throw new Error("denokv: needs Deno (the denokv: session store runs only under the Deno runtime)");
    if (typeof deno.openKv !== "function") throw new Error("denokv: Deno.openKv is not available: run deno with --unstable-kv (or \"unstable\": [\"kv\"] in deno.json)");
    const chunkBytes = options.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    if (!Number.isInteger(chunkBytes) || chunkBytes < 16 || chunkBytes > MAX_VALUE_BYTES) throw new RangeError(`denokv: chunkBytes must be an integer in [16, ${MAX_VALUE_BYTES}]`);
    const kv = await deno.openKv(path || undefined);
    return new DenoKvSessionStore(retryingWhileLocked(kv), chunkBytes, path);
  }

  forTenant(tenant: string): TenantStore {
    return this.tenant(tenant);
  }

  /** The tenant's store, with its Deno-KV-specific extras (for tests and diagnostics). */
  tenant(tenant: string): DenoKvTenant {
    this.assertOpen();
    checkName(tenant, "tenant");
    let t = this.tenants.get(tenant);
    if (!t) {
      t = new DenoKvTenant(this, tenant);
      this.tenants.set(tenant, t);
      this.track(t.sweep());
    }
    return t;
  }

  assertOpen(): void {
    if (this.closed) throw new Error("denokv: the store is closed");
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** Runs a background task (a sweep, a renewal) that close() waits for; a failure is dropped (a sweep runs again later; a lease whose renewal keeps failing expires). */
  track(p: Promise<unknown>): void {
    const t = p.catch(() => {}).finally(() => this.tasks.delete(t));
    this.tasks.add(t);
  }

  /** Waits for the background tasks now running (tests). */
  async idle(): Promise<void> {
    while (this.tasks.size) await Promise.all([...this.tasks]);
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const l of this.leases) l.stop();
    await this.idle();
    this.kv.close();
  }
}

function redact(path: string): string {
  try {
    const u = new URL(path);
    if (u.protocol === "http:" || u.protocol === "https:") {
      u.username = "";
      u.password = "";
      u.search = "";
      return u.toString();
    }
  } catch {
    // a file path
  }
  return path;
}

class KvLease implements Lease {
  private state: "held" | "released" | "lost" = "held";
  private timer: ReturnType<typeof setTimeout> | null = null;
  private renewing: Promise<void> | null = null;

  constructor(
    readonly tenant: DenoKvTenant,
    readonly id: string,
    readonly token: number,
    private readonly ttlMs: number,
    private expiresAt: number,
  ) {
    tenant.store.leases.add(this);
    this.schedule();
  }

  get held(): boolean {
    return this.state === "held" && Date.now() < this.expiresAt;
  }

  private schedule(): void {
    if (this.state !== "held" || this.tenant.store.isClosed) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.renewing = this.renew().finally(() => {
        this.renewing = null;
        this.schedule();
      });
      this.tenant.store.track(this.renewing);
    }, Math.max(1, Math.floor(this.ttlMs / 3)));
  }

  private async renew(): Promise<void> {
    const kv = this.tenant.store.kv;
    const key = this.tenant.leaseKey(this.id);
    for (;;) {
      if (this.state !== "held" || this.tenant.store.isClosed) return;
      const e = await kv.get<LeaseRecord>(key);
      const now = Date.now();
      if (!e.value || e.value.token !== this.token || e.value.expiresAt <= now) {
        this.lose();
        return;
      }
      const expiresAt = now + this.ttlMs;
      const r = await kv.atomic().check({ key, versionstamp: e.versionstamp }).set(key, { token: this.token, expiresAt } satisfies LeaseRecord).commit();
      if (r.ok) {
        this.expiresAt = expiresAt;
        return;
      }
    }
  }

  private lose(): void {
    this.state = "lost";
    this.stop();
  }

  /** Stops renewing (the store closes: the lease then expires, as a killed worker's does). */
  stop(): void {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.tenant.store.leases.delete(this);
  }

  async release(): Promise<void> {
    if (this.state !== "held") return;
    this.state = "released";
    this.stop();
    await this.renewing?.catch(() => {});
    if (this.tenant.store.isClosed) return;
    const kv = this.tenant.store.kv;
    const key = this.tenant.leaseKey(this.id);
    for (;;) {
      const e = await kv.get<LeaseRecord>(key);
      if (!e.value || e.value.token !== this.token) return;
      const r = await kv.atomic().check({ key, versionstamp: e.versionstamp }).set(key, { token: this.token, expiresAt: 0 } satisfies LeaseRecord).commit();
      if (r.ok) return;
    }
  }
}

/** A blob being written: its meta record first (pending), then its chunks, batched. */
class BlobWriter {
  readonly blob = newId();
  bytes = 0;
  chunks = 0;
  metaVs: string | null = null;
  private buf: Uint8Array;
  private fill = 0;
  private batch: Uint8Array[] = [];
  private batchBytes = 0;
  private batchKeyBytes = 0;
  private inflight = new Set<Promise<void>>();
  private failure: unknown = null;
  private touchedAt = 0;

  constructor(
    private readonly t: DenoKvTenant,
    readonly chunk: number,
  ) {
    this.buf = new Uint8Array(chunk);
  }

  private meta(pending: boolean): MetaRecord {
    return { pending, touchedAt: Date.now(), bytes: this.bytes, chunk: this.chunk, chunks: this.chunks };
  }

  async begin(): Promise<void> {
    const key = this.t.metaKey(this.blob);
    this.touchedAt = Date.now();
    const r = await this.t.kv.atomic().check({ key, versionstamp: null }).set(key, this.meta(true)).commit();
    if (!r.ok) throw new Error("denokv: blob id collision");
    this.metaVs = r.versionstamp;
  }

  async write(data: Uint8Array): Promise<void> {
    let at = 0;
    while (at < data.length) {
      const take = Math.min(data.length - at, this.chunk - this.fill);
      this.buf.set(data.subarray(at, at + take), this.fill);
      this.fill += take;
      at += take;
      this.bytes += take;
      if (this.fill === this.chunk) await this.pushChunk();
    }
  }

  private async pushChunk(): Promise<void> {
    if (this.fill === 0) return;
    const value = this.fill === this.buf.length ? this.buf : this.buf.slice(0, this.fill);
    this.buf = new Uint8Array(this.chunk);
    this.fill = 0;
    const kb = keyBytes(this.t.chunkKey(this.blob, this.chunks));
    if (this.batch.length && (this.batchBytes + value.length + kb > OP_BYTES || this.batchKeyBytes + kb > OP_KEY_BYTES || this.batch.length >= OP_MUTATIONS)) await this.flushBatch();
    this.batch.push(value);
    this.batchBytes += value.length + kb;
    this.batchKeyBytes += kb;
  }

  private async flushBatch(): Promise<void> {
    if (this.failure) throw this.failure;
    if (!this.batch.length) return;
    const values = this.batch;
    const first = this.chunks;
    this.chunks += values.length;
    this.batch = [];
    this.batchBytes = 0;
    this.batchKeyBytes = 0;
    const op = this.t.kv.atomic();
    values.forEach((v, i) => op.set(this.t.chunkKey(this.blob, first + i), v));
    const p: Promise<void> = op.commit().then(
      () => {
        this.inflight.delete(p);
      },
      (e) => {
        this.inflight.delete(p);
        this.failure ??= e;
      },
    );
    this.inflight.add(p);
    while (this.inflight.size >= WRITES_IN_FLIGHT) await Promise.race(this.inflight);
    if (this.failure) throw this.failure;
    if (Date.now() - this.touchedAt > TOUCH_EVERY_MS) await this.touch();
  }

  /** Refreshes the pending meta (a sweep takes an untouched one for a dead writer's). */
  private async touch(): Promise<void> {
    const key = this.t.metaKey(this.blob);
    this.touchedAt = Date.now();
    const r = await this.t.kv.atomic().check({ key, versionstamp: this.metaVs }).set(key, this.meta(true)).commit();
    if (!r.ok) throw new Error("denokv: the blob being written was collected (the writer stalled past the pending expiry)");
    this.metaVs = r.versionstamp;
  }

  /** Writes what is left and records the blob's size in its (still pending) meta. */
  async finish(): Promise<Segment> {
    await this.pushChunk();
    await this.flushBatch();
    await Promise.all(this.inflight);
    if (this.failure) throw this.failure;
    await this.touch();
    return { blob: this.blob, bytes: this.bytes, chunk: this.chunk };
  }

  /**
   * Deletes what was written (a failed save, a refused upload), if the blob is still pending and ours: a
   * commit that failed with an error after it reached the store may have adopted it.
   */
  async abort(): Promise<void> {
    await Promise.all(this.inflight);
    this.batch = [];
    if (this.metaVs === null) return;
    const key = this.t.metaKey(this.blob);
    const r = await this.t.kv.atomic().check({ key, versionstamp: this.metaVs }).delete(key).commit();
    this.metaVs = null;
    if (r.ok) await this.t.deleteBlob(this.blob, this.chunks);
  }
}

interface SwapPlan {
  next: HeadRecord | null;
  /** A pending blob this commit adopts (its meta's versionstamp, checked). */
  adopt?: { blob: string; metaVs: string | null };
}

export class DenoKvTenant implements TenantStore {
  readonly kv: Kv;

  constructor(
    readonly store: DenoKvSessionStore,
    readonly tenant: string,
  ) {
    this.kv = store.kv;
  }

  // --- keys ---
  headKey = (id: string): KvKey => [PREFIX, this.tenant, "head", id];
  leaseKey = (id: string): KvKey => [PREFIX, this.tenant, "lease", id];
  chunkKey = (blob: string, n: number): KvKey => [PREFIX, this.tenant, "blob", blob, n];
  metaKey = (blob: string): KvKey => [PREFIX, this.tenant, "meta", blob];
  refKey = (blob: string): KvKey => [PREFIX, this.tenant, "ref", blob];
  pinKey = (blob: string, pin: string): KvKey => [PREFIX, this.tenant, "pin", blob, pin];
  /** Every key of this tenant starts with this. */
  get prefix(): KvKey {
    return [PREFIX, this.tenant];
  }

  private check(id: string): void {
    this.store.assertOpen();
    checkName(id, "id");
  }

  private getHead(id: string): Promise<KvEntryMaybe<HeadRecord>> {
    return this.kv.get<HeadRecord>(this.headKey(id));
  }

  async has(id: string): Promise<boolean> {
    if (!NAME_PATTERN.test(id)) return false;
    return (await this.head(id)) !== null;
  }

  async ids(): Promise<string[]> {
    this.store.assertOpen();
    const out: string[] = [];
    for await (const e of this.kv.list<HeadRecord>({ prefix: [PREFIX, this.tenant, "head"] })) out.push(e.key[3] as string);
    return out;
  }

  async head(id: string): Promise<StoreVersion | null> {
    this.check(id);
    const h = (await this.getHead(id)).value;
    return h ? version(h) : null;
  }

  async open(id: string, bufferBytes = 8 << 20): Promise<SnapshotReader> {
    this.check(id);
    for (;;) {
      const e = await this.getHead(id);
      if (!e.value) throw new NotFound(id);
      const pin = newId();
      const blobs = [...blobsOf(e.value)];
      const expiresAt = Date.now() + PIN_TTL_MS;
      const op = this.kv.atomic().check({ key: this.headKey(id), versionstamp: e.versionstamp });
      for (const b of blobs) op.set(this.pinKey(b, pin), { expiresAt } satisfies PinRecord, { expireIn: PIN_TTL_MS + 60_000 });
      if ((await op.commit()).ok) return new KvReader(this, e.value.segments, version(e.value), bufferBytes, { id: pin, blobs, at: Date.now() });
    }
  }

  async read<T>(id: string, fn: (reader: SnapshotReader) => Promise<T>): Promise<T> {
    const reader = await this.open(id);
    try {
      return await fn(reader);
    } finally {
      await reader.close();
    }
  }

  async summary(id: string): Promise<SnapshotSummary> {
    this.check(id);
    for (let attempt = 0; ; attempt++) {
      const h = (await this.getHead(id)).value;
      if (!h) throw new NotFound(id);
      const reader = new KvReader(this, h.segments, version(h), 1 << 20, null);
      try {
        return await readSnapshotSummary((offset, n) => reader.readAt(offset, n), h.bytes);
      } catch (e) {
        // A commit replaced the version and collected its chunks while we read: read the new one.
        if (!(e instanceof ChunkMissing) || attempt >= 5) throw e;
      } finally {
        await reader.close();
      }
    }
  }

  private async writeBlob(chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>, maxBytes = Infinity): Promise<{ writer: BlobWriter; segment: Segment }> {
    const writer = new BlobWriter(this, this.store.chunkBytes);
    await writer.begin();
    try {
      for await (const c of chunks) {
        if (writer.bytes + c.length > maxBytes) throw new SnapshotError("too_large", `the upload passes the ${maxBytes}-byte limit for snapshots`);
        await writer.write(c);
      }
      return { writer, segment: await writer.finish() };
    } catch (e) {
      await writer.abort().catch(() => {});
      throw e;
    }
  }

  /** Checks the lease record (LeaseLost unless it holds this lease's token, unexpired). */
  private checkLease(id: string, lease: Lease, rec: LeaseRecord | null): void {
    if (lease.id !== id || (lease instanceof KvLease && lease.tenant.tenant !== this.tenant)) throw new LeaseLost(id);
    if (!rec || rec.token !== lease.token || rec.expiresAt <= Date.now()) throw new LeaseLost(id);
  }

  /** Checks, before any bytes are written, what the commit will check again (saves writing a blob that cannot commit). */
  private async precheck(id: string, lease: Lease | null | undefined, plan: (cur: HeadRecord | null) => void): Promise<void> {
    const [h, l] = await this.kv.getMany(lease ? [this.headKey(id), this.leaseKey(id)] : [this.headKey(id)]);
    if (lease) this.checkLease(id, lease, l!.value as LeaseRecord | null);
    plan(h!.value as HeadRecord | null);
  }

  /**
   * The commit: reads the head (and lease, and adopted meta), lets `plan` decide the next head (or throw),
   * then swaps it in one atomic operation checked on every versionstamp read, with the refcount changes;
   * retries when a check fails. Then collects the blobs that lost their last head.
   */
  private async swap(id: string, lease: Lease | null | undefined, plan: (cur: HeadRecord | null) => SwapPlan, adopting?: string): Promise<HeadRecord | null> {
    for (;;) {
      this.store.assertOpen();
      const keys = [this.headKey(id), lease ? this.leaseKey(id) : null, adopting ? this.metaKey(adopting) : null];
      const [h, l, m] = await this.kv.getMany(keys.filter((k) => k !== null)).then((got) => keys.map((k) => (k ? got.shift()! : null)));
      if (lease) this.checkLease(id, lease, l!.value as LeaseRecord | null);
      const cur = h!.value as HeadRecord | null;
      const { next, adopt } = plan(cur);
      const op = this.kv.atomic().check({ key: this.headKey(id), versionstamp: h!.versionstamp });
      if (lease) op.check({ key: this.leaseKey(id), versionstamp: l!.versionstamp });
      if (adopt) {
        const meta = m?.value as MetaRecord | null;
        if (adopt.blob !== adopting || !meta || !meta.pending || m!.versionstamp !== adopt.metaVs) throw new Error("denokv: the staged snapshot was committed, discarded or collected before this commit");
        op.check({ key: this.metaKey(adopt.blob), versionstamp: m!.versionstamp }).set(this.metaKey(adopt.blob), { ...meta, pending: false, touchedAt: Date.now() } satisfies MetaRecord);
      }
      if (next) op.set(this.headKey(id), next);
      else op.delete(this.headKey(id));
      const before = blobsOf(cur);
      const after = blobsOf(next);
      const dropped: string[] = [];
      for (const b of after) if (!before.has(b)) op.sum(this.refKey(b), 1n);
      for (const b of before)
        if (!after.has(b)) {
          op.sum(this.refKey(b), MINUS_ONE);
          dropped.push(b);
        }
      if (!(await op.commit()).ok) continue;
      await this.collectIfUnused(dropped).catch(() => {});
      return next;
    }
  }

  async save(id: string, chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>, options: SaveOptions = {}): Promise<StoreVersion> {
    this.check(id);
    const expectOk = (cur: HeadRecord | null) => {
      if (options.expect === null && cur) throw new Exists(id);
      if (options.expect && (!cur || cur.tag !== options.expect.tag)) throw new StaleVersion(id);
    };
    await this.precheck(id, options.lease, expectOk);
    const { writer, segment } = await this.writeBlob(chunks);
    return this.commitBlob(id, writer.blob, writer.metaVs, segment, options, expectOk, () => writer.abort());
  }

  private async commitBlob(
    id: string,
    blob: string,
    metaVs: string | null,
    segment: Segment,
    options: SaveOptions,
    expectOk: (cur: HeadRecord | null) => void,
    onFail: () => Promise<void>,
  ): Promise<StoreVersion> {
    try {
      const next = await this.swap(id, options.lease, (cur) => {
        expectOk(cur);
        return { next: { tag: newId(), bytes: segment.bytes, segments: [segment] }, adopt: { blob, metaVs } };
      }, blob);
      return version(next!);
    } catch (e) {
      await onFail().catch(() => {});
      throw e;
    }
  }

  async append(id: string, chunks: Iterable<Uint8Array>, at: StoreVersion, options: CommitOptions = {}): Promise<StoreVersion> {
    this.check(id);
    let base: HeadRecord | null = null;
    await this.precheck(id, options.lease, (cur) => {
      if (!cur || cur.tag !== at.tag) throw new StaleVersion(id);
      base = cur;
    });
    const head = base as unknown as HeadRecord;
    // Past MAX_SEGMENTS the deltas (every segment after the first) are copied into one blob with the new bytes.
    const merge = head.segments.length + 1 > MAX_SEGMENTS;
    const keep = merge ? head.segments.slice(0, 1) : head.segments;
    let source: Iterable<Uint8Array> | AsyncIterable<Uint8Array> = chunks;
    if (merge) {
      const tail = new KvReader(this, head.segments.slice(1), version(head), 8 << 20, null);
      source = (async function* () {
        try {
          for (let left = tail.size; left > 0; ) {
            const part = await tail.read(Math.min(left, 1 << 20));
            if (!part.length) break;
            left -= part.length;
            yield part;
          }
        } catch (e) {
          if (e instanceof ChunkMissing) throw new StaleVersion(id);
          throw e;
        } finally {
          await tail.close();
        }
        yield* chunks;
      })();
    }
    const { writer, segment } = await this.writeBlob(source);
    try {
      const next = await this.swap(id, options.lease, (cur) => {
        if (!cur || cur.tag !== at.tag) throw new StaleVersion(id);
        const segments = [...keep, segment];
        return { next: { tag: newId(), bytes: segments.reduce((a, s) => a + s.bytes, 0), segments }, adopt: { blob: writer.blob, metaVs: writer.metaVs } };
      }, writer.blob);
      return version(next!);
    } catch (e) {
      await writer.abort().catch(() => {});
      throw e;
    }
  }

  async truncate(id: string, bytes: number, options: CommitOptions = {}): Promise<StoreVersion> {
    this.check(id);
    if (!Number.isInteger(bytes) || bytes < 0) throw new RangeError(`truncate: bad length ${bytes}`);
    const next = await this.swap(id, options.lease, (cur) => {
      if (!cur) throw new NotFound(id);
      if (bytes > cur.bytes) throw new RangeError(`truncate: session ${id} has ${cur.bytes} bytes, fewer than ${bytes}`);
      return { next: { tag: newId(), bytes, segments: cutSegments(cur.segments, bytes).filter((s) => s.bytes > 0) } };
    });
    return version(next!);
  }

  async remove(id: string, options: CommitOptions = {}): Promise<void> {
    this.check(id);
    await this.swap(id, options.lease, () => ({ next: null }));
  }

  async fork(from: string, to: string): Promise<StoreVersion> {
    this.check(from);
    this.check(to);
    for (;;) {
      const [f, t] = await this.kv.getMany([this.headKey(from), this.headKey(to)]);
      const src = f!.value as HeadRecord | null;
      if (!src) throw new NotFound(from);
      if (t!.value) throw new Exists(to);
      const next: HeadRecord = { tag: newId(), bytes: src.bytes, segments: src.segments };
      const op = this.kv
        .atomic()
        .check({ key: this.headKey(from), versionstamp: f!.versionstamp })
        .check({ key: this.headKey(to), versionstamp: null })
        .set(this.headKey(to), next);
      for (const b of blobsOf(next)) op.sum(this.refKey(b), 1n);
      if ((await op.commit()).ok) return version(next);
    }
  }

  async stage(body: ReadableStream<Uint8Array>, maxBytes: number): Promise<StagedSnapshot> {
    this.store.assertOpen();
    const reader = body.getReader();
    const chunks = async function* () {
      try {
        for (;;) {
          const { value, done } = await reader.read();
          if (done) return;
          yield value;
        }
      } finally {
        await reader.cancel().catch(() => {});
      }
    };
    const { writer, segment } = await this.writeBlob(chunks(), maxBytes);
    return new KvStaged(this, writer, segment);
  }

  async commitStaged(id: string, staged: StagedSnapshot, options: SaveOptions = {}): Promise<StoreVersion> {
    this.check(id);
    if (!(staged instanceof KvStaged) || staged.tenant.tenant !== this.tenant) throw new TypeError("denokv: commitStaged takes a snapshot staged by a Deno KV store of the same tenant");
    const expectOk = (cur: HeadRecord | null) => {
      if (options.expect === null && cur) throw new Exists(id);
      if (options.expect && (!cur || cur.tag !== options.expect.tag)) throw new StaleVersion(id);
    };
    const v = await this.commitBlob(id, staged.writer.blob, staged.writer.metaVs, staged.segment, options, expectOk, async () => {});
    staged.committed = true;
    return v;
  }

  async lease(id: string, options: LeaseOptions): Promise<Lease> {
    this.check(id);
    const { ttlMs, wait, signal } = options;
    if (!(ttlMs > 0)) throw new RangeError("lease: ttlMs must be positive");
    const key = this.leaseKey(id);
    const attempt = async (): Promise<Lease | null> => {
      for (;;) {
        this.store.assertOpen();
        signal?.throwIfAborted();
        const e = await this.kv.get<LeaseRecord>(key);
        const now = Date.now();
        if (e.value && e.value.expiresAt > now) return null;
        const token = (e.value?.token ?? 0) + 1;
        const expiresAt = now + ttlMs;
        const r = await this.kv.atomic().check({ key, versionstamp: e.versionstamp }).set(key, { token, expiresAt } satisfies LeaseRecord).commit();
        if (r.ok) return new KvLease(this, id, token, ttlMs, expiresAt);
      }
    };
    if (!wait) {
      const got = await attempt();
      if (!got) throw new SessionBusy(id);
      return got;
    }
    return poll(attempt, signal);
  }

  // --- collection ---

  /**
   * Deletes a blob's chunks, then its meta, refcount and pins. `chunks`: how many it has (a writer's own
   * count); else its meta's, or, for a blob whose meta is gone or pending (what a dead writer left), all
   * that a listing finds.
   */
  async deleteBlob(blob: string, chunks?: number): Promise<void> {
    if (chunks === undefined) {
      const m = (await this.kv.get<MetaRecord>(this.metaKey(blob))).value;
      if (m && !m.pending) chunks = m.chunks;
    }
    if (chunks === undefined) await this.deletePrefix([PREFIX, this.tenant, "blob", blob]);
    else
      for (let i = 0; i < chunks; i += OP_MUTATIONS) {
        const op = this.kv.atomic();
        for (let j = i; j < Math.min(chunks, i + OP_MUTATIONS); j++) op.delete(this.chunkKey(blob, j));
        await op.commit();
      }
    await this.kv.atomic().delete(this.metaKey(blob)).delete(this.refKey(blob)).commit();
    await this.deletePrefix([PREFIX, this.tenant, "pin", blob]);
  }

  /** Deletes every key under a prefix (a listing reads the values too: for pins, and for what a crash left). */
  private async deletePrefix(prefix: KvKey): Promise<void> {
    for (;;) {
      const keys: KvKey[] = [];
      for await (const e of this.kv.list({ prefix }, { limit: 100, batchSize: 10 })) keys.push(e.key);
      if (!keys.length) return;
      const op = this.kv.atomic();
      for (const k of keys) op.delete(k);
      await op.commit();
      if (keys.length < 100) return;
    }
  }

  /** Collects each of these blobs that no head lists (refcount 0) and no live reader pins. */
  async collectIfUnused(blobs: string[]): Promise<void> {
    for (let i = 0; i < blobs.length; i += GET_MANY) {
      const part = blobs.slice(i, i + GET_MANY);
      const refs = await this.kv.getMany(part.map((b) => this.refKey(b)));
      for (let j = 0; j < part.length; j++) {
        const v = refs[j]!.value as { value: bigint } | null;
        if (v !== null && v.value !== 0n) continue;
        const m = (await this.kv.get<MetaRecord>(this.metaKey(part[j]!))).value;
        if (m?.pending) continue; // not adopted yet (its refcount comes with the adoption)
        if (await this.pinned(part[j]!)) continue;
        await this.deleteBlob(part[j]!);
      }
    }
  }

  private async pinned(blob: string): Promise<boolean> {
    const now = Date.now();
    for await (const e of this.kv.list<PinRecord>({ prefix: [PREFIX, this.tenant, "pin", blob] })) if (e.value.expiresAt > now) return true;
    return false;
  }

  /**
   * Removes what crashes left: blobs whose writer stopped touching them (pending, stale) and blobs at
   * refcount 0 whose collection did not finish. At most once per SWEEP_EVERY_MS per tenant, across processes.
   */
  async sweep(force = false): Promise<void> {
    const key: KvKey = [PREFIX, this.tenant, "sweep"];
    const e = await this.kv.get<{ at: number }>(key);
    const now = Date.now();
    if (!force && e.value && now - e.value.at < SWEEP_EVERY_MS) return;
    if (!(await this.kv.atomic().check({ key, versionstamp: e.versionstamp }).set(key, { at: now }).commit()).ok) return;
    const unreferenced: string[] = [];
    for await (const m of this.kv.list<MetaRecord>({ prefix: [PREFIX, this.tenant, "meta"] })) {
      if (this.store.isClosed) return;
      const blob = m.key[3] as string;
      if (m.value.pending) {
        if (now - m.value.touchedAt < STALE_PENDING_MS) continue;
        const r = await this.kv.atomic().check({ key: m.key, versionstamp: m.versionstamp }).delete(m.key).commit();
        if (r.ok) await this.deleteBlob(blob);
      } else unreferenced.push(blob);
    }
    await this.collectIfUnused(unreferenced);
  }

  // --- for tests and diagnostics ---

  /** Counts this tenant's keys by kind ("head", "blob", "meta", "ref", "pin", "lease"). */
  async census(): Promise<Record<string, number>> {
    const out: Record<string, number> = {};
    for await (const e of this.kv.list({ prefix: [PREFIX, this.tenant] }, { batchSize: 100 })) {
      const kind = String(e.key[2]);
      out[kind] = (out[kind] ?? 0) + 1;
    }
    return out;
  }
}

class KvStaged implements StagedSnapshot {
  committed = false;
  private discarded = false;
  constructor(
    readonly tenant: DenoKvTenant,
    readonly writer: BlobWriter,
    readonly segment: Segment,
  ) {}

  get bytes(): number {
    return this.segment.bytes;
  }

  open(): Promise<SnapshotReader> {
    if (this.committed || this.discarded) return Promise.reject(new Error("denokv: the staged snapshot was already committed or discarded"));
    return Promise.resolve(new KvReader(this.tenant, this.segment.bytes ? [this.segment] : [], { tag: `staged-${this.writer.blob}`, bytes: this.segment.bytes }, 8 << 20, null));
  }

  async discard(): Promise<void> {
    if (this.committed || this.discarded) return;
    this.discarded = true;
    await this.writer.abort();
  }
}

/**
 * Reads a version's bytes: sequentially, prefetching up to `bufferBytes` ahead in getMany batches, or at
 * any offset (readAt). `pin` is the reader's hold on the blobs (released, and the blobs collected if that
 * was the last hold, on close); null for readers of a pending blob or of a summary.
 */
class KvReader implements SnapshotReader {
  readonly size: number;
  private readonly pieces: Piece[] = [];
  private readonly starts: number[] = [];
  private next = 0;
  private queued: { len: number; value: Promise<Uint8Array> }[] = [];
  private queuedBytes = 0;
  private inFlight = 0;
  private cur: Uint8Array = new Uint8Array(0);
  private curAt = 0;
  private position = 0;
  private scratch = new Uint8Array(0);
  private closed = false;

  constructor(
    private readonly t: DenoKvTenant,
    private readonly segments: Segment[],
    readonly version: StoreVersion,
    private readonly bufferBytes: number,
    private pin: { id: string; blobs: string[]; at: number } | null,
  ) {
    let total = 0;
    for (const s of segments) {
      this.starts.push(total);
      for (let i = 0; i * s.chunk < s.bytes; i++) this.pieces.push({ key: t.chunkKey(s.blob, i), len: Math.min(s.chunk, s.bytes - i * s.chunk) });
      total += s.bytes;
    }
    this.size = total;
  }

  private async fetch(pieces: Piece[]): Promise<Uint8Array[]> {
    const entries = await this.t.kv.getMany(pieces.map((p) => p.key));
    return entries.map((e, i) => {
      const v = e.value;
      const len = pieces[i]!.len;
      if (!(v instanceof Uint8Array) || v.length < len) throw new ChunkMissing(`denokv: chunk ${JSON.stringify(pieces[i]!.key)} of version ${this.version.tag} is gone (collected or never written)`);
      return v.length === len ? v : v.subarray(0, len);
    });
  }

  /** Keeps up to bufferBytes requested ahead. */
  private prefetch(): void {
    while (this.next < this.pieces.length && this.inFlight < READS_IN_FLIGHT && (this.queuedBytes < this.bufferBytes || this.queued.length === 0)) {
      const group = this.pieces.slice(this.next, this.next + GET_MANY);
      this.next += group.length;
      this.inFlight++;
      const all = this.fetch(group).finally(() => this.inFlight--);
      all.catch(() => {});
      group.forEach((p, i) => {
        const value = all.then((vs) => vs[i]!);
        value.catch(() => {});
        this.queued.push({ len: p.len, value });
        this.queuedBytes += p.len;
      });
    }
  }

  /** Makes `cur` the next piece with bytes left; false at the end. */
  private async advance(): Promise<boolean> {
    while (this.curAt >= this.cur.length) {
      if (this.closed) throw new Error("denokv: the reader is closed");
      if (!this.queued.length) this.prefetch();
      const q = this.queued.shift();
      if (!q) return false;
      this.queuedBytes -= q.len;
      await this.renewPin();
      this.cur = await q.value;
      this.curAt = 0;
      this.prefetch();
    }
    return true;
  }

  async read(n: number, out?: Uint8Array): Promise<Uint8Array> {
    const want = Math.max(0, Math.min(n, this.size - this.position));
    const dest = out ? out.subarray(0, want) : new Uint8Array(want);
    let filled = 0;
    while (filled < want) {
      if (!(await this.advance())) break;
      const take = Math.min(want - filled, this.cur.length - this.curAt);
      dest.set(this.cur.subarray(this.curAt, this.curAt + take), filled);
      this.curAt += take;
      filled += take;
    }
    this.position += filled;
    return filled === dest.length ? dest : dest.subarray(0, filled);
  }

  async readTemporary(n: number): Promise<Uint8Array> {
    const want = Math.max(0, Math.min(n, this.size - this.position));
    if (want === 0) return new Uint8Array(0);
    if (await this.advance()) {
      if (this.cur.length - this.curAt >= want) {
        const view = this.cur.subarray(this.curAt, this.curAt + want);
        this.curAt += want;
        this.position += want;
        return view;
      }
    }
    if (this.scratch.length < want) this.scratch = new Uint8Array(Math.max(want, this.scratch.length * 2));
    return this.read(want, this.scratch);
  }

  /** Bytes at any offset (a summary's reads of headers and trailer). */
  async readAt(offset: number, n: number): Promise<Uint8Array> {
    const end = Math.min(this.size, offset + n);
    if (offset >= end) return new Uint8Array(0);
    const out = new Uint8Array(end - offset);
    // The pieces overlapping [offset, end).
    const wanted: { piece: Piece; start: number }[] = [];
    let s = 0;
    while (s + 1 < this.segments.length && this.starts[s + 1]! <= offset) s++;
    let pieceIndex = 0;
    for (let k = 0; k < s; k++) pieceIndex += Math.ceil(this.segments[k]!.bytes / this.segments[k]!.chunk);
    let pos = this.starts[s]!;
    for (; s < this.segments.length && pos < end; s++) {
      const seg = this.segments[s]!;
      for (let i = 0; i * seg.chunk < seg.bytes; i++, pieceIndex++) {
        const start = pos + i * seg.chunk;
        const piece = this.pieces[pieceIndex]!;
        if (start + piece.len > offset && start < end) wanted.push({ piece, start });
      }
      pos += seg.bytes;
    }
    for (let i = 0; i < wanted.length; i += GET_MANY) {
      const group = wanted.slice(i, i + GET_MANY);
      const values = await this.fetch(group.map((w) => w.piece));
      group.forEach((w, j) => {
        const v = values[j]!;
        const from = Math.max(offset, w.start);
        const to = Math.min(end, w.start + v.length);
        out.set(v.subarray(from - w.start, to - w.start), from - offset);
      });
    }
    return out;
  }

  private async renewPin(): Promise<void> {
    const pin = this.pin;
    if (!pin || Date.now() - pin.at < PIN_TTL_MS / 3) return;
    pin.at = Date.now();
    const expiresAt = pin.at + PIN_TTL_MS;
    const op = this.t.kv.atomic();
    for (const b of pin.blobs) op.set(this.t.pinKey(b, pin.id), { expiresAt } satisfies PinRecord, { expireIn: PIN_TTL_MS + 60_000 });
    await op.commit();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.queued = [];
    const pin = this.pin;
    this.pin = null;
    if (!pin || this.t.store.isClosed) return;
    try {
      const op = this.t.kv.atomic();
      for (const b of pin.blobs) op.delete(this.t.pinKey(b, pin.id));
      await op.commit();
      // The last reader of a version that commits dropped collects it.
      await this.t.collectIfUnused(pin.blobs);
    } catch {
      // the pins expire; a sweep collects the blobs
    }
  }
}
