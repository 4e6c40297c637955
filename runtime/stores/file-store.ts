/**
 * The session store in a directory (`--session-store file:<dir>`, the default): one file per session,
 * `<id>.ulsnap`, and one directory per tenant under `tenants/` (the default tenant's is the root, so a
 * single-tenant store keeps the layout it always had). Works for one process, or several on one machine.
 *
 * - A save writes a temporary file, syncs it and renames it over the session's file (then syncs the
 *   directory): a crash leaves the previous version or the new one. A create links the temporary file to
 *   the name instead, which fails if the name exists.
 * - An append writes past the version's end in place and syncs, then records the new length in the
 *   session's commit record (`.commits/<id>`: the file's inode, its committed bytes and the version's
 *   tag, written by rename). Readers, in any process, read only the committed bytes, so an append under
 *   way is never seen, and one a crash left unfinished is cut off by the next append (or by a read that
 *   finds it: SnapshotLogTail and truncate). A file without a record of its inode (a save that crashed
 *   between its rename and its record, or a store written before records) is whole.
 * - A fork is a hard link: both names share the bytes until one side commits. A save renames a new file
 *   over its own name; an append or a truncate on a file that has other links copies it first
 *   (copy-on-write), so neither side ever changes the other; deleting one name keeps the other whole.
 * - A version's tag is new for every commit (its record's); a file without a record gets its inode, size
 *   and modification time (ns).
 * - Leases are claim files `.leases/<id>.<token>`, each created exclusively (so every token is granted
 *   once), holding the holder and its expiry; the session's lease is its highest claim. A commit under a
 *   lease first checks that it is still the highest and unexpired. Between that check and the rename there
 *   is a window another process could use only after the lease expired meanwhile (a holder stalled for its
 *   whole ttl at that instant): use Redis or Deno KV (atomic checks) where that matters.
 *
 * Temporary files carry the writing process's id; those of processes that no longer run (a crash) are
 * removed when the store is first used.
 */
import { copyFile, link, mkdir, open, readdir, readFile, rename, rm, stat, writeFile, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { invalidRequest } from "../errors.ts";
import { readSnapshotSummary, SnapshotError, type SnapshotSummary } from "../snapshot.ts";
import {
  Exists,
  LeaseLost,
  NAME_PATTERN,
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
} from "../session-store.ts";

export { NAME_PATTERN };

const SUFFIX = ".ulsnap";
const TEMP_PREFIX = ".tmp-";
const TENANTS_DIR = "tenants";
const LEASES_DIR = ".leases";
const COMMITS_DIR = ".commits";

/** What a commit wrote: the file (inode) and how many of its bytes are the version. */
interface CommitRecord {
  ino: string;
  bytes: number;
  tag: string;
}
/** The tenant whose sessions live in the store's root directory. */
export const DEFAULT_TENANT = "default";

export function assertSessionId(id: string): void {
  if (!NAME_PATTERN.test(id)) throw invalidRequest("a session id is 1-64 letters, digits, '_' or '-'", "id");
}

const isCode = (e: unknown, code: string) => (e as NodeJS.ErrnoException | null)?.code === code;

/** Buffered sequential reads of one open file, up to `size` bytes (a version's). */
export class FileByteSource implements SnapshotReader {
  private readonly buffer: Uint8Array;
  private start = 0;
  private end = 0;
  private position = 0;
  private scratch = new Uint8Array(0);
  private zero: Promise<FileHandle | null> | null = null;

  private constructor(
    private readonly handle: FileHandle,
    readonly size: number,
    readonly version: StoreVersion,
    bufferBytes: number,
  ) {
    this.buffer = new Uint8Array(Math.max(16, Math.min(size, bufferBytes)));
  }

  /**
   * Opens `path` for reading the version `versionOf(stat)` says it holds (default: the whole file). The default
   * buffer (8 MB) is large enough that most snapshot frames (a chunk of one layer's keys or values) lie in it whole.
   */
  static async open(path: string, bufferBytes = 8 << 20, versionOf?: (st: BigStat) => StoreVersion): Promise<FileByteSource> {
    const handle = await open(path, "r");
    try {
      const st = (await handle.stat({ bigint: true })) as unknown as BigStat;
      const version = versionOf ? versionOf(st) : { tag: versionTag(st, Number(st.size)), bytes: Number(st.size) };
      return new FileByteSource(handle, Math.min(version.bytes, Number(st.size)), version, bufferBytes);
    } catch (e) {
      await handle.close();
      throw e;
    }
  }

  /**
   * Zero-fills `region` by reading /dev/zero into it: the read runs on the I/O threads, so the region's
   * pages are faulted in there rather than one by one on the main thread. A no-op where there is no /dev/zero.
   */
  async prefault(region: Uint8Array): Promise<void> {
    this.zero ??= open("/dev/zero", "r").catch(() => null);
    const zero = await this.zero;
    if (!zero) return;
    try {
      for (let done = 0; done < region.length; ) {
        const { bytesRead } = await zero.read(region, done, region.length - done, null);
        if (bytesRead <= 0) return;
        done += bytesRead;
      }
    } catch {
      // a region left unfaulted is only slower to write
    }
  }

  /** A view of the next n bytes in the read buffer itself where they fit (no copy), valid until the next read. */
  async readTemporary(n: number): Promise<Uint8Array> {
    if (n <= this.buffer.length) {
      if (this.end - this.start < n) {
        // Keep what is left at the front and fill the rest of the buffer from the file.
        this.buffer.copyWithin(0, this.start, this.end);
        this.end -= this.start;
        this.start = 0;
        while (this.end < n) {
          const { bytesRead } = await this.handle.read(this.buffer, this.end, Math.min(this.buffer.length - this.end, this.size - this.position), this.position);
          if (bytesRead === 0) break;
          this.position += bytesRead;
          this.end += bytesRead;
        }
      }
      const take = Math.min(n, this.end - this.start);
      const view = this.buffer.subarray(this.start, this.start + take);
      this.start += take;
      return view;
    }
    if (this.scratch.length < n) this.scratch = new Uint8Array(n);
    return this.read(n, this.scratch.subarray(0, n));
  }

  async read(n: number, out = new Uint8Array(n)): Promise<Uint8Array> {
    let filled = 0;
    while (filled < n) {
      if (this.start === this.end) {
        if (n - filled >= this.buffer.length) {
          // Large reads go straight into the destination.
          const { bytesRead } = await this.handle.read(out, filled, Math.min(n - filled, this.size - this.position), this.position);
          this.position += bytesRead;
          filled += bytesRead;
          if (bytesRead === 0) break;
          continue;
        }
        const { bytesRead } = await this.handle.read(this.buffer, 0, Math.min(this.buffer.length, this.size - this.position), this.position);
        this.position += bytesRead;
        this.start = 0;
        this.end = bytesRead;
        if (bytesRead === 0) break;
      }
      const take = Math.min(n - filled, this.end - this.start);
      out.set(this.buffer.subarray(this.start, this.start + take), filled);
      this.start += take;
      filled += take;
    }
    return filled === n ? out : out.subarray(0, filled);
  }

  async close(): Promise<void> {
    await this.handle.close().catch(() => {});
    await (await this.zero)?.close().catch(() => {});
  }
}

type BigStat = { ino: bigint; size: bigint; mtimeNs: bigint; nlink: bigint };
function versionTag(st: BigStat, size: number): string {
  return `${st.ino}:${size}:${st.mtimeNs}`;
}

/** Whether a process with this id runs on this machine (a temporary file of a live writer must not be removed). */
function processAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return isCode(e, "EPERM");
  }
}

async function* chunksOf(chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>): AsyncIterable<Uint8Array> {
  yield* chunks;
}

interface Claim {
  owner: string;
  expiresAt: number;
}

class FileLease implements Lease {
  private timer: ReturnType<typeof setInterval> | null = null;
  private lost = false;

  constructor(
    private readonly tenant: FileTenantStore,
    readonly id: string,
    readonly token: number,
    readonly owner: string,
    private readonly ttlMs: number,
  ) {}

  get held(): boolean {
    return !this.lost && this.timer !== null;
  }

  start(): void {
    this.timer = setInterval(() => void this.renew(), Math.max(10, this.ttlMs / 3));
    (this.timer as { unref?: () => void }).unref?.();
  }

  private async renew(): Promise<void> {
    if (!this.timer) return;
    try {
      if (!(await this.tenant.renewClaim(this, this.ttlMs))) this.drop(true);
    } catch {
      // a failed renewal is retried; the lease expires if none succeeds in time
    }
  }

  drop(lost: boolean): void {
    if (this.timer) clearInterval(this.timer);
    this.timer = null;
    if (lost) this.lost = true;
  }

  async release(): Promise<void> {
    if (!this.timer) return;
    this.drop(false);
    this.lost = true;
    await this.tenant.releaseClaim(this).catch(() => {});
  }
}

class FileTenantStore implements TenantStore {
  private ready: Promise<void> | null = null;

  constructor(
    readonly root: FileSessionStore,
    readonly dir: string,
  ) {}

  private async ensureDir(): Promise<void> {
    this.ready ??= (async () => {
      await mkdir(this.dir, { recursive: true });
      await this.removeDeadTemps();
    })();
    await this.ready;
  }

  /** Removes temporary files whose writer is gone: what a crash in the middle of a save or an upload left. */
  private async removeDeadTemps(): Promise<void> {
    for (const name of await readdir(this.dir)) {
      if (!name.startsWith(TEMP_PREFIX)) continue;
      const pid = Number(name.slice(TEMP_PREFIX.length).split("-")[0]);
      if (!Number.isInteger(pid) || pid <= 0 || !processAlive(pid)) await rm(join(this.dir, name), { force: true });
    }
  }

  /** Makes a rename in the directory durable (the rename is atomic, but only a synced directory keeps it across a power loss). */
  private async syncDir(): Promise<void> {
    let handle: FileHandle | null = null;
    try {
      handle = await open(this.dir, "r");
      await handle.sync();
    } catch {
      // Some platforms cannot open or sync a directory; the rename itself stays atomic.
    } finally {
      await handle?.close();
    }
  }

  path(id: string): string {
    assertSessionId(id);
    return join(this.dir, id + SUFFIX);
  }

  private tempPath(label: string): string {
    return join(this.dir, `${TEMP_PREFIX}${process.pid}-${label}-${crypto.randomUUID()}`);
  }

  /** Temporary files now in the store's directory (for tests and diagnostics). */
  async temps(): Promise<string[]> {
    await this.ensureDir();
    return (await readdir(this.dir)).filter((f) => f.startsWith(TEMP_PREFIX));
  }

  async has(id: string): Promise<boolean> {
    try {
      return (await stat(this.path(id))).isFile();
    } catch {
      return false;
    }
  }

  async ids(): Promise<string[]> {
    await this.ensureDir();
    return (await readdir(this.dir)).filter((f) => f.endsWith(SUFFIX)).map((f) => f.slice(0, -SUFFIX.length)).filter((id) => NAME_PATTERN.test(id));
  }

  private recordPath(id: string): string {
    return join(this.dir, COMMITS_DIR, id);
  }

  private async readRecord(id: string): Promise<CommitRecord | null> {
    try {
      return JSON.parse(await readFile(this.recordPath(id), "utf8")) as CommitRecord;
    } catch {
      return null; // none (a file saved whole before records, or a crash before its record)
    }
  }

  /** Records that the session's file `ino` holds a version of `bytes` bytes (atomic: written aside, renamed). */
  private async writeRecord(id: string, ino: bigint | number, bytes: number): Promise<StoreVersion> {
    const record: CommitRecord = { ino: String(ino), bytes, tag: `${ino}:${bytes}:${Date.now().toString(36)}-${crypto.randomUUID().slice(0, 8)}` };
    await mkdir(join(this.dir, COMMITS_DIR), { recursive: true });
    const temp = this.tempPath(`commit-${id}`);
    await writeFile(temp, JSON.stringify(record));
    await rename(temp, this.recordPath(id));
    return { tag: record.tag, bytes };
  }

  /** The version a file holds: its record's, if the record is of this file; else the whole file. */
  private versionOf(st: BigStat, record: CommitRecord | null): StoreVersion {
    const size = Number(st.size);
    if (record && record.ino === String(st.ino) && record.bytes <= size) return { tag: record.tag, bytes: record.bytes };
    return { tag: versionTag(st, size), bytes: size };
  }

  async head(id: string): Promise<StoreVersion | null> {
    let st: BigStat & { isFile(): boolean };
    try {
      st = (await stat(this.path(id), { bigint: true })) as unknown as BigStat & { isFile(): boolean };
    } catch (e) {
      if (isCode(e, "ENOENT")) return null;
      throw e;
    }
    if (!st.isFile()) throw new Error(`${this.path(id)} is not a file`);
    return this.versionOf(st, await this.readRecord(id));
  }

  async open(id: string, bufferBytes?: number): Promise<FileByteSource> {
    const record = await this.readRecord(id);
    try {
      // The record is read first: a commit after it only adds bytes past its length, or renames a new file in.
      return await FileByteSource.open(this.path(id), bufferBytes, (st) => this.versionOf(st, record));
    } catch (e) {
      if (isCode(e, "ENOENT")) throw new NotFound(id);
      throw e;
    }
  }

  async read<T>(id: string, fn: (reader: SnapshotReader) => Promise<T>): Promise<T> {
    const source = await this.open(id);
    try {
      return await fn(source);
    } finally {
      await source.close();
    }
  }

  async summary(id: string): Promise<SnapshotSummary> {
    let handle: FileHandle;
    try {
      handle = await open(this.path(id), "r");
    } catch (e) {
      if (isCode(e, "ENOENT")) throw new NotFound(id);
      throw e;
    }
    try {
      const size = this.versionOf((await handle.stat({ bigint: true })) as unknown as BigStat, await this.readRecord(id)).bytes;
      const readAt = async (offset: number, n: number) => {
        const out = new Uint8Array(Math.max(0, Math.min(n, size - offset)));
        let done = 0;
        while (done < out.length) {
          const { bytesRead } = await handle.read(out, done, out.length - done, offset + done);
          if (bytesRead === 0) break;
          done += bytesRead;
        }
        return out.subarray(0, done);
      };
      return await readSnapshotSummary(readAt, size);
    } finally {
      await handle.close();
    }
  }

  /**
   * Writes chunks to a new temporary file in the store and syncs it; past `maxBytes` it stops, deletes the
   * file and throws too_large. On any failure nothing is left behind.
   */
  private async writeTemp(label: string, chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>, maxBytes = Infinity): Promise<{ path: string; bytes: number }> {
    await this.ensureDir();
    const path = this.tempPath(label);
    const handle = await open(path, "w");
    let bytes = 0;
    try {
      for await (const chunk of chunksOf(chunks)) {
        bytes += chunk.length;
        if (bytes > maxBytes) throw new SnapshotError("too_large", `the upload passes the ${maxBytes}-byte limit for snapshots`);
        await handle.write(chunk);
      }
      await handle.sync();
    } catch (e) {
      await handle.close();
      await rm(path, { force: true });
      throw e;
    }
    await handle.close();
    return { path, bytes };
  }

  /** Puts a finished temporary file in place as the session's next version, after the checks `options` ask for. */
  private async commitTemp(id: string, temp: string, options: SaveOptions = {}): Promise<StoreVersion> {
    const target = this.path(id);
    try {
      await this.checkLease(id, options.lease);
      if (options.expect === null) {
        // A create: link fails if the name exists (atomic across processes).
        try {
          await link(temp, target);
        } catch (e) {
          if (isCode(e, "EEXIST")) throw new Exists(id);
          throw e;
        }
        await rm(temp, { force: true });
      } else {
        if (options.expect !== undefined) {
          const current = await this.head(id);
          if (!current || current.tag !== options.expect.tag) throw new StaleVersion(id);
        }
        await rename(temp, target);
      }
    } catch (e) {
      await rm(temp, { force: true });
      throw e;
    }
    await this.syncDir();
    const st = (await stat(target, { bigint: true })) as unknown as BigStat;
    return this.writeRecord(id, st.ino, Number(st.size));
  }

  async save(id: string, chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>, options: SaveOptions = {}): Promise<StoreVersion> {
    assertSessionId(id);
    const { path } = await this.writeTemp(id, chunks);
    return this.commitTemp(id, path, options);
  }

  /**
   * Appends in place (a file no other name shares), or to a copy of the version that is then renamed over
   * the name (a fork's shared file). On failure the file is cut back to `at` (if that fails too, the next
   * read finds an unfinished segment and cuts it off).
   */
  async append(id: string, chunks: Iterable<Uint8Array>, at: StoreVersion, options: CommitOptions = {}): Promise<StoreVersion> {
    await this.checkLease(id, options.lease);
    const current = await this.head(id);
    if (!current) throw new NotFound(id);
    if (current.tag !== at.tag) throw new StaleVersion(id);
    const st = (await stat(this.path(id), { bigint: true })) as unknown as BigStat;
    if (st.nlink > 1n) {
      // Shared with a fork: copy the version, append to the copy, rename it over this name.
      const temp = this.tempPath(`${id}-cow`);
      await copyFile(this.path(id), temp);
      await this.appendAt(temp, chunks, at.bytes);
      return this.commitTemp(id, temp, { expect: at, lease: options.lease });
    }
    const handle = await open(this.path(id), "r+");
    let bytes = at.bytes;
    try {
      // Bytes past the version (an append that did not finish) are cut off first.
      const { size } = await handle.stat();
      if (size > at.bytes) await handle.truncate(at.bytes);
      for (const chunk of chunks) {
        await handle.write(chunk, 0, chunk.length, bytes);
        bytes += chunk.length;
      }
      await handle.sync();
      await this.checkLease(id, options.lease);
    } catch (e) {
      await handle.truncate(at.bytes).catch(() => {});
      throw e;
    } finally {
      await handle.close().catch(() => {});
    }
    // The commit: readers see the new bytes from here on.
    return this.writeRecord(id, st.ino, bytes);
  }

  private async appendAt(path: string, chunks: Iterable<Uint8Array>, at: number): Promise<void> {
    const handle = await open(path, "r+");
    try {
      await handle.truncate(at);
      let bytes = at;
      for (const chunk of chunks) {
        await handle.write(chunk, 0, chunk.length, bytes);
        bytes += chunk.length;
      }
      await handle.sync();
    } catch (e) {
      await rm(path, { force: true });
      throw e;
    } finally {
      await handle.close().catch(() => {});
    }
  }

  async truncate(id: string, bytes: number, options: CommitOptions = {}): Promise<StoreVersion> {
    await this.checkLease(id, options.lease);
    const st = (await stat(this.path(id), { bigint: true })) as unknown as BigStat;
    if (st.nlink > 1n) {
      const temp = this.tempPath(`${id}-cow`);
      await copyFile(this.path(id), temp);
      await this.appendAt(temp, [], bytes);
      return this.commitTemp(id, temp, { lease: options.lease });
    }
    const handle = await open(this.path(id), "r+");
    try {
      await handle.truncate(bytes);
      await handle.sync();
    } finally {
      await handle.close();
    }
    return this.writeRecord(id, st.ino, bytes);
  }

  async remove(id: string, options: CommitOptions = {}): Promise<void> {
    await this.checkLease(id, options.lease);
    await rm(this.path(id), { force: true });
    await rm(this.recordPath(id), { force: true });
    await this.syncDir();
  }

  async fork(from: string, to: string): Promise<StoreVersion> {
    assertSessionId(to);
    await this.ensureDir();
    const record = await this.readRecord(from);
    try {
      await link(this.path(from), this.path(to));
    } catch (e) {
      if (isCode(e, "ENOENT")) throw new NotFound(from);
      if (isCode(e, "EEXIST")) throw new Exists(to);
      throw e;
    }
    await this.syncDir();
    // The fork's version is the parent's as recorded when the link was made (its committed bytes).
    const st = (await stat(this.path(to), { bigint: true })) as unknown as BigStat;
    return this.writeRecord(to, st.ino, this.versionOf(st, record).bytes);
  }

  async stage(body: ReadableStream<Uint8Array>, maxBytes: number): Promise<StagedSnapshot> {
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
    const { path, bytes } = await this.writeTemp("upload", chunks(), maxBytes);
    return {
      bytes,
      path,
      open: () => FileByteSource.open(path),
      discard: () => rm(path, { force: true }),
    } as StagedSnapshot & { path: string };
  }

  async commitStaged(id: string, staged: StagedSnapshot, options: SaveOptions = {}): Promise<StoreVersion> {
    const path = (staged as StagedSnapshot & { path?: string }).path;
    if (!path) throw new Error("commitStaged: not a snapshot staged by this store");
    // Linked, not moved, so that the staged file stays valid for its owner to discard.
    const temp = this.tempPath(`${id}-staged`);
    await link(path, temp);
    return this.commitTemp(id, temp, options);
  }

  // ---- leases: claim files .leases/<id>.<token>; the highest is the session's lease ----

  private claimPath(id: string, token: number): string {
    return join(this.dir, LEASES_DIR, `${id}.${token}`);
  }

  /** The session's claims, highest token first. */
  private async claims(id: string): Promise<number[]> {
    const prefix = `${id}.`;
    let names: string[];
    try {
      names = await readdir(join(this.dir, LEASES_DIR));
    } catch (e) {
      if (isCode(e, "ENOENT")) return [];
      throw e;
    }
    return names
      .filter((f) => f.startsWith(prefix) && /^\d+$/.test(f.slice(prefix.length)))
      .map((f) => Number(f.slice(prefix.length)))
      .sort((a, b) => b - a);
  }

  private async readClaim(id: string, token: number): Promise<Claim | null> {
    const path = this.claimPath(id, token);
    try {
      return JSON.parse(await readFile(path, "utf8")) as Claim;
    } catch {
      // Claims are written whole (linked or renamed into place): one that does not parse was damaged outside
      // this store. Past a minute it counts as expired, so that it cannot hold the session forever.
      const age = await stat(path).then((st) => Date.now() - st.mtimeMs, () => 0);
      return age > 60_000 ? { owner: "", expiresAt: 0 } : null;
    }
  }

  private async writeClaim(id: string, token: number, claim: Claim): Promise<void> {
    const temp = this.tempPath(`lease-${id}`);
    await writeFile(temp, JSON.stringify(claim));
    await rename(temp, this.claimPath(id, token));
  }

  /** Grants the lease if the session's highest claim is free (expired or released); null if it is held. */
  private async tryLease(id: string, owner: string, ttlMs: number): Promise<number | null> {
    const [top] = await this.claims(id);
    if (top !== undefined) {
      const claim = await this.readClaim(id, top);
      if (!claim || claim.expiresAt > Date.now()) return null;
    }
    const token = (top ?? 0) + 1;
    await mkdir(join(this.dir, LEASES_DIR), { recursive: true });
    // Exclusive create, whole: the claim is written aside and linked to its name, which fails if the name
    // exists (each token is granted once). A process killed while writing leaves only its temporary file,
    // never an empty or half-written claim that would read as held forever.
    const temp = this.tempPath(`lease-${id}`);
    await writeFile(temp, JSON.stringify({ owner, expiresAt: Date.now() + ttlMs } satisfies Claim));
    try {
      await link(temp, this.claimPath(id, token));
    } catch (e) {
      if (isCode(e, "EEXIST")) return null;
      throw e;
    } finally {
      await rm(temp, { force: true });
    }
    // A claimer that had read an older top could have created a lower token just now; the highest wins.
    const [highest] = await this.claims(id);
    if (highest !== token) {
      await rm(this.claimPath(id, token), { force: true });
      return null;
    }
    // Older claims are history: keep the one below (a claimer that read it creates our token and loses).
    for (const old of (await this.claims(id)).filter((t) => t < token - 1)) await rm(this.claimPath(id, old), { force: true });
    return token;
  }

  async lease(id: string, options: LeaseOptions): Promise<Lease> {
    assertSessionId(id);
    const owner = `${process.pid}-${crypto.randomUUID()}`;
    const attempt = () => this.tryLease(id, owner, options.ttlMs);
    const token = options.wait ? await poll(attempt, options.signal) : await attempt();
    if (token === null) throw new SessionBusy(id);
    const lease = new FileLease(this, id, token, owner, options.ttlMs);
    lease.start();
    this.root.track(lease);
    return lease;
  }

  /** Extends the claim if it is still the session's lease; false if it was lost. */
  async renewClaim(lease: FileLease, ttlMs: number): Promise<boolean> {
    const [top] = await this.claims(lease.id);
    const claim = top === lease.token ? await this.readClaim(lease.id, lease.token) : null;
    if (!claim || claim.owner !== lease.owner || claim.expiresAt <= Date.now()) return false;
    await this.writeClaim(lease.id, lease.token, { owner: lease.owner, expiresAt: Date.now() + ttlMs });
    return true;
  }

  async releaseClaim(lease: FileLease): Promise<void> {
    const [top] = await this.claims(lease.id);
    if (top !== lease.token) return;
    const claim = await this.readClaim(lease.id, lease.token);
    if (claim?.owner === lease.owner) await this.writeClaim(lease.id, lease.token, { owner: lease.owner, expiresAt: 0 });
  }

  /** Fencing: throws LeaseLost unless `lease` is the session's current, unexpired lease. */
  private async checkLease(id: string, lease: Lease | null | undefined): Promise<void> {
    if (!lease) return;
    const [top] = await this.claims(id);
    const claim = top === lease.token ? await this.readClaim(id, lease.token) : null;
    if (!claim || claim.expiresAt <= Date.now() || (lease instanceof FileLease && claim.owner !== lease.owner)) throw new LeaseLost(id);
  }
}

export class FileSessionStore implements SessionStore {
  private readonly tenants = new Map<string, FileTenantStore>();
  private readonly leases = new Set<FileLease>();
  readonly description: string;

  constructor(readonly dir: string) {
    this.description = `file:${dir}`;
  }

  forTenant(tenant: string): FileTenantStore {
    let store = this.tenants.get(tenant);
    if (!store) {
      if (tenant !== DEFAULT_TENANT) assertSessionId(tenant);
      store = new FileTenantStore(this, tenant === DEFAULT_TENANT ? this.dir : join(this.dir, TENANTS_DIR, tenant));
      this.tenants.set(tenant, store);
    }
    return store;
  }

  /** @internal a lease of this handle, stopped by close() */
  track(lease: FileLease): void {
    this.leases.add(lease);
  }

  async close(): Promise<void> {
    for (const lease of this.leases) lease.drop(false);
    this.leases.clear();
  }
}
