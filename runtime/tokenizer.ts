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
  private readonly style: PieceStyle;
  private readonly byteTable = byteLevelDecoderTable();
  private readonly encoder = new TextEncoder();
  private readonly pieceCache = new Map<number, Uint8Array>();
  private readonly special = new Set<number>();
  private readonly vocabSize: number;
  readonly specials: TokenizerSpecials;

  constructor(tokenizerJson: Record<string, unknown>, tokenizerConfig: Record<string, unknown>) {
    this.tokenizer = new Tokenizer(tokenizerJson, tokenizerConfig);
    const decoder = tokenizerJson.decoder as { type?: string; decoders?: { type?: string }[] } | null;
    const types = [decoder?.type, ...(decoder?.decoders ?? []).map((d) => d.type)];
    this.style = types.includes("ByteLevel") ? "byte-level" : "sentencepiece";
    for (const [id, token] of this.tokenizer.get_added_tokens_decoder()) {
      if (token.special) this.special.add(id);
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

  /** Encodes text. Special-token strings in the text (e.g. from a rendered chat template) become their ids. */
  encode(text: string, addSpecialTokens = false): number[] {
    return this.tokenizer.encode(text, { add_special_tokens: addSpecialTokens }).ids;
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
