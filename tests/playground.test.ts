/**
 * The playground page at `/` (src/playground.ts, src/playground/): its files are served with their
 * content types and without an API key, nothing else is reachable through them, and the Bun, Node and Deno
 * entry points all find them. Then the page itself in a real headless Chromium (Debian's `chromium`,
 * driven by playwright-core) against a real server process on the built-in fixture model: it loads without
 * console errors, streams a chat answer, reads an uploaded document with a progress bar, answers the
 * document's pass-key question in the session, downloads, uploads and forks a snapshot and deletes; and
 * with --api-key it asks for the key, refuses a wrong one and then works. Screenshots go to
 * test-artifacts/ (printed). Without /usr/bin/chromium the browser tests are skipped, saying why.
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import type { ChildProcess } from "node:child_process";
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { request as httpRequest } from "node:http";
import { chromium, type Browser, type ConsoleMessage, type Page } from "playwright-core";
import { ChatTemplate } from "../runtime/chat-template.ts";
import { TextTokenizer } from "../runtime/tokenizer.ts";
import { FixtureTasks, rngOf } from "../scripts/lib/fixture-tasks.ts";
import { FIXTURE_DIR, REPO } from "./helpers/model.ts";
import { bin, startBunServer, startProcess, type ServerProcess } from "./helpers/server.ts";

const CHROMIUM = "/usr/bin/chromium";
const HAVE_CHROMIUM = existsSync(CHROMIUM);
if (!HAVE_CHROMIUM) console.warn(`SKIPPED: the browser tests of tests/playground.test.ts: ${CHROMIUM} is missing (Debian's chromium package; .ci/run installs it)`);
// The flags that work on these machines (no sandbox as root, no background connections to a closed network).
const CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync"];
const ARTIFACTS = join(REPO, "test-artifacts");
/** Generous: a busy 2-core machine runs this beside other suites. */
const TEST_MS = 240_000;
const STEP_MS = 90_000;
const API_KEY = "playground-test-key";

const PAGE_FILES = { "/": "index.html", "/playground/app.js": "app.js", "/playground/api.js": "api.js", "/playground/style.css": "style.css" } as const;
const TYPES = { "/": "text/html", "/playground/app.js": "text/javascript", "/playground/api.js": "text/javascript", "/playground/style.css": "text/css" } as const;

const servers: ServerProcess[] = [];
const tempDirs: string[] = [];
const tempDir = () => {
  const dir = mkdtempSync(join(tmpdir(), "playground-test-"));
  tempDirs.push(dir);
  return dir;
};
async function start(args: string[], run: (args: string[]) => Promise<ServerProcess> = startBunServer): Promise<ServerProcess> {
  const server = await run(["--host", "127.0.0.1", "--port", "0", "--backend", "wasm", "--session-dir", tempDir(), ...args]);
  servers.push(server);
  return server;
}
afterAll(() => {
  for (const s of servers.splice(0)) s.child.kill("SIGKILL");
  for (const dir of tempDirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});

/** A raw GET that sends the path exactly as given (fetch would normalize `..` and `%2e%2e`). */
function rawGet(url: string, path: string): Promise<{ status: number; type: string }> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve, reject) => {
    const req = httpRequest({ host: hostname, port, path, method: "GET" }, (res) => {
      res.resume();
      res.on("end", () => resolve({ status: res.statusCode!, type: String(res.headers["content-type"] ?? "") }));
    });
    req.on("error", reject);
    req.end();
  });
}

/** Each page file answers 200 with its content type and exactly the bytes in src/playground/. */
async function expectPageFiles(url: string) {
  for (const [path, file] of Object.entries(PAGE_FILES)) {
    const res = await fetch(`${url}${path}`);
    expect(res.status).toBe(200);
    expect(res.headers.get("content-type")).toStartWith(TYPES[path as keyof typeof TYPES]);
    expect(res.headers.get("x-content-type-options")).toBe("nosniff");
    expect(res.headers.get("content-security-policy")).toContain("connect-src 'self'");
    expect(new Uint8Array(await res.arrayBuffer())).toEqual(new Uint8Array(readFileSync(join(REPO, "src", "playground", file))));
  }
}

/** Paths that must reach no file: only the fixed list is served. */
const STRAY_PATHS = [
  "/playground/",
  "/playground/index.html",
  "/playground/../playground.ts",
  "/playground/%2e%2e/playground.ts",
  "/playground/..%2fplayground.ts",
  "/playground/%2e%2e%2f%2e%2e%2fpackage.json",
  "/../package.json",
  "/%2e%2e/package.json",
  "/playground/app.js/",
  "/playground/app.js%00",
  "/playground/APP.JS",
  "/index.html",
  "/src/playground/app.js",
];

describe("serving the page's files", () => {
  test("Bun: content types, HEAD, no key needed with --api-key, nothing outside the fixed list", async () => {
    const open = await start([]);
    await expectPageFiles(open.url);
    const head = await fetch(`${open.url}/`, { method: "HEAD" });
    expect(head.status).toBe(200);
    expect(head.headers.get("content-type")).toStartWith("text/html");
    expect((await head.arrayBuffer()).byteLength).toBe(0);
    for (const path of STRAY_PATHS) expect({ path, status: (await rawGet(open.url, path)).status }).toEqual({ path, status: 404 });

    const locked = await start(["--api-key", API_KEY]);
    await expectPageFiles(locked.url); // no key sent
    expect((await fetch(`${locked.url}/v1/models`)).status).toBe(401);
    // Only GET and HEAD of the listed files are public: everything else still needs the key.
    for (const path of STRAY_PATHS) expect({ path, status: (await rawGet(locked.url, path)).status }).toEqual({ path, status: 401 });
    expect((await fetch(`${locked.url}/`, { method: "POST", body: "{}" })).status).toBe(401);
    expect((await fetch(`${locked.url}/`, { method: "POST", body: "{}", headers: { authorization: `Bearer ${API_KEY}` } })).status).toBe(404);
  }, TEST_MS);

  test("Node (@hono/node-server) and Deno (Deno.serve) find the same files", async () => {
    const node = await start([], (args) => startProcess("node", ["--import", "tsx", "src/entry/node.ts", ...args], {}, 120_000));
    await expectPageFiles(node.url);
    expect((await rawGet(node.url, "/playground/%2e%2e/playground.ts")).status).toBe(404);
    const deno = await start([], (args) => startProcess(bin("deno"), ["run", "-A", "src/entry/deno.ts", ...args], {}, 120_000));
    await expectPageFiles(deno.url);
    expect((await rawGet(deno.url, "/playground/%2e%2e/playground.ts")).status).toBe(404);
  }, TEST_MS);
});

// A pass-key document for the session: the fixture's task text without its question (the question is
// asked as the session's next message), and the README's short pass-key prompt for the chat.
const readJson = (name: string) => JSON.parse(readFileSync(join(FIXTURE_DIR, name), "utf8")) as Record<string, unknown>;
const CHAT_PROMPT =
  "There is a pass key hidden in the text below. Find it and remember it. The mayor promised that the work would begin before the harvest. The pass key is 58231. Remember it. Nobody in the hall believed him, but they clapped anyway. What is the pass key?";
const QUESTION = "What is the pass key?";

function passKeyDocument() {
  const tokenizerConfig = readJson("tokenizer_config.json");
  const tokenizer = new TextTokenizer(readJson("tokenizer.json"), tokenizerConfig);
  const tasks = new FixtureTasks(tokenizer, new ChatTemplate(tokenizerConfig, tokenizer.specialTokens), "eval");
  const sample = tasks.sample(rngOf(2026), { kind: "passkey", fillerTokens: 1200, depth: 0.4, dateString: "26 Jul 2024" });
  expect(sample.content.endsWith(` ${QUESTION}`)).toBe(true);
  return { text: sample.content.slice(0, -(QUESTION.length + 1)), key: sample.key };
}

/** Console errors and uncaught exceptions of a page; `allow` filters expected ones. */
function watchErrors(page: Page, allow: (text: string) => boolean = () => false): string[] {
  const errors: string[] = [];
  page.on("console", (m: ConsoleMessage) => {
    if ((m.type() === "error" || m.type() === "warning") && !allow(m.text())) errors.push(`console.${m.type()}: ${m.text()}`);
  });
  page.on("pageerror", (e) => errors.push(`pageerror: ${e.message}`));
  page.on("requestfailed", (r) => {
    // A stream the page stopped on purpose is not an error; nothing here stops one.
    errors.push(`request failed: ${r.method()} ${r.url()} ${r.failure()?.errorText}`);
  });
  return errors;
}

/** Text of the last assistant bubble in `log` once it has finished streaming, and how many states its text went through. */
async function lastReply(page: Page, log: string) {
  const bubble = page.locator(`${log} .msg.assistant[data-done="true"]`).last();
  await bubble.waitFor({ timeout: STEP_MS });
  return { text: (await bubble.locator(".content").textContent()) ?? "", meta: (await bubble.locator(".meta").textContent()) ?? "" };
}

/** Counts the distinct texts an assistant bubble shows in `log` while it streams (a streamed reply shows several). */
async function countTextStates(page: Page, log: string) {
  await page.evaluate((selector) => {
    const w = window as unknown as { __states: string[] };
    w.__states = [];
    new MutationObserver(() => {
      const bubbles = document.querySelectorAll(`${selector} .msg.assistant .content`);
      const text = bubbles[bubbles.length - 1]?.textContent ?? "";
      if (text && w.__states[w.__states.length - 1] !== text) w.__states.push(text);
    }).observe(document.querySelector(selector)!, { subtree: true, childList: true, characterData: true });
  }, log);
  return () => page.evaluate(() => (window as unknown as { __states: string[] }).__states);
}

function shot(name: string) {
  mkdirSync(ARTIFACTS, { recursive: true });
  return join(ARTIFACTS, name);
}

describe.skipIf(!HAVE_CHROMIUM)("the page in headless Chromium", () => {
  let browser: Browser;
  beforeAll(async () => {
    browser = await chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout: STEP_MS });
  }, STEP_MS);
  afterAll(async () => {
    await browser?.close();
  });

  test("chat streams; a document is read with progress, answers its pass key, and its snapshot downloads, uploads, forks and deletes", async () => {
    // Small prefill chunks, so that reading the document takes several steps the progress bar shows.
    const server = await start(["--prefill-chunk", "96", "--prefill-target-ms", "0"]);
    const context = await browser.newContext({ viewport: { width: 1440, height: 1000 }, acceptDownloads: true });
    const page = await context.newPage();
    page.setDefaultTimeout(STEP_MS);
    const errors = watchErrors(page);
    await page.goto(server.url);
    await page.locator('body[data-ready="true"]').waitFor();
    expect(await page.locator("#server-info").textContent()).toContain("model builtin");
    expect(await page.locator("#key-form").isHidden()).toBe(true);

    // Chat: greedy, streamed; the rendered prompt's token count is the one the server reports.
    await page.fill("#temperature", "0");
    await page.fill("#max-tokens", "24");
    await page.fill("#chat-input", CHAT_PROMPT);
    await page.locator("#prompt-text", { hasText: "The pass key is 58231" }).waitFor(); // the draft's prompt, rendered
    const states = await countTextStates(page, "#chat-log");
    await page.click("#chat-send");
    const chat = await lastReply(page, "#chat-log");
    expect(chat.text).toBe("The pass key is 58231.");
    expect((await states()).length).toBeGreaterThan(2); // the text grew in steps: streamed, not at once
    const promptTokens = Number(/([\d,]+) prompt/.exec(chat.meta)![1]!.replace(/,/g, ""));
    expect(chat.meta).toMatch(/generated · [\d.]+ tok\/s/);
    expect(chat.meta).toContain("finish: stop");
    expect(await page.locator("#prompt-tokens").textContent()).toBe(`${promptTokens} tokens`);
    expect(await page.locator("#prompt-text").textContent()).toContain("<|start_header_id|>user<|end_header_id|>");

    // A document from the file input, read with progress.
    const doc = passKeyDocument();
    await page.setInputFiles("#doc-file", { name: "pass-key-report.txt", mimeType: "text/plain", buffer: Buffer.from(doc.text) });
    await page.waitForFunction(() => (document.getElementById("doc-text") as HTMLTextAreaElement).value.length > 1000);
    expect(await page.inputValue("#new-id")).toBe("pass-key-report");
    await page.evaluate(() => {
      const w = window as unknown as { __progress: [number, number][] };
      w.__progress = [];
      const bar = document.getElementById("ingest-progress") as HTMLProgressElement;
      new MutationObserver(() => w.__progress.push([bar.value, bar.max])).observe(document.getElementById("ingest-status")!, { childList: true, characterData: true, subtree: true });
    });
    await page.click("#session-create");
    await page.locator('#ingest-status[data-state="done"]').waitFor();
    const progress = await page.evaluate(() => (window as unknown as { __progress: [number, number][] }).__progress);
    const total = Math.max(...progress.map(([, max]) => max));
    const partial = progress.filter(([value, max]) => max === total && value > 0 && value < max);
    expect(total).toBeGreaterThan(1200);
    expect(partial.length).toBeGreaterThanOrEqual(3); // the bar moved through the read
    expect(await page.locator("#ingest-progress").evaluate((bar: HTMLProgressElement) => bar.value === bar.max)).toBe(true);
    const status = (await page.locator("#ingest-status").textContent())!;
    expect(status).toMatch(/^done: [\d,]+ tokens read in [\d.]+ s · [\d,]+ tok\/s · [\d,]+ resident$/);
    const tokensRead = Number(/done: ([\d,]+)/.exec(status)![1]!.replace(/,/g, ""));
    expect(tokensRead).toBeGreaterThan(1200);
    await page.locator('#session-list tr.selected[data-id="pass-key-report"]').waitFor();
    await page.locator("#resident-text", { hasText: `${tokensRead.toLocaleString("en-US")} of ${tokensRead.toLocaleString("en-US")} tokens read are resident` }).waitFor();

    // The question, streamed in the session: the right number, with the document's tokens from the cache.
    await page.fill("#session-input", QUESTION);
    await page.click("#session-ask");
    const answer = await lastReply(page, "#session-log");
    expect(answer.text).toBe(`The pass key is ${doc.key}.`);
    const cached = Number(/([\d,]+) cached/.exec(answer.meta)![1]!.replace(/,/g, ""));
    expect(cached).toBeGreaterThanOrEqual(tokensRead);

    const screenshot = shot("playground.png");
    await page.screenshot({ path: screenshot, fullPage: true });
    console.log(`screenshot: ${screenshot}`);

    // Download the snapshot, upload it as another session, which answers the same.
    const [download] = await Promise.all([page.waitForEvent("download"), page.click("#snapshot-download")]);
    const saved = join(tempDir(), "report.ulsnap");
    await download.saveAs(saved);
    expect(download.suggestedFilename()).toBe("pass-key-report.ulsnap");
    expect(readFileSync(saved).subarray(0, 8).toString()).toBe("ULS-SNAP");
    await page.setInputFiles("#snapshot-file", saved);
    await page.fill("#upload-id", "restored");
    await page.click("#snapshot-upload");
    await page.locator('#session-list tr.selected[data-id="restored"]').waitFor();
    await page.locator("#toast", { hasText: "Uploaded session restored" }).waitFor();
    await page.fill("#session-input", QUESTION);
    await page.click("#session-ask");
    expect((await lastReply(page, "#session-log")).text).toBe(`The pass key is ${doc.key}.`);

    // Fork the first, ask the fork; delete the fork (two clicks).
    await page.click('#session-list tr[data-id="pass-key-report"]');
    await page.fill("#fork-id", "branch");
    await page.click("#session-fork");
    await page.locator('#session-list tr.selected[data-id="branch"]').waitFor();
    await page.fill("#session-input", QUESTION);
    await page.click("#session-ask");
    expect((await lastReply(page, "#session-log")).text).toBe(`The pass key is ${doc.key}.`);
    await page.click("#session-delete");
    expect(await page.locator("#session-delete").textContent()).toBe("Really delete?");
    await page.click("#session-delete");
    await page.locator('#session-list tr[data-id="branch"]').waitFor({ state: "detached" });
    expect(await page.locator("#session-detail").isHidden()).toBe(true);
    const left = (await (await fetch(`${server.url}/v1/sessions`)).json()) as { data: { id: string }[] };
    expect(left.data.map((s) => s.id).sort()).toEqual(["pass-key-report", "restored"]);

    expect(errors).toEqual([]);
    await context.close();
  }, TEST_MS);

  test("with --api-key: the page loads, asks for the key, refuses a wrong one, then works and keeps it for the tab", async () => {
    const server = await start(["--api-key", API_KEY]);
    const context = await browser.newContext({ viewport: { width: 1440, height: 900 } });
    const page = await context.newPage();
    page.setDefaultTimeout(STEP_MS);
    // The browser logs each 401 answer as a failed resource load; those are expected here, nothing else.
    const errors = watchErrors(page, (text) => /status of 401/.test(text));
    await page.goto(server.url);
    await page.locator("#key-form").waitFor();
    expect(await page.locator("#key-reason").textContent()).toBe("This server needs an API key.");
    const screenshot = shot("playground-api-key.png");
    await page.screenshot({ path: screenshot });
    console.log(`screenshot (asking for the key): ${screenshot}`);

    await page.fill("#api-key", "wrong-key");
    await page.click('#key-form button[type="submit"]');
    await page.locator("#key-form.rejected").waitFor();
    expect(await page.locator("#key-reason").textContent()).toContain("refused");

    await page.fill("#api-key", API_KEY);
    await page.click('#key-form button[type="submit"]');
    await page.locator('body[data-ready="true"]').waitFor();
    expect(await page.locator("#server-info").textContent()).toContain("model builtin");
    expect(await page.locator("#key-form").isHidden()).toBe(true);
    expect(await page.locator("#key-state").isVisible()).toBe(true);
    expect(await page.evaluate(() => sessionStorage.getItem("ultralong-serve.api-key"))).toBe(API_KEY);

    await page.fill("#temperature", "0");
    await page.fill("#chat-input", CHAT_PROMPT);
    await page.click("#chat-send");
    expect((await lastReply(page, "#chat-log")).text).toBe("The pass key is 58231.");

    // A reload in the same tab keeps the key: no question this time.
    await page.reload();
    await page.locator('body[data-ready="true"]').waitFor();
    expect(await page.locator("#key-form").isHidden()).toBe(true);
    expect(await page.locator("#server-info").textContent()).toContain("model builtin");

    expect(errors).toEqual([]);
    await context.close();
  }, TEST_MS);
});
