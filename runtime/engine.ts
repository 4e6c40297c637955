/**
 * The Engine is what an entry point builds once and hands to the HTTP app: the model folder, its ONNX
 * session on the chosen backend, the tokenizer, the chat template, and the FIFO queue in front of them.
 * It speaks messages, text and token ids; it knows no HTTP.
 */
import { selectBackend, type BackendName, type BackendRequest } from "./backend.ts";
import { ChatTemplate, type ChatMessage, type RenderOptions } from "./chat-template.ts";
import { ChunkedEncoder } from "./chunked-encode.ts";
import { RuntimeError, invalidRequest } from "./errors.ts";
import { decode, prefillPrompt, type GenerateResult } from "./generate.ts";
import type { TokenLogprob } from "./logprobs.ts";
import { LlamaModel } from "./llama-model.ts";
import { createHash } from "node:crypto";
import { open, readFile } from "node:fs/promises";
import { join } from "node:path";
import { eng as stopwords } from "stopword";
import type { KvCache } from "./kv-cache.ts";
import { FileColdStorage } from "./kv/cold-tier.ts";
import { KvCompactor, compactionSettings, type CompactionPolicyName, type CompactionSettings, type CompactionShape, type CompactionState, type Lexicon } from "./kv/compaction.ts";
import { tmpdir } from "node:os";
import { KvMemory } from "./kv-memory.ts";
import { loadModelFolder, variantUsesFloat16, type ModelFolder, type ModelVariant } from "./model-folder.ts";
import { RequestQueue } from "./request-queue.ts";
import { DEFAULT_SAMPLING, type SamplingParams } from "./sampling.ts";
import { TextTokenizer } from "./tokenizer.ts";
import { yieldToEventLoop } from "./yield.ts";

/**
 * A digest of what decides the meaning of a KV cache: config.json, tokenizer.json, the variant and KV
 * dtype, and the graph files (their sizes and first and last MiB: hashing a many-GB graph whole would
 * cost seconds at every start).
 */
async function modelFingerprint(folder: ModelFolder, kvDtype: string): Promise<string> {
  const hash = createHash("sha256");
  hash.update(await readFile(join(folder.dir, "config.json")));
  hash.update(await readFile(join(folder.dir, "tokenizer.json")));
  hash.update(`${folder.variant}|${kvDtype}`);
  const MiB = 1 << 20;
  for (const file of [folder.onnxFile, ...folder.externalData.map((f) => f.file)]) {
    const handle = await open(file, "r");
    try {
      const { size } = await handle.stat();
      hash.update(`|${size}|`);
      const head = new Uint8Array(Math.min(MiB, size));
      await handle.read(head, 0, head.length, 0);
      hash.update(head);
      if (size > MiB) {
        const tail = new Uint8Array(Math.min(MiB, size - MiB));
        await handle.read(tail, 0, tail.length, size - tail.length);
        hash.update(tail);
      }
    } finally {
      await handle.close();
    }
  }
  return hash.digest("hex").slice(0, 32);
}

export interface EngineOptions {
  modelDir: string;
  /** Model id reported by /v1/models; defaults to the folder name. */
  modelId?: string;
  variant: ModelVariant | "auto";
  backend: BackendRequest;
  threads: number;
  queueLimit: number;
  /** Tokens of context a request may use (prompt + completion); 0 means the model's max_position_embeddings. */
  contextLength: number;
  prefillChunk: number;
  /** KV bytes the process may hold in all (sessions, running requests, uploads being read); default 8 GiB. */
  kvMemoryBytes?: number;
  /** Bounds on text before and while it is tokenized (defaults: DEFAULT_TEXT_LIMITS). */
  textLimits?: Partial<TextLimits>;
  /**
   * Milliseconds one prefill forward pass should take: the chunk shrinks below prefillChunk to fit, so the
   * event loop (which a synchronous session.run holds) gets turns often. 0 (the default here; the server's
   * is DEFAULT_PREFILL_TARGET_MS): always prefillChunk tokens.
   */
  prefillTargetMs?: number;
  /**
   * KV compaction of every cache (requests and sessions): at most `budget` slots resident (plus one
   * prefill chunk while reading), the rest dropped by `policy` and, with recall, archived in a file under
   * coldDir (default: the system's temporary directory). Undefined or policy "none": every slot stays.
   */
  compaction?: { policy: CompactionPolicyName; budget: number; coldDir?: string } & Partial<CompactionSettings>;
}

export interface TextLimits {
  /** Characters of one text field of a request (a message's content, a prompt, a document). */
  maxFieldChars: number;
  /** Characters tokenized for one request: the rendered chat (a session's whole conversation) or the prompt. */
  maxPromptChars: number;
  /** Longest run without a break (a word, a number, a run of spaces or symbols): its tokenization cannot pause. */
  maxRunChars: number;
}

/** A million-token context is about 4 MB of text: documents that size pass; one "word" of 2 MB does not. */
export const DEFAULT_TEXT_LIMITS: TextLimits = { maxFieldChars: 8 * 2 ** 20, maxPromptChars: 16 * 2 ** 20, maxRunChars: 8192 };
export const DEFAULT_PREFILL_TARGET_MS = 50;

/** Text pieces shorter than this are tokenized again every time (cheaper than hashing and recording them). */
export const MEMO_MIN_CHARS = 1024;

/** Where a text piece's ids lie in an encoding: its text's SHA-256 (hex), first index, count. */
export interface TokenizedPiece {
  hash: string;
  start: number;
  count: number;
}

export interface EngineInfo {
  modelId: string;
  /** Identifies the exact model (config, tokenizer, graph, variant): snapshots from another model are refused. */
  fingerprint: string;
  modelDir: string;
  variant: ModelVariant;
  backend: BackendName;
  backendDetail: string;
  contextLength: number;
  vocabSize: number;
  kvDtype: string;
  /** KV bytes one token of context costs on this model. */
  kvBytesPerToken: number;
  loadMs: number;
  createdAt: number;
}

export interface CompletionJob {
  promptIds: number[];
  /**
   * Runs when the job's turn in the queue comes: the KV cache to continue, holding a strict prefix of
   * promptIds (a session's cache, a reused prefix). Default: a fresh cache.
   */
  prepare?: () => KvCache;
  /** Undefined: up to the end of the context. */
  maxTokens?: number;
  sampling: Partial<SamplingParams>;
  stop: string[];
  /** Generate past eos ids (llama.cpp's ignore_eos). */
  ignoreEos?: boolean;
  signal?: AbortSignal;
  /** Each generated token id, before its text (see GenerateRequest.onToken); `index`: the sample's (see n). */
  onToken?: (id: number, index: number) => void;
  /** Independent samples from one prefill (default 1): sample i draws with seed + i, on its own copy of the prompt's KV. */
  n?: number;
  /** Each generated token's logprob with this many alternatives (0: none); undefined: no logprobs. */
  logprobs?: number;
  /**
   * The prompt tokens' logprobs too, with this many alternatives: every prompt position's logits are
   * computed, so the cache must hold none of the prompt (`prepare` is not called).
   */
  promptLogprobs?: number;
  /** Called once the prompt is read, before the first token is chosen (with the prompt's logprobs when asked for). */
  onPrefilled?: (promptLogprobs?: (TokenLogprob | null)[]) => void | Promise<void>;
}

/** Text deltas of sample `index` (0 unless n > 1), with the logprobs of their tokens when asked for. */
export type CompletionDelta = (text: string, logprobs?: TokenLogprob[], index?: number) => void | Promise<void>;

/** What compaction did in a request (CompletionResult.kv). */
export interface KvReport {
  /** Slots resident at the end, of the tokens the cache read (prompt + reply). */
  residentSlots: number;
  tokensRead: number;
  evicted: number;
  /** Archived KV bytes (the recall tier) and blocks brought back. */
  coldBytes: number;
  recalledBlocks: number;
}

/**
 * A completion: the first sample's text, tokens and finish reason at the top (with completionTokens and
 * decodeMs over all samples), every sample in `choices`, and the prompt's logprobs when asked for.
 */
export type CompletionResult = GenerateResult & { kv: KvReport; choices: GenerateResult[]; promptLogprobs?: (TokenLogprob | null)[] };

export interface EngineMetrics {
  requests: number;
  /** Requests whose client went away during generation (counted in requests too). */
  cancelled: number;
  /** Requests (completions and ingests) whose client went away while they waited in the queue: they never ran. */
  cancelledQueued: number;
  promptTokens: number;
  completionTokens: number;
  prefillMs: number;
  decodeMs: number;
}

export const DEFAULT_KV_MEMORY_BYTES = 8 * 2 ** 30;
let coldFiles = 0;

export class Engine {
  readonly metrics: EngineMetrics = { requests: 0, cancelled: 0, cancelledQueued: 0, promptTokens: 0, completionTokens: 0, prefillMs: 0, decodeMs: 0 };
  /** Characters of chat text tokenized so far (pieces reused from a session's last render are not). */
  chatCharsTokenized = 0;

  private constructor(
    readonly info: EngineInfo,
    readonly model: LlamaModel,
    readonly tokenizer: TextTokenizer,
    readonly template: ChatTemplate,
    private readonly queue: RequestQueue,
    private readonly prefillChunk: number,
    /** Every KV cache holds a reservation here while it exists. */
    readonly kvMemory: KvMemory,
    readonly textLimits: TextLimits,
    /** Plain text (special-token strings are text), and text whose special-token strings are specials (parse_special). */
    private readonly encoders: { plain: ChunkedEncoder; parseSpecial: ChunkedEncoder },
    /** Compaction of every cache (null: none), and where archives go. */
    readonly compaction: CompactionSettings | null,
    private readonly coldDir: string,
  ) {}

  static async load(options: EngineOptions): Promise<Engine> {
    const t0 = performance.now();
    const folder = await loadModelFolder(options.modelDir, options.variant);
    const backend = await selectBackend(options.backend, options.threads, { float16Io: variantUsesFloat16(folder.variant) });
    const model = await LlamaModel.load(folder, backend);
    model.prefillTargetMs = options.prefillTargetMs ?? 0;
    const tokenizer = new TextTokenizer(folder.tokenizerJson, folder.tokenizerConfig);
    // Build the plain-text tokenizer now (~0.3 s), not inside the first request, where it would hold the event loop.
    tokenizer.encode("warm up", false, false);
    const textLimits = { ...DEFAULT_TEXT_LIMITS, ...options.textLimits };
    const encoders = {
      plain: new ChunkedEncoder(folder.tokenizerJson, (text, addSpecial) => tokenizer.encode(text, addSpecial, false), textLimits),
      parseSpecial: new ChunkedEncoder(folder.tokenizerJson, (text, addSpecial) => tokenizer.encode(text, addSpecial, true), textLimits),
    };
    const template = new ChatTemplate(folder.tokenizerConfig, tokenizer.specialTokens);
    const c = folder.config;
    const kvBytesPerToken = c.numLayers * 2 * c.numKeyValueHeads * c.headDim * (model.io.kvDtype === "float16" ? 2 : 4);
    const info: EngineInfo = {
      modelId: options.modelId ?? folder.id,
      fingerprint: await modelFingerprint(folder, model.io.kvDtype),
      modelDir: folder.dir,
      variant: folder.variant,
      backend: backend.name,
      backendDetail: backend.detail,
      contextLength: options.contextLength > 0 ? Math.min(options.contextLength, c.maxPositionEmbeddings) : c.maxPositionEmbeddings,
      vocabSize: c.vocabSize,
      kvDtype: model.io.kvDtype,
      kvBytesPerToken,
      loadMs: Math.round(performance.now() - t0),
      createdAt: Math.floor(Date.now() / 1000),
    };
    const kvMemory = new KvMemory(options.kvMemoryBytes ?? DEFAULT_KV_MEMORY_BYTES);
    const c2 = options.compaction;
    const compaction = c2 && c2.policy !== "none" ? compactionSettings(c2.policy, c2.budget, c2) : null;
    return new Engine(info, model, tokenizer, template, new RequestQueue(options.queueLimit), options.prefillChunk, kvMemory, textLimits, encoders, compaction, c2?.coldDir ?? tmpdir());
  }

  get queueState(): { busy: boolean; waiting: number; limit: number } {
    return { busy: this.queue.busy, waiting: this.queue.waiting, limit: this.queue.limit };
  }

  /** Throws queue_full if a completion submitted now would be refused (see RequestQueue.checkAdmission). */
  checkAdmission(): void {
    this.queue.checkAdmission();
  }

  /** Throws invalid_request naming `param` if any id is not a token of this model's vocabulary. */
  checkTokenIds(ids: readonly number[], param: string): void {
    const vocab = this.info.vocabSize;
    const bad = ids.find((id) => !Number.isInteger(id) || id < 0 || id >= vocab);
    if (bad !== undefined) throw invalidRequest(`${param}: token id ${bad} is outside the vocabulary (0..${vocab - 1})`, param);
  }

  renderChat(messages: ChatMessage[], options: RenderOptions = {}): string {
    return this.template.render(messages, options);
  }

  /**
   * Token ids of a chat: special tokens only where the template wrote them (request text is plain text),
   * the text between them tokenized in pieces that give the event loop turns. The template's text already
   * holds the BOS token, so none is added.
   */
  async encodeChat(messages: ChatMessage[], options: RenderOptions = {}, signal?: AbortSignal): Promise<number[]> {
    return (await this.encodeChatPieces(messages, options, signal)).ids;
  }

  /**
   * encodeChat, and where each long text piece (the text between two special tokens, MEMO_MIN_CHARS or
   * more) went in the ids, by the SHA-256 of its text. `reuse` may return a piece's ids from an earlier
   * encoding (a session's, from its last render): they are taken instead of tokenizing the text again if
   * they hold no special token and no id outside the vocabulary. A session's next turn then tokenizes
   * only what is new; its ids are the same as a fresh encoding's, since the reused ones were one.
   */
  async encodeChatPieces(
    messages: ChatMessage[],
    options: RenderOptions = {},
    signal?: AbortSignal,
    reuse?: (hash: string) => ArrayLike<number> | null,
  ): Promise<{ ids: number[]; pieces: TokenizedPiece[] }> {
    const rendered = this.template.renderPieces(messages, options);
    this.assertPromptChars(rendered.reduce((n, p) => n + p.length, 0), "messages");
    const { texts, specialIds } = this.tokenizer.splitPieces(rendered);
    const ids: number[] = [];
    const pieces: TokenizedPiece[] = [];
    const tokenize = async (text: string) => {
      this.chatCharsTokenized += text.length;
      for (const id of await this.encoders.plain.encode(text, false, "messages", signal)) ids.push(id);
    };
    for (let i = 0; i < texts.length; i++) {
      const text = texts[i]!;
      if (text.length >= MEMO_MIN_CHARS) {
        const hash = createHash("sha256").update(text).digest("hex");
        const start = ids.length;
        const known = reuse?.(hash);
        if (known && this.plainIds(known)) for (let j = 0; j < known.length; j++) ids.push(known[j]!);
        else await tokenize(text);
        pieces.push({ hash, start, count: ids.length - start });
      } else if (text.length > 0) {
        await tokenize(text);
      }
      if (i < specialIds.length) ids.push(specialIds[i]!);
    }
    return { ids, pieces };
  }

  /** Whether ids could be a plain text's: inside the vocabulary, none of them a special token. */
  private plainIds(ids: ArrayLike<number>): boolean {
    for (let i = 0; i < ids.length; i++) {
      const id = ids[i]!;
      if (!Number.isInteger(id) || id < 0 || id >= this.info.vocabSize || this.tokenizer.isSpecial(id)) return false;
    }
    return ids.length > 0;
  }

  /**
   * Token ids of a raw prompt, BOS first. Special-token strings in it are plain text unless parseSpecial
   * (llama.cpp's parse_special); then a prompt that starts with the BOS string gets no second BOS.
   */
  encodePrompt(text: string, parseSpecial = false, signal?: AbortSignal): Promise<number[]> {
    if (!parseSpecial) return this.encodeText(text, true, false, "prompt", signal);
    const bos = this.tokenizer.specials.bosToken;
    return this.encodeText(text, !(bos && text.startsWith(bos)), true, "prompt", signal);
  }

  private assertPromptChars(chars: number, param: string): void {
    const max = this.textLimits.maxPromptChars;
    if (chars > max) {
      throw invalidRequest(`${param}: the text to tokenize has ${chars} characters; at most ${max} are read per request (--max-prompt-chars)`, param);
    }
  }

  /**
   * Token ids of text, the tokenizer's own, computed in pieces that give the event loop turns (see
   * chunked-encode.ts); special-token strings are specials only with parseSpecial. Text over
   * maxPromptChars, or with a run over maxRunChars, is refused naming `param`.
   */
  async encodeText(text: string, addSpecial: boolean, parseSpecial: boolean, param: string, signal?: AbortSignal): Promise<number[]> {
    this.assertPromptChars(text.length, param);
    return (parseSpecial ? this.encoders.parseSpecial : this.encoders.plain).encode(text, addSpecial, param, signal);
  }

  /**
   * Throws invalid_request naming `param` if one request field's text passes maxFieldChars or has a run
   * over maxRunChars: checked before any tokenizing, so the error names the field the client sent.
   */
  async checkField(text: string, param: string, signal?: AbortSignal): Promise<void> {
    const max = this.textLimits.maxFieldChars;
    if (text.length > max) throw invalidRequest(`${param}: ${text.length} characters; a field may hold at most ${max} (--max-field-chars)`, param);
    await this.encoders.plain.checkRuns(text, param, signal);
  }

  /** The tokenizer's decode, a slice of ids at a time with turns for the event loop between slices. */
  async decodeIds(ids: readonly number[], skipSpecial = false): Promise<string> {
    const stream = this.tokenizer.streamDecoder(skipSpecial);
    const parts: string[] = [];
    for (let start = 0; start < ids.length; start += 1 << 16) {
      if (start > 0) await yieldToEventLoop();
      let text = "";
      for (let i = start; i < Math.min(ids.length, start + (1 << 16)); i++) text += stream.push(ids[i]!);
      parts.push(text);
    }
    parts.push(stream.flush());
    return parts.join("");
  }

  /** Request values win; then the model's generation_config.json; then neutral defaults. */
  resolveSampling(requested: Partial<SamplingParams>): SamplingParams {
    const g = this.model.folder.generation;
    const fromModel: Partial<SamplingParams> = {};
    if (g.doSample === false) fromModel.temperature = 0;
    else if (g.temperature !== undefined) fromModel.temperature = g.temperature;
    if (g.topP !== undefined) fromModel.topP = g.topP;
    if (g.topK !== undefined) fromModel.topK = g.topK;
    if (g.repetitionPenalty !== undefined) fromModel.repetitionPenalty = g.repetitionPenalty;
    const defined = Object.fromEntries(Object.entries(requested).filter(([, v]) => v !== undefined)) as Partial<SamplingParams>;
    const seed = defined.seed ?? crypto.getRandomValues(new Uint32Array(1))[0]!;
    return { ...DEFAULT_SAMPLING, ...fromModel, ...defined, seed };
  }

  /** A new cache, compacted under the engine's settings if it has any. */
  newCache(): KvCache {
    const cache = this.model.newCache();
    cache.compactor = this.newCompactorIfAny();
    return cache;
  }

  /** A compactor under the engine's settings, or null when it has none. */
  newCompactorIfAny(): KvCompactor | null {
    return this.compaction ? this.newCompactor(this.compaction) : null;
  }

  /** A compactor as a snapshot recorded it, with an empty archive file of its own (its blocks are added next). */
  restoreCompactor(state: CompactionState): KvCompactor {
    return KvCompactor.restore(state, this.compactionShape(), state.settings.recall ? this.coldStorage() : undefined, this.lexicon());
  }

  private compactionShape(): CompactionShape {
    const c = this.model.folder.config;
    return { layers: c.numLayers, kvHeads: c.numKeyValueHeads, headDim: c.headDim, heads: c.numAttentionHeads, dtype: this.model.io.kvDtype, invFreq: c.ropeInvFreq };
  }

  private coldStorage(): FileColdStorage {
    return new FileColdStorage(join(this.coldDir, `ultralong-cold-${process.pid}-${++coldFiles}.bin`));
  }

  private specialIdSet(): Set<number> {
    this.specialIds ??= new Set(this.tokenizer.specialTokens.map((t) => this.tokenizer.tokenToId(t)).filter((id): id is number => id !== undefined));
    return this.specialIds;
  }

  private specialIds: Set<number> | null = null;

  /** Lexical recall's view of this model's tokenizer: its special tokens, the question of a probe, English function words. */
  lexicon(): Lexicon {
    if (!this.lexiconOf) {
      const functionWords = new Set(stopwords);
      const known = new Map<number, boolean>();
      this.lexiconOf = {
        ignored: this.specialIdSet(),
        questionOf: (probe) => this.lastSentence(probe),
        isFunctionWord: (id) => {
          let is = known.get(id);
          if (is === undefined) known.set(id, (is = functionWords.has(this.tokenizer.decode([id]).trim().toLowerCase())));
          return is;
        },
      };
    }
    return this.lexiconOf;
  }

  private lexiconOf: Lexicon | null = null;

  /**
   * The last sentence of a prompt's tail: of the text between special tokens (not a header's role name,
   * not whitespace), the last piece, and of it what follows its last sentence end before the final one.
   * Lexical recall searches for these tokens (the question), not for the text the question follows.
   */
  private lastSentence(probe: ArrayLike<number>): number[] {
    const ids = Array.from(probe);
    const specials = this.specialIdSet();
    const header = this.tokenizer.tokenToId("<|start_header_id|>");
    let piece: number[] = [];
    let current: number[] = [];
    let afterHeader = false;
    const close = () => {
      if (!afterHeader && this.tokenizer.decode(current).trim().length > 0) piece = current;
      current = [];
    };
    for (const id of ids) {
      if (specials.has(id)) {
        close();
        afterHeader = id === header;
      } else current.push(id);
    }
    close();
    for (let i = piece.length - 2; i >= 0; i--) {
      if (/[.!?\n]\s*$/.test(this.tokenizer.decode([piece[i]!]))) return piece.slice(i + 1);
    }
    return piece;
  }

  /** A compactor for a new request's cache under the engine's settings (its archive in a file of its own). */
  private newCompactor(settings: CompactionSettings): KvCompactor {
    return KvCompactor.create(settings, this.compactionShape(), settings.recall ? this.coldStorage() : undefined, this.lexicon());
  }

  /** Queues a completion and runs it on job.prepare()'s cache (or a fresh one); text deltas go to onDelta as they are decoded. */
  async complete(job: CompletionJob, onDelta: CompletionDelta = () => {}): Promise<CompletionResult> {
    const context = this.info.contextLength;
    const promptTokens = job.promptIds.length;
    if (promptTokens === 0) throw invalidRequest("the prompt is empty", "prompt");
    if (promptTokens >= context) {
      throw invalidRequest(`the prompt has ${promptTokens} tokens but the context holds ${context}; shorten it`, "messages");
    }
    this.checkTokenIds(job.promptIds, "prompt");
    const room = context - promptTokens;
    const bytesPerToken = this.info.kvBytesPerToken;
    const explicit = job.maxTokens !== undefined;
    const wanted = Math.min(job.maxTokens ?? room, room);
    const compaction = this.compaction;
    // A compacted cache never holds more than its budget plus one prefill chunk, however long the request.
    const cap = compaction ? compaction.budget + this.prefillChunk : Number.POSITIVE_INFINITY;
    // With n > 1 the prompt's cache and one sample's copy of it live at once (samples run one after another).
    const samples = job.n ?? 1;
    const copies = samples > 1 ? 2 : 1;
    const slots = (n: number) => copies * Math.min(n, cap);
    if (explicit) this.kvMemory.assertCanEverFit(slots(promptTokens + wanted) * bytesPerToken, `${promptTokens} prompt tokens plus max_tokens ${wanted}`, "max_tokens");
    else this.kvMemory.assertCanEverFit(slots(promptTokens + 1) * bytesPerToken, `a prompt of ${promptTokens} tokens`, "messages");
    const sampling = this.resolveSampling(job.sampling);
    const eosIds = new Set(job.ignoreEos ? [] : this.model.folder.generation.eosTokenIds);

    const result = await this.runQueued(async () => {
      // The cache this job builds (from nothing, a session's working copy or a borrowed prefix) is held here
      // while it runs. Without max_tokens the reply may run to the end of the context or of the KV memory
      // free now (idle sessions leave memory for it), whichever comes first.
      const hold = explicit
        ? this.kvMemory.reserve(slots(promptTokens + wanted) * bytesPerToken, "this request", "max_tokens")
        : this.kvMemory.reserveUpTo(slots(promptTokens + 1) * bytesPerToken, slots(promptTokens + wanted) * bytesPerToken, "this request");
      let cache: KvCache | null = null;
      // The archive of a compactor attached here ends with the request; a caller's cache (a session's
      // working copy) keeps its own.
      let attached = false;
      try {
        const maxTokens = compaction ? wanted : Math.min(wanted, Math.floor(hold.bytes / copies / bytesPerToken) - promptTokens);
        cache = job.prepare && job.promptLogprobs === undefined ? job.prepare() : this.model.newCache();
        if (compaction && !cache.compactor) {
          cache.compactor = this.newCompactor(compaction);
          attached = true;
        }
        const ctx = { model: this.model, tokenizer: this.tokenizer, prefillChunk: this.prefillChunk };
        const request = { promptIds: job.promptIds, maxTokens, sampling, stop: job.stop, eosIds, signal: job.signal, logprobs: job.logprobs };
        const prefilled = await prefillPrompt(ctx, cache, job.promptIds, { signal: job.signal, promptLogprobs: job.promptLogprobs });
        await job.onPrefilled?.(prefilled.promptLogprobs);
        const choices: GenerateResult[] = [];
        for (let index = 0; index < samples; index++) {
          // The last sample continues the prompt's own cache; the others each a copy of it (and of its first logits).
          const last = index === samples - 1;
          const own = last ? cache : cache.clone();
          try {
            const choice = await decode(
              ctx,
              own,
              { ...request, sampling: { ...sampling, seed: (sampling.seed + index) >>> 0 }, onToken: job.onToken && ((id) => job.onToken!(id, index)) },
              last ? prefilled : { ...prefilled, logits: prefilled.logits.slice() },
              (text, logprobs) => onDelta(text, logprobs, index),
            );
            choices.push(choice);
          } finally {
            // A copy's archive share is released now when the compactor is this request's own (file storage,
            // shared by count); a copy of a caller's compactor is dropped, as clones are (its file closes on GC).
            if (!last && attached) await own.compactor?.dispose();
          }
          if (choices[index]!.finishReason === "cancelled") break;
        }
        const first = choices[0]!;
        const result: GenerateResult = {
          ...first,
          completionTokens: choices.reduce((n, c) => n + c.completionTokens, 0),
          decodeMs: choices[choices.length - 1]!.decodeMs,
          finishReason: choices.some((c) => c.finishReason === "cancelled") ? "cancelled" : first.finishReason,
        };
        const stats = cache.compactor?.stats;
        const kv: KvReport = {
          residentSlots: cache.length,
          tokensRead: cache.nextPosition,
          evicted: stats?.evicted ?? 0,
          coldBytes: cache.compactor?.cold?.bytes ?? 0,
          recalledBlocks: stats?.recalledBlocks ?? 0,
        };
        return { ...result, kv, choices, ...(prefilled.promptLogprobs ? { promptLogprobs: prefilled.promptLogprobs } : {}) };
      } finally {
        if (attached) await cache?.compactor?.dispose();
        hold.release();
      }
    }, job.signal);
    this.metrics.requests++;
    if (result.finishReason === "cancelled") this.metrics.cancelled++;
    this.metrics.promptTokens += result.promptTokens - result.cachedTokens;
    this.metrics.completionTokens += result.completionTokens;
    this.metrics.prefillMs += result.prefillMs;
    this.metrics.decodeMs += result.decodeMs;
    return result;
  }

  /**
   * Reads tokens into a cache without generating (a session's appended document), in its turn in the
   * queue and in chunks, reporting progress after each chunk. `prepare` returns the cache to extend,
   * holding a strict prefix of promptIds.
   */
  async ingest(
    promptIds: number[],
    prepare: () => KvCache,
    onProgress?: (done: number, total: number) => void | Promise<void>,
    signal?: AbortSignal,
  ): Promise<{ cachedTokens: number; prefilledTokens: number; ms: number }> {
    if (promptIds.length >= this.info.contextLength) {
      throw invalidRequest(`the session would hold ${promptIds.length} tokens but the context holds ${this.info.contextLength}`, "text");
    }
    // A session's cache compacts when the engine does: it never holds more than its budget plus one chunk.
    const slots = this.compaction ? Math.min(promptIds.length, this.compaction.budget + this.prefillChunk) : promptIds.length;
    const bytes = slots * this.info.kvBytesPerToken;
    this.kvMemory.assertCanEverFit(bytes, `reading ${promptIds.length} tokens`, "text");
    return this.runQueued(async () => {
      const hold = this.kvMemory.reserve(bytes, "this read", "text");
      try {
        const t0 = performance.now();
        const cache = prepare();
        const cachedTokens = cache.tokensRead;
        const rest = promptIds.slice(cachedTokens);
        if (rest.length > 0) await this.model.prefill(cache, rest, this.prefillChunk, signal, onProgress);
        this.metrics.promptTokens += rest.length;
        this.metrics.prefillMs += performance.now() - t0;
        return { cachedTokens, prefilledTokens: rest.length, ms: performance.now() - t0 };
      } finally {
        hold.release();
      }
    }, signal);
  }

  /** Resolves once no request runs or waits in the queue. */
  idle(): Promise<void> {
    return this.queue.idle();
  }

  /** queue.run, counting the requests cancelled before their turn came. */
  private async runQueued<T>(job: () => Promise<T>, signal: AbortSignal | undefined): Promise<T> {
    let started = false;
    try {
      return await this.queue.run(() => {
        started = true;
        return job();
      }, signal);
    } catch (e) {
      if (!started && e instanceof RuntimeError && e.kind === "cancelled") this.metrics.cancelledQueued++;
      throw e;
    }
  }

  async close(): Promise<void> {
    await this.model.release();
  }
}
