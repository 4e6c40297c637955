/**
 * Server configuration: environment variables, overridden by command-line flags, validated with zod.
 * One schema is the single source of names, defaults, bounds and the --help text.
 */
import { z } from "zod";
import { DEFAULT_PREFILL_TARGET_MS, DEFAULT_TEXT_LIMITS, MODEL_VARIANT_NAMES } from "../runtime/index.ts";

const intIn = (min: number, max: number) => z.coerce.number().int().min(min).max(max);

export const configSchema = z.object({
  modelDir: z.string().min(1).optional().describe("model folder in the onnx-community layout (default: the built-in model)"),
  modelId: z.string().min(1).optional().describe("id served by /v1/models (default: the folder name)"),
  variant: z.enum(["auto", ...MODEL_VARIANT_NAMES]).default("auto").describe("which onnx/model*.onnx to load: auto picks fp32, then fp16, q4f16, q4, ..."),
  backend: z.enum(["auto", "webgpu", "native", "wasm"]).default("auto").describe("ORT backend: auto = hardware WebGPU, else onnxruntime-node, else WASM"),
  threads: intIn(1, 256).default(1).describe("CPU threads for the wasm / native backend"),
  host: z.string().min(1).default("127.0.0.1").describe("address to listen on"),
  port: intIn(0, 65535).default(8080).describe("port to listen on (0 picks a free one)"),
  queueLimit: intIn(0, 100000).default(16).describe("requests that may wait behind the running one before 429"),
  ctxSize: intIn(0, 1 << 30).default(131072).describe("context tokens per request, prompt + completion (0 = the model's max_position_embeddings)"),
  prefillChunk: intIn(1, 1 << 20).default(512).describe("prompt tokens per forward pass while prefilling"),
  maxBodyBytes: intIn(1024, 1 << 30).default(16 * 1024 * 1024).describe("largest request body accepted, in bytes (413 above)"),
  apiKey: z.string().min(1).optional().describe("if set, every route but /health needs 'Authorization: Bearer <key>' (tenant \"default\")"),
  sessionDir: z.string().min(1).default("snapshots").describe("directory of the session snapshot store (the file store's, when --session-store is not given)"),
  sessionStore: z
    .string()
    .regex(/^(file:.+|rediss?:\/\/.+|denokv:.*)$/, "file:<dir>, redis://[user:pass@]host:port[/db] or denokv:[path]")
    .optional()
    .describe("where sessions live: file:<dir> (default file:<--session-dir>), redis://host:port (workers sharing one Redis), denokv:[path] (Deno KV; the Deploy entry's default)"),
  sessionLeaseMs: intIn(100, 3_600_000).default(30_000).describe("a turn's lease on its session in the store lasts this long unless renewed (renewed every third while the worker lives): after a crash, others wait at most this"),
  sessionMemoryBytes: intIn(0, Number.MAX_SAFE_INTEGER).default(4 * 2 ** 30).describe("KV bytes sessions may hold in memory; beyond it the least recently used are dropped (they stay in the store)"),
  kvMemoryBytes: intIn(1 << 20, Number.MAX_SAFE_INTEGER).default(8 * 2 ** 30).describe("KV bytes the process may hold in all (sessions, running requests, uploads); a request that does not fit gets 400 or 429"),
  sessionBusy: z.enum(["wait", "reject"]).default("wait").describe("a second request on a busy session waits, or gets 409"),
  maxSnapshotBytes: intIn(1024, Number.MAX_SAFE_INTEGER).default(8 * 2 ** 30).describe("largest snapshot upload, in bytes (413 above)"),
  snapshotChunkTokens: intIn(1, 65536).default(4096).describe("tokens per snapshot chunk (each chunk has its own checksum)"),
  apiKeysFile: z.string().min(1).optional().describe('JSON file of tenant name to API key(s): {"tenant-a": "sk-...", "tenant-b": ["sk-1", "sk-2"]}'),
  idleTimeoutS: intIn(0, 255).default(60).describe("seconds a connection may stay silent both ways before it is closed (0 = never; generations are exempt once their body is in)"),
  shutdownGraceMs: intIn(0, 24 * 3600 * 1000).default(30000).describe("on SIGTERM / SIGINT, how long running requests may take to finish before the server exits anyway (status 1)"),
  maxFieldChars: intIn(1, 1 << 30).default(DEFAULT_TEXT_LIMITS.maxFieldChars).describe("characters one text field of a request may hold (message content, prompt, document); 400 above"),
  maxPromptChars: intIn(1, 1 << 30).default(DEFAULT_TEXT_LIMITS.maxPromptChars).describe("characters tokenized for one request (the rendered chat, a session's whole conversation); 400 above"),
  maxRunChars: intIn(16, 1 << 30).default(DEFAULT_TEXT_LIMITS.maxRunChars).describe("longest word, number or run of spaces or symbols accepted (its tokenization cannot pause); 400 above"),
  prefillTargetMs: intIn(0, 60000).default(DEFAULT_PREFILL_TARGET_MS).describe("milliseconds one prefill forward pass aims at (smaller chunks keep the server responsive); 0 = always --prefill-chunk"),
  kvPolicy: z.enum(["none", "window", "attention"]).default("none").describe("KV compaction of requests and sessions: none (every slot stays), window (sinks + recent), attention (sinks + recent + most-attended slots, with a recall tier)"),
  kvBudget: intIn(64, 1 << 30).default(4096).describe("with --kv-policy window or attention: KV slots a request or session keeps resident (plus one prefill chunk while reading)"),
  kvRecent: intIn(0, 1 << 30).default(0).describe("with --kv-policy: most recent tokens always kept (window keeps only these, the first 64 tokens and recalled blocks); 0 = what fills the budget"),
  kvRecall: z.enum(["auto", "on", "off"]).default("auto").describe("with --kv-policy: the recall tier (archive what leaves the window, bring back the blocks a question points to); auto = on for attention, off for window"),
  kvPlacement: z.enum(["near", "original"]).default("near").describe("with --kv-policy: where sinks and recalled blocks attend from: near = just before the recent window (one stretch of text), original = where they were read"),
  kvColdDir: z.string().min(1).optional().describe("where the attention policy's recall tier writes its per-request archive files (default: the system's temporary directory)"),
});

export type ServerConfig = z.infer<typeof configSchema>;

/** Environment variable and flag for each setting. */
const NAMES: Record<keyof ServerConfig, { env: string; flag: string }> = {
  modelDir: { env: "MODEL_DIR", flag: "--model" },
  modelId: { env: "MODEL_ID", flag: "--model-id" },
  variant: { env: "MODEL_VARIANT", flag: "--variant" },
  backend: { env: "BACKEND", flag: "--backend" },
  threads: { env: "THREADS", flag: "--threads" },
  host: { env: "HOST", flag: "--host" },
  port: { env: "PORT", flag: "--port" },
  queueLimit: { env: "QUEUE_LIMIT", flag: "--queue-limit" },
  ctxSize: { env: "CTX_SIZE", flag: "--ctx-size" },
  prefillChunk: { env: "PREFILL_CHUNK", flag: "--prefill-chunk" },
  maxBodyBytes: { env: "MAX_BODY_BYTES", flag: "--max-body-bytes" },
  apiKey: { env: "API_KEY", flag: "--api-key" },
  sessionDir: { env: "SESSION_DIR", flag: "--session-dir" },
  sessionStore: { env: "SESSION_STORE", flag: "--session-store" },
  sessionLeaseMs: { env: "SESSION_LEASE_MS", flag: "--session-lease-ms" },
  sessionMemoryBytes: { env: "SESSION_MEMORY_BYTES", flag: "--session-memory-bytes" },
  kvMemoryBytes: { env: "KV_MEMORY_BYTES", flag: "--kv-memory-bytes" },
  sessionBusy: { env: "SESSION_BUSY", flag: "--session-busy" },
  maxSnapshotBytes: { env: "MAX_SNAPSHOT_BYTES", flag: "--max-snapshot-bytes" },
  snapshotChunkTokens: { env: "SNAPSHOT_CHUNK_TOKENS", flag: "--snapshot-chunk-tokens" },
  apiKeysFile: { env: "API_KEYS_FILE", flag: "--api-keys-file" },
  idleTimeoutS: { env: "IDLE_TIMEOUT_S", flag: "--idle-timeout-s" },
  shutdownGraceMs: { env: "SHUTDOWN_GRACE_MS", flag: "--shutdown-grace-ms" },
  maxFieldChars: { env: "MAX_FIELD_CHARS", flag: "--max-field-chars" },
  maxPromptChars: { env: "MAX_PROMPT_CHARS", flag: "--max-prompt-chars" },
  maxRunChars: { env: "MAX_RUN_CHARS", flag: "--max-run-chars" },
  prefillTargetMs: { env: "PREFILL_TARGET_MS", flag: "--prefill-target-ms" },
  kvPolicy: { env: "KV_POLICY", flag: "--kv-policy" },
  kvBudget: { env: "KV_BUDGET", flag: "--kv-budget" },
  kvRecent: { env: "KV_RECENT", flag: "--kv-recent" },
  kvRecall: { env: "KV_RECALL", flag: "--kv-recall" },
  kvPlacement: { env: "KV_PLACEMENT", flag: "--kv-placement" },
  kvColdDir: { env: "KV_COLD_DIR", flag: "--kv-cold-dir" },
};

export class ConfigError extends Error {}

export function helpText(): string {
  const lines = ["Options (flag / environment variable):"];
  for (const [key, names] of Object.entries(NAMES) as [keyof ServerConfig, { env: string; flag: string }][]) {
    const field = configSchema.shape[key];
    lines.push(`  ${names.flag.padEnd(18)} ${names.env.padEnd(15)} ${field.description ?? ""}`);
  }
  return lines.join("\n");
}

/** Builds the configuration from an environment map and argv (flags as --name value or --name=value). */
export function loadConfig(env: Record<string, string | undefined>, argv: string[]): ServerConfig {
  const raw: Record<string, string> = {};
  for (const [key, names] of Object.entries(NAMES)) {
    const v = env[names.env];
    if (v !== undefined && v !== "") raw[key] = v;
  }
  const byFlag = new Map(Object.entries(NAMES).map(([key, n]) => [n.flag, key]));
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i]!;
    if (!arg.startsWith("--")) throw new ConfigError(`unexpected argument "${arg}"\n${helpText()}`);
    const eq = arg.indexOf("=");
    const flag = eq === -1 ? arg : arg.slice(0, eq);
    const key = byFlag.get(flag);
    if (!key) throw new ConfigError(`unknown option ${flag}\n${helpText()}`);
    const value = eq === -1 ? argv[++i] : arg.slice(eq + 1);
    if (value === undefined) throw new ConfigError(`option ${flag} needs a value`);
    raw[key] = value;
  }
  const parsed = configSchema.safeParse(raw);
  if (!parsed.success) {
    const problems = parsed.error.issues.map((issue) => {
      const key = issue.path[0] as keyof ServerConfig;
      const n = NAMES[key];
      return `  ${n ? `${n.flag} / ${n.env}` : String(key)}: ${issue.message}`;
    });
    throw new ConfigError(`invalid configuration:\n${problems.join("\n")}`);
  }
  return parsed.data;
}
