/** The real Llama-3 tokenizer files of the built-in model, and streaming detokenization. */
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { TextTokenizer } from "../runtime/tokenizer.ts";
import { MODEL_DIR, readJsonFile } from "./helpers/model.ts";

const tokenizer = new TextTokenizer(
  await readJsonFile(join(MODEL_DIR, "tokenizer.json")),
  await readJsonFile(join(MODEL_DIR, "tokenizer_config.json")),
);

describe("tokenizer", () => {
  test('"Hello world" encodes to [9906, 1917] without BOS, and with BOS when asked', () => {
    expect(tokenizer.encode("Hello world")).toEqual([9906, 1917]);
    expect(tokenizer.encode("Hello world", true)).toEqual([128000, 9906, 1917]);
  });

  test("special-token strings in text become their ids when parseSpecial is asked", () => {
    expect(tokenizer.encode("<|begin_of_text|><|start_header_id|>user<|end_header_id|>", false, true)).toEqual([128000, 128006, 882, 128007]);
    expect(tokenizer.specials.bosTokenId).toBe(128000);
    expect(tokenizer.isSpecial(128009)).toBe(true);
    expect(tokenizer.isSpecial(9906)).toBe(false);
  });

  test("decode round-trips text, with and without special tokens", () => {
    const text = "Grüße, 世界! The year is 2024.\n\tTabs and  spaces.";
    expect(tokenizer.decode(tokenizer.encode(text))).toBe(text);
    const ids = tokenizer.encode("<|begin_of_text|>Hi<|eot_id|>", false, true);
    expect(tokenizer.decode(ids)).toBe("<|begin_of_text|>Hi<|eot_id|>");
    expect(tokenizer.decode(ids, true)).toBe("Hi");
  });

  test("a multi-byte character split across tokens streams intact", () => {
    const text = "party 🎉🎉 日本語 ok 👩‍👩‍👧 done";
    const ids = tokenizer.encode(text);
    // The emoji really is split: some token's bytes are not valid UTF-8 on their own.
    const splitTokens = ids.filter((id) => new TextDecoder().decode(tokenizer.tokenBytes(id)).includes("\uFFFD"));
    expect(splitTokens.length).toBeGreaterThan(0);
    const stream = tokenizer.streamDecoder();
    const deltas = ids.map((id) => stream.push(id));
    deltas.push(stream.flush());
    for (const d of deltas) expect(d).not.toContain("\uFFFD");
    expect(deltas.join("")).toBe(text);
    // Some delta had to wait for a later token: an empty delta appears where the character was incomplete.
    expect(deltas.slice(0, -1)).toContain("");
  });

  test("a truncated stream ends with U+FFFD, as a full decode would", () => {
    const ids = tokenizer.encode("🎉");
    const stream = tokenizer.streamDecoder();
    let out = "";
    for (const id of ids.slice(0, -1)) out += stream.push(id);
    expect(out).toBe("");
    expect(stream.flush()).toBe("\uFFFD");
  });
});
