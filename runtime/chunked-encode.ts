/**
 * Tokenization that leaves the event loop free. The tokenizer (@huggingface/tokenizers) is synchronous:
 * one encode of a few MB of text holds the thread for seconds, and nothing else (not even /health) is
 * answered meanwhile. A long text is therefore cut at places where Llama-3's pre-tokenizer splits anyway,
 * the pieces are encoded one by one by the same tokenizer, and the loop gets a turn between pieces. The
 * ids joined are exactly the ids of one encode of the whole text.
 *
 * Why the cuts are exact (Llama-3's Split regex, no normalizer, added tokens without lstrip / rstrip):
 * every pre-token is one regex match, and the match found at a position k depends only on text[k..] (the
 * pattern has no lookbehind), so the text after a cut is split as before. Before the cut, the match that
 * covers text[k-1] must end at k whatever follows, which holds when
 *  - a letter is followed by a non-letter, or a digit by a non-digit (\p{L}+ and \p{N}{1,3} end there);
 *  - a symbol (neither letter, digit nor space) is followed by a digit, or by a space other than \r and
 *    \n (` ?[^\s\p{L}\p{N}]+[\r\n]*` ends there; a symbol joins only letters that follow it);
 *  - \r or \n is followed by a non-space (`\s*[\r\n]+` and the symbol rule's `[\r\n]*` end there);
 * and no added token (special-token string) holds the two characters around k, so none is cut in two.
 *
 * Between two cut points the tokenizer cannot pause, and its BPE costs several microseconds per character
 * of one unbroken run (a 1 MB "word" takes seconds and GBs): runs longer than a limit are refused.
 */
import { RuntimeError, invalidRequest } from "./errors.ts";
import { yieldToEventLoop } from "./yield.ts";

/** tokenizer.json's Split pattern of the Llama-3 family: the only pattern the cut rules above are shown for. */
export const LLAMA3_SPLIT_PATTERN =
  "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+";

const LETTER = 1;
const DIGIT = 2;
const SPACE = 3; // White_Space other than \r and \n
const NEWLINE = 4; // \r or \n
const SYMBOL = 5;

/** Character class of each code point, filled on first sight (the tokenizer's regex uses \p{White_Space} for \s). */
const classes = new Uint8Array(0x110000);
function classOf(cp: number): number {
  let cls = classes[cp]!;
  if (cls === 0) {
    const ch = String.fromCodePoint(cp);
    cls = cp === 10 || cp === 13 ? NEWLINE : /\p{L}/u.test(ch) ? LETTER : /\p{N}/u.test(ch) ? DIGIT : /\p{White_Space}/u.test(ch) ? SPACE : SYMBOL;
    classes[cp] = cls;
  }
  return cls;
}

function isCut(before: number, after: number): boolean {
  switch (before) {
    case LETTER:
    case DIGIT:
      return after !== before;
    case SYMBOL:
      return after === DIGIT || after === SPACE;
    case NEWLINE:
      return after === LETTER || after === DIGIT || after === SYMBOL;
    default:
      return false;
  }
}

const pairKey = (a: number, b: number) => a * 0x110000 + b;

interface AddedToken {
  content?: unknown;
  lstrip?: unknown;
  rstrip?: unknown;
}

/** Whether this tokenizer.json is one the cut rules are exact for (else texts are encoded in one piece). */
export function cutsAreExact(tokenizerJson: Record<string, unknown>): boolean {
  if (tokenizerJson.normalizer != null) return false;
  const pre = tokenizerJson.pre_tokenizer as { type?: string; pretokenizers?: Record<string, unknown>[] } | null;
  const steps = pre?.type === "Sequence" ? (pre.pretokenizers ?? []) : [];
  if (steps.length !== 2) return false;
  const [split, byteLevel] = steps as [Record<string, unknown>, Record<string, unknown>];
  const pattern = split.pattern as { Regex?: unknown } | undefined;
  if (split.type !== "Split" || pattern?.Regex !== LLAMA3_SPLIT_PATTERN || split.invert === true) return false;
  if (String(split.behavior).toLowerCase() !== "isolated") return false;
  if (byteLevel.type !== "ByteLevel" || byteLevel.add_prefix_space === true || byteLevel.use_regex === true) return false;
  const added = (tokenizerJson.added_tokens ?? []) as AddedToken[];
  return added.every((t) => t.lstrip !== true && t.rstrip !== true);
}

export interface ChunkedEncoderOptions {
  /** Longest run of characters without a cut point that is accepted (its BPE cannot pause). */
  maxRunChars: number;
  /** Milliseconds one piece should take to encode; the piece size follows measured speed (0: always the smallest). */
  targetMs?: number;
  /** Smallest piece in characters (tests use 1: a cut at every cut point). */
  minPieceChars?: number;
}

export class ChunkedEncoder {
  /** False when the tokenizer is not one the cuts are exact for: texts are then encoded in one piece. */
  readonly exact: boolean;
  readonly maxRunChars: number;
  private readonly targetMs: number;
  private readonly minPieceChars: number;
  /** Adjacent code-point pairs inside added tokens: no cut between them. */
  private readonly pairs = new Set<number>();
  private specialsAround: { before: number[]; after: number[] } | null = null;

  constructor(
    tokenizerJson: Record<string, unknown>,
    /** The tokenizer's own encode (addSpecial: its post-processor's BOS etc.). */
    private readonly encodeWhole: (text: string, addSpecial: boolean) => number[],
    options: ChunkedEncoderOptions,
  ) {
    this.exact = cutsAreExact(tokenizerJson);
    this.maxRunChars = options.maxRunChars;
    this.targetMs = options.targetMs ?? 10;
    this.minPieceChars = options.minPieceChars ?? 256;
    for (const token of (tokenizerJson.added_tokens ?? []) as AddedToken[]) {
      if (typeof token.content !== "string") continue;
      const cps = Array.from(token.content, (ch) => ch.codePointAt(0)!);
      for (let i = 1; i < cps.length; i++) this.pairs.add(pairKey(cps[i - 1]!, cps[i]!));
    }
  }

  /**
   * Scans `text` from `start` (0 or a cut point) and returns the first cut point at or after `atLeast`,
   * or text.length. Throws invalid_request naming `param` when a run longer than maxRunChars is passed.
   */
  nextCut(text: string, start: number, atLeast: number, param: string): number {
    const max = this.maxRunChars;
    let lastCut = start;
    let prev = start > 0 ? text.charCodeAt(start - 1) : -1;
    if (prev >= 0xdc00 && prev <= 0xdfff && start > 1) {
      const high = text.charCodeAt(start - 2);
      if (high >= 0xd800 && high <= 0xdbff) prev = text.codePointAt(start - 2)!;
    }
    let prevClass = prev < 0 ? 0 : classOf(prev);
    let i = start;
    while (i < text.length) {
      const cp = text.codePointAt(i)!;
      const cls = classOf(cp);
      if (i > start && isCut(prevClass, cls) && !this.pairs.has(pairKey(prev, cp))) {
        if (i >= atLeast) return i;
        lastCut = i;
      }
      i += cp > 0xffff ? 2 : 1;
      if (i - lastCut > max) throw this.runError(param, lastCut);
      prev = cp;
      prevClass = cls;
    }
    return text.length;
  }

  private runError(param: string, at: number): RuntimeError {
    return invalidRequest(
      `${param}: more than ${this.maxRunChars} characters in a row without a break (from character ${at}); ` +
        `a word, number or run of spaces or symbols may be at most ${this.maxRunChars} characters long (--max-run-chars)`,
      param,
    );
  }

  /** Throws invalid_request naming `param` if `text` has a run longer than maxRunChars; gives the loop turns on long text. */
  async checkRuns(text: string, param: string, signal?: AbortSignal): Promise<void> {
    if (text.length <= this.maxRunChars) return;
    const slice = 1 << 18;
    for (let at = 0; at < text.length; ) {
      at = this.nextCut(text, at, at + slice, param);
      if (at < text.length) await pause(signal);
    }
  }

  /**
   * Token ids of `text`, identical to the tokenizer's encode of the whole text, computed in pieces with a
   * turn for the event loop between them. Refuses (invalid_request naming `param`) runs over maxRunChars.
   */
  async encode(text: string, addSpecial: boolean, param: string, signal?: AbortSignal): Promise<number[]> {
    if (!this.exact) {
      await this.checkRuns(text, param, signal);
      return this.encodeWhole(text, addSpecial);
    }
    // Start small (a character can cost 0.2 to 7 us) and let measured speed size the next pieces.
    let pieceChars = this.targetMs > 0 ? Math.max(4096, this.minPieceChars) : this.minPieceChars;
    let end = this.nextCut(text, 0, pieceChars, param);
    if (end === text.length) return this.encodeWhole(text, addSpecial);
    const { before, after } = this.specials();
    // Pieces are joined at the end: growing one array of millions of ids copies it, in one blocking step, each time.
    const parts: number[][] = addSpecial ? [before] : [];
    for (let start = 0; start < text.length; ) {
      const t0 = performance.now();
      parts.push(this.encodeWhole(text.slice(start, end), false));
      pieceChars = this.nextSize(pieceChars, end - start, performance.now() - t0);
      start = end;
      if (start < text.length) {
        await pause(signal);
        end = this.nextCut(text, start, start + pieceChars, param);
      }
    }
    if (addSpecial) parts.push(after);
    return join(parts, signal);
  }

  /** Next piece size: what the last piece's speed says fits targetMs, changing at most 2x per piece. */
  private nextSize(size: number, chars: number, ms: number): number {
    if (this.targetMs <= 0) return this.minPieceChars;
    const fit = ms > 0 ? (chars * this.targetMs) / ms : size * 2;
    return Math.round(Math.min(Math.max(fit, size / 2, this.minPieceChars), size * 2, 1 << 20));
  }

  /** What the post-processor puts around a text when asked to add special tokens (Llama-3: BOS before). */
  private specials(): { before: number[]; after: number[] } {
    if (!this.specialsAround) {
      const plain = this.encodeWhole("a", false);
      const full = this.encodeWhole("a", true);
      let at = 0;
      while (at <= full.length - plain.length && !plain.every((id, i) => full[at + i] === id)) at++;
      this.specialsAround = { before: full.slice(0, at), after: full.slice(at + plain.length) };
    }
    return this.specialsAround;
  }
}

/** parts.flat(), filled a slice at a time with turns for the loop between slices. */
async function join(parts: number[][], signal?: AbortSignal): Promise<number[]> {
  let total = 0;
  for (const part of parts) total += part.length;
  const ids = new Array<number>(total);
  let at = 0;
  for (let p = 0; p < parts.length; p++) {
    const part = parts[p]!;
    for (let i = 0; i < part.length; i++) ids[at++] = part[i]!;
    if (p % 256 === 255) await pause(signal);
  }
  return ids;
}

async function pause(signal?: AbortSignal): Promise<void> {
  await yieldToEventLoop();
  if (signal?.aborted) throw new RuntimeError("cancelled", "the request was cancelled");
}
