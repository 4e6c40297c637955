/**
 * Per-session locks: two changes of one session never interleave. A lock is a chain of promises per key;
 * taking it waits for the holder before, or refuses at once under the "reject" busy policy.
 */
import { RuntimeError } from "./errors.ts";

export type BusyPolicy = "wait" | "reject";

export class SessionLocks {
  private readonly chains = new Map<string, Promise<void>>();

  constructor(private readonly busy: BusyPolicy) {}

  /** Whether a change of this session is running or waiting. */
  isHeld(key: string): boolean {
    return this.chains.has(key);
  }

  get size(): number {
    return this.chains.size;
  }

  /** Throws session_busy if the lock is held and the policy is reject. */
  assertAvailable(key: string, id: string): void {
    if (this.chains.has(key) && this.busy === "reject") throw new RuntimeError("session_busy", `session ${id} is busy with another request`);
  }

  /** Takes the lock: waits for the current holder, or refuses at once under busy=reject. Returns the release. */
  async acquire(key: string, id: string): Promise<() => void> {
    this.assertAvailable(key, id);
    const previous = this.chains.get(key);
    let release!: () => void;
    const mine = new Promise<void>((resolve) => (release = resolve));
    const chain = (previous ?? Promise.resolve()).then(() => mine);
    this.chains.set(key, chain);
    await previous;
    return () => {
      if (this.chains.get(key) === chain) this.chains.delete(key);
      release();
    };
  }

  /** Resolves once no lock is held, or after `timeoutMs`; returns whether all were released in time. */
  async drain(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (this.chains.size > 0) {
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await Promise.race([Promise.all([...this.chains.values()]), new Promise((r) => setTimeout(r, left))]);
    }
    return true;
  }
}
