/**
 * No single request stalls the server: a real server process (Bun entry point, WASM backend, default
 * settings) is loaded with a multi-megabyte tokenization and a long prefill at once while /health is
 * probed every 20 ms. Before tokenization was cut into pieces and prefill chunks were sized to a time
 * target, /health waited seconds behind them. Over-long input is refused before tokenizing, naming the
 * field and the limit.
 *
 * The one wall-time assertion of the suite lives here, because the issue asks for it: the median probe
 * answers within 100 ms and the worst within 1 s (generous for a busy 2-core machine; it was 2+ s).
 */
import { afterAll, describe, expect, test } from "bun:test";
import { startBunServer, type ServerProcess } from "./helpers/server.ts";

let server: Promise<ServerProcess> | null = null;
/** One server for the file, started by whichever test needs it first. */
const serverUrl = async () => (await (server ??= startBunServer(["--host", "127.0.0.1", "--port", "0", "--backend", "wasm"]))).url;
afterAll(async () => {
  (await server)?.child.kill("SIGKILL");
});

const post = (url: string, path: string, body: unknown) =>
  fetch(`${url}${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });

/** Probes /health every 20 ms until `work` settles; returns the probe latencies and what work returned. */
async function probeDuring<T>(url: string, work: Promise<T>): Promise<{ latencies: number[]; result: T }> {
  let done = false;
  const latencies: number[] = [];
  const probing = (async () => {
    while (!done) {
      const t0 = performance.now();
      const res = await fetch(`${url}/health`);
      await res.json();
      latencies.push(performance.now() - t0);
      await new Promise((r) => setTimeout(r, 20));
    }
  })();
  try {
    return { latencies, result: await work };
  } finally {
    done = true;
    await probing;
  }
}

const PROSE = "The harbour master logged 42 arrivals, 17 departures and one very late ferry before noon.\n";

describe("a responsive server", () => {
  test(
    "/health answers within 100 ms (median) and 1 s (worst) while an 8 MB tokenization and an 8K-token prefill run",
    async () => {
      const url = await serverUrl();
      const document = PROSE.repeat(Math.floor(8_000_000 / PROSE.length)); // ~8 MB, ~1.8M tokens
      const longChat = PROSE.repeat(400); // ~8K tokens to prefill
      const work = Promise.all([
        post(url, "/tokenize", { content: document }).then(async (r) => ({ status: r.status, tokens: ((await r.json()) as { tokens: number[] }).tokens.length })),
        post(url, "/v1/chat/completions", { messages: [{ role: "user", content: longChat }], max_tokens: 2, temperature: 0 }).then(async (r) => ({
          status: r.status,
          prompt: ((await r.json()) as { usage: { prompt_tokens: number } }).usage.prompt_tokens,
        })),
      ]);
      const { latencies, result } = await probeDuring(url, work);
      const [tokenized, chat] = result;
      expect(tokenized.status).toBe(200);
      expect(tokenized.tokens).toBeGreaterThan(1_500_000);
      expect(chat.status).toBe(200);
      expect(chat.prompt).toBeGreaterThan(7000);
      latencies.sort((a, b) => a - b);
      const median = latencies[Math.floor(latencies.length / 2)]!;
      const worst = latencies.at(-1)!;
      console.log(`/health during load: ${latencies.length} probes, median ${median.toFixed(1)} ms, worst ${worst.toFixed(0)} ms`);
      expect(median).toBeLessThan(100);
      expect(worst).toBeLessThan(1000);
      expect(latencies.length).toBeGreaterThan(20); // probes really ran during the load
    },
    240_000,
  );

  test(
    "a 2 MB one-word message and a 10 MB /tokenize are refused at once, naming the field and the limit",
    async () => {
      const url = await serverUrl();
      const word = await post(url, "/v1/chat/completions", { messages: [{ role: "user", content: "a".repeat(2_000_000) }], max_tokens: 1 });
      expect(word.status).toBe(400);
      const wordError = ((await word.json()) as { error: { message: string; param: string } }).error;
      expect(wordError.param).toBe("messages.0.content");
      expect(wordError.message).toContain("8192");

      const big = await post(url, "/tokenize", { content: PROSE.repeat(Math.ceil(10_000_000 / PROSE.length)) });
      expect(big.status).toBe(400);
      const bigError = ((await big.json()) as { error: { message: string; param: string } }).error;
      expect(bigError.param).toBe("content");
      expect(bigError.message).toContain("8388608");

      // The server is still there and answers.
      expect((await fetch(`${url}/health`)).status).toBe(200);
    },
    120_000,
  );
});
