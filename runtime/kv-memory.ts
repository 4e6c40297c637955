/**
 * The KV memory budget of one process: every KV cache that exists holds a reservation here first, so the
 * process never grows past the configured bytes however many sessions, requests, prefix copies and
 * uploads there are. A reservation that does not fit asks the reclaimer (the session manager, which can
 * drop idle sessions from memory: they are all in the store) to make room, and is refused if it still
 * does not fit.
 */
import { RuntimeError, invalidRequest } from "./errors.ts";

export class KvHold {
  constructor(
    private readonly memory: KvMemory,
    private held: number,
  ) {}

  get bytes(): number {
    return this.held;
  }

  /**
   * Changes the reservation to `bytes`. Growth must fit like a new reservation unless `force` is set: memory
   * that already exists (a finished turn's cache) is counted whatever it is, and idle sessions make room.
   */
  resize(bytes: number, force = false): void {
    const growth = bytes - this.held;
    if (growth > 0) this.memory.take(growth, "the session", force);
    else this.memory.give(-growth);
    this.held = bytes;
  }

  release(): void {
    this.memory.give(this.held);
    this.held = 0;
  }
}

export class KvMemory {
  private used = 0;
  private reclaimer: ((bytes: number) => void) | null = null;

  constructor(readonly limitBytes: number) {}

  get usedBytes(): number {
    return this.used;
  }

  /** Bytes that could be had now by a reservation, counting what the reclaimer could free as in use. */
  get freeBytes(): number {
    return Math.max(0, this.limitBytes - this.used);
  }

  /** Who can free memory (drop idle sessions) when a reservation does not fit; called with the bytes missing. */
  setReclaimer(reclaim: (bytes: number) => void): void {
    this.reclaimer = reclaim;
  }

  /** Throws invalid_request (naming `param`) if `bytes` could never fit, whatever else were freed. */
  assertCanEverFit(bytes: number, what: string, param: string | null = null): void {
    if (bytes > this.limitBytes) {
      throw invalidRequest(`${what} needs ${bytes} bytes of KV memory, more than this server's whole KV budget of ${this.limitBytes} bytes (--kv-memory-bytes)`, param);
    }
  }

  /** Reserves `bytes`; throws invalid_request if they could never fit, kv_memory_full if they do not fit now. */
  reserve(bytes: number, what: string, param: string | null = null): KvHold {
    this.assertCanEverFit(bytes, what, param);
    this.take(bytes, what, false);
    return new KvHold(this, bytes);
  }

  /**
   * Reserves as much as it can between `minBytes` and `maxBytes`, after asking the reclaimer for what is
   * missing of `maxBytes`; throws like reserve() if not even `minBytes` fit.
   */
  reserveUpTo(minBytes: number, maxBytes: number, what: string): KvHold {
    this.assertCanEverFit(minBytes, what);
    const wanted = Math.min(maxBytes, this.limitBytes);
    if (this.used + wanted > this.limitBytes) this.reclaimer?.(this.used + wanted - this.limitBytes);
    const bytes = Math.max(minBytes, Math.min(wanted, this.limitBytes - this.used));
    this.take(bytes, what, false);
    return new KvHold(this, bytes);
  }

  /** Makes room for `bytes` (asking the reclaimer), then counts them; beyond the limit only with force. */
  take(bytes: number, what: string, force: boolean): void {
    if (this.used + bytes > this.limitBytes) this.reclaimer?.(this.used + bytes - this.limitBytes);
    if (this.used + bytes > this.limitBytes && !force) {
      throw new RuntimeError(
        "kv_memory_full",
        `${what} needs ${bytes} bytes of KV memory but only ${this.freeBytes} of the server's ${this.limitBytes} are free now (sessions in use and running requests hold the rest); retry later`,
      );
    }
    this.used += bytes;
  }

  give(bytes: number): void {
    this.used = Math.max(0, this.used - bytes);
  }
}
