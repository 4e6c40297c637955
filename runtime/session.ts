/**
 * One session's record: who owns it, its committed state (tokens read, the KV of a prefix of them, its
 * messages), its pinned template variables, where its KV came from, and its place in the memory budget.
 * The manager (sessions.ts) changes it only by building a new state beside the current one and swapping
 * it in after it is persisted.
 */
import type { ChatMessage } from "./chat-template.ts";
import type { StoreVersion } from "./session-store.ts";
import type { Engine, TokenizedPiece } from "./engine.ts";
import type { KvCache } from "./kv-cache.ts";
import type { KvHold } from "./kv-memory.ts";
import type { KvOrigin, SnapshotData, SnapshotLog } from "./snapshot.ts";

export interface SessionInfo {
  id: string;
  object: "session";
  created_at: number;
  updated_at: number;
  /** Tokens the session has read (its history). */
  tokens_read: number;
  /** KV slots held for it (fewer than tokens_read once compaction has dropped some). */
  tokens_resident: number;
  kv_bytes: number;
  /** KV archived by compaction's recall tier (bytes as stored), and blocks brought back so far. */
  kv_cold_bytes: number;
  recalled_blocks: number;
  messages: number;
  /** In memory now (else only in the store, read back on next use). */
  in_memory: boolean;
  busy: boolean;
}

/** strftime("%d %b %Y"), the form Llama-3.1's template writes its date line in. */
export function templateDate(now = new Date()): string {
  const months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
  return `${String(now.getDate()).padStart(2, "0")} ${months[now.getMonth()]} ${now.getFullYear()}`;
}

export function commonPrefix(a: ArrayLike<number>, aLength: number, b: ArrayLike<number>): number {
  const n = Math.min(aLength, b.length);
  let i = 0;
  while (i < n && a[i] === b[i]) i++;
  return i;
}

/** A counter, not a clock: several sessions can be touched within one millisecond. */
let useCounter = 0;
export const nextUse = () => ++useCounter;

/**
 * What a session is between changes: the tokens it has read, the KV of (a prefix of) them, its messages.
 * A change builds a new state beside the current one (the KV as a working copy), persists it, and only
 * then puts it in place, in one step: a cancelled or failed change leaves the old state untouched, and
 * nobody (the session's next turn, another request borrowing its KV) ever sees tokens and KV that disagree.
 */
export interface SessionState {
  /**
   * Every token read. Without compaction the first cache.length of them are the KV's slots; a compacted
   * cache has read them all (cache.tokensRead) and holds some, by position.
   */
  tokens: number[];
  cache: KvCache;
  messages: ChatMessage[];
  updatedAt: number;
  /** Long text pieces of the last render and where their ids lie in `tokens` (reused by the next render). */
  pieces: TokenizedPiece[];
}

export class Session {
  /** Order of last use, for LRU eviction. */
  lastUsed = nextUse();
  /** The snapshot log in the store as it holds `state` (a compacted session's), or null: write it whole next. */
  log: SnapshotLog | null = null;
  /** The store's version that holds `state` (null until first persisted): a resident copy is used only while it is the store's current one. */
  version: StoreVersion | null = null;
  constructor(
    readonly tenant: string,
    readonly id: string,
    readonly createdAt: number,
    public state: SessionState,
    readonly templateKwargs: Record<string, unknown>,
    /** Uploaded KV is only checked for shape: it is never lent to another session or request. */
    readonly origin: KvOrigin,
    /** The session's KV in the process's memory budget, while it is in memory. */
    readonly hold: KvHold,
    /** Reserved for the compaction issue: its policy state travels with the snapshot. */
    public compaction: unknown = null,
  ) {}

  get key(): string {
    return sessionKey(this.tenant, this.id);
  }

  /**
   * The ids of a text piece the session's last render tokenized (by its text's hash), for the next render
   * to reuse. An uploaded session starts with none recorded (the upload's are dropped).
   */
  knownPiece(hash: string): ArrayLike<number> | null {
    const { tokens, pieces } = this.state;
    const piece = pieces.find((p) => p.hash === hash);
    if (!piece || piece.start + piece.count > tokens.length) return null;
    return tokens.slice(piece.start, piece.start + piece.count);
  }

  /**
   * A working copy of the cache holding the longest prefix of `promptIds` it already has, leaving at least
   * one token to read. A compacted cache is not a prefix of anything but all it read: it is continued only
   * by a prompt that extends the whole history, and otherwise replaced by `fresh()` (everything read again).
   */
  workingCacheFor(promptIds: number[], fresh: () => KvCache): KvCache {
    const { tokens, cache } = this.state;
    if (cache.compactor?.hasDropped) {
      const extends_ = promptIds.length > tokens.length && commonPrefix(tokens, tokens.length, promptIds) === tokens.length;
      return extends_ ? cache.clone() : fresh();
    }
    let keep = commonPrefix(tokens, cache.length, promptIds);
    if (keep >= promptIds.length) keep = promptIds.length - 1;
    return cache.clone(keep);
  }

  toSnapshot(engine: Engine, state: SessionState): SnapshotData {
    const { cache } = state;
    // Views of the storage, not copies: persisting a million-token session must not hold its KV twice.
    const kv = cache.layerViews();
    return {
      fingerprint: engine.info.fingerprint,
      modelId: engine.info.modelId,
      kvDtype: cache.dtype,
      layers: cache.layers,
      kvHeads: cache.kvHeads,
      headDim: cache.headDim,
      tokens: Int32Array.from(state.tokens),
      length: cache.length,
      nextPosition: cache.nextPosition,
      positions: cache.positions.subarray(0, cache.length),
      keys: kv.keys,
      values: kv.values,
      arraySlots: kv.slots,
      compaction: cache.compactor
        ? {
            state: cache.compactor.state(),
            slotTokens: cache.tokens.subarray(0, cache.length),
            slotScores: cache.scores.subarray(0, cache.length),
            block: (b) => cache.compactor!.cold!.rawBlock(b),
            archiveId: cache.compactor.cold?.archiveId,
          }
        : null,
      meta: {
        id: this.id,
        createdAt: this.createdAt,
        updatedAt: state.updatedAt,
        messages: state.messages,
        templateKwargs: this.templateKwargs,
        compaction: this.compaction,
        origin: this.origin,
        pieces: state.pieces,
      },
    };
  }

  info(busy: boolean): SessionInfo {
    const { tokens, cache, messages, updatedAt } = this.state;
    return {
      id: this.id,
      object: "session",
      created_at: Math.floor(this.createdAt / 1000),
      updated_at: Math.floor(updatedAt / 1000),
      tokens_read: tokens.length,
      tokens_resident: cache.length,
      kv_bytes: cache.bytes,
      kv_cold_bytes: cache.compactor?.cold?.bytes ?? 0,
      recalled_blocks: cache.compactor?.stats.recalledBlocks ?? 0,
      messages: messages.length,
      in_memory: true,
      busy,
    };
  }
}

export const sessionKey = (tenant: string, id: string) => `${tenant}/${id}`;

