/**
 * Backend choice with a real WebGPU adapter: Deno's navigator.gpu on Mesa's software Vulkan driver
 * (lavapipe / llvmpipe; .ci/run installs mesa-vulkan-drivers). `auto` must not pick a software adapter;
 * `webgpu` by name must use it and give the same greedy tokens as WASM.
 */
import { expect, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REPO } from "./helpers/model.ts";

const run = spawnSync(join(REPO, "node_modules", ".bin", "deno"), ["run", "-A", "tests/fixtures/webgpu-backend.ts"], {
  cwd: REPO,
  encoding: "utf8",
  env: { ...process.env, NO_COLOR: "1", XDG_RUNTIME_DIR: mkdtempSync(join(tmpdir(), "xdg-")) },
  timeout: 300_000,
});
const line = run.stdout.trim().split("\n").pop() ?? "";
const result = JSON.parse(line || "{}") as {
  adapter?: string | null;
  auto?: { backend: string; tokens: number[] };
  webgpu?: { backend: string; detail: string; tokens: number[] };
  wasm?: { backend: string; tokens: number[] };
};
const hasAdapter = typeof result.adapter === "string";
if (!hasAdapter) console.warn(`webgpu tests skipped: no WebGPU adapter (install mesa-vulkan-drivers). ${run.stderr.slice(-500)}`);

test("the Deno WebGPU probe ran", () => {
  expect(run.status).toBe(0);
  expect("adapter" in result).toBe(true);
});

test.skipIf(!hasAdapter)("backend auto skips a software adapter; backend webgpu uses it with the same greedy tokens as wasm", () => {
  const software = /llvmpipe|lavapipe|swiftshader/i.test(result.adapter!);
  if (software) expect(result.auto!.backend).not.toBe("webgpu");
  else expect(result.auto!.backend).toBe("webgpu");
  expect(result.webgpu!.backend).toBe("webgpu");
  expect(result.webgpu!.detail).toContain(result.adapter!);
  expect(result.wasm!.tokens).toHaveLength(8);
  expect(result.webgpu!.tokens).toEqual(result.wasm!.tokens);
});
