/**
 * FIFO admission for the one model instance a process holds: one job runs at a time, up to `limit` wait
 * behind it, and the next is refused at once (the HTTP edge answers 429). A waiter whose signal aborts
 * leaves the queue without running.
 */
import { RuntimeError } from "./errors.ts";

interface Waiter {
  start: () => void;
}

export class RequestQueue {
  private running = false;
  private readonly waiters: Waiter[] = [];
  /** Resolved when nothing runs and nothing waits (graceful shutdown waits on this). */
  private readonly idleWaiters: (() => void)[] = [];

  constructor(readonly limit: number) {}

  get waiting(): number {
    return this.waiters.length;
  }

  get busy(): boolean {
    return this.running;
  }

  /**
   * Throws queue_full if a job submitted now would be refused. Callers that must answer before the job
   * starts (a streaming response commits to 200 when it opens) check here, then submit synchronously.
   */
  checkAdmission(): void {
    if (this.running && this.waiters.length >= this.limit) {
      throw new RuntimeError("queue_full", `the server is busy: ${this.waiters.length} request(s) are already waiting (queue limit ${this.limit})`);
    }
  }

  /** Resolves once no job runs and none waits. */
  idle(): Promise<void> {
    if (!this.running) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** Runs `job` when its turn comes. */
  async run<T>(job: () => Promise<T>, signal?: AbortSignal): Promise<T> {
    await this.acquire(signal);
    try {
      return await job();
    } finally {
      this.release();
    }
  }

  private acquire(signal?: AbortSignal): Promise<void> {
    if (signal?.aborted) return Promise.reject(new RuntimeError("cancelled", "the request was cancelled"));
    if (!this.running) {
      this.running = true;
      return Promise.resolve();
    }
    try {
      this.checkAdmission();
    } catch (e) {
      return Promise.reject(e);
    }
    return new Promise<void>((resolve, reject) => {
      const onAbort = () => {
        const i = this.waiters.indexOf(waiter);
        if (i !== -1) this.waiters.splice(i, 1);
        reject(new RuntimeError("cancelled", "the request was cancelled while waiting in the queue"));
      };
      const waiter: Waiter = {
        start: () => {
          signal?.removeEventListener("abort", onAbort);
          resolve();
        },
      };
      signal?.addEventListener("abort", onAbort, { once: true });
      this.waiters.push(waiter);
    });
  }

  private release(): void {
    const next = this.waiters.shift();
    if (next) next.start();
    else {
      this.running = false;
      for (const resolve of this.idleWaiters.splice(0)) resolve();
    }
  }
}
