/**
 * The hard haystack (FixtureTasks.haystack) for long-context KV compaction benchmarks: filler with
 * digits, distractor multikey needles spread through it that never name the queried word (nor the
 * pass key), the queried needle once at its depth, an assembly equal to tokenizing the rendered chat,
 * the same prompt for the same seed, and a million tokens of filler assembled quickly.
 */
import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { ChatTemplate } from "../runtime/chat-template.ts";
import { TextTokenizer } from "../runtime/tokenizer.ts";
import { FixtureTasks, rngOf, type HaystackOptions, type TaskKind } from "../scripts/lib/fixture-tasks.ts";

// Only the tokenizer and the chat template of the built-in model (no ONNX session, no engine).
const FIXTURE_DIR = fileURLToPath(new URL("../models/builtin/", import.meta.url));
const readJson = (name: string) => JSON.parse(readFileSync(join(FIXTURE_DIR, name), "utf8")) as Record<string, unknown>;
const tokenizerConfig = readJson("tokenizer_config.json");
const tokenizer = new TextTokenizer(readJson("tokenizer.json"), tokenizerConfig);
const template = new ChatTemplate(tokenizerConfig, tokenizer.specialTokens);
const tasks = new FixtureTasks(tokenizer, template, "eval", { digits: true });

const SMALL = { fillerTokens: 6000, distractorEvery: 500 };
const DISTRACTOR = / The special magic number for (\w+) is (\d{5})\./g;

/** How often `needle` occurs in `ids` as a contiguous run. */
function occurrences(ids: number[], needle: number[]): number[] {
  const at: number[] = [];
  outer: for (let i = 0; i + needle.length <= ids.length; i++) {
    for (let j = 0; j < needle.length; j++) if (ids[i + j] !== needle[j]) continue outer;
    at.push(i);
  }
  return at;
}

function make(kind: TaskKind, seed: number, options: Partial<HaystackOptions> = {}) {
  return tasks.haystack(rngOf(seed), { kind, depth: 0.5, ...SMALL, ...options });
}

describe("haystack at 6,000 filler tokens, one distractor per 500", () => {
  for (const kind of ["passkey", "multikey"] as const) {
    describe(kind, () => {
      test("the assembly equals tokenizing the rendered chat, at several depths and seeds", () => {
        for (const [seed, depth] of [
          [1, 0],
          [2, 0.25],
          [3, 0.5],
          [4, 0.9],
          [5, 1],
        ] as const) {
          expect(tasks.composeCheck(make(kind, seed, { depth }))).toBe(true);
        }
      });

      test("distractors: about fillerTokens / distractorEvery of them, never the queried word, never 'pass key', numbers not the key", () => {
        for (let seed = 10; seed < 20; seed++) {
          const s = make(kind, seed);
          expect(s.distractors).toBe(s.others.length);
          expect(Math.abs(s.distractors - s.fillerTokens / SMALL.distractorEvery)).toBeLessThanOrEqual(1);
          const inText = [...s.content.matchAll(DISTRACTOR)].map((m) => ({ word: m[1]!, key: m[2]! }));
          const queriedWord = kind === "multikey" ? s.answerText.match(/for (\w+) is/)![1]! : "";
          const distractorsInText = inText.filter((d) => !(d.word === queriedWord && d.key === s.key));
          expect(distractorsInText).toEqual(s.others);
          for (const d of s.others) {
            expect(tasks.keyWords).toContain(d.word);
            expect(d.word).not.toBe(queriedWord);
            expect(d.key).not.toBe(s.key);
          }
          if (kind === "multikey") expect(s.content.split(`magic number for ${queriedWord} `).length - 1).toBe(1);
          expect(s.content.split("pass key").length - 1).toBe(kind === "passkey" ? 3 : 0); // intro, needle, question
          expect(s.content.split(s.key).length - 1).toBe(1);
        }
      });

      test("distractors spread through the whole input", () => {
        const s = make(kind, 7);
        const starts = occurrences(s.prompt, tokenizer.encode(" The special magic number for")).filter((i) => i !== s.needleStart);
        expect(starts.length).toBe(s.distractors);
        const fifths = [0, 0, 0, 0, 0];
        for (const i of starts) fifths[Math.min(4, Math.floor((5 * i) / s.prompt.length))]!++;
        for (const f of fifths) expect(f).toBeGreaterThanOrEqual(1);
      });

      test("the needle appears exactly once, at about the requested depth", () => {
        for (const [seed, depth] of [
          [21, 0],
          [22, 0.1],
          [23, 0.33],
          [24, 0.5],
          [25, 0.75],
          [26, 1],
        ] as const) {
          const s = make(kind, seed, { depth });
          const needle = tokenizer.encode(kind === "passkey" ? ` The pass key is ${s.key}. Remember it.` : ` ${s.answerText}`);
          expect(occurrences(s.prompt, needle)).toEqual([s.needleStart]);
          expect(Math.abs(s.needleStart / s.prompt.length - depth)).toBeLessThanOrEqual(0.05);
          expect(s.questionStart).toBeGreaterThan(s.needleStart);
          expect(s.fillerTokens).toBeGreaterThanOrEqual(SMALL.fillerTokens);
        }
      });

      test("the filler has digits of its own", () => {
        const s = make(kind, 31);
        const filler = s.content.replace(DISTRACTOR, "").replace(/ The pass key is \d{5}\. Remember it\./, "");
        expect(filler).toMatch(/\d/);
      });

      test("deterministic: the same seed gives the same prompt, another seed another", () => {
        const a = make(kind, 41);
        const b = make(kind, 41);
        expect(b.prompt).toEqual(a.prompt);
        expect(b.content).toBe(a.content);
        expect(b.others).toEqual(a.others);
        expect(make(kind, 42).prompt).not.toEqual(a.prompt);
      });

      test("exactTokens: the whole prompt is at most that long and within a few hundred tokens of it", () => {
        for (const exactTokens of [2000, 8192]) {
          const s = make(kind, 51, { fillerTokens: undefined, exactTokens });
          expect(s.prompt.length).toBeLessThanOrEqual(exactTokens);
          expect(s.prompt.length).toBeGreaterThan(exactTokens - 300);
          expect(tasks.composeCheck(s)).toBe(true);
        }
      });
    });
  }

  test("distractorEvery 0: no distractors", () => {
    const s = make("multikey", 61, { distractorEvery: 0 });
    expect(s.distractors).toBe(0);
    expect([...s.content.matchAll(DISTRACTOR)].length).toBe(1);
    expect(tasks.composeCheck(s)).toBe(true);
  });
});

describe("haystack at a million tokens", () => {
  test("1,048,576 filler tokens: length, default distractor count, needle once at depth", () => {
    const t0 = performance.now();
    const s = tasks.haystack(rngOf(1), { kind: "multikey", fillerTokens: 1_048_576, depth: 0.3 });
    console.log(`1M-token haystack in ${(performance.now() - t0).toFixed(0)} ms: ${s.prompt.length} tokens, ${s.distractors} distractors`);
    expect(s.fillerTokens).toBeGreaterThanOrEqual(1_048_576);
    expect(s.fillerTokens).toBeLessThan(1_048_576 + 1000);
    expect(s.distractors).toBe(Math.round(1_048_576 / 2000));
    expect(s.prompt.length).toBeGreaterThan(s.fillerTokens + s.distractors * 10);
    expect(s.prompt.length).toBeLessThan(s.fillerTokens + s.distractors * 20 + 200);
    expect(Math.abs(s.needleStart / s.prompt.length - 0.3)).toBeLessThanOrEqual(0.01);
  }, 60_000);

  test("exactTokens 1,048,576: the prompt fits a 1M context and nearly fills it", () => {
    const s = tasks.haystack(rngOf(2), { kind: "passkey", exactTokens: 1_048_576, depth: 0.8 });
    expect(s.prompt.length).toBeLessThanOrEqual(1_048_576);
    expect(s.prompt.length).toBeGreaterThan(1_048_576 - 300);
    expect(s.distractors).toBeGreaterThan(500);
  }, 60_000);
});
