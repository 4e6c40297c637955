/**
 * Python Jinja2 as the reference renderer of chat templates (tests/fixtures/jinja2-render.py renders a
 * template the way transformers' apply_chat_template does). Needs /usr/bin/python3 with Jinja2 (Debian's
 * python3-jinja2; .ci/run installs it); without it the tests that use it are skipped with a warning.
 */
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { join } from "node:path";
import type { ChatMessage, ToolDefinition } from "../../runtime/index.ts";
import { REPO } from "./model.ts";

const PYTHON = "/usr/bin/python3";
const SCRIPT = join(REPO, "tests", "fixtures", "jinja2-render.py");

export const hasJinja2 = existsSync(PYTHON) && spawnSync(PYTHON, ["-c", "import jinja2"], { timeout: 30_000 }).status === 0;

/** Logs once per file that uses it when the reference is missing (the test itself is skipped). */
export function warnIfNoJinja2(): void {
  if (!hasJinja2) console.warn("Python Jinja2 reference skipped: /usr/bin/python3 with Jinja2 is missing (apt-get install -y python3-jinja2)");
}

export interface Jinja2Case {
  name: string;
  messages: ChatMessage[];
  tools?: ToolDefinition[] | null;
  addGenerationPrompt?: boolean;
  kwargs: Record<string, unknown>;
}

/** What Jinja2 made of each case: its text, or the error it raised. */
export type Jinja2Result = { text: string } | { error: string };

/**
 * Renders each case with Python Jinja2: the template of `tokenizerConfigPath` (or `chatTemplate` instead,
 * with that config's special tokens). Messages go over as they are, except that content null becomes ""
 * (as ChatTemplate normalizes it).
 */
export function jinja2Results(tokenizerConfigPath: string, cases: Jinja2Case[], chatTemplate?: string): Jinja2Result[] {
  if (!existsSync(PYTHON)) throw new Error(`${PYTHON} is missing: install python3 and python3-jinja2 (apt-get install -y python3 python3-jinja2)`);
  const input = {
    tokenizer_config: tokenizerConfigPath,
    ...(chatTemplate !== undefined ? { chat_template: chatTemplate } : {}),
    cases: cases.map((c) => ({
      messages: c.messages.map((m) => ({ ...m, content: m.content ?? "" })),
      tools: c.tools ?? null,
      add_generation_prompt: c.addGenerationPrompt ?? true,
      kwargs: c.kwargs,
    })),
  };
  const run = spawnSync(PYTHON, [SCRIPT], { input: JSON.stringify(input), encoding: "utf8", timeout: 60_000 });
  if (run.status === 3) throw new Error(`Python Jinja2 reference: ${run.stderr.trim()}`);
  if (run.status !== 0) throw new Error(`Python Jinja2 reference failed (status ${run.status}): ${run.stderr || run.error?.message}`);
  return JSON.parse(run.stdout) as Jinja2Result[];
}

/** The texts Jinja2 renders; a case it refuses is an error naming the case. */
export function jinja2Render(tokenizerConfigPath: string, cases: Jinja2Case[], chatTemplate?: string): string[] {
  return jinja2Results(tokenizerConfigPath, cases, chatTemplate).map((r, i) => {
    if ("error" in r) throw new Error(`Jinja2 could not render case "${cases[i]!.name}": ${r.error}`);
    return r.text;
  });
}
