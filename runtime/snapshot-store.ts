/**
 * Where snapshots live between requests, restarts and machines: one file per session in a directory, and
 * one directory per tenant (the default tenant's is the root, so a single-tenant store keeps its layout).
 * A whole snapshot is written to a temporary file that is synced and then renamed over the old one, and
 * the directory is synced after the rename, so a crash leaves either the previous snapshot or the new one,
 * never half of one. A compacted session's snapshot is a log that a turn appends a delta to (append());
 * a crash in the middle of an append leaves an unfinished delta at the end, which the next read finds
 * (SnapshotLogTail) and cuts off (truncate()). Readers of a file being appended to (a download) read only
 * its committed bytes (committedSize()). Temporary files carry the writing process's id; those of
 * processes that no longer run (a crash) are removed when the store is first used.
 */
import { mkdir, open, readdir, rename, rm, stat, truncate, type FileHandle } from "node:fs/promises";
import { join } from "node:path";
import { invalidRequest } from "./errors.ts";
import { readSnapshotSummary, SnapshotError, type ByteSource, type SnapshotSummary } from "./snapshot.ts";

const SUFFIX = ".ulsnap";
/** The alphabet of session ids and tenant names: safe as file and folder names, and in logs unescaped. */
export const NAME_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;

export function assertSessionId(id: string): void {
  if (!NAME_PATTERN.test(id)) throw invalidRequest("a session id is 1-64 letters, digits, '_' or '-'", "id");
}

/** Buffered sequential reads from a file. */
export class FileByteSource implements ByteSource {
  private readonly buffer: Uint8Array;
  private start = 0;
  private end = 0;
  private position = 0;
  private scratch = new Uint8Array(0);

  private constructor(
    private readonly handle: FileHandle,
    readonly size: number,
    bufferBytes: number,
    /** The file read (its inode): SnapshotStore.recordCommitted names the file a log was read from. */
    readonly inode: number,
  ) {
    this.buffer = new Uint8Array(Math.max(16, Math.min(size, bufferBytes)));
  }

  /**
   * The default buffer (8 MB) is large enough that most snapshot frames (a chunk of one layer's keys or
   * values) lie in it whole. `limit(inode, size)` may cut what is read to fewer bytes than the file has
   * (its committed bytes, while an append may be under way).
   */
  static async open(path: string, bufferBytes = 8 << 20, limit?: (inode: number, size: number) => number): Promise<FileByteSource> {
    const handle = await open(path, "r");
    const { ino, size } = await handle.stat();
    return new FileByteSource(handle, limit ? Math.min(size, limit(ino, size)) : size, bufferBytes, ino);
  }

  private zero: Promise<FileHandle | null> | null = null;

  /**
   * Zero-fills `region` by reading /dev/zero into it: the read runs on the I/O threads, so the region's
   * pages are faulted in there rather than one by one on the main thread. A no-op where there is no
   * /dev/zero.
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
    await this.handle.close();
    await (await this.zero)?.close();
  }
}

/** Runs `fn` on the source once it is open, and closes it however `fn` ends. */
async function withSource<T>(opening: Promise<FileByteSource>, fn: (source: FileByteSource) => Promise<T>): Promise<T> {
  const source = await opening;
  try {
    return await fn(source);
  } finally {
    await source.close();
  }
}

/** An append refused because the file is not the log this store holds (see SnapshotStore.append). */
export class StaleLog extends Error {
  constructor(id: string) {
    super(`the snapshot of ${id} is not the log this store last wrote`);
    this.name = "StaleLog";
  }
}

const TEMP_PREFIX = ".tmp-";
const TENANTS_DIR = "tenants";
/** The tenant whose sessions live in the store's root directory. */
export const DEFAULT_TENANT = "default";

/** Whether a process with this id runs on this machine (a temporary file of a live writer must not be removed). */
function processAlive(pid: number): boolean {
  if (pid === process.pid) return true;
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === "EPERM";
  }
}

export class SnapshotStore {
  private ready: Promise<void> | null = null;
  private readonly tenants = new Map<string, SnapshotStore>();
  /** Per session id: the file (inode) this store last wrote and its bytes once that write was whole. */
  private readonly committed = new Map<string, { inode: number; bytes: number }>();

  constructor(readonly dir: string) {}

  /** The store of one tenant's sessions (ids are per tenant: two tenants may both have a session "report"). */
  forTenant(tenant: string): SnapshotStore {
    if (tenant === DEFAULT_TENANT) return this;
    assertSessionId(tenant);
    let store = this.tenants.get(tenant);
    if (!store) {
      store = new SnapshotStore(join(this.dir, TENANTS_DIR, tenant));
      this.tenants.set(tenant, store);
    }
    return store;
  }

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

  /** Temporary files now in the store's directory (for tests and diagnostics). */
  async temps(): Promise<string[]> {
    await this.ensureDir();
    return (await readdir(this.dir)).filter((f) => f.startsWith(TEMP_PREFIX));
  }

  /**
   * Writes chunks to a new temporary file in the store and syncs it; past `maxBytes` it stops, deletes
   * the file and throws too_large. On any failure nothing is left behind.
   */
  private async writeTemp(label: string, chunks: Iterable<Uint8Array> | AsyncIterable<Uint8Array>, maxBytes = Infinity): Promise<{ path: string; bytes: number }> {
    await this.ensureDir();
    const path = this.tempPath(label);
    const handle = await open(path, "w");
    let bytes = 0;
    try {
      for await (const chunk of chunks) {
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

  /**
   * Writes the chunks as the session's snapshot, atomically (temporary file, sync, rename, directory sync);
   * returns the bytes written. On failure the previous snapshot stays and no temporary file is left.
   */
  async save(id: string, chunks: Iterable<Uint8Array>): Promise<number> {
    const target = this.path(id);
    const { path, bytes } = await this.writeTemp(id, chunks);
    let inode: number;
    try {
      inode = (await stat(path)).ino;
      await rename(path, target);
    } catch (e) {
      await rm(path, { force: true });
      throw e;
    }
    this.committed.set(id, { inode, bytes });
    await this.syncDir();
    return bytes;
  }

  /**
   * Appends the chunks to the session's snapshot, whose committed length is `at` (bytes past it, left by
   * an append that failed, are cut off first), and syncs it; returns the new length. On failure the file
   * is cut back to `at` (if that fails too, the next read finds an unfinished segment and cuts it off).
   * Throws StaleLog, writing nothing, unless the file is the one this store last wrote or read (another
   * writer replaced it): the caller writes the snapshot whole instead.
   */
  async append(id: string, chunks: Iterable<Uint8Array>, at: number): Promise<number> {
    const handle = await open(this.path(id), "r+");
    let bytes = at;
    try {
      const { size, ino } = await handle.stat();
      const known = this.committed.get(id);
      if (!known || known.inode !== ino || known.bytes !== at || size < at) {
        await handle.close();
        throw new StaleLog(id);
      }
      if (size > at) await handle.truncate(at);
      for (const chunk of chunks) {
        await handle.write(chunk, 0, chunk.length, bytes);
        bytes += chunk.length;
      }
      await handle.sync();
      this.committed.set(id, { inode: ino, bytes });
    } catch (e) {
      if (e instanceof StaleLog) throw e;
      await handle.truncate(at).catch(() => {});
      throw e;
    } finally {
      await handle.close().catch(() => {});
    }
    return bytes;
  }

  /** Records that the session's file `inode` holds `bytes` whole bytes (a log just read back: its next turn appends). */
  recordCommitted(id: string, inode: number, bytes: number): void {
    this.committed.set(id, { inode, bytes });
  }

  /** Cuts the session's snapshot to its first `bytes` (a log's unfinished last segment: SnapshotLogTail). */
  async truncate(id: string, bytes: number): Promise<void> {
    await truncate(this.path(id), bytes);
    const ino = (await stat(this.path(id))).ino;
    this.committed.set(id, { inode: ino, bytes });
  }

  /**
   * How much of a file of the session's that a reader opened (`inode`, `size` bytes now) is whole: all of
   * it, unless it is the file an append may be extending now, whose bytes past the last commit are not.
   */
  committedSize(id: string, inode: number, size: number): number {
    const c = this.committed.get(id);
    return c && c.inode === inode ? Math.min(c.bytes, size) : size;
  }

  /** Opens the session's snapshot for reading (its committed bytes), runs `fn`, and closes it. */
  read<T>(id: string, fn: (source: FileByteSource) => Promise<T>): Promise<T> {
    return withSource(this.open(id), fn);
  }

  /** The session's snapshot as a source of its committed bytes (the caller closes it). */
  open(id: string, bufferBytes?: number): Promise<FileByteSource> {
    return FileByteSource.open(this.path(id), bufferBytes, (inode, size) => this.committedSize(id, inode, size));
  }

  /** The headers of the session's snapshot (a listing), without reading its tensors. */
  async summary(id: string): Promise<SnapshotSummary> {
    const handle = await open(this.path(id), "r");
    try {
      const { ino, size: fileSize } = await handle.stat();
      const size = this.committedSize(id, ino, fileSize);
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

  async size(id: string): Promise<number> {
    return (await stat(this.path(id))).size;
  }

  /** Deletes the session's snapshot; throws if it exists and cannot be deleted. */
  async remove(id: string): Promise<void> {
    await rm(this.path(id), { force: true });
    this.committed.delete(id);
    await this.syncDir();
  }

  /**
   * Streams an upload into a temporary file in the store, refusing it (and deleting what was written) once
   * it passes `maxBytes`. Returns the file; the caller validates it, then commits or discards it.
   */
  async receive(body: ReadableStream<Uint8Array>, maxBytes: number): Promise<string> {
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
    return (await this.writeTemp("upload", chunks(), maxBytes)).path;
  }

  /** Opens any snapshot file (e.g. a received upload) for reading, runs `fn`, and closes it. */
  readFile<T>(path: string, fn: (source: FileByteSource) => Promise<T>): Promise<T> {
    return withSource(FileByteSource.open(path), fn);
  }

  async discard(tempPath: string): Promise<void> {
    await rm(tempPath, { force: true });
  }
}
