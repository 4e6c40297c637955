/**
 * Logprobs in OpenAI's two shapes: chat completions' `logprobs.content` ({token, logprob, bytes,
 * top_logprobs}) and the legacy completions' `logprobs` ({tokens, token_logprobs, top_logprobs,
 * text_offset}). The values are the runtime's (runtime/logprobs.ts: log-softmax of the raw logits).
 *
 * A token's string is its text; a token whose bytes are not UTF-8 on their own (a piece of a character)
 * is written as OpenAI writes it, "bytes:" and its bytes as \xNN escapes (e.g. "bytes:\xe6\x88"), and
 * `bytes` (chat) always holds the token's exact bytes from the tokenizer's byte-level vocabulary.
 */
import type { TokenLogprob } from "../runtime/index.ts";

interface TokenSource {
  tokenBytes(id: number): Uint8Array;
  streamDecoder(skipSpecial?: boolean): { push(id: number): string };
}

const strict = new TextDecoder("utf-8", { fatal: true });

/** Token strings and bytes of one tokenizer, remembered per id. */
export class TokenStrings {
  private readonly strings = new Map<number, string>();
  constructor(private readonly tokenizer: TokenSource) {}

  text(id: number): string {
    let s = this.strings.get(id);
    if (s === undefined) {
      const bytes = this.tokenizer.tokenBytes(id);
      try {
        s = strict.decode(bytes);
      } catch {
        s = `bytes:${Array.from(bytes, (b) => `\\x${b.toString(16).padStart(2, "0")}`).join("")}`;
      }
      this.strings.set(id, s);
    }
    return s;
  }

  bytes(id: number): number[] {
    return Array.from(this.tokenizer.tokenBytes(id));
  }

  /** Chat completions' `logprobs` for these tokens: `{ content: [...], refusal: null }`. */
  chat(entries: readonly TokenLogprob[]) {
    const item = (id: number, logprob: number) => ({ token: this.text(id), logprob, bytes: this.bytes(id) });
    return {
      content: entries.map((e) => ({ ...item(e.id, e.logprob), top_logprobs: e.top.map((t) => item(t.id, t.logprob)) })),
      refusal: null,
    };
  }

  /**
   * The legacy completions' `logprobs` for these tokens (a null entry: a token without one, the prompt's
   * first). Each top_logprobs map holds the k best tokens and the token itself, as OpenAI's does (up to
   * k + 1 entries); tokens with the same string share a key (the likelier one stays). `silentFirst`: the
   * first token adds no text (the BOS the server put before a text prompt).
   */
  legacy(ids: readonly number[], entries: readonly (TokenLogprob | null)[], offsets: TextOffsets, silentFirst = false) {
    const tokens: string[] = [];
    const token_logprobs: (number | null)[] = [];
    const top_logprobs: (Record<string, number> | null)[] = [];
    const text_offset: number[] = [];
    ids.forEach((id, i) => {
      const e = entries[i] ?? null;
      tokens.push(this.text(id));
      token_logprobs.push(e ? e.logprob : null);
      text_offset.push(i === 0 && silentFirst ? offsets.at : offsets.next(id));
      if (!e) {
        top_logprobs.push(null);
        return;
      }
      const top: Record<string, number> = {};
      for (const t of e.top) {
        const key = this.text(t.id);
        if (!(key in top)) top[key] = t.logprob;
      }
      const own = this.text(id);
      if (!(own in top)) top[own] = e.logprob;
      top_logprobs.push(top);
    });
    return { tokens, token_logprobs, top_logprobs, text_offset };
  }

  /** Offsets into a text that starts `start` characters in, read token by token (special tokens count as their text unless skipped). */
  offsets(start: number, skipSpecial: boolean): TextOffsets {
    return new TextOffsets(this.tokenizer.streamDecoder(skipSpecial), start);
  }
}

/** Where each token's text starts in a text, token by token (a piece of a character adds nothing until the piece that completes it). */
export class TextOffsets {
  constructor(
    private readonly decoder: { push(id: number): string },
    private offset: number,
  ) {}

  next(id: number): number {
    const at = this.offset;
    this.offset += this.decoder.push(id).length;
    return at;
  }

  get at(): number {
    return this.offset;
  }
}
