// The playground's client for the server's API: requests with the API key (asked for on a 401 and kept in
// sessionStorage), JSON errors as exceptions, and server-sent events read from a fetch body.

const KEY_STORAGE = "ultralong-serve.api-key";

/** Thrown for an error answer: `status`, and the OpenAI error's `code` and `message`. */
export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code ?? null;
  }
}

export function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE) ?? "";
  } catch {
    return "";
  }
}

export function storeKey(key) {
  try {
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage refused (private mode): the key lives as long as the page
  }
  memoryKey = key;
}

let memoryKey = storedKey();

/**
 * How the page asks for a key: set by app.js. Called with the reason ("needed" or "rejected"); resolves
 * with the key the person typed.
 */
let askForKey = async () => {
  throw new ApiError(401, "this server needs an API key");
};
export function onKeyNeeded(ask) {
  askForKey = ask;
}

function withKey(init = {}) {
  const headers = new Headers(init.headers ?? {});
  if (memoryKey) headers.set("authorization", `Bearer ${memoryKey}`);
  return { ...init, headers };
}

async function errorOf(res) {
  let message = `${res.status} ${res.statusText}`;
  let code = null;
  try {
    const body = await res.json();
    if (body?.error?.message) message = body.error.message;
    code = body?.error?.code ?? null;
  } catch {
    // not JSON
  }
  return new ApiError(res.status, message, code);
}

/**
 * fetch() with the key. A 401 asks for the key (once per wrong key) and sends the request again; other
 * error statuses throw ApiError. Bodies must be re-sendable (a string, a Blob).
 */
export async function request(path, init = {}) {
  for (;;) {
    const res = await fetch(path, withKey(init));
    if (res.status === 401) {
      const hadKey = Boolean(memoryKey);
      await res.text().catch(() => {}); // read it: cancelling would show as an aborted request
      storeKey(await askForKey(hadKey ? "rejected" : "needed"));
      continue;
    }
    if (!res.ok) throw await errorOf(res);
    return res;
  }
}

export async function getJson(path) {
  return (await request(path)).json();
}

export async function postJson(path, body, init = {}) {
  const res = await request(path, { ...init, method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  return res.json();
}

/** Whether a key is in use (downloads then go through fetch, since a link cannot carry the header). */
export const hasKey = () => Boolean(memoryKey);

/**
 * POSTs `body` and calls onEvent with each server-sent event's JSON, until "[DONE]". An error event (the
 * stream failed after it began) throws ApiError. `signal` stops it.
 */
export async function streamEvents(path, body, onEvent, signal) {
  const res = await request(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body), signal });
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = block
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const event = JSON.parse(data);
      if (event.error) throw new ApiError(event.error.status ?? 500, event.error.message ?? "the stream failed", event.error.code);
      onEvent(event);
    }
  }
}
