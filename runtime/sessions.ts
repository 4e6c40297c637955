/**
 * Sessions: a conversation whose KV cache lives across requests, restarts and machines.
 *
 * A session holds its token history, its KV cache (every resident slot with its original position), its
 * chat messages, the template variables pinned at creation (the date line stays the same, so earlier
 * turns' KV stays valid), the model fingerprint (through its snapshots) and room for compaction state.
 *
 * Each turn renders the whole conversation with the model's template, keeps the KV of the longest prefix
 * the cache already holds, and prefills only the rest: a turn costs its new tokens, and its reply is
 * token-identical to a fresh request that carries the whole conversation. After each turn the session is
 * written to the SnapshotStore; sessions beyond the memory budget are dropped from memory (least
 * recently used first) and read back from the store on their next use.
 */
import type { ChatMessage, ToolDefinition } from "./chat-template.ts";
import type { CompletionJob, Engine } from "./engine.ts";
import { RuntimeError, invalidRequest } from "./errors.ts";
import type { GenerateResult } from "./generate.ts";
import type { KvCache } from "./kv-cache.ts";
import { decodeSnapshot, encodeSnapshot, readSnapshotHeader, SnapshotError, type SnapshotData, type SnapshotExpectation } from "./snapshot.ts";
import { assertSessionId, FileByteSource, type SnapshotStore } from "./snapshot-store.ts";

export type BusyPolicy = "wait" | "reject";

export interface SessionManagerOptions {
  /** KV bytes that resident sessions may hold together before the least recently used are dropped from memory. */
  memoryBudgetBytes: number;
  /** A second request on a busy session waits its turn, or is refused (409). */
  busy: BusyPolicy;
  /** Tokens per snapshot chunk. */
  chunkTokens: number;
}

export interface SessionInfo {
  id: string;
  object: "session";
  created_at: number;
  updated_at: number;
  /** Tokens the session has read (its history). */
  tokens_read: number;
  /** KV slots held for it. */
  tokens_resident: number;
  kv_bytes: number;
  messages: number;
  /** In memory now (else only in the store, read back on next use). */
  in_memory: boolean;
  busy: boolean;
}

export interface TurnRequest extends Omit<CompletionJob, "promptIds" | "prepare"> {
  /**
   * The whole conversation to answer, from the session's current messages (e.g. those plus one new
   * message, or a client's full history). It replaces the session's messages; the shared token prefix is reused.
   */
  messages: (current: ChatMessage[]) => ChatMessage[];
  tools?: ToolDefinition[] | null;
}

export interface IngestResult {
  cachedTokens: number;
  prefilledTokens: number;
  ms: number;
}

/** strftime("%d %b %Y"), the form Llama-3.1's template writes its date line in. */
export function templateDate(now = new Date()): string {
  const months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  return `${String(now.getDate()).padStart(2, "0")} ${months[now.getMonth()]} ${now.getFullYear()}`;
}

function commonPrefix(a: ArrayLike<number>, aLength: number, b: ArrayLike<number>): number {
  const n = Math.min(aLength, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/** A counter, not a clock: several sessions can be touched within one millisecond. */
let useCounter = 0;

class Session {
  busy = false;
  /** Order of last use, for LRU eviction. */
  lastUsed = ++useCounter;
  constructor(
    readonly id: string,
    readonly createdAt: number,
    public updatedAt: number,
    public tokens: number[],
    public cache: KvCache,
    public messages: ChatMessage[],
    readonly templateKwargs: Record<string, unknown>,
    /** Reserved for the compaction issue: its policy state travels with the snapshot. */
    public compaction: unknown = null,
  ) {}

  /** Makes the cache hold exactly the longest prefix of `promptIds` it already has, leaving at least one token to read. */
  reuseFor(promptIds: number[]): KvCache {
    let keep = commonPrefix(this.tokens, this.cache.length, promptIds);
    if (keep >= promptIds.length) keep = promptIds.length - 1;
    this.cache.truncate(keep);
    return this.cache;
  }

  /** After reading `promptIds` and generating `generated`: the history is whatever the cache now holds. */
  recordTokens(promptIds: number[], generated: number[]): void {
    this.tokens = [...promptIds, ...generated].slice(0, this.cache.length);
  }

  toSnapshot(engine: Engine): SnapshotData {
    return {
      fingerprint: engine.info.fingerprint,
      modelId: engine.info.modelId,
      kvDtype: this.cache.dtype,
      layers: this.cache.layers,
      kvHeads: this.cache.kvHeads,
      headDim: this.cache.headDim,
      tokens: Int32Array.from(this.tokens),
      length: this.cache.length,
      nextPosition: this.cache.nextPosition,
      positions: this.cache.positions.subarray(0, this.cache.length),
      keys: this.cache.keys,
      values: this.cache.values,
      meta: {
        id: this.id,
        createdAt: this.createdAt,
        updatedAt: this.updatedAt,
        messages: this.messages,
        templateKwargs: this.templateKwargs,
        compaction: this.compaction,
      },
    };
  }

  info(inMemory = true): SessionInfo {
    return {
      id: this.id,
      object: "session",
      created_at: Math.floor(this.createdAt / 1000),
      updated_at: Math.floor(this.updatedAt / 1000),
      tokens_read: this.tokens.length,
      tokens_resident: this.cache.length,
      kv_bytes: this.cache.bytes,
      messages: this.messages.length,
      in_memory: inMemory,
      busy: this.busy,
    };
  }
}

/** Messages read back from a snapshot: plain objects with a string role and string-or-null content. */
function restoreMessages(raw: unknown[]): ChatMessage[] {
  return raw.map((m, i) => {
    const r = m as Record<string, unknown>;
    if (typeof r.role !== "string" || !(typeof r.content === "string" || r.content === null)) {
      throw new SnapshotError("malformed", `message ${i} has no string role and string content`);
    }
    return r as unknown as ChatMessage;
  });
}

export class SessionManager {
  private readonly resident = new Map<string, Session>();
  /** Per-id turn lock, so two requests on one session are never interleaved (also while it is being loaded). */
  private readonly locks = new Map<string, Promise<void>>();

  constructor(
    readonly engine: Engine,
    readonly store: SnapshotStore,
    readonly options: SessionManagerOptions,
  ) {}

  /** What a snapshot must match to be loaded into this server (its model, KV layout and context length). */
  snapshotExpectation(): SnapshotExpectation {
    const c = this.engine.model.folder.config;
    return {
      fingerprint: this.engine.info.fingerprint,
      modelId: this.engine.info.modelId,
      kvDtype: this.engine.model.io.kvDtype,
      layers: this.engine.model.io.layers,
      kvHeads: c.numKeyValueHeads,
      headDim: c.headDim,
      maxTokens: this.engine.info.contextLength,
    };
  }

  /** Throws session_busy if the session is in use and busy=reject (a caller that must answer before it starts checks here). */
  assertAvailable(id: string): void {
    assertSessionId(id);
    if (this.locks.has(id) && this.options.busy === "reject") throw new RuntimeError("session_busy", `session ${id} is busy with another request`);
  }

  /** Throws not_found unless the session is in memory or in the store. */
  private async assertExists(id: string): Promise<void> {
    if (!this.resident.has(id) && !(await this.store.has(id))) throw new RuntimeError("not_found", `no session with id ${id}`);
  }

  /**
   * Throws not_found, or session_busy under busy=reject, so that a route can answer 404 / 409 before it
   * opens a stream. The busy check is synchronous and last: nothing can take the lock between it and a
   * turn submitted right after.
   */
  async assertReady(id: string): Promise<void> {
    assertSessionId(id);
    await this.assertExists(id);
    this.assertAvailable(id);
  }

  /** Takes the session's lock: waits for the current holder, or refuses at once under busy=reject. Returns the release. */
  private async acquire(id: string): Promise<() => void> {
    this.assertAvailable(id);
    const previous = this.locks.get(id);
    let release!: () => void;
    const mine = new Promise<void>((resolve) => (release = resolve));
    const chain = (previous ?? Promise.resolve()).then(() => mine);
    this.locks.set(id, chain);
    await previous;
    const session = this.resident.get(id);
    if (session) session.busy = true;
    return () => {
      const s = this.resident.get(id);
      if (s) s.busy = false;
      if (this.locks.get(id) === chain) this.locks.delete(id);
      release();
    };
  }

  /** Runs `fn` holding the session's lock. */
  private async locked<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const release = await this.acquire(id);
    try {
      return await fn();
    } finally {
      release();
    }
  }

  private sessionFromSnapshot(data: SnapshotData, id: string): Session {
    const cache = this.engine.model.newCache();
    cache.assign(data.keys, data.values, data.positions, data.length, data.nextPosition);
    const m = data.meta;
    return new Session(id, m.createdAt, m.updatedAt, Array.from(data.tokens), cache, restoreMessages(m.messages), m.templateKwargs, m.compaction);
  }

  /** The session in memory, read back from the store if it was dropped from memory or the server restarted. */
  private async load(id: string): Promise<Session> {
    let session = this.resident.get(id);
    if (!session) {
      await this.assertExists(id);
      const data = await this.store.read(id, (source) => decodeSnapshot(source, this.snapshotExpectation()));
      session = this.sessionFromSnapshot(data, id);
      this.resident.set(id, session);
    }
    session.busy = true;
    session.lastUsed = ++useCounter;
    return session;
  }

  private async persist(session: Session): Promise<void> {
    session.updatedAt = Date.now();
    await this.store.save(session.id, encodeSnapshot(session.toSnapshot(this.engine), this.options.chunkTokens));
  }

  /** Drops the least recently used idle sessions from memory while the resident KV exceeds the budget (all are already stored). */
  private enforceBudget(): void {
    let total = 0;
    for (const s of this.resident.values()) total += s.cache.bytes;
    const idle = [...this.resident.values()].filter((s) => !s.busy).sort((a, b) => a.lastUsed - b.lastUsed);
    for (const s of idle) {
      if (total <= this.options.memoryBudgetBytes) break;
      this.resident.delete(s.id);
      total -= s.cache.bytes;
    }
  }

  private renderIds(session: Session, messages: ChatMessage[], addGenerationPrompt: boolean, tools?: ToolDefinition[] | null): Promise<number[]> {
    return this.engine.encodeChat(messages, { addGenerationPrompt, tools, extra: session.templateKwargs });
  }

  private async ingestMessages(
    session: Session,
    messages: ChatMessage[],
    onProgress?: (done: number, total: number) => void | Promise<void>,
    signal?: AbortSignal,
  ): Promise<IngestResult> {
    const promptIds = await this.renderIds(session, messages, false);
    const result = await this.engine.ingest(promptIds, () => session.reuseFor(promptIds), onProgress, signal);
    session.recordTokens(promptIds, []);
    session.messages = messages;
    await this.persist(session);
    return result;
  }

  async create(options: {
    id?: string;
    messages?: ChatMessage[];
    templateKwargs?: Record<string, unknown>;
    onProgress?: (done: number, total: number) => void | Promise<void>;
    signal?: AbortSignal;
  }): Promise<SessionInfo & { ingest: IngestResult | null }> {
    const id = options.id ?? `sess_${crypto.randomUUID().replaceAll("-", "").slice(0, 24)}`;
    const ingest = await this.locked(id, async () => {
      if (this.resident.has(id) || (await this.store.has(id))) throw invalidRequest(`a session with id ${id} already exists`, "id");
      const now = Date.now();
      const session = new Session(id, now, now, [], this.engine.model.newCache(), [], { date_string: templateDate(), ...options.templateKwargs });
      session.busy = true;
      this.resident.set(id, session);
      try {
        const result = options.messages?.length ? await this.ingestMessages(session, options.messages, options.onProgress, options.signal) : null;
        if (!result) await this.persist(session);
        return result;
      } catch (e) {
        this.resident.delete(id);
        await this.store.remove(id);
        throw e;
      } finally {
        this.enforceBudget();
      }
    });
    return { ...(await this.info(id)), ingest };
  }

  /** Adds a message (default role user) and reads it into the KV without generating. */
  async append(
    id: string,
    message: ChatMessage,
    onProgress?: (done: number, total: number) => void | Promise<void>,
    signal?: AbortSignal,
  ): Promise<SessionInfo & { ingest: IngestResult }> {
    const ingest = await this.locked(id, async () => {
      const session = await this.load(id);
      try {
        return await this.ingestMessages(session, [...session.messages, message], onProgress, signal);
      } finally {
        session.busy = false;
        this.enforceBudget();
      }
    });
    return { ...(await this.info(id)), ingest };
  }

  /**
   * Answers a conversation in the session: `messages` become its conversation, KV of the shared token prefix
   * is kept, only new tokens are prefilled, and the reply joins the messages.
   */
  async turn(id: string, request: TurnRequest, onDelta?: (text: string) => void | Promise<void>): Promise<GenerateResult> {
    return this.locked(id, async () => {
      const session = await this.load(id);
      try {
        const messages = request.messages(session.messages);
        const promptIds = await this.renderIds(session, messages, true, request.tools);
        const { messages: _, tools: __, ...generation } = request;
        const result = await this.engine.complete({ ...generation, promptIds, prepare: () => session.reuseFor(promptIds) }, onDelta);
        session.recordTokens(promptIds, result.tokenIds);
        session.messages = [...messages, { role: "assistant", content: result.text }];
        await this.persist(session);
        return result;
      } finally {
        session.busy = false;
        this.enforceBudget();
      }
    });
  }

  async info(id: string): Promise<SessionInfo> {
    assertSessionId(id);
    const session = this.resident.get(id);
    if (session) return session.info();
    await this.assertExists(id);
    const h = await this.store.read(id, readSnapshotHeader);
    const bytesPerSlot = h.layers * 2 * h.kvHeads * h.headDim * (h.kvDtype === "float16" ? 2 : 4);
    return {
      id,
      object: "session",
      created_at: Math.floor(h.meta.createdAt / 1000),
      updated_at: Math.floor(h.meta.updatedAt / 1000),
      tokens_read: h.tokenCount,
      tokens_resident: h.length,
      kv_bytes: h.length * bytesPerSlot,
      messages: h.meta.messages.length,
      in_memory: false,
      busy: this.locks.has(id),
    };
  }

  async list(): Promise<SessionInfo[]> {
    const ids = new Set([...this.resident.keys(), ...(await this.store.ids())]);
    const infos: SessionInfo[] = [];
    for (const id of ids) {
      try {
        infos.push(await this.info(id));
      } catch {
        // a stored file that cannot be read is left out of the list (it stays on disk for inspection)
      }
    }
    return infos.sort((a, b) => a.created_at - b.created_at || a.id.localeCompare(b.id));
  }

  async delete(id: string): Promise<void> {
    await this.locked(id, async () => {
      await this.assertExists(id);
      this.resident.delete(id);
      await this.store.remove(id);
    });
  }

  /**
   * Streams the session's stored snapshot (always current: every change is saved before its request ends),
   * holding the session's lock until the last byte is read or the reader goes away.
   */
  async download(id: string): Promise<{ stream: ReadableStream<Uint8Array>; bytes: number }> {
    const release = await this.acquire(id);
    let source: FileByteSource;
    let bytes: number;
    try {
      await this.assertExists(id);
      bytes = await this.store.size(id);
      source = await FileByteSource.open(this.store.path(id));
    } catch (e) {
      release();
      throw e;
    }
    const CHUNK = 1 << 20;
    const finish = async () => {
      await source.close();
      release();
    };
    const stream = new ReadableStream<Uint8Array>({
      async pull(controller) {
        const chunk = await source.read(CHUNK);
        if (chunk.length > 0) controller.enqueue(chunk);
        if (chunk.length < CHUNK) {
          controller.close();
          await finish();
        }
      },
      cancel: finish,
    });
    return { stream, bytes };
  }

  /**
   * Resumes a session from an uploaded snapshot: the upload is streamed to a temporary file under a size
   * limit, decoded and checked against this model, and only then replaces any session of that id.
   */
  async upload(id: string, body: ReadableStream<Uint8Array>, maxBytes: number): Promise<SessionInfo & { replaced: boolean }> {
    assertSessionId(id);
    const temp = await this.store.receive(body, maxBytes);
    try {
      const data = await this.store.readFile(temp, (source) => decodeSnapshot(source, this.snapshotExpectation()));
      return await this.locked(id, async () => {
        const replaced = this.resident.has(id) || (await this.store.has(id));
        const session = this.sessionFromSnapshot(data, id);
        await this.store.commit(temp, id);
        this.resident.set(id, session);
        session.lastUsed = ++useCounter;
        this.enforceBudget();
        return { ...session.info(), replaced };
      });
    } finally {
      await this.store.discard(temp);
    }
  }

  /**
   * Resolves once no session turn, append, upload or download holds a lock (or after `timeoutMs`):
   * shutdown calls it after the listener stops accepting, so every finished turn is persisted before exit.
   * Returns whether everything finished in time.
   */
  async drain(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (this.locks.size > 0) {
      const left = deadline - Date.now();
      if (left <= 0) return false;
      await Promise.race([Promise.all([...this.locks.values()]), new Promise((r) => setTimeout(r, left))]);
    }
    return true;
  }

  /**
   * For a request outside any session: a copy of the KV of the in-memory session that shares the longest
   * token prefix with `promptIds` (at least `minTokens`), or null. Call it inside the request's queue turn.
   */
  prefixCache(promptIds: number[], minTokens = 16): KvCache | null {
    let best: Session | null = null;
    let bestLength = 0;
    for (const s of this.resident.values()) {
      const n = commonPrefix(s.tokens, s.cache.length, promptIds);
      if (n > bestLength) {
        best = s;
        bestLength = n;
      }
    }
    bestLength = Math.min(bestLength, promptIds.length - 1);
    if (!best || bestLength < minTokens) return null;
    return best.cache.clone(bestLength);
  }
}
