/**
 * The directory session store under its earlier name, with the default tenant's sessions at hand: what
 * tests, benchmarks and tools that look at one directory use. The store itself, and the contract every
 * store keeps, are runtime/stores/file-store.ts and runtime/session-store.ts.
 */
import type { SnapshotSummary } from "./snapshot.ts";
import type { SnapshotReader, StoreVersion } from "./session-store.ts";
import { DEFAULT_TENANT, FileSessionStore } from "./stores/file-store.ts";

export { assertSessionId, DEFAULT_TENANT, FileByteSource, FileSessionStore, NAME_PATTERN } from "./stores/file-store.ts";

export class SnapshotStore extends FileSessionStore {
  private get defaultTenant() {
    return this.forTenant(DEFAULT_TENANT);
  }

  /** The default tenant's file for session `id`. */
  path(id: string): string {
    return this.defaultTenant.path(id);
  }

  read<T>(id: string, fn: (reader: SnapshotReader) => Promise<T>): Promise<T> {
    return this.defaultTenant.read(id, fn);
  }

  summary(id: string): Promise<SnapshotSummary> {
    return this.defaultTenant.summary(id);
  }

  has(id: string): Promise<boolean> {
    return this.defaultTenant.has(id);
  }

  ids(): Promise<string[]> {
    return this.defaultTenant.ids();
  }

  save(id: string, chunks: Iterable<Uint8Array>): Promise<StoreVersion> {
    return this.defaultTenant.save(id, chunks);
  }

  /** Temporary files in the default tenant's directory (for tests and diagnostics). */
  temps(): Promise<string[]> {
    return this.defaultTenant.temps();
  }
}
