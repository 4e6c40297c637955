/**
 * The trained fixture model (the built-in default) really retrieves: a small fixed-seed subset of
 * scripts/eval-passkey.ts's grid must stay above a threshold, so that a runtime regression that loses
 * what lies far back in the context (KV handling, positions, masks, chunked prefill) fails CI. And a
 * passkey question sent to the running server is answered with the right number.
 */
import { afterAll, describe, expect, test } from "bun:test";
import type { ChildProcess } from "node:child_process";
import { answerIsRight, FixtureTasks, rngOf } from "../scripts/lib/fixture-tasks.ts";
import { runCell } from "../scripts/lib/passkey-eval.ts";
import { FIXTURE_DIR, sharedEngine } from "./helpers/model.ts";
import { startBunServer } from "./helpers/server.ts";

// models/builtin is built from the committed fixtures/fixture-model.safetensors.
const engine = await sharedEngine({ modelDir: FIXTURE_DIR, contextLength: 0 });
const tasks = new FixtureTasks(engine.tokenizer, engine.template, "eval");
// A fixed date line (the template's own default), so that the subset is the same trials every day.
const FIXED_DATE = "26 Jul 2024";
// The committed fixture scores 70/70 (passkey) and 69/70 (multikey) on this subset; a runtime that loses
// far-back context scores near 0 (as the untrained model below does), and one that blurs positions or
// mixes up needles loses multikey first (the needle is picked by its key word among several).
const THRESHOLD = { passkey: 0.9, multikey: 0.85 };

describe("fixture model accuracy (fixed seed, held-out filler)", () => {
  for (const kind of ["passkey", "multikey"] as const) {
    test(`${kind}: 256 and 1024 tokens of filler at depths 0, 0.5, 1, and a 1,000,000-position gap`, async () => {
      let correct = 0;
      let trials = 0;
      let seed = kind === "passkey" ? 100 : 200;
      const cells = [
        ...[256, 1024].flatMap((fillerTokens) => [0, 0.5, 1].map((depth) => ({ fillerTokens, depth, gap: undefined as number | undefined }))),
        { fillerTokens: 256, depth: undefined, gap: 1_000_000 },
      ];
      for (const c of cells) {
        const r = await runCell(engine, tasks, { kind, ...c, trials: 10, seed: seed++ }, FIXED_DATE);
        correct += r.correct;
        trials += r.trials;
      }
      expect(trials).toBe(70);
      console.log(`${kind}: ${correct}/${trials} on the fixed subset`);
      expect(correct / trials).toBeGreaterThanOrEqual(THRESHOLD[kind]);
    }, 120_000);
  }

  test("an untrained model with the same architecture does not pass (the measure can fail)", async () => {
    const random = await sharedEngine({ contextLength: 0 });
    const r = await runCell(random, tasks, { kind: "passkey", fillerTokens: 256, depth: 0.5, trials: 10, seed: 5 }, FIXED_DATE);
    expect(r.correct).toBeLessThan(3);
  });
});

describe("through the running server", () => {
  let child: ChildProcess | null = null;
  afterAll(() => child?.kill("SIGKILL"));

  test("a passkey question to /v1/chat/completions on the built-in model is answered with the right number", async () => {
    const server = await startBunServer(["--port", "0", "--backend", "wasm"]);
    child = server.child;
    const { url } = server;
    expect(server.output()).toContain("model builtin");
    // The date line the server renders without a date_string: the built-in template's fixed default, as Meta's.
    const date = "26 Jul 2024";
    const random = rngOf(42);
    for (let i = 0; i < 3; i++) {
      const sample = tasks.sample(random, { kind: "passkey", fillerTokens: 400, depth: random(), dateString: date });
      const res = await fetch(`${url}/v1/chat/completions`, {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify({ messages: [{ role: "user", content: sample.content }], max_tokens: 24, seed: i }),
      });
      const body = (await res.json()) as { choices: { message: { content: string }; finish_reason: string }[]; usage: { prompt_tokens: number } };
      expect(body.usage.prompt_tokens).toBe(sample.prompt.length);
      expect(body.choices[0]!.message.content).toBe(sample.answerText);
      expect(answerIsRight(body.choices[0]!.message.content, sample.key)).toBe(true);
      expect(body.choices[0]!.finish_reason).toBe("stop");
    }
  }, 60_000);
});
