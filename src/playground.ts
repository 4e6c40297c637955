/**
 * The playground: a page at `/` for trying the server in a browser (chat with streaming, sampling
 * settings, the rendered prompt and its token count, sessions with progress, snapshots, forks). Plain
 * HTML, CSS and JavaScript modules from src/playground/, served as they are: no build step, nothing
 * fetched from elsewhere.
 *
 * Only the files named in ASSETS are served (a fixed table, so no request path ever reaches the file
 * system), and they are public: the page loads without an API key and asks for one when the API answers
 * 401 (auth.ts lets exactly these paths through, for GET and HEAD).
 */
import { readFile } from "node:fs/promises";
import { fileURLToPath } from "node:url";
import type { Hono } from "hono";

/** The folder of the page's files, found from this module (the same under Bun, Node and Deno). */
export const PLAYGROUND_DIR = fileURLToPath(new URL("./playground/", import.meta.url));

/** URL path -> file in PLAYGROUND_DIR and its content type. */
const ASSETS: Readonly<Record<string, { file: string; type: string }>> = {
  "/": { file: "index.html", type: "text/html; charset=utf-8" },
  "/playground/app.js": { file: "app.js", type: "text/javascript; charset=utf-8" },
  "/playground/api.js": { file: "api.js", type: "text/javascript; charset=utf-8" },
  "/playground/style.css": { file: "style.css", type: "text/css; charset=utf-8" },
};

/** The playground's routes (all GET, public) and their content types, e.g. for the OpenAPI document. */
export const PLAYGROUND_ROUTES: readonly { path: string; type: string }[] = Object.entries(ASSETS).map(([path, { type }]) => ({ path, type }));

/** The page may run only its own scripts and styles and talk only to this server. */
const HEADERS = {
  "content-security-policy":
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
  "x-content-type-options": "nosniff",
  "referrer-policy": "no-referrer",
  "cache-control": "no-cache",
};

/** Whether a request is for one of the playground's files (which need no API key). */
export const isPlaygroundAsset = (method: string, path: string): boolean =>
  (method === "GET" || method === "HEAD") && Object.hasOwn(ASSETS, path);

export function registerPlayground(app: Hono): void {
  // Read once, on first request: a missing file is then a 500 that the server logs with its path.
  const cache = new Map<string, Promise<Uint8Array>>();
  const load = (file: string) => {
    let bytes = cache.get(file);
    if (!bytes) {
      bytes = readFile(`${PLAYGROUND_DIR}${file}`).then((b) => new Uint8Array(b.buffer, b.byteOffset, b.byteLength));
      bytes.catch(() => cache.delete(file)); // try again next time
      cache.set(file, bytes);
    }
    return bytes;
  };
  for (const [path, { file, type }] of Object.entries(ASSETS)) {
    app.get(path, async (c) => {
      const body = await load(file);
      return c.body(body as Uint8Array<ArrayBuffer>, 200, { ...HEADERS, "content-type": type });
    });
  }
}
