/**
 * Where sessions live between requests, restarts, machines and workers: the contract every session store
 * keeps (a directory: runtime/stores/file-store.ts; Redis: runtime/stores/redis-store.ts; Deno KV:
 * runtime/stores/denokv-store.ts), chosen by `--session-store file:<dir> | redis://... | denokv:[path]`.
 *
 * A session's stored state is a *version*: the bytes of its snapshot, which for a compacted session is a
 * log (a whole snapshot, then deltas appended by later turns). Every commit makes a new version whose tag
 * differs from every earlier one of that session; readers get one version, whole, whatever commits meanwhile.
 *
 * - save(): a whole snapshot becomes the session's next version, atomically (staged, then committed: a
 *   failure or a crash leaves the version before).
 * - append(): bytes added to version `at` become the next version, only if `at` is still the current one
 *   (else StaleVersion, nothing written): the writer then saves whole.
 * - Leases: a worker that changes a session holds its lease (lease()): one holder at a time across every
 *   process sharing the store, expiring unless renewed (the holder renews it while it lives), each grant
 *   with a fencing token larger than any before for that session. save/append/remove given a lease commit
 *   only while it is the session's current lease (else LeaseLost, nothing changed), so a holder that
 *   stalled past its expiry cannot overwrite the work of the next.
 * - fork(): a new session whose first version is the parent's current one, sharing its stored bytes
 *   (copy-on-write where the store can: neither side's later commits change the other; deleting the
 *   parent keeps the fork whole).
 *
 * Session ids and tenant names match NAME_PATTERN. Each tenant's sessions are apart (forTenant).
 */
import type { ByteSource, SnapshotSummary } from "./snapshot.ts";

/** The alphabet of session ids and tenant names: safe as file names and key parts, and in logs unescaped. */
export const NAME_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;

/** One committed version of a session's snapshot. */
export interface StoreVersion {
  /** Different for every commit of the session (compare with ===). */
  readonly tag: string;
  /** Bytes of the snapshot (a log: whole snapshot plus deltas). */
  readonly bytes: number;
}

/** A version being read: sequential bytes, its size known. */
export interface SnapshotReader extends ByteSource {
  readonly size: number;
  readonly version: StoreVersion;
  read(n: number, out?: Uint8Array): Promise<Uint8Array>;
  close(): Promise<void>;
}

/** An upload held by the store apart from any session until it is checked (then committed with save, or discarded). */
export interface StagedSnapshot {
  readonly bytes: number;
  open(): Promise<SnapshotReader>;
  discard(): Promise<void>;
}

/** The right to change one session, for a while. */
export interface Lease {
  readonly id: string;
  /** Fencing token: larger than every earlier grant's for this session, in this store. */
  readonly token: number;
  /** False once the lease has expired or was released (renewal failed, or the store gave it to another). */
  readonly held: boolean;
  /** Gives the lease back (idempotent); the next taker need not wait for the expiry. */
  release(): Promise<void>;
}

export interface LeaseOptions {
  /** How long the lease lasts without renewal; the holder renews it every ttlMs / 3 while held. */
  ttlMs: number;
  /** Wait for the current holder (polling until it releases or its lease expires), or throw SessionBusy at once. */
  wait: boolean;
  signal?: AbortSignal;
}

export interface CommitOptions {
  /** Commit only while this is the session's current lease (LeaseLost otherwise). */
  lease?: Lease | null;
}

export interface SaveOptions extends CommitOptions {
  /**
   * What the writer based the new version on: a version (commit only if it is still current), null (the
   * session must not exist: a create), or undefined (replace whatever is there).
   */
  expect?: StoreVersion | null;
}

/** One tenant's sessions. */
export interface TenantStore {
  has(id: string): Promise<boolean>;
  ids(): Promise<string[]>;
  /** The session's current version, or null if it does not exist. */
  head(id: string): Promise<StoreVersion | null>;
  /** Reads the current version (whole: commits after the open are not seen). Throws NotFound. */
  open(id: string, bufferBytes?: number): Promise<SnapshotReader>;
  /** open, run fn, close. */
  read<T>(id: string, fn: (reader: SnapshotReader) => Promise<T>): Promise<T>;
  /** The snapshot headers (a listing) of the current version, without its tensors. */
  summary(id: string): Promise<SnapshotSummary>;
  save(id: string, chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>, options?: SaveOptions): Promise<StoreVersion>;
  /** Appends to version `at`; throws StaleVersion if `at` is no longer current. */
  append(id: string, chunks: Iterable<Uint8Array>, at: StoreVersion, options?: CommitOptions): Promise<StoreVersion>;
  /** Cuts the current version to its first `bytes` (a log whose last delta a crash left unfinished). */
  truncate(id: string, bytes: number, options?: CommitOptions): Promise<StoreVersion>;
  /** Deletes the session (no-op if absent). */
  remove(id: string, options?: CommitOptions): Promise<void>;
  /** A new session `to` whose first version is `from`'s current one (shared, copy-on-write). Throws NotFound, or Exists if `to` exists. */
  fork(from: string, to: string): Promise<StoreVersion>;
  /** Streams an upload into the store apart from any session, refusing it past maxBytes (SnapshotError too_large). */
  stage(body: ReadableStream<Uint8Array>, maxBytes: number): Promise<StagedSnapshot>;
  /** Commits a staged upload as the session's next version (as save). */
  commitStaged(id: string, staged: StagedSnapshot, options?: SaveOptions): Promise<StoreVersion>;
  lease(id: string, options: LeaseOptions): Promise<Lease>;
}

export interface SessionStore {
  /** For logs and /health: "file:snapshots", "redis://127.0.0.1:6379", "denokv:..." (no credentials). */
  readonly description: string;
  forTenant(tenant: string): TenantStore;
  /** Stops renewing this handle's leases (they then expire: what a killed worker leaves) and closes connections. Idempotent. */
  close(): Promise<void>;
}

/** append() found that `at` is not the session's current version (another commit came first). */
export class StaleVersion extends Error {
  override name = "StaleVersion";
  constructor(readonly id: string) {
    super(`session ${id} changed in the store since this version was read`);
  }
}

/** A commit under a lease that is no longer the session's current one. */
export class LeaseLost extends Error {
  override name = "LeaseLost";
  constructor(readonly id: string) {
    super(`session ${id}: the lease under which this change was made has expired or passed to another worker`);
  }
}

/** lease() with wait: false on a session another holder has. */
export class SessionBusy extends Error {
  override name = "SessionBusy";
  constructor(readonly id: string) {
    super(`session ${id} is busy with another request`);
  }
}

export class NotFound extends Error {
  override name = "NotFound";
  constructor(readonly id: string) {
    super(`no session with id ${id}`);
  }
}

export class Exists extends Error {
  override name = "Exists";
  constructor(readonly id: string) {
    super(`a session with id ${id} already exists`);
  }
}

/** Waits with capped exponential backoff until `attempt` returns a value (not null), or the signal aborts. */
export async function poll<T>(attempt: () => Promise<T | null>, signal?: AbortSignal, firstMs = 5, maxMs = 200): Promise<T> {
  let delay = firstMs;
  for (;;) {
    const got = await attempt();
    if (got !== null) return got;
    signal?.throwIfAborted();
    await new Promise<void>((resolve) => setTimeout(resolve, delay));
    delay = Math.min(maxMs, delay * 2);
  }
}
