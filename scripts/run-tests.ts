/**
 * `npm test`: builds the built-in model if needed, runs every test suite with `bun test`, and ends with
 * one line CI reads, `N passed, N failed`, summed over the suites. Exit status is non-zero on any failure.
 * Extra arguments go to bun test (e.g. a file filter).
 */
import { spawn } from "node:child_process";

function run(cmd: string, args: string[]): Promise<{ code: number; output: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ["ignore", "pipe", "pipe"], env: process.env });
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
const suites: { name: string; cmd: string; args: string[] }[] = [
  { name: "bun", cmd: process.execPath, args: ["test", ...timeout, ...extra] },
];

let passed = 0;
let failed = 0;
let exitCode = 0;
for (const suite of suites) {
  const { code, output } = await run(suite.cmd, suite.args);
  // bun test ends with lines such as " 42 pass", " 1 fail".
  const pass = [...output.matchAll(/^\s*(\d+) pass$/gm)].pop();
  const fail = [...output.matchAll(/^\s*(\d+) fail$/gm)].pop();
  const p = pass ? Number(pass[1]) : 0;
  let f = fail ? Number(fail[1]) : 0;
  if (code !== 0 && f === 0) f = 1; // the runner itself failed (crash, no tests found, ...)
  passed += p;
  failed += f;
  if (code !== 0) exitCode = 1;
  console.log(`${suite.name}: ${p} passed, ${f} failed (exit ${code})`);
}
console.log(`${passed} passed, ${failed} failed`);
process.exit(exitCode || (failed > 0 ? 1 : 0));
