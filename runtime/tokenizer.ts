/**
 * Text <-> token ids, with the model's own tokenizer.json (via @huggingface/tokenizers), plus a streaming
 * detokenizer that works on bytes: every token id maps to the exact bytes it stands for, and a streaming
 * TextDecoder holds back an incomplete UTF-8 sequence until the token that completes it arrives, so a
 * multi-byte character split across tokens is never emitted broken.
 */
import { Tokenizer } from "@huggingface/tokenizers";

/** GPT-2 / Llama-3 ByteLevel alphabet: printable bytes stand for themselves, the rest are shifted past 255. */
function byteLevelDecoderTable(): Map<string, number> {
  const bytes: number[] = [];
  for (let b = 33; b <= 126; b++) bytes.push(b);
  for (let b = 161; b <= 172; b++) bytes.push(b);
  for (let b = 174; b <= 255; b++) bytes.push(b);
  const chars = bytes.slice();
  let n = 0;
  for (let b = 0; b < 256; b++) {
    if (!bytes.includes(b)) {
      bytes.push(b);
      chars.push(256 + n++);
    }
  }
  const table = new Map<string, number>();
  bytes.forEach((b, i) => table.set(String.fromCodePoint(chars[i]!), b));
  return table;
}

type PieceStyle = "byte-level" | "sentencepiece";

export interface TokenizerSpecials {
  bosToken: string | null;
  eosToken: string | null;
  bosTokenId: number | null;
}

function tokenString(v: unknown): string | null {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof (v as { content?: unknown }).content === "string") {
    return (v as { content: string }).content;
  }
  return null;
}

export class TextTokenizer {
  private readonly tokenizer: Tokenizer;
  private readonly tokenizerJson: Record<string, unknown>;
  private readonly tokenizerConfig: Record<string, unknown>;
  /** The same tokenizer without its special added tokens (built on first use): text in which no special token is recognized. */
  private plainTokenizer: Tokenizer | null = null;
  /** What add_special_tokens puts before and after a text (Llama-3: BOS before), found once by a probe. */
  private addedAround: { before: number[]; after: number[] } | null = null;
  /** Special-token string -> id, with the added token's lstrip/rstrip flags. */
  private readonly specialByText = new Map<string, { id: number; lstrip: boolean; rstrip: boolean }>();
  private readonly style: PieceStyle;
  private readonly byteTable = byteLevelDecoderTable();
  private readonly encoder = new TextEncoder();
  private readonly pieceCache = new Map<number, Uint8Array>();
  private readonly special = new Set<number>();
  private readonly vocabSize: number;
  readonly specials: TokenizerSpecials;

  constructor(tokenizerJson: Record<string, unknown>, tokenizerConfig: Record<string, unknown>) {
    this.tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
    this.tokenizerJson = tokenizerJson;
    this.tokenizerConfig = tokenizerConfig;
    const decoder = tokenizerJson.decoder as { type?: string; decoders?: { type?: string }[] } | null;
    const types = [decoder?.type, ...(decoder?.decoders ?? []).map((d) => d.type)];
    this.style = types.includes("ByteLevel") ? "byte-level" : "sentencepiece";
    for (const [id, token] of this.tokenizer.get_added_tokens_decoder()) {
      if (token.special) {
        this.special.add(id);
        this.specialByText.set(token.content, { id, lstrip: token.lstrip, rstrip: token.rstrip });
      }
    }
    this.vocabSize = this.tokenizer.get_vocab(true).size;
    const bosToken = tokenString(tokenizerConfig.bos_token);
    this.specials = {
      bosToken,
      eosToken: tokenString(tokenizerConfig.eos_token),
      bosTokenId: bosToken === null ? null : (this.tokenizer.token_to_id(bosToken) ?? null),
    };
  }

  get size(): number {
    return this.vocabSize;
  }

  /** The strings that parseSpecial turns into special tokens (ChatTemplate keeps request text from forming them). */
  get specialTokens(): string[] {
    return [...this.specialByText.keys()];
  }

  /**
   * Encodes text. By default a special-token string in the text ("<|eot_id|>") is plain text, as
   * transformers' split_special_tokens=True does; with parseSpecial (trusted text only) it becomes its id.
   * addSpecialTokens adds what the tokenizer adds around a text (Llama-3: BOS).
   */
  encode(text: string, addSpecialTokens = false, parseSpecial = false): number[] {
    if (parseSpecial) return this.tokenizer.encode(text, { add_special_tokens: addSpecialTokens }).ids;
    const ids = this.plain().encode(text, { add_special_tokens: false }).ids;
    if (!addSpecialTokens) return ids;
    const { before, after } = this.around();
    return before.length + after.length === 0 ? ids : [...before, ...ids, ...after];
  }

  /**
   * Ids of a rendered chat cut at the template's own special tokens (ChatTemplate.renderPieces): each odd
   * piece is one special token, each even piece plain text. Equal to tokenizing the whole text with
   * specials recognized only at the cuts: the tokenizer splits at added tokens before anything else.
   */
  encodePieces(pieces: readonly string[]): number[] {
    const { texts, specialIds } = this.splitPieces(pieces);
    const ids: number[] = [];
    texts.forEach((text, i) => {
      if (text.length > 0) for (const id of this.encode(text)) ids.push(id);
      if (i < specialIds.length) ids.push(specialIds[i]!);
    });
    return ids;
  }

  /**
   * The texts between a template's special tokens, and those tokens' ids (texts[i] comes before
   * specialIds[i]); callers encode the texts as plain text, in one go or in pieces (engine.encodeChat).
   */
  splitPieces(pieces: readonly string[]): { texts: string[]; specialIds: number[] } {
    const texts = pieces.filter((_, i) => i % 2 === 0);
    const specials = pieces.filter((_, i) => i % 2 === 1).map((p) => {
      const token = this.specialByText.get(p);
      if (!token) throw new Error(`"${p}" is not a special token of this tokenizer`);
      return token;
    });
    // An added token with lstrip / rstrip eats the whitespace beside it, as the tokenizer's own split does.
    specials.forEach((t, i) => {
      if (t.lstrip) texts[i] = texts[i]!.trimEnd();
      if (t.rstrip) texts[i + 1] = texts[i + 1]!.trimStart();
    });
    return { texts, specialIds: specials.map((t) => t.id) };
  }

  private plain(): Tokenizer {
    if (!this.plainTokenizer) {
      const added = (this.tokenizerJson.added_tokens ?? []) as { special?: boolean }[];
      const json = { ...this.tokenizerJson, added_tokens: added.filter((t) => t.special !== true) };
      this.plainTokenizer = new Tokenizer(json, this.tokenizerConfig);
    }
    return this.plainTokenizer;
  }

  private around(): { before: number[]; after: number[] } {
    if (!this.addedAround) {
      const probe = "a";
      const bare = this.tokenizer.encode(probe, { add_special_tokens: false }).ids;
      const full = this.tokenizer.encode(probe, { add_special_tokens: true }).ids;
      const at = full.findIndex((_, i) => bare.every((id, j) => full[i + j] === id));
      this.addedAround = at < 0 ? { before: [], after: [] } : { before: full.slice(0, at), after: full.slice(at + bare.length) };
    }
    return this.addedAround;
  }

  /** The id of a special token by its text (e.g. "<|python_tag|>"), or null when the tokenizer has no such special token. */
  specialTokenId(text: string): number | null {
    return this.specialByText.get(text)?.id ?? null;
  }

  isSpecial(id: number): boolean {
    return this.special.has(id);
  }

  tokenToId(token: string): number | undefined {
    return this.tokenizer.token_to_id(token);
  }

  idToToken(id: number): string | undefined {
    return this.tokenizer.id_to_token(id);
  }

  /** The exact bytes a token id stands for (special tokens: their text). */
  tokenBytes(id: number): Uint8Array {
    let bytes = this.pieceCache.get(id);
    if (bytes) return bytes;
    const piece = this.tokenizer.id_to_token(id);
    if (piece === undefined) {
      bytes = new Uint8Array(0);
    } else if (this.special.has(id)) {
      bytes = this.encoder.encode(piece);
    } else if (this.style === "byte-level") {
      const out: number[] = [];
      for (const ch of piece) {
        const b = this.byteTable.get(ch);
        if (b === undefined) out.push(...this.encoder.encode(ch));
        else out.push(b);
      }
      bytes = Uint8Array.from(out);
    } else {
      const hex = /^<0x([0-9A-Fa-f]{2})>$/.exec(piece);
      bytes = hex ? Uint8Array.of(parseInt(hex[1]!, 16)) : this.encoder.encode(piece.replaceAll("\u2581", " "));
    }
    this.pieceCache.set(id, bytes);
    return bytes;
  }

  /** Decodes ids to text; with skipSpecial, special tokens are left out. */
  decode(ids: ArrayLike<number>, skipSpecial = false): string {
    const stream = this.streamDecoder(skipSpecial);
    let text = "";
    for (let i = 0; i < ids.length; i++) text += stream.push(ids[i]!);
    return text + stream.flush();
  }

  streamDecoder(skipSpecial = true): StreamDecoder {
    return new StreamDecoder(this, skipSpecial);
  }
}

/** Turns a stream of token ids into text deltas that never split a UTF-8 character. */
export class StreamDecoder {
  private readonly decoder = new TextDecoder("utf-8", { fatal: false });
  constructor(
    private readonly tokenizer: TextTokenizer,
    private readonly skipSpecial: boolean,
  ) {}

  push(id: number): string {
    if (this.skipSpecial && this.tokenizer.isSpecial(id)) return "";
    return this.decoder.decode(this.tokenizer.tokenBytes(id), { stream: true });
  }

  /** Ends the stream: a dangling incomplete sequence becomes U+FFFD, as a non-streaming decode would. */
  flush(): string {
    return this.decoder.decode();
  }
}
