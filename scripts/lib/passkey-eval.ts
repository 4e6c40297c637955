/**
 * Runs the fixture tasks through our runtime (Engine, full KV cache) and counts exact answers. Used by
 * scripts/eval-passkey.ts (the accuracy grid) and by the fast accuracy test.
 *
 * A cell is a task, a filler length, a needle depth (or random depths) and optionally a position gap: the
 * question then stands `gap` positions further on than its token index, as after a compaction that kept
 * the needle and dropped what lay between (positions are original positions; the KV is not touched).
 * Trials come in groups that share their filler text (and so the KV of everything before the first
 * needle, which is prefilled once per group and copied); keys, words and distractors differ per trial.
 */
import type { Engine } from "../../runtime/index.ts";
import { answerIsRight, rngOf, type FixtureTasks, type TaskKind } from "./fixture-tasks.ts";

export interface CellSpec {
  kind: TaskKind;
  fillerTokens: number;
  /** Needle depth 0..1; undefined draws one per trial. */
  depth?: number;
  /** Extra positions between the end of the filler and the question. */
  gap?: number;
  trials: number;
  seed: number;
  /** Trials per shared filler. */
  groupSize?: number;
}

export interface CellResult {
  correct: number;
  trials: number;
  ms: number;
  promptTokens: number;
  /** A few wrong answers, for the log. */
  misses: { expected: string; got: string }[];
}

function commonPrefix(a: number[], b: number[]): number {
  let i = 0;
  while (i < a.length && i < b.length && a[i] === b[i]) i++;
  return i;
}

/**
 * The date of the system header's "Today Date:" line as the server renders a request without a date_string:
 * the template's own default (Llama-3.1's: 26 Jul 2024), or today for a template that reads the clock.
 */
export function serverDateLine(engine: Engine): string {
  const text = engine.renderChat([{ role: "user", content: "x" }]);
  const line = /Today Date: ([^\n]+)\n/.exec(text);
  if (!line) throw new Error("the model's chat template writes no \"Today Date:\" line: give --date");
  return line[1]!;
}

export async function runCell(engine: Engine, tasks: FixtureTasks, spec: CellSpec, dateString: string): Promise<CellResult> {
  const t0 = performance.now();
  const random = rngOf(spec.seed);
  const groupSize = spec.groupSize ?? 10;
  let correct = 0;
  let promptTokens = 0;
  const misses: CellResult["misses"] = [];
  for (let start = 0; start < spec.trials; start += groupSize) {
    const fillerSeed = Math.floor(random() * 2 ** 31);
    const samples = Array.from({ length: Math.min(groupSize, spec.trials - start) }, () =>
      tasks.sample(random, {
        kind: spec.kind,
        fillerTokens: spec.fillerTokens,
        depth: spec.depth ?? random(),
        keys: 4,
        dateString,
        fillerRandom: rngOf(fillerSeed),
      }),
    );
    // Everything up to where the group's prompts part is read once.
    let shared = samples[0]!.prompt.length;
    for (const s of samples) shared = Math.min(shared, commonPrefix(s.prompt, samples[0]!.prompt), s.questionStart);
    shared = Math.max(0, shared - 1);
    const base = engine.model.newCache();
    if (shared > 0) await engine.ingest(samples[0]!.prompt.slice(0, shared), () => base);
    for (const s of samples) {
      const cache = base.clone();
      if (spec.gap) {
        // Read the rest of the filler at its own positions, then jump before the question.
        const rest = s.prompt.slice(0, s.questionStart);
        await engine.ingest(rest, () => cache);
        cache.nextPosition += spec.gap;
      }
      const r = await engine.complete({ promptIds: s.prompt, maxTokens: s.answer.length + 4, sampling: { temperature: 0 }, stop: [], prepare: () => cache });
      promptTokens += s.prompt.length;
      if (answerIsRight(r.text, s.key)) correct++;
      else if (misses.length < 3) misses.push({ expected: s.key, got: r.text });
    }
  }
  return { correct, trials: spec.trials, ms: performance.now() - t0, promptTokens: promptTokens / spec.trials, misses };
}
