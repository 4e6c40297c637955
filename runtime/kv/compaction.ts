/**
 * Streaming KV compaction: keeps a cache within a budget of resident slots whatever the number of tokens
 * read, and keeps what it drops in a recall tier from which the blocks a new question needs come back.
 *
 * Policies (one interface: which slots stay when the cache passes its budget; nothing is dropped before):
 *   none       every slot stays (no compactor is attached at all)
 *   window     sinks (the first tokens) + the most recent tokens + recalled blocks (StreamingLLM)
 *   attention  sinks + recent tokens + the slots that have received the most attention so far (H2O): the
 *              graph's slot_attention output, summed over runs. Graphs without that output (exported
 *              Optimum graphs) keep the most recent slots instead.
 * With recall (the default for `attention`), every token that leaves the recent window is first archived
 * in blocks of consecutive tokens (int8 with a scale per head and slot, or float32), each with its token
 * ids and a Quest summary (per channel min and max of its keys). Before the last tokens of a prompt are
 * read, the blocks its question points to are brought back into the resident set (pinned until the next
 * recall): scored lexically by default (the question's rare tokens each block holds), or by the
 * question's queries against the summaries and keys (a probe run whose KV is dropped).
 *
 * A compactor travels with its cache (clones copy it, sharing the append-only archive) and with a
 * session's snapshot (state(), restore(), the archive's blocks as frames: snapshot.ts).
 * Every slot keeps its original position (what the session records); kept slots attend as where they were
 * read, recalled ones by default from just before the prompt's last tokens (recallPlacement).
 * Everything here is deterministic: the same tokens and settings give the same resident set.
 */
import { z } from "zod";
import { cpuKernels as K } from "../../kernels/compaction.ts";
import type { KvArray } from "../../kernels/kv-slots.ts";
import type { KvCache, KvDtype } from "../kv-cache.ts";
import { bigramKey, ColdTier, type ColdStorage } from "./cold-tier.ts";

export type CompactionPolicyName = "none" | "window" | "attention";

export interface CompactionSettings {
  policy: CompactionPolicyName;
  /** Most slots resident after a compaction; a run adds at most one prefill chunk on top. */
  budget: number;
  /**
   * First tokens always kept: the attention sinks, and the head of the prompt (system header, the start
   * of the instruction). 64 by default (a 16th of smaller budgets): with the 4 of StreamingLLM, the fixture lost the instruction
   * line and answered multi-key questions wrongly 3 times in 10 at 32K; with 64, none.
   */
  sinks: number;
  /**
   * Most recent tokens always kept. The window policy keeps only these (and sinks, and recalled blocks):
   * the cache grows to the budget while reading and is cut back to them; the default fills the budget.
   */
  recent: number;
  /** Archive what leaves the recent window and bring the best blocks back for a prompt's last tokens. */
  recall: boolean;
  /** Tokens per archived block. */
  blockTokens: number;
  /** Most blocks brought back per prompt (each with the block before it). */
  recallBlocks: number;
  /** Blocks scoring below this fraction of the best block's score are not brought back. */
  recallCutoff: number;
  /** How archived KV is stored: int8 (a scale per head and slot) or float32. */
  coldFormat: "int8" | "float32";
  /** Last tokens of a prompt run as the recall probe. */
  probeTokens: number;
  /**
   * How archived blocks are scored against the probe: "lexical" (the probe's token ids each block holds,
   * rare ones weighing most) or "keys" (the attention the probe's queries would give each block: Quest
   * bounds, then exact dots for the best candidates).
   */
  recallScorer: "lexical" | "keys";
  /** Slots a compaction frees below the budget, so that decoding compacts once per this many tokens. */
  slack: number;
  /**
   * Where the slots kept apart from the recent tokens attend from. "near": the resident set is laid out
   * as one stretch of text, as StreamingLLM lays out its cache: the sinks' keys are moved (a rotary turn,
   * kernels rotateSlots) to the positions just before the slots that follow them, and recalled blocks to
   * the positions just before the run of tokens that ends the cache (the recent window), with the sinks
   * before them; so a question reads a recalled needle from a few hundred positions away, as text it has
   * just read (InfLLM places its memory units the same way). "original": every slot attends from where
   * it was read. Slot positions (what sessions record, prefix reuse and snapshots) are the original ones
   * either way. Graphs whose rope type has no fixed frequencies (the model config's ropeInvFreq null)
   * always keep "original".
   */
  recallPlacement: "near" | "original";
}

/** Scores at or above this mark slots that stay for the rest of the request (recalled blocks). */
export const PINNED = Math.fround(1e30); // as a Float32Array stores it

const nonNegative = z.number().int().min(0).max(2 ** 31 - 1);
/** A compactor's state as a snapshot carries it (its archived blocks travel as frames of their own). */
export const compactionStateSchema = z.object({
  settings: z.object({
    policy: z.enum(["window", "attention"]),
    budget: z.number().int().min(64).max(2 ** 30),
    sinks: nonNegative,
    recent: nonNegative,
    recall: z.boolean(),
    blockTokens: z.number().int().min(1).max(4096),
    recallBlocks: z.number().int().min(1).max(65536),
    recallCutoff: z.number().min(0).max(1),
    coldFormat: z.enum(["int8", "float32"]),
    probeTokens: z.number().int().min(0).max(65536),
    recallScorer: z.enum(["lexical", "keys"]),
    slack: z.number().int().min(1).max(2 ** 30),
    // Snapshots written before placement existed recalled at the original positions; they go on so.
    recallPlacement: z.enum(["near", "original"]).default("original"),
  }),
  evicted: nonNegative,
  compactions: nonNegative,
  recalls: nonNegative,
  recalledBlocks: nonNegative,
  pinned: nonNegative,
  // How far the sinks' keys have been moved ("near" placement); 0 in snapshots written before it existed.
  sinkShift: nonNegative.default(0),
  archivedUpTo: nonNegative,
  blocks: nonNegative,
});
export type CompactionState = z.infer<typeof compactionStateSchema>;

/** Full settings from a policy and budget (and any overrides); throws RangeError on values that cannot work. */
export function compactionSettings(policy: CompactionPolicyName, budget: number, overrides: Partial<CompactionSettings> = {}): CompactionSettings {
  const attention = policy === "attention";
  const sinks = overrides.sinks ?? Math.min(64, Math.floor(budget / 16));
  const blockTokens = overrides.blockTokens ?? 64;
  const recall = overrides.recall ?? attention;
  // At least 4: a single best block loses to a filler block that shares a rare word with the question.
  const recallBlocks = overrides.recallBlocks ?? Math.max(Math.min(4, Math.floor(budget / 4 / blockTokens)), Math.floor(budget / 16 / blockTokens));
  const probeTokens = overrides.probeTokens ?? 16;
  const slack = overrides.slack ?? Math.max(1, Math.min(256, Math.floor(budget / 16)));
  // What a compaction can never drop besides the recent tokens: the sinks, recalled blocks (each with the
  // block before it: a needle can straddle the boundary) and the tokens not archived yet (under a block).
  const kept = sinks + (recall ? 2 * recallBlocks * blockTokens + blockTokens : 0);
  const s: CompactionSettings = {
    policy,
    budget,
    sinks,
    recent: overrides.recent ?? Math.min(attention ? Math.floor(budget / 4) : budget, budget - slack - kept),
    recall,
    blockTokens,
    recallBlocks,
    recallCutoff: overrides.recallCutoff ?? 0.8,
    coldFormat: overrides.coldFormat ?? "int8",
    probeTokens,
    recallScorer: overrides.recallScorer ?? "lexical",
    slack,
    recallPlacement: overrides.recallPlacement ?? "near",
  };
  if (!Number.isInteger(s.budget) || s.budget < 64) throw new RangeError(`the KV budget must be at least 64 slots, got ${budget}`);
  if (s.slack >= s.budget) throw new RangeError("slack must be below the budget");
  if (s.recent < 0 || !Number.isInteger(s.recent)) throw new RangeError(`the budget (${s.budget}) is too small for the sinks and recalled blocks asked for (recent window ${s.recent})`);
  // Then a compaction always gets back under the budget less its slack, whatever is pinned.
  if (kept + s.recent > s.budget - s.slack) {
    throw new RangeError(
      `sinks (${s.sinks}) + recent (${s.recent})` +
        (s.recall ? ` + recalled blocks (${s.recallBlocks} x 2 x ${s.blockTokens}) + one block not archived yet` : "") +
        ` exceed the budget less its slack (${s.budget} - ${s.slack})`,
    );
  }
  if (s.recall && s.probeTokens > s.recent) throw new RangeError(`the probe (${s.probeTokens} tokens) must lie within the recent window (${s.recent})`);
  return s;
}

export interface CompactionShape {
  layers: number;
  kvHeads: number;
  headDim: number;
  /** Query heads (a multiple of kvHeads). */
  heads: number;
  dtype: KvDtype;
  /** RoPE inverse frequencies (headDim / 2; runtime/rope.ts), to move keys; null or absent: keys never move. */
  invFreq?: Float32Array | null;
}

export interface CompactionStats {
  /** Slots dropped from the resident set (recalled ones count again when dropped again). */
  evicted: number;
  compactions: number;
  /** Prompts whose blocks were scored, and blocks brought back. */
  recalls: number;
  recalledBlocks: number;
}

/** What lexical recall knows of the tokenizer (the engine gives the model's; the default searches every token of the probe). */
export interface Lexicon {
  /** Token ids never searched for (the model's special tokens). */
  readonly ignored: ReadonlySet<number>;
  /**
   * The part of the probe searched for: the engine gives the last sentence of the text before the chat
   * template's closing tokens (the question, not the text it follows).
   */
  questionOf(probe: ArrayLike<number>): number[];
  /**
   * Function words ("what", "is", "the", "for": a standard English stop list): alone they are no evidence
   * and count only in a pair with a content word ("for table", "the pass"); two of them in a row ("what
   * is") count not at all. Without this, at 1M tokens a filler sentence asking "What is the ..." beside
   * the word "pass" outranked the pass-key needle (1 question in 20 on held-out haystacks, none with it).
   */
  isFunctionWord(id: number): boolean;
}

const EVERY_TOKEN: Lexicon = { ignored: new Set(), questionOf: (probe) => Array.from(probe), isFunctionWord: () => false };

export class KvCompactor {
  readonly stats: CompactionStats = { evicted: 0, compactions: 0, recalls: 0, recalledBlocks: 0 };

  constructor(
    readonly settings: CompactionSettings,
    readonly shape: CompactionShape,
    /** Archived blocks (null without recall). */
    readonly cold: ColdTier | null,
    readonly lexicon: Lexicon = EVERY_TOKEN,
  ) {}

  /** A compactor for a new cache; `storage` holds its archived blocks (default: memory). */
  static create(settings: CompactionSettings, shape: CompactionShape, storage?: ColdStorage, lexicon?: Lexicon): KvCompactor {
    const cold = settings.recall ? new ColdTier(shape, settings.coldFormat, storage, settings.recallScorer === "keys") : null;
    return new KvCompactor(settings, shape, cold, lexicon);
  }

  /** Whether slots have been dropped (then slot i no longer holds token i). */
  get hasDropped(): boolean {
    return this.stats.evicted > 0;
  }

  /** The policy reads the graph's slot_attention. */
  get needsAttention(): boolean {
    return this.settings.policy === "attention";
  }

  /** A prompt's last tokens should be probed for recall: there are archived blocks to score. */
  get canRecall(): boolean {
    return this.cold !== null && this.cold.blockCount > 0;
  }

  /** What a snapshot records of this compactor (its archived blocks are written apart: cold.rawBlock). */
  state(): CompactionState {
    const { policy } = this.settings;
    if (policy === "none") throw new Error("state: no compaction");
    return {
      settings: { ...this.settings, policy },
      ...this.stats,
      pinned: this.pinned,
      sinkShift: this.sinkShift,
      archivedUpTo: this.cold?.archivedUpTo ?? 0,
      blocks: this.cold?.blockCount ?? 0,
    };
  }

  /**
   * A compactor as a snapshot recorded it, with an empty archive in `storage` that the snapshot's blocks
   * are then added to (ColdTier.addRaw).
   */
  static restore(
    state: CompactionState,
    shape: CompactionShape,
    storage?: ColdStorage,
    lexicon?: Lexicon,
  ): KvCompactor {
    const settings = compactionSettings(state.settings.policy, state.settings.budget, state.settings);
    const compactor = KvCompactor.create(settings, shape, storage, lexicon);
    compactor.adopt(state);
    return compactor;
  }

  /**
   * Takes a later state of the same compactor (a snapshot log's delta): its counters and pinned slots. Its
   * archive grows by the blocks that follow it in the log.
   */
  adopt(state: CompactionState): void {
    const { evicted, compactions, recalls, recalledBlocks } = state;
    Object.assign(this.stats, { evicted, compactions, recalls, recalledBlocks });
    this.pinned = state.pinned;
    this.sinkShift = state.sinkShift;
  }

  clone(): KvCompactor {
    const copy = new KvCompactor(this.settings, this.shape, this.cold?.clone() ?? null, this.lexicon);
    Object.assign(copy.stats, this.stats);
    copy.pinned = this.pinned;
    copy.sinkShift = this.sinkShift;
    return copy;
  }

  /** Releases what the archive holds outside the heap (a file). */
  async dispose(): Promise<void> {
    await this.cold?.dispose();
  }

  /** After a run: if the cache passed its budget, archive what left the recent window and compact to budget - slack. */
  maintain(cache: KvCache, attentionKnown: boolean): void {
    const { budget, slack, policy, sinks, recent } = this.settings;
    // Nothing is dropped while the cache fits its budget. Once it has not, window keeps only sinks + recent
    // + pinned, and is cut back as soon as it holds a slack more than that (letting it grow to the budget
    // again would only make every run read slots it is about to drop).
    const limit = policy === "window" && this.hasDropped ? Math.min(budget, sinks + recent + this.pinned + slack) : budget;
    if (cache.length <= limit) return;
    this.compactTo(cache, budget - slack, attentionKnown);
  }

  /** Slots brought back by the last recall (pinned; window keeps them beside sinks and recent). */
  private pinned = 0;
  /** Positions the sinks' keys have been moved by ("near" placement): sink p attends from p + sinkShift. */
  private sinkShift = 0;

  /** Keys move under "near" placement when the model's rotary frequencies are known. */
  private get invFreqToMove(): Float32Array | null {
    return this.settings.recallPlacement === "near" ? (this.shape.invFreq ?? null) : null;
  }

  /** Turns keys ([kvHeads, count, headDim], cache dtype) by shifts[j] positions; returns them in the cache's dtype. */
  private turned(keys: KvArray, shifts: Int32Array, invFreq: Float32Array): KvArray {
    const f32 = K.toFloat32(keys);
    K.rotateSlots(f32, shifts.length, { heads: this.shape.kvHeads, headDim: this.shape.headDim }, shifts, invFreq);
    return keys instanceof Float32Array ? f32 : K.toFloat16Bits(f32);
  }

  /**
   * "near" placement: moves the sinks' keys so that they end just before `anchor` (by default, the first
   * position of the other resident slots), never before where they were read.
   */
  private placeSinks(cache: KvCache, anchor?: number): void {
    const invFreq = this.invFreqToMove;
    if (!invFreq) return;
    const { sinks } = this.settings;
    const slots: number[] = [];
    let first = Number.POSITIVE_INFINITY;
    for (let i = 0; i < cache.length; i++) {
      const p = cache.positions[i]!;
      if (p < sinks) slots.push(i);
      else first = Math.min(first, p);
    }
    const end = anchor ?? first;
    if (slots.length === 0 || !Number.isFinite(end)) return;
    const shift = Math.max(0, end - slots.length);
    const delta = shift - this.sinkShift;
    if (delta === 0) return;
    const at = Int32Array.from(slots);
    const { keys } = cache.readSlots(at, at.length);
    const shifts = new Int32Array(at.length).fill(delta);
    cache.rewriteKeys(at, keys.map((k) => this.turned(k, shifts, invFreq)));
    this.sinkShift = shift;
  }

  private compactTo(cache: KvCache, target: number, attentionKnown: boolean): void {
    const { sinks, recent } = this.settings;
    const n = cache.length;
    const positions = cache.positions;
    const scores = cache.scores;
    const recentFrom = cache.nextPosition - recent;
    const archivedUpTo = this.cold ? this.archive(cache, recentFrom) : Number.POSITIVE_INFINITY;
    // Protected: sinks, the recent window, pinned (recalled) slots, and what is not archived yet.
    const evictable = new Int32Array(n);
    let evictableCount = 0;
    let protectedCount = 0;
    const isProtected = new Uint8Array(n);
    for (let i = 0; i < n; i++) {
      const p = positions[i]!;
      if (p < sinks || p >= recentFrom || p >= archivedUpTo || scores[i]! >= PINNED) {
        isProtected[i] = 1;
        protectedCount++;
      } else evictable[evictableCount++] = i;
    }
    // window keeps nothing beyond its protected slots (StreamingLLM: sinks and a window of `recent`).
    const room = this.settings.policy === "window" ? 0 : Math.max(0, target - protectedCount);
    if (room >= evictableCount) return;
    const keepMiddle = new Uint8Array(n);
    if (room > 0) {
      if (this.settings.policy === "attention" && attentionKnown) {
        const candidateScores = new Float32Array(evictableCount);
        for (let j = 0; j < evictableCount; j++) candidateScores[j] = scores[evictable[j]!]!;
        const best = K.topK(candidateScores, evictableCount, room);
        for (let j = 0; j < best.length; j++) keepMiddle[evictable[best[j]!]!] = 1;
      } else {
        // attention without the graph's slot_attention: the most recent of the evictable slots (by position).
        const order = Array.from(evictable.subarray(0, evictableCount)).sort((a, b) => positions[b]! - positions[a]!);
        for (let j = 0; j < room; j++) keepMiddle[order[j]!] = 1;
      }
    }
    const keep = new Int32Array(n);
    let count = 0;
    for (let i = 0; i < n; i++) if (isProtected[i] || keepMiddle[i]) keep[count++] = i;
    this.stats.evicted += n - count;
    this.stats.compactions++;
    cache.compact(keep, count);
    // Recalled blocks, while pinned, keep the sinks where the recall put them (just before the blocks).
    if (this.pinned === 0) this.placeSinks(cache);
  }

  /**
   * Archives, in whole blocks, the resident tokens not archived yet that lie before `upTo` (the recent
   * window's start); returns the position below which every token is archived.
   */
  private archive(cache: KvCache, upTo: number): number {
    const cold = this.cold!;
    const B = this.settings.blockTokens;
    const from = cold.archivedUpTo;
    const pending: number[] = [];
    for (let i = 0; i < cache.length; i++) {
      const p = cache.positions[i]!;
      if (p >= from && p < upTo) pending.push(i);
    }
    // Slots of tokens not archived yet were never dropped and were appended in reading order.
    pending.sort((a, b) => cache.positions[a]! - cache.positions[b]!);
    const whole = Math.floor(pending.length / B) * B;
    for (let start = 0; start < whole; start += B) {
      const slots = Int32Array.from(pending.slice(start, start + B));
      const { keys, values } = cache.readSlots(slots, B);
      const positions = new Int32Array(B);
      const tokens = new Int32Array(B);
      for (let j = 0; j < B; j++) {
        positions[j] = cache.positions[slots[j]!]!;
        tokens[j] = cache.tokens[slots[j]!]!;
      }
      cold.add(keys, values, positions, tokens, B);
    }
    return cold.archivedUpTo;
  }

  /**
   * Brings back the archived blocks that the probe's queries (per layer [heads, rows, headDim], after
   * rotary) point to most, pinned, making room for them first. Returns the number of blocks brought back.
   */
  recall(cache: KvCache, probe: ArrayLike<number>, queries: Float32Array[] | undefined): number {
    const cold = this.cold;
    const rows = probe.length;
    if (!cold || cold.blockCount === 0 || rows === 0) return 0;
    const scores = this.settings.recallScorer === "keys" && queries ? this.keyScores(cache, cold, queries, rows) : this.lexicalScores(cold, probe);
    return this.bringBack(cache, cold, scores);
  }

  /**
   * Blocks scored by the question's tokens and pairs they hold (rare ones weigh most); blocks holding none
   * score -1. The question is what the lexicon takes from the probe (the engine: its last sentence, not the
   * text it follows); special tokens (the chat template's structure) are never searched for, function
   * words only beside a content word (see Lexicon).
   */
  lexicalScores(cold: ColdTier, probe: ArrayLike<number>): Float32Array {
    const { ignored, isFunctionWord } = this.lexicon;
    const question = this.lexicon.questionOf(probe);
    const wanted = question.filter((t) => !ignored.has(t) && !isFunctionWord(t));
    // Adjacent pairs too: a needle shares "for table" with its question, where a distractor needle beside a
    // filler sentence about a table shares each word alone (at 1M tokens such blocks tied with the needle).
    const pairs: number[] = [];
    for (let i = 1; i < question.length; i++) {
      const [a, b] = [question[i - 1]!, question[i]!];
      if (!ignored.has(a) && !ignored.has(b) && !(isFunctionWord(a) && isFunctionWord(b))) pairs.push(bigramKey(a, b));
    }
    const scores = new Float32Array(cold.blockCount);
    cold.lexicalScores(wanted, scores, pairs);
    for (let b = 0; b < scores.length; b++) if (scores[b]! <= 0) scores[b] = -1;
    return scores;
  }

  /** Blocks scored by the share of the probe's attention they would draw (see recall); unscored blocks -1. */
  private keyScores(cache: KvCache, cold: ColdTier, queries: Float32Array[], rows: number): Float32Array {
    const { heads, headDim, kvHeads, layers } = this.shape;
    const blocks = cold.blockCount;
    const scale = 1 / Math.sqrt(headDim);
    // Each query row's attention over what is resident: exp(q.k * scale - max) summed, per layer, head, row.
    // A block then gets, from every row, the share of that row's attention it would draw beside the
    // resident slots; rows busy with the local context give the archive almost nothing.
    const all = Int32Array.from({ length: cache.length }, (_, i) => i);
    const resident = cache.readSlots(all, cache.length);
    const rowMax: Float32Array[] = [];
    const rowSum: Float32Array[] = [];
    const dots = new Float32Array(heads * rows);
    for (let l = 0; l < layers; l++) {
      const keys = K.toFloat32(resident.keys[l]!);
      const max = new Float32Array(heads * rows).fill(-Infinity);
      const sum = new Float32Array(heads * rows);
      // blockMaxDots over one-slot "blocks" gives q.k per slot; an online log-sum-exp keeps it one pass.
      const one = new Float32Array(kvHeads * headDim);
      for (let slot = 0; slot < cache.length; slot++) {
        for (let kv = 0; kv < kvHeads; kv++) one.set(keys.subarray((kv * cache.length + slot) * headDim, (kv * cache.length + slot + 1) * headDim), kv * headDim);
        K.blockMaxDots(queries[l]!, heads, rows, headDim, kvHeads, one, 1, dots);
        for (let i = 0; i < heads * rows; i++) {
          const x = dots[i]! * scale;
          if (x > max[i]!) {
            sum[i] = sum[i]! * Math.exp(max[i]! - x) + 1;
            max[i] = x;
          } else sum[i]! += Math.exp(x - max[i]!);
        }
      }
      rowMax.push(max);
      rowSum.push(sum);
    }
    /** Adds each block's share of every row's attention, given per-layer [blocks, heads, rows] best dots. */
    const vote = (best: Float32Array[], count: number, out: Float32Array) => {
      for (let l = 0; l < layers; l++) {
        for (let i = 0; i < heads * rows; i++) {
          const m = rowMax[l]![i]!;
          let total = rowSum[l]![i]!;
          for (let b = 0; b < count; b++) total += Math.exp(best[l]![b * heads * rows + i]! * scale - m);
          for (let b = 0; b < count; b++) out[b]! += Math.exp(best[l]![b * heads * rows + i]! * scale - m) / total;
        }
      }
    };
    // Stage 1: every block by its summary's upper bound; stage 2: the best few by their keys' exact dots.
    const bounds = Array.from({ length: layers }, (_, l) => {
      const out = new Float32Array(blocks * heads * rows);
      K.blockUpperBounds(queries[l]!, heads, rows, headDim, kvHeads, cold.mins[l]!, cold.maxs[l]!, blocks, out);
      return out;
    });
    const rough = new Float32Array(blocks);
    vote(bounds, blocks, rough);
    const candidates = Array.from(K.topK(rough, blocks, 4 * this.settings.recallBlocks));
    const exact = Array.from({ length: layers }, () => new Float32Array(candidates.length * heads * rows));
    const read = new Map<number, ReturnType<ColdTier["read"]>>();
    candidates.forEach((b, c) => {
      const block = cold.read(b);
      read.set(b, block);
      for (let l = 0; l < layers; l++) {
        K.blockMaxDots(queries[l]!, heads, rows, headDim, kvHeads, K.toFloat32(block.keys[l]!), block.positions.length, dots);
        exact[l]!.set(dots, c * heads * rows);
      }
    });
    const fine = new Float32Array(candidates.length);
    vote(exact, candidates.length, fine);
    const scores = new Float32Array(blocks).fill(-1);
    candidates.forEach((b, c) => (scores[b] = fine[c]!));
    // Blocks of sinks (always resident, drawing attention from every row) are in the rows' normalization;
    // as candidates they would only set the cutoff. (Blocks an earlier recall brought are resident too,
    // but only until this recall's compaction: they compete like the others.)
    const { sinks } = this.settings;
    for (const b of candidates) if (cold.blockPositions(b).every((p) => p < sinks)) scores[b] = -1;
    return scores;
  }

  /**
   * For "near" placement, where the `incoming` recalled tokens go: in reading order and without gaps,
   * just before the run of `resident` positions (the cache's, now) that ends the cache (the recent window
   * and the tokens not archived yet), from `start`. `shifts` gives, block after block, how far each token's keys move (never
   * to an earlier position). Slot positions (what the session records, what prefix reuse and snapshots
   * use) stay the original ones. Null when keys stay where they were read.
   */
  private placement(cache: KvCache, resident: ReadonlySet<number>, incoming: number): { start: number; invFreq: Float32Array; shifts: (positions: Int32Array) => Int32Array } | null {
    const invFreq = this.invFreqToMove;
    if (!invFreq || incoming === 0) return null;
    let runStart = cache.nextPosition;
    while (runStart > 0 && resident.has(runStart - 1)) runStart--;
    const start = runStart - incoming;
    let next = start;
    return {
      start,
      invFreq,
      shifts: (positions) => positions.map((p) => Math.max(0, next++ - p)),
    };
  }

  /** Brings back the best-scoring blocks (score >= 0) not resident already, pinned. Returns how many. */
  private bringBack(cache: KvCache, cold: ColdTier, scores: Float32Array): number {
    const blocks = cold.blockCount;
    const { headDim, kvHeads } = this.shape;
    // Only blocks that score close to the best: each extra block that merely shares the question's common
    // words (other needles of the same form) is one more place for the answer to be copied from.
    const top = K.topK(scores, blocks, this.settings.recallBlocks);
    let best = -1;
    for (const b of top) best = Math.max(best, scores[b]!);
    const hits = Array.from(top).filter((b) => scores[b]! >= 0 && scores[b]! >= this.settings.recallCutoff * best);
    // The best blocks, with the block before each.
    const wanted = [...new Set(hits.flatMap((b) => (b > 0 ? [b - 1, b] : [b])))].sort((a, b) => a - b);
    if (wanted.length === 0) return 0;
    const B = this.settings.blockTokens;
    // Room first: unpin earlier recalls, compact so the blocks and the prompt's last tokens fit the budget.
    for (let i = 0; i < cache.length; i++) if (cache.scores[i]! >= PINNED) cache.scores[i] = 0;
    this.pinned = 0;
    // Always compacted here, so that a question is answered over the same kind of resident set wherever it
    // falls in the cycle of growing and compacting (window: exactly sinks + recent + these blocks).
    const incoming = wanted.length * B + this.settings.probeTokens;
    this.compactTo(cache, this.settings.budget - incoming, true);
    // What is resident now (the sinks, above all) is not added twice; what an earlier recall brought and
    // this compaction dropped comes back from the archive like any other block. (Resident tokens were
    // taken as they stood before the compaction until a later question on the same needle, beside a
    // block not resident, lost it: the needle was skipped as resident, then dropped.)
    const residentPositions = new Set<number>();
    for (let i = 0; i < cache.length; i++) residentPositions.add(cache.positions[i]!);
    const chosen = wanted.filter((b) => !cold.blockPositions(b).every((p) => residentPositions.has(p)));
    if (chosen.length === 0) return 0;
    const takes = chosen.map((b) => {
      const positions = cold.blockPositions(b);
      return Int32Array.from(positions.keys()).filter((j) => !residentPositions.has(positions[j]!));
    });
    const place = this.placement(cache, residentPositions, takes.reduce((n, t) => n + t.length, 0));
    chosen.forEach((b, c) => {
      const block = cold.read(b);
      const take = takes[c]!;
      const count = take.length;
      const pick = (a: KvArray) => {
        if (count === B) return a;
        const out = a instanceof Float32Array ? new Float32Array(kvHeads * count * headDim) : new Uint16Array(kvHeads * count * headDim);
        K.gatherSlots(a, B, take, count, out, count, 0, { heads: kvHeads, headDim });
        return out;
      };
      const positions = new Int32Array(count);
      const tokens = new Int32Array(count);
      for (let j = 0; j < count; j++) {
        positions[j] = block.positions[take[j]!]!;
        tokens[j] = block.tokens[take[j]!]!;
      }
      const shifts = place?.shifts(positions);
      const keys = block.keys.map((k) => (place && shifts ? this.turned(pick(k), shifts, place.invFreq) : pick(k)));
      cache.appendSlots(keys, block.values.map(pick), positions, tokens, new Float32Array(count).fill(PINNED), count);
      this.pinned += count;
    });
    if (place) this.placeSinks(cache, place.start);
    this.stats.recalls++;
    this.stats.recalledBlocks += chosen.length;
    return chosen.length;
  }
}
