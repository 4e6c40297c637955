/**
 * Sessions: a conversation whose KV cache lives across requests, restarts and machines.
 *
 * A session holds its token history, its KV cache (every resident slot with its original position), its
 * chat messages, the template variables pinned at creation (the date line stays the same, so earlier
 * turns' KV stays valid), the model fingerprint (through its snapshots) and room for compaction state.
 *
 * Each turn renders the whole conversation with the model's template, keeps the KV of the longest prefix
 * the cache already holds, and prefills only the rest: a turn costs its new tokens, and its reply is
 * token-identical to a fresh request that carries the whole conversation. A change is all or nothing: it
 * is persisted to the tenant's session store before it takes effect. Sessions beyond the memory budget are
 * dropped from memory (least recently used first) and read back from the store on their next use.
 *
 * Several workers may share one store (runtime/session-store.ts: a directory, Redis, Deno KV). A change
 * holds the session's lease in the store (besides this process's lock), so two workers never advance one
 * session at once; a resident copy is used only while its version is the store's current one (else it is
 * read back), and every commit is fenced by the lease.
 *
 * The record and its state are in session.ts, the per-session locks in session-locks.ts, the memory
 * budget in kv-memory.ts, the store contract in session-store.ts (stores in stores/); this file is the
 * manager that ties them.
 */
import { assertTemplateKwargsAllowed, type ChatMessage, type ToolDefinition } from "./chat-template.ts";
import type { CompletionJob, Engine, TokenizedPiece } from "./engine.ts";

/** A conversation rendered for a session: its ids, and where its long text pieces lie in them. */
type Rendered = { ids: number[]; pieces: TokenizedPiece[] };
import { RuntimeError, invalidRequest } from "./errors.ts";
import type { GenerateResult } from "./generate.ts";
import type { KvCache } from "./kv-cache.ts";
import type { KvHold } from "./kv-memory.ts";
import { ColdTier } from "./kv/cold-tier.ts";
import { assertTemplateKwargsDepth, storedMessageSchema } from "./message-schema.ts";
import {
  decodeSnapshot,
  encodeSnapshot,
  encodeSnapshotDelta,
  planSnapshotDelta,
  SnapshotError,
  SnapshotLogTail,
  type ByteSource,
  type KvOrigin,
  type SnapshotData,
  type SnapshotExpectation,
} from "./snapshot.ts";
import { Exists, LeaseLost, NotFound, SessionBusy, StaleVersion, type Lease, type SessionStore, type SnapshotReader, type StoreVersion, type TenantStore } from "./session-store.ts";
import { assertSessionId } from "./stores/file-store.ts";
import { commonPrefix, nextUse, Session, sessionKey, templateDate, type SessionInfo, type SessionState } from "./session.ts";
import { SessionLocks, type BusyPolicy } from "./session-locks.ts";

export type { BusyPolicy, SessionInfo };
export { templateDate };

export interface SessionManagerOptions {
  /** KV bytes that resident sessions may hold together before the least recently used are dropped from memory. */
  memoryBudgetBytes: number;
  /** A second request on a busy session waits its turn, or is refused (409). */
  busy: BusyPolicy;
  /** Tokens per snapshot chunk. */
  chunkTokens: number;
  /** Uploads decoded at once (each holds its KV in memory while it is checked); more get 429. Default 2. */
  maxConcurrentUploads?: number;
  /**
   * How long a change's lease on its session lasts in the store without renewal (the holder renews it every
   * third of this while it lives): after a worker dies mid-turn, others wait at most this. Default 30 s.
   */
  leaseMs?: number;
}

/** A turn's generation, with the template variables the session pinned (its builtin_tools say which tool calls the reply may hold). */
export type TurnResult = GenerateResult & { templateKwargs: Record<string, unknown> };

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

export class SessionManager {
  /** Sessions in memory, by tenant/id. */
  private readonly resident = new Map<string, Session>();
  /** Two changes of one session never interleave (also while it is being loaded). */
  private readonly locks: SessionLocks;
  private uploadsDecoding = 0;

  constructor(
    readonly engine: Engine,
    /** The store; each tenant's sessions live in store.forTenant(tenant). */
    readonly store: SessionStore,
    readonly options: SessionManagerOptions,
  ) {
    this.locks = new SessionLocks(options.busy);
    // When a request's KV does not fit, idle sessions leave memory (they are all in the store).
    engine.kvMemory.setReclaimer((bytes) => this.evictIdle(bytes));
  }

  /** KV bytes held by sessions in memory. */
  get residentBytes(): number {
    let total = 0;
    for (const s of this.resident.values()) total += s.hold.bytes;
    return total;
  }

  /** Decodes a snapshot for this server, holding its KV in the memory budget (released if decoding fails). */
  private async decode(source: ByteSource, what: string, ownStore: boolean, limitBytes?: number): Promise<{ data: SnapshotData; hold: KvHold; cache: KvCache }> {
    let hold: KvHold | null = null;
    const cache = this.engine.model.newCache();
    try {
      const data = await decodeSnapshot(source, {
        ...this.snapshotExpectation(),
        kvArrays: (length) => cache.restoreTarget(length), // the KV is decoded straight into the cache's storage
        ownStore,
        limitBytes,
        // A compacted session: its compactor as recorded (then as each delta of its log says), its archived
        // blocks into a new archive of its own.
        onCompaction: (state) => {
          if (cache.compactor) cache.compactor.adopt(state);
          else cache.compactor = this.engine.restoreCompactor(state);
          const cold = cache.compactor.cold;
          return (block) => cold!.addRaw(block);
        },
        // A log's deltas each bring a resident set: the hold follows the latest.
        reserveKv: (bytes) => {
          try {
            (hold as KvHold | null)?.release();
            hold = null;
            hold = this.engine.kvMemory.reserve(bytes, what);
          } catch (e) {
            // A snapshot larger than the whole budget can never be loaded here: say so as a size refusal.
            if (e instanceof RuntimeError && e.kind === "invalid_request") throw new SnapshotError("too_large", e.message);
            throw e;
          }
        },
      });
      return { data, hold: hold ?? this.engine.kvMemory.reserve(0, what), cache };
    } catch (e) {
      (hold as KvHold | null)?.release();
      await cache.compactor?.dispose();
      throw e;
    }
  }

  /** What a snapshot must match to be loaded into this server (its model, KV layout, context length and vocabulary). */
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
      vocabSize: this.engine.info.vocabSize,
    };
  }

  private storeOf(tenant: string): TenantStore {
    return this.store.forTenant(tenant);
  }

  /** The messages of the session's copy in this process, if it has one (it may be behind another worker's: a pre-check only). */
  residentMessages(tenant: string, id: string): ChatMessage[] | null {
    return this.resident.get(sessionKey(tenant, id))?.state.messages ?? null;
  }

  /** Throws session_busy if the session is in use and busy=reject (a caller that must answer before it starts checks here). */
  assertAvailable(tenant: string, id: string): void {
    assertSessionId(id);
    this.locks.assertAvailable(sessionKey(tenant, id), id);
  }

  /** Throws not_found unless the tenant has this session, in memory or in its store. */
  private async assertExists(tenant: string, id: string): Promise<void> {
    if (!this.resident.has(sessionKey(tenant, id)) && !(await this.storeOf(tenant).has(id))) throw new RuntimeError("not_found", `no session with id ${id}`);
  }

  /**
   * Throws not_found, or session_busy under busy=reject, so that a route can answer 404 / 409 before it
   * opens a stream. The busy check is synchronous and last: nothing can take the lock between it and a
   * turn submitted right after.
   */
  async assertReady(tenant: string, id: string): Promise<void> {
    assertSessionId(id);
    await this.assertExists(tenant, id);
    this.assertAvailable(tenant, id);
  }

  /**
   * Runs `fn` holding the session's lock in this process and its lease in the store (waiting for another
   * worker's turn, or session_busy under busy=reject); afterwards sessions beyond the memory budget leave memory.
   */
  private async locked<T>(tenant: string, id: string, fn: (lease: Lease) => Promise<T>): Promise<T> {
    const release = await this.locks.acquire(sessionKey(tenant, id), id);
    let lease: Lease | null = null;
    try {
      try {
        lease = await this.storeOf(tenant).lease(id, { ttlMs: this.options.leaseMs ?? 30_000, wait: this.options.busy === "wait" });
      } catch (e) {
        if (e instanceof SessionBusy) throw new RuntimeError("session_busy", e.message);
        throw e;
      }
      return await fn(lease);
    } finally {
      await lease?.release().catch(() => {});
      release();
      this.enforceBudget();
    }
  }

  /** `cache` is the one decode() wrote the KV into (taken without copying). */
  private sessionFromSnapshot(data: SnapshotData, hold: KvHold, tenant: string, id: string, origin: KvOrigin, cache: KvCache): Session {
    cache.assign(data.keys, data.values, data.positions, data.length, data.nextPosition, data.arraySlots);
    if (data.compaction) {
      cache.tokens.set(data.compaction.slotTokens);
      cache.scores.set(data.compaction.slotScores);
      cache.tokensRead = data.tokens.length;
    } else {
      // Every token read is resident, slot i holding token i; compaction (if this server does it) starts now.
      cache.tokens.set(data.tokens.subarray(0, data.length));
      cache.compactor = this.engine.newCompactorIfAny();
    }
    const m = data.meta;
    const state: SessionState = { tokens: Array.from(data.tokens), cache, messages: m.messages as ChatMessage[], updatedAt: m.updatedAt, pieces: m.pieces ?? [] };
    return new Session(tenant, id, m.createdAt, state, m.templateKwargs, origin, hold, m.compaction);
  }

  /**
   * The session in memory, read back from its tenant's store if it was dropped from memory, the server
   * restarted, or another worker committed a newer version since this copy was read. Call it holding the lease.
   */
  private async load(tenant: string, id: string, lease: Lease): Promise<Session> {
    const key = sessionKey(tenant, id);
    const store = this.storeOf(tenant);
    let session = this.resident.get(key);
    let head: StoreVersion | null;
    try {
      head = await store.head(id);
    } catch (e) {
      throw new RuntimeError("store_failed", `session ${id} could not be read from the store; nothing changed`, null, e);
    }
    if (!head) {
      if (session) this.evict(session); // deleted by another worker
      throw new RuntimeError("not_found", `no session with id ${id}`);
    }
    if (session && session.version?.tag !== head.tag) {
      this.evict(session); // another worker changed it: this copy is out of date
      session = undefined;
    }
    if (!session) {
      const what = `reading session ${id} back`;
      const read = (limitBytes?: number) => store.read(id, async (source) => ({ ...(await this.decode(source, what, true, limitBytes)), version: source.version }));
      let decoded: Awaited<ReturnType<typeof read>>;
      try {
        decoded = await read();
      } catch (e) {
        if (e instanceof NotFound) throw new RuntimeError("not_found", `no session with id ${id}`);
        if (!(e instanceof SnapshotLogTail)) throw e;
        // A turn whose append did not finish (the process died): the session is as it was before that turn.
        console.warn(`session ${id}: ${e.message}; the log is cut back to its ${e.validBytes} whole bytes`);
        decoded = await read(e.validBytes);
        decoded.version = await store.truncate(id, e.validBytes, { lease });
      }
      const { data, hold, cache, version } = decoded;
      session = this.sessionFromSnapshot(data, hold, tenant, id, data.meta.origin, cache);
      session.version = version;
      // A log's next turn may append to it.
      if (data.log) session.log = data.log;
      this.resident.set(key, session);
    }
    session.lastUsed = nextUse();
    return session;
  }

  /**
   * Writes `state` as the session's snapshot; the session in memory is not touched, but for its log's
   * record. A compacted session whose log holds its current state gets a delta appended (what changed)
   * while the deltas, this one included, stay within the size of the whole snapshot they follow; else
   * the log is written again whole, as one segment. So the file stays within twice the session's size,
   * and what turns write stays proportional to what they changed (a document appended to an empty
   * session becomes the log's first segment at once, not a delta that a later turn must rewrite).
   */
  private async persist(session: Session, state: SessionState, lease: Lease, options: { replace?: boolean } = {}): Promise<void> {
    const store = this.storeOf(session.tenant);
    // Based on the version this copy was read from (none: a create); an upload replaces whatever is there.
    const expect = options.replace ? undefined : session.version;
    const next = session.toSnapshot(this.engine, state);
    const log = session.log;
    try {
      if (log && session.version) {
        const plan = planSnapshotDelta(session.toSnapshot(this.engine, session.state), next);
        if (plan && log.bytes - log.baseBytes + plan.bytes <= log.baseBytes) {
          session.version = await store.append(session.id, encodeSnapshotDelta(next, plan, log.deltas + 1, log.bytes, this.options.chunkTokens), session.version, { lease });
          session.log = { bytes: session.version.bytes, baseBytes: log.baseBytes, deltas: log.deltas + 1 };
          return;
        }
      }
      session.version = await store.save(session.id, encodeSnapshot(next, this.options.chunkTokens), { lease, expect });
      session.log = next.compaction ? { bytes: session.version.bytes, baseBytes: session.version.bytes, deltas: 0 } : null;
    } catch (e) {
      if (e instanceof RuntimeError) throw e;
      if (e instanceof Exists) throw invalidRequest(`a session with id ${session.id} already exists`, "id");
      if (e instanceof StaleVersion || e instanceof LeaseLost) {
        // Another worker committed to the session (this worker's lease had lapsed): nothing of this change was written.
        throw new RuntimeError("session_busy", `session ${session.id} was changed by another worker during this request, so this change was not saved; it is as that worker left it`, null, e);
      }
      // The disk said no (full, read-only, gone): the client learns that the change did not happen; the log gets the cause.
      throw new RuntimeError("store_failed", `session ${session.id} could not be saved, so the change did not take effect; it is as it was before this request`, null, e);
    }
  }

  /**
   * Changes a session all or nothing: `work` reads `promptIds` into a working copy of the KV (its queue turn
   * calls `prepare`); unless it was cancelled, the new state is persisted and then put in place. A
   * cancellation or any error (the model, the disk) leaves the session exactly as it was.
   */
  private async change<T>(
    session: Session,
    lease: Lease,
    { ids: promptIds, pieces }: Rendered,
    work: (prepare: () => KvCache) => Promise<{ result: T; generated: number[]; cancelled: boolean; messages: ChatMessage[] }>,
  ): Promise<T> {
    let working: KvCache | null = null;
    const { result, generated, cancelled, messages } = await work(() => (working = session.workingCacheFor(promptIds, () => this.engine.newCache())));
    if (cancelled || !working) return result;
    const cache: KvCache = working;
    const tokens = [...promptIds, ...generated].slice(0, cache.tokensRead);
    const next: SessionState = { tokens, cache, messages, updatedAt: Date.now(), pieces: pieces.filter((p) => p.start + p.count <= tokens.length) };
    await this.persist(session, next, lease);
    session.state = next;
    // The new cache exists already (the request's reservation covered it while it was built): count it.
    session.hold.resize(cache.bytes, true);
    return result;
  }

  /** Drops a session from memory (it stays in the store) and gives its KV back to the budget. */
  private evict(session: Session): void {
    if (this.resident.get(session.key) === session) this.resident.delete(session.key);
    session.hold.release();
  }

  /** Idle sessions, least recently used first. */
  private idleSessions(): Session[] {
    return [...this.resident.values()].filter((s) => !this.locks.isHeld(s.key)).sort((a, b) => a.lastUsed - b.lastUsed);
  }

  /** Drops the least recently used idle sessions from memory while the resident KV exceeds the session budget (all are already stored). */
  private enforceBudget(): void {
    let total = this.residentBytes;
    for (const s of this.idleSessions()) {
      if (total <= this.options.memoryBudgetBytes) break;
      total -= s.hold.bytes;
      this.evict(s);
    }
  }

  /** Frees at least `bytes` of KV memory if idle sessions hold that much, least recently used first. */
  private evictIdle(bytes: number): void {
    let freed = 0;
    for (const s of this.idleSessions()) {
      if (freed >= bytes) break;
      freed += s.hold.bytes;
      this.evict(s);
    }
  }

  /** The conversation's ids; long text pieces the session tokenized last time are not tokenized again. */
  private renderIds(session: Session, messages: ChatMessage[], addGenerationPrompt: boolean, tools: ToolDefinition[] | null, signal?: AbortSignal): Promise<Rendered> {
    return this.engine.encodeChatPieces(messages, { addGenerationPrompt, tools, extra: session.templateKwargs }, signal, (hash) => session.knownPiece(hash));
  }

  /** Reads `messages` (the whole conversation) into the session without generating. */
  private async ingestMessages(
    session: Session,
    lease: Lease,
    messages: ChatMessage[],
    onProgress?: (done: number, total: number) => void | Promise<void>,
    signal?: AbortSignal,
  ): Promise<IngestResult> {
    assertStorableMessages(messages);
    const rendered = await this.renderIds(session, messages, false, null, signal);
    const promptIds = rendered.ids;
    return this.change(session, lease, rendered, async (prepare) => {
      // A cancellation during prefill throws out of ingest: nothing is committed.
      const result = await this.engine.ingest(promptIds, prepare, onProgress, signal);
      return { result, generated: [], cancelled: false, messages };
    });
  }

  async create(options: {
    tenant: string;
    id?: string;
    messages?: ChatMessage[];
    templateKwargs?: Record<string, unknown>;
    onProgress?: (done: number, total: number) => void | Promise<void>;
    signal?: AbortSignal;
  }): Promise<SessionInfo & { ingest: IngestResult | null }> {
    const { tenant } = options;
    const id = options.id ?? newSessionId();
    assertSessionId(id);
    // A template that dates the prompt by the clock gets today's date pinned, so the system header (and the
    // KV of every earlier turn) stays the same across midnight; one with a fixed default keeps it, as a plain request renders it.
    const templateKwargs = { ...(this.engine.template.readsClock ? { date_string: templateDate() } : {}), ...options.templateKwargs };
    assertTemplateKwargsAllowed(templateKwargs);
    assertTemplateKwargsDepth(templateKwargs);
    const ingest = await this.locked(tenant, id, async (lease) => {
      const store = this.storeOf(tenant);
      if (await store.has(id)) throw invalidRequest(`a session with id ${id} already exists`, "id");
      const now = Date.now();
      const empty: SessionState = { tokens: [], cache: this.engine.newCache(), messages: [], updatedAt: now, pieces: [] };
      const session = new Session(tenant, id, now, empty, templateKwargs, "computed", this.engine.kvMemory.reserve(0, "a new session"));
      // Nothing is stored or listed until the session's first state is persisted: a failed read leaves no trace.
      try {
        let result: IngestResult | null = null;
        if (options.messages?.length) result = await this.ingestMessages(session, lease, options.messages, options.onProgress, options.signal);
        else await this.persist(session, empty, lease);
        this.resident.set(session.key, session);
        return result;
      } catch (e) {
        session.hold.release();
        throw e;
      }
    });
    return { ...(await this.info(tenant, id)), ingest };
  }

  /** Adds a message (default role user) and reads it into the KV without generating. */
  async append(
    tenant: string,
    id: string,
    message: ChatMessage,
    onProgress?: (done: number, total: number) => void | Promise<void>,
    signal?: AbortSignal,
  ): Promise<SessionInfo & { ingest: IngestResult }> {
    const ingest = await this.locked(tenant, id, async (lease) => {
      const session = await this.load(tenant, id, lease);
      return this.ingestMessages(session, lease, [...session.state.messages, message], onProgress, signal);
    });
    return { ...(await this.info(tenant, id)), ingest };
  }

  /**
   * Answers a conversation in the session: `messages` become its conversation, KV of the shared token prefix
   * is kept, only new tokens are prefilled, and the reply joins the messages. A turn whose client went away
   * changes nothing.
   */
  async turn(tenant: string, id: string, request: TurnRequest, onDelta?: (text: string) => void | Promise<void>): Promise<TurnResult> {
    return this.locked(tenant, id, async (lease) => {
      const session = await this.load(tenant, id, lease);
      const messages = request.messages(session.state.messages);
      assertStorableMessages(messages);
      const rendered = await this.renderIds(session, messages, true, request.tools ?? null, request.signal);
      const promptIds = rendered.ids;
      const { messages: _, tools: __, ...generation } = request;
      return this.change(session, lease, rendered, async (prepare) => {
        const result = await this.engine.complete({ ...generation, promptIds, prepare }, onDelta);
        const reply: ChatMessage = { role: "assistant", content: result.text };
        return { result: { ...result, templateKwargs: session.templateKwargs }, generated: result.tokenIds, cancelled: result.finishReason === "cancelled", messages: [...messages, reply] };
      });
    });
  }

  async info(tenant: string, id: string): Promise<SessionInfo> {
    assertSessionId(id);
    const session = this.resident.get(sessionKey(tenant, id));
    const busy = this.locks.isHeld(sessionKey(tenant, id));
    const store = this.storeOf(tenant);
    let head: StoreVersion | null;
    try {
      head = await store.head(id);
    } catch (e) {
      // The store cannot be read now: the copy in memory is what there is to show.
      if (session) return session.info(busy);
      throw e;
    }
    // The resident copy, while it is the store's current version (or being changed here: its commit is next).
    if (session && (busy || session.version?.tag === head?.tag)) return session.info(busy);
    if (!head) throw new RuntimeError("not_found", `no session with id ${id}`);
    let h: Awaited<ReturnType<TenantStore["summary"]>>;
    try {
      h = await store.summary(id);
    } catch (e) {
      if (e instanceof NotFound) throw new RuntimeError("not_found", `no session with id ${id}`);
      throw e;
    }
    const bytesPerSlot = h.layers * 2 * h.kvHeads * h.headDim * (h.kvDtype === "float16" ? 2 : 4);
    return {
      id,
      object: "session",
      created_at: Math.floor(h.createdAt / 1000),
      updated_at: Math.floor(h.updatedAt / 1000),
      tokens_read: h.tokenCount,
      tokens_resident: h.length,
      kv_bytes: h.length * bytesPerSlot,
      kv_cold_bytes: h.compaction ? h.compaction.blocks * ColdTier.blockBytes(h, h.compaction.settings.coldFormat, h.compaction.settings.blockTokens) : 0,
      recalled_blocks: h.compaction?.recalledBlocks ?? 0,
      messages: h.messages,
      in_memory: false,
      busy,
    };
  }

  /** The tenant's sessions, in memory and in its store. */
  async list(tenant: string): Promise<SessionInfo[]> {
    const ids = new Set([...this.resident.values()].filter((s) => s.tenant === tenant).map((s) => s.id));
    for (const id of await this.storeOf(tenant).ids()) ids.add(id);
    const infos: SessionInfo[] = [];
    for (const id of ids) {
      try {
        infos.push(await this.info(tenant, id));
      } catch {
        // a stored file that cannot be read is left out of the list (it stays on disk for inspection)
      }
    }
    return infos.sort((a, b) => a.created_at - b.created_at || a.id.localeCompare(b.id));
  }

  /** Deletes the session from the store, then from memory: a delete that fails leaves it as it was. */
  async delete(tenant: string, id: string): Promise<void> {
    await this.locked(tenant, id, async (lease) => {
      try {
        if (!(await this.storeOf(tenant).head(id))) throw new RuntimeError("not_found", `no session with id ${id}`);
        await this.storeOf(tenant).remove(id, { lease });
      } catch (e) {
        if (e instanceof RuntimeError) throw e;
        if (e instanceof LeaseLost) throw new RuntimeError("session_busy", `session ${id} was taken over by another worker; it was not deleted`, null, e);
        throw new RuntimeError("store_failed", `session ${id} could not be deleted from the store; it is still there`, null, e);
      }
      const session = this.resident.get(sessionKey(tenant, id));
      if (session) this.evict(session);
    });
  }

  /**
   * Streams the session's stored snapshot, which is always current (a change is persisted before it takes
   * effect). The open file is the version current when the download began, up to its committed bytes: a
   * later turn renames a new file over it, or appends a delta past those bytes, without touching what is
   * being read, so no lock is held while a slow client reads.
   */
  async download(tenant: string, id: string): Promise<{ stream: ReadableStream<Uint8Array>; bytes: number }> {
    assertSessionId(id);
    await this.assertExists(tenant, id);
    // A log that ends in an unfinished delta (the process died while appending it) is read back first,
    // which cuts the delta off: a download is always a snapshot that uploads.
    if (!this.resident.has(sessionKey(tenant, id))) {
      const summary = await this.storeOf(tenant).summary(id).catch(() => null);
      if (summary && !summary.whole) await this.locked(tenant, id, async (lease) => void (await this.load(tenant, id, lease)));
    }
    const CHUNK = 1 << 20;
    let source: SnapshotReader;
    try {
      // A buffer of one chunk: each chunk is read straight into the bytes sent, not through a larger buffer.
      source = await this.storeOf(tenant).open(id, CHUNK);
    } catch (e) {
      if (e instanceof NotFound) throw new RuntimeError("not_found", `no session with id ${id}`);
      throw e;
    }
    let closed = false;
    const close = async () => {
      if (closed) return;
      closed = true;
      await source.close();
    };
    const stream = new ReadableStream<Uint8Array>({
      async pull(controller) {
        const chunk = await source.read(CHUNK);
        if (chunk.length > 0) controller.enqueue(chunk);
        if (chunk.length < CHUNK) {
          controller.close();
          await close();
        }
      },
      cancel: close,
    });
    return { stream, bytes: source.size };
  }

  /**
   * Resumes a session from an uploaded snapshot: the upload is streamed to a temporary file under a size
   * limit, decoded and checked against this model (tokens in the vocabulary, positions, finite KV, messages
   * and template variables as the API would take them), and only then replaces any session of that id of
   * the same tenant. The store gets a snapshot written by this server, marking the KV as uploaded: it is
   * never lent to another session or request.
   */
  async upload(tenant: string, id: string, body: ReadableStream<Uint8Array>, maxBytes: number): Promise<SessionInfo & { replaced: boolean }> {
    assertSessionId(id);
    const store = this.storeOf(tenant);
    const limit = this.options.maxConcurrentUploads ?? 2;
    if (this.uploadsDecoding >= limit) throw new RuntimeError("queue_full", `${limit} snapshot uploads are being read already; retry later`);
    this.uploadsDecoding++;
    let hold: KvHold | null = null;
    try {
      const staged = await store.stage(body, maxBytes);
      try {
        const source = await staged.open();
        const decoded = await this.decode(source, "the uploaded snapshot", false).finally(() => source.close());
        hold = decoded.hold;
        const { data } = decoded;
        // Where the uploader says its text pieces lie in its tokens is not taken on trust: the first turn
        // tokenizes the conversation afresh and records its own.
        data.meta.pieces = [];
        return await this.locked(tenant, id, async (lease) => {
          const previous = this.resident.get(sessionKey(tenant, id));
          const replaced = await store.has(id);
          const session = this.sessionFromSnapshot(data, decoded.hold, tenant, id, "uploaded", decoded.cache);
          await this.persist(session, session.state, lease, { replace: true });
          if (previous) this.evict(previous);
          this.resident.set(session.key, session);
          hold = null; // the session holds it now
          session.lastUsed = nextUse();
          return { ...session.info(false), replaced };
        });
      } finally {
        await staged.discard();
      }
    } finally {
      (hold as KvHold | null)?.release();
      this.uploadsDecoding--;
    }
  }

  /**
   * A new session of the tenant that starts as `id`'s committed state (messages, KV, template variables,
   * compaction) and then goes its own way: the store shares the parent's stored bytes (copy-on-write), so
   * a fork of a long document costs almost nothing until one side's next turn, and neither side's turns
   * change the other. Deleting the parent keeps its forks. A turn running on the parent is not waited for:
   * the fork is the last committed version.
   */
  async fork(tenant: string, id: string, options: { id?: string } = {}): Promise<SessionInfo> {
    assertSessionId(id);
    const forkId = options.id ?? newSessionId();
    assertSessionId(forkId);
    try {
      await this.storeOf(tenant).fork(id, forkId);
    } catch (e) {
      if (e instanceof NotFound) throw new RuntimeError("not_found", `no session with id ${id}`);
      if (e instanceof Exists) throw invalidRequest(`a session with id ${forkId} already exists`, "id");
      throw new RuntimeError("store_failed", `session ${id} could not be forked: ${(e as Error).message}`, null, e);
    }
    return this.info(tenant, forkId);
  }

  /**
   * Resolves once no session turn, append, upload or delete holds a lock (or after `timeoutMs`):
   * shutdown calls it after the listener stops accepting, so every finished turn is persisted before exit.
   * Returns whether everything finished in time.
   */
  drain(timeoutMs: number): Promise<boolean> {
    return this.locks.drain(timeoutMs);
  }

  /**
   * For a request outside any session: a copy of the KV of the tenant's in-memory session that shares the
   * longest token prefix with `promptIds` (at least `minTokens`), or null. Only KV this server computed is
   * lent, and only within a tenant. Call it inside the request's queue turn; it reads sessions' committed
   * states, whose tokens and KV always agree.
   */
  prefixCache(tenant: string, promptIds: number[], minTokens = 16): KvCache | null {
    let best: Session | null = null;
    let bestLength = 0;
    for (const s of this.resident.values()) {
      // A compacted cache's slots are no prefix to lend.
      if (s.tenant !== tenant || s.origin !== "computed" || s.state.cache.compactor?.hasDropped) continue;
      const n = commonPrefix(s.state.tokens, s.state.cache.length, promptIds);
      if (n > bestLength) {
        best = s;
        bestLength = n;
      }
    }
    bestLength = Math.min(bestLength, promptIds.length - 1);
    if (!best || bestLength < minTokens) return null;
    return best.state.cache.clone(bestLength);
  }
}

/**
 * How a request that names a session (chat completions with session_id) relates to its history:
 * - "extend" (default): the request's messages are the whole conversation, as OpenAI clients send it; they
 *   must begin with the session's (its system, user and developer messages in order: assistant and tool
 *   turns may come back in another form), else the request is refused, saying how to continue;
 * - "append": the request's messages are new ones, added to the session's history;
 * - "replace": the request's messages become the conversation (the session keeps the KV of what they share).
 */
export type SessionHistoryMode = "extend" | "append" | "replace";

export function conversationFor(id: string, current: ChatMessage[], incoming: ChatMessage[], mode: SessionHistoryMode = "extend"): ChatMessage[] {
  if (mode === "append") return [...current, ...incoming];
  if (mode === "replace") return incoming;
  const said = (list: ChatMessage[]) => list.filter((m) => m.role === "system" || m.role === "user" || m.role === "developer").map((m) => `${m.role}\u0000${JSON.stringify(m.content)}`);
  const before = said(current);
  const now = said(incoming);
  if (before.length <= now.length && before.every((m, i) => m === now[i])) return incoming;
  throw invalidRequest(
    `session ${id} holds ${current.length} messages, and this request's messages do not begin with them: with session_id the messages are the whole ` +
      `conversation (as an OpenAI client sends it). To add only new messages, send "session_history": "append" (or post the message to ` +
      `/v1/sessions/${id}/messages); to start the conversation over from these messages, send "session_history": "replace"`,
    "messages",
  );
}

const newSessionId = () => `sess_${crypto.randomUUID().replaceAll("-", "").slice(0, 24)}`;

/** Messages a session takes must be storable as they are (the snapshot reader's limits). */
function assertStorableMessages(messages: ChatMessage[]): void {
  messages.forEach((m, i) => {
    const parsed = storedMessageSchema.safeParse(m);
    if (!parsed.success) {
      const issue = parsed.error.issues[0]!;
      throw invalidRequest(`messages.${i}.${issue.path.join(".")}: ${issue.message}`, `messages.${i}`);
    }
  });
}
