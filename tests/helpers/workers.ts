/**
 * Several server processes sharing one session store, as workers behind a router: the cases of issue 15's
 * acceptance, for any store a `--session-store` value names. Used by tests/session-workers.test.ts (file,
 * Redis) and the Deno KV suite.
 */
import { beforeAll, describe, expect, test } from "bun:test";
import { MODEL_DIR } from "./model.ts";
import { bin, startBunServer, startProcess, type ServerProcess } from "./server.ts";

const DATE = { date_string: "26 Jul 2024" };
const GREEDY = { temperature: 0, max_tokens: 12 };
const TURNS = ["What is the tide doing?", "And at noon?", "Say it again, shorter.", "Thanks. Anything else?", "One more line, please."];

export interface StoreUnderTest {
  /** A fresh, empty store: its --session-store value, and how to remove it. */
  make(): Promise<{ spec: string; cleanup(): Promise<void> }>;
  /** The runtime the workers run on (Deno KV needs Deno). Default bun. */
  runtime?: "bun" | "deno";
}

const json = (body: unknown) => ({ method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });

let runtime: "bun" | "deno" = "bun";

async function startWorker(spec: string, extra: string[] = []): Promise<ServerProcess> {
  const args = ["--port", "0", "--backend", "wasm", "--model", MODEL_DIR, "--session-store", spec, "--session-lease-ms", "1500", ...extra];
  return runtime === "deno" ? startProcess(bin("deno"), ["run", "-A", "src/entry/deno.ts", ...args], {}, 120_000) : startBunServer(args);
}

async function stopAll(workers: ServerProcess[]): Promise<void> {
  await Promise.all(
    workers.map(
      (w) =>
        new Promise<void>((resolve) => {
          if (w.child.exitCode !== null || w.child.signalCode !== null) return resolve();
          w.child.once("exit", () => resolve());
          w.child.kill("SIGKILL");
        }),
    ),
  );
}

async function createSession(url: string, id: string): Promise<void> {
  const res = await fetch(`${url}/v1/sessions`, json({ id, system: "You keep the harbour log.", messages: [{ role: "user", content: "The tide came in at 04:17." }], chat_template_kwargs: DATE }));
  expect(res.status).toBe(201);
}

async function say(url: string, id: string, content: string, extra: Record<string, unknown> = {}): Promise<{ status: number; text: string; body: any }> {
  const res = await fetch(`${url}/v1/sessions/${id}/messages`, json({ content, ...GREEDY, ...extra }));
  const body = (await res.json()) as any;
  return { status: res.status, text: body.choices?.[0]?.message?.content ?? "", body };
}

async function messagesOf(url: string, id: string): Promise<number> {
  const res = await fetch(`${url}/v1/sessions/${id}`);
  expect(res.status).toBe(200);
  return ((await res.json()) as { messages: number }).messages;
}

export function workerSuite(name: string, store: StoreUnderTest, skip: string | null): void {
  const title = skip ? `${name} (skipped: ${skip})` : name;
  describe(`workers sharing one store: ${title}`, () => {
    beforeAll(() => {
      runtime = store.runtime ?? "bun";
    });
    test.skipIf(skip !== null)("three workers take the turns of one session in turn: replies token-identical to one worker's", async () => {
      const shared = await store.make();
      const alone = await store.make();
      const workers: ServerProcess[] = [];
      try {
        workers.push(...(await Promise.all([startWorker(shared.spec), startWorker(shared.spec), startWorker(shared.spec), startWorker(alone.spec)])));
        const [a, b, c, single] = workers as [ServerProcess, ServerProcess, ServerProcess, ServerProcess];
        await createSession(a.url, "log");
        await createSession(single.url, "log");
        const round = [a, b, c];
        for (const [i, content] of TURNS.entries()) {
          const spread = await say(round[i % 3]!.url, "log", content);
          const one = await say(single.url, "log", content);
          expect(spread.status).toBe(200);
          expect(one.status).toBe(200);
          expect(spread.text.length).toBeGreaterThan(0);
          expect(spread.text).toBe(one.text);
          expect(spread.body.usage).toEqual(one.body.usage);
        }
        // Every worker sees the whole conversation: system + first message + 5 turns of 2.
        for (const w of round) expect(await messagesOf(w.url, "log")).toBe(1 + 1 + 2 * TURNS.length);
      } finally {
        await stopAll(workers);
        await shared.cleanup();
        await alone.cleanup();
      }
    }, 240_000);

    test.skipIf(skip !== null)("two workers get a turn of one session at the same moment: they run one after the other, both kept in order", async () => {
      const shared = await store.make();
      const workers: ServerProcess[] = [];
      try {
        workers.push(...(await Promise.all([startWorker(shared.spec), startWorker(shared.spec)])));
        const [a, b] = workers as [ServerProcess, ServerProcess];
        await createSession(a.url, "both");
        const [x, y] = await Promise.all([say(a.url, "both", "First question?", { max_tokens: 24 }), say(b.url, "both", "Second question?", { max_tokens: 24 })]);
        expect(x.status).toBe(200);
        expect(y.status).toBe(200);
        const res = await fetch(`${a.url}/v1/sessions/both/snapshot`);
        expect(res.status).toBe(200);
        // The history holds both turns (2 + 2 messages after the first two), whichever ran first.
        expect(await messagesOf(b.url, "both")).toBe(2 + 4);
        expect(await messagesOf(a.url, "both")).toBe(2 + 4);
        // Under --session-busy reject the second gets 409 instead, and nothing of it is kept.
        const rejecting = await startWorker(shared.spec, ["--session-busy", "reject"]);
        workers.push(rejecting);
        const long = say(a.url, "both", "A long answer, please.", { max_tokens: 200, ignore_eos: true });
        await new Promise((r) => setTimeout(r, 300));
        const refused = await say(rejecting.url, "both", "Me too?");
        expect((await long).status).toBe(200);
        expect(refused.status).toBe(409);
        expect(await messagesOf(rejecting.url, "both")).toBe(2 + 6);
      } finally {
        await stopAll(workers);
        await shared.cleanup();
      }
    }, 240_000);

    test.skipIf(skip !== null)("kill -9 of the worker holding the lease mid-turn: another continues after the lease expires, from the last committed version", async () => {
      const shared = await store.make();
      const workers: ServerProcess[] = [];
      try {
        workers.push(...(await Promise.all([startWorker(shared.spec), startWorker(shared.spec)])));
        const [a, b] = workers as [ServerProcess, ServerProcess];
        await createSession(a.url, "crash");
        expect((await say(a.url, "crash", "Before the crash?")).status).toBe(200);
        // A long streamed turn on a: once its first token arrives, a holds the lease; kill it then.
        const res = await fetch(`${a.url}/v1/sessions/crash/messages`, json({ content: "Talk for a long time.", temperature: 0, max_tokens: 2000, ignore_eos: true, stream: true }));
        const reader = res.body!.getReader();
        await reader.read();
        a.child.kill("SIGKILL");
        void reader.cancel().catch(() => {}); // the connection is gone: nothing to wait for
        // b's turn waits for the dead worker's lease to expire (1.5 s), then runs on the last committed version:
        // the dead turn left nothing.
        const after = await say(b.url, "crash", "After the crash?");
        if (after.status !== 200) console.error(`worker b said:\n${b.output().slice(-3000)}`);
        expect({ status: after.status, error: after.body.error ?? null }).toEqual({ status: 200, error: null });
        expect(await messagesOf(b.url, "crash")).toBe(2 + 2 + 2);
        // A worker that restarts on the same store sees exactly that.
        const again = await startWorker(shared.spec);
        workers.push(again);
        expect(await messagesOf(again.url, "crash")).toBe(6);
      } finally {
        await stopAll(workers);
        await shared.cleanup();
      }
    }, 240_000);

    test.skipIf(skip !== null)("a fork answers like its parent, then both go their own way; deleting the parent keeps the fork", async () => {
      const shared = await store.make();
      const workers: ServerProcess[] = [];
      try {
        workers.push(...(await Promise.all([startWorker(shared.spec), startWorker(shared.spec)])));
        const [a, b] = workers as [ServerProcess, ServerProcess];
        await createSession(a.url, "trunk");
        expect((await say(a.url, "trunk", "Where were we?")).status).toBe(200);
        const forked = await fetch(`${b.url}/v1/sessions/trunk/fork`, json({ id: "branch" }));
        expect(forked.status).toBe(201);
        expect(((await forked.json()) as any).forked_from).toBe("trunk");
        expect((await fetch(`${b.url}/v1/sessions/trunk/fork`, json({ id: "branch" }))).status).toBe(400); // exists
        expect((await fetch(`${b.url}/v1/sessions/nope/fork`, { method: "POST" })).status).toBe(404);
        // The same question to both: the same answer (same KV, same conversation).
        const [p, f] = [await say(a.url, "trunk", "Go on."), await say(b.url, "branch", "Go on.")];
        expect(f.text).toBe(p.text);
        // Then they diverge, and neither sees the other's turns.
        await say(a.url, "trunk", "Parent only.");
        await say(b.url, "branch", "Fork only, first.");
        await say(b.url, "branch", "Fork only, second.");
        expect(await messagesOf(b.url, "trunk")).toBe(2 + 2 + 2 + 2);
        expect(await messagesOf(a.url, "branch")).toBe(2 + 2 + 2 + 4);
        expect((await fetch(`${a.url}/v1/sessions/trunk`, { method: "DELETE" })).status).toBe(200);
        expect((await say(a.url, "branch", "Still here?")).status).toBe(200);
        expect(await messagesOf(b.url, "branch")).toBe(2 + 2 + 2 + 6);
      } finally {
        await stopAll(workers);
        await shared.cleanup();
      }
    }, 240_000);
  });
}
