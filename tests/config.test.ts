import { describe, expect, test } from "bun:test";
import { ConfigError, helpText, loadConfig } from "../src/config.ts";

describe("configuration", () => {
  test("defaults", () => {
    expect(loadConfig({}, [])).toMatchObject({ host: "127.0.0.1", port: 8080, backend: "auto", variant: "auto", threads: 1, queueLimit: 16, shutdownGraceMs: 30000 });
    expect(loadConfig({ API_KEYS_FILE: "/etc/keys.json" }, ["--shutdown-grace-ms", "500"])).toMatchObject({ apiKeysFile: "/etc/keys.json", shutdownGraceMs: 500 });
  });
  test("environment, overridden by flags (both --flag value and --flag=value)", () => {
    const c = loadConfig({ PORT: "9000", BACKEND: "wasm", THREADS: "2", MODEL_DIR: "/models/x" }, ["--port", "9100", "--threads=4"]);
    expect(c).toMatchObject({ port: 9100, backend: "wasm", threads: 4, modelDir: "/models/x" });
  });
  test("KV compaction: none by default; policy, budget, recent window and archive directory from flags or the environment", () => {
    expect(loadConfig({}, [])).toMatchObject({ kvPolicy: "none", kvBudget: 4096, kvRecent: 0, kvRecall: "auto", kvPlacement: "near" });
    expect(loadConfig({ KV_RECALL: "on" }, ["--kv-placement", "original"])).toMatchObject({ kvRecall: "on", kvPlacement: "original" });
    expect(() => loadConfig({}, ["--kv-recall", "yes"])).toThrow();
    expect(loadConfig({ KV_POLICY: "window" }, ["--kv-budget", "1024", "--kv-recent=448", "--kv-cold-dir", "/var/tmp/kv"])).toMatchObject({ kvPolicy: "window", kvBudget: 1024, kvRecent: 448, kvColdDir: "/var/tmp/kv" });
    expect(() => loadConfig({}, ["--kv-policy", "lru"])).toThrow(/--kv-policy \/ KV_POLICY/);
    expect(() => loadConfig({}, ["--kv-budget", "32"])).toThrow(/--kv-budget \/ KV_BUDGET/);
  });

  test("invalid values and unknown flags are refused with the flag and variable named", () => {
    expect(() => loadConfig({ BACKEND: "cuda" }, [])).toThrow(/--backend \/ BACKEND/);
    expect(() => loadConfig({}, ["--port", "-1"])).toThrow(/--port \/ PORT/);
    expect(() => loadConfig({}, ["--nope", "1"])).toThrow(ConfigError);
    expect(() => loadConfig({}, ["--port"])).toThrow(/needs a value/);
  });
  test("help lists every option", () => {
    for (const flag of ["--model", "--backend", "--variant", "--queue-limit", "--ctx-size", "--max-body-bytes", "--api-key", "--api-keys-file", "--shutdown-grace-ms"]) expect(helpText()).toContain(flag);
  });
});
