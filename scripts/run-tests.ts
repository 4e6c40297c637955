/**
 * `npm test`: builds the built-in model if needed, runs every test suite with `bun test`, then the Deno
 * suite (tests/deno/, which needs Deno's own APIs such as Deno KV: `deno test -A --unstable-kv tests/deno/`
 * through node_modules/.bin/deno), and ends with one line CI reads, `N passed, N failed`, summed over the
 * suites. Exit status is non-zero on any failure. Extra arguments go to bun test (e.g. a file filter), and
 * then the Deno suite is left out (run it alone with `npx deno test -A --unstable-kv tests/deno/`).
 */
import { spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { fileURLToPath } from "node:url";

const root = fileURLToPath(new URL("..", import.meta.url));

function run(cmd: string, args: string[], env: Record<string, string> = {}): Promise<{ code: number; output: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, ...env }, cwd: root });
    let output = "";
    const forward = (stream: NodeJS.WritableStream) => (chunk: Buffer) => {
      output += chunk.toString();
      stream.write(chunk);
    };
    child.stdout.on("data", forward(process.stdout));
    child.stderr.on("data", forward(process.stderr));
    child.on("close", (code) => resolve({ code: code ?? 1, output }));
  });
}

const build = await run(process.execPath, ["scripts/build-model.ts", "--if-missing"]);
if (build.code !== 0) {
  console.log("model build failed");
  console.log("0 passed, 1 failed");
  process.exit(1);
}

// bunfig.toml's [test] timeout is not applied by Bun 1.4: without --timeout every test that has no timeout
// of its own gets 5 s, which model loads and spawned servers pass on a busy machine.
const extra = process.argv.slice(2);
const timeout = extra.some((a) => a === "--timeout" || a.startsWith("--timeout=")) ? [] : ["--timeout", "120000"];
type Counts = { passed: number; failed: number } | null;
// bun test ends with lines such as " 42 pass", " 1 fail".
function bunCounts(output: string): Counts {
  const pass = [...output.matchAll(/^\s*(\d+) pass$/gm)].pop();
  const fail = [...output.matchAll(/^\s*(\d+) fail$/gm)].pop();
  return pass || fail ? { passed: pass ? Number(pass[1]) : 0, failed: fail ? Number(fail[1]) : 0 } : null;
}
// deno test ends with "ok | 20 passed | 0 failed (5s)" or "FAILED | 19 passed (2 steps) | 1 failed | 1 ignored (5s)".
function denoCounts(output: string): Counts {
  const line = [...output.replace(/\x1b\[[0-9;]*m/g, "").matchAll(/^(?:ok|FAILED) \|.*$/gm)].pop()?.[0];
  if (!line) return null;
  const passed = /(\d+) passed/.exec(line);
  const failed = /(\d+) failed/.exec(line);
  return { passed: passed ? Number(passed[1]) : 0, failed: failed ? Number(failed[1]) : 0 };
}

const localDeno = fileURLToPath(new URL("../node_modules/.bin/deno", import.meta.url));
// tests/deno/ runs under Deno (bunfig.toml keeps bun test out of it): Deno.test, and Deno KV behind --unstable-kv.
const suites: { name: string; cmd: string; args: string[]; env?: Record<string, string>; counts: (output: string) => Counts }[] = [
  { name: "bun", cmd: process.execPath, args: ["test", ...timeout, ...extra], counts: bunCounts },
];
if (extra.length === 0) {
  suites.push({
    name: "deno",
    cmd: existsSync(localDeno) ? localDeno : "deno",
    args: ["test", "-A", "--unstable-kv", "tests/deno/"],
    env: { NO_COLOR: "1" },
    counts: denoCounts,
  });
}

let passed = 0;
let failed = 0;
let exitCode = 0;
for (const suite of suites) {
  const { code, output } = await run(suite.cmd, suite.args, suite.env);
  const counts = suite.counts(output);
  const p = counts ? counts.passed : 0;
  let f = counts ? counts.failed : 0;
  if (code !== 0 && f === 0) f = 1; // the runner itself failed (crash, no tests found, ...)
  passed += p;
  failed += f;
  if (code !== 0) exitCode = 1;
  console.log(`${suite.name}: ${p} passed, ${f} failed (exit ${code})`);
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(exitCode || (failed > 0 ? 1 : 0));
