// The playground page: chat, the rendered prompt, sessions. Everything the server sends is shown as text
// (textContent), never parsed as HTML.
import { ApiError, getJson, hasKey, onKeyNeeded, postJson, request, storeKey, storedKey, streamEvents } from "./api.js";

const $ = (id) => document.getElementById(id);
const fmt = new Intl.NumberFormat("en-US");
const n = (x) => fmt.format(Math.round(x));
const ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;

function bytes(b) {
  if (b >= 2 ** 30) return `${(b / 2 ** 30).toFixed(2)} GiB`;
  if (b >= 2 ** 20) return `${(b / 2 ** 20).toFixed(1)} MiB`;
  if (b >= 2 ** 10) return `${(b / 2 ** 10).toFixed(1)} KiB`;
  return `${b} B`;
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

let toastTimer = 0;
function toast(message, kind = "error") {
  const box = $("toast");
  box.textContent = message;
  box.className = `toast ${kind}`;
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => (box.hidden = true), kind === "error" ? 8000 : 3000);
}

const messageOf = (e) => (e instanceof ApiError ? `${e.status}${e.code ? ` ${e.code}` : ""}: ${e.message}` : String(e?.message ?? e));
const aborted = (e) => e?.name === "AbortError";

// ---------------------------------------------------------------------------------------------- API key

let keyWaiters = [];
onKeyNeeded((reason) => {
  $("key-reason").textContent = reason === "rejected" ? "That API key was refused. Enter another:" : "This server needs an API key.";
  $("key-form").hidden = false;
  $("key-form").classList.toggle("rejected", reason === "rejected");
  $("api-key").focus();
  return new Promise((resolve) => keyWaiters.push(resolve));
});

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const key = $("api-key").value.trim();
  if (!key) return;
  $("api-key").value = "";
  $("key-form").hidden = true;
  showKeyState(key);
  const waiting = keyWaiters;
  keyWaiters = [];
  for (const resolve of waiting) resolve(key);
});

function showKeyState(key) {
  $("key-state").hidden = !key;
}
showKeyState(storedKey());
$("key-forget").addEventListener("click", () => {
  storeKey("");
  showKeyState("");
  toast("The API key was forgotten.", "info");
});

// ------------------------------------------------------------------------------------------- settings

function sampling() {
  const out = {};
  const num = (id) => {
    const v = $(id).value.trim();
    return v === "" ? undefined : Number(v);
  };
  const t = num("temperature");
  const p = num("top-p");
  const m = num("max-tokens");
  const s = num("seed");
  if (t !== undefined) out.temperature = t;
  if (p !== undefined) out.top_p = p;
  if (m !== undefined) out.max_tokens = m;
  if (s !== undefined) out.seed = s;
  return out;
}

async function loadServerInfo() {
  try {
    const models = await getJson("/v1/models");
    const health = await getJson("/health");
    const model = models.data?.[0];
    const parts = [`model ${model?.id ?? "?"}`];
    if (health.backend) parts.push(health.backend);
    if (model?.meta?.n_ctx) parts.push(`ctx ${n(model.meta.n_ctx)}`);
    if (health.kv_compaction?.policy && health.kv_compaction.policy !== "none") parts.push(`kv ${health.kv_compaction.policy} ${n(health.kv_compaction.budget)}`);
    $("server-info").textContent = parts.join(" · ");
    $("server-info").classList.add("ok");
  } catch (e) {
    $("server-info").textContent = `not reachable: ${messageOf(e)}`;
  }
}

// ----------------------------------------------------------------------------------------------- chat

const chat = { messages: [], abort: null };

function chatMessages(draft) {
  const system = $("system-prompt").value.trim();
  return [...(system ? [{ role: "system", content: system }] : []), ...chat.messages, ...(draft ? [{ role: "user", content: draft }] : [])];
}

function addBubble(log, role, text) {
  log.querySelector(".empty")?.remove();
  const box = el("div", `msg ${role}`);
  box.append(el("div", "role", role));
  const body = el("div", "content", text);
  box.append(body);
  const meta = el("div", "meta");
  box.append(meta);
  log.append(box);
  log.scrollTop = log.scrollHeight;
  return { box, body, meta };
}

function usageLine(usage, timings, finish) {
  const parts = [];
  if (usage) {
    parts.push(`${n(usage.prompt_tokens)} prompt`);
    const cached = usage.prompt_tokens_details?.cached_tokens;
    if (cached !== undefined) parts.push(`${n(cached)} cached`);
    parts.push(`${n(usage.completion_tokens)} generated`);
  }
  if (timings?.predicted_per_second) parts.push(`${timings.predicted_per_second.toFixed(1)} tok/s`);
  if (timings?.prompt_per_second && timings.prompt_n > 0) parts.push(`prefill ${n(timings.prompt_per_second)} tok/s`);
  if (finish) parts.push(`finish: ${finish}`);
  return parts.join(" · ");
}

/** Streams one chat completion into a bubble; returns the text. */
async function streamReply(path, body, log, abort) {
  const bubble = addBubble(log, "assistant", "");
  bubble.box.classList.add("streaming");
  let text = "";
  let finish = null;
  try {
    await streamEvents(
      path,
      { ...body, stream: true, stream_options: { include_usage: true } },
      (event) => {
        const choice = event.choices?.[0];
        if (choice?.delta?.content) {
          text += choice.delta.content;
          bubble.body.textContent = text;
          log.scrollTop = log.scrollHeight;
        }
        if (choice?.delta?.tool_calls) {
          text += choice.delta.tool_calls.map((c) => (c.function?.name ? `[tool call ${c.function.name}] ` : "") + (c.function?.arguments ?? "")).join("");
          bubble.body.textContent = text;
        }
        if (choice?.finish_reason) finish = choice.finish_reason;
        if (event.usage) bubble.meta.textContent = usageLine(event.usage, event.timings, finish);
      },
      abort.signal,
    );
    if (!bubble.meta.textContent) bubble.meta.textContent = finish ? `finish: ${finish}` : "";
    bubble.box.dataset.done = "true";
    return { text, ok: true };
  } catch (e) {
    bubble.box.classList.add("failed");
    bubble.meta.textContent = aborted(e) ? "stopped" : messageOf(e);
    bubble.box.dataset.done = "true";
    return { text, ok: false };
  } finally {
    bubble.box.classList.remove("streaming");
  }
}

$("chat-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (chat.abort) return;
  const content = $("chat-input").value.trim();
  if (!content) return;
  const messages = chatMessages(content);
  chat.messages.push({ role: "user", content });
  $("chat-input").value = "";
  addBubble($("chat-log"), "user", content);
  chat.abort = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  updatePrompt(messages);
  const { text, ok } = await streamReply("/v1/chat/completions", { messages, ...sampling() }, $("chat-log"), chat.abort);
  if (ok || text) chat.messages.push({ role: "assistant", content: text });
  else chat.messages.pop(); // a failed turn is not part of the conversation
  chat.abort = null;
  $("chat-send").disabled = false;
  $("chat-stop").disabled = true;
});

$("chat-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("chat-form").requestSubmit();
  }
});
$("chat-stop").addEventListener("click", () => chat.abort?.abort());
$("chat-clear").addEventListener("click", () => {
  chat.abort?.abort();
  chat.messages = [];
  $("chat-log").replaceChildren(el("p", "empty", "Cleared."));
  schedulePrompt();
});

// The prompt the next request sends: the chat template rendered by /apply-template, counted by /tokenize.
let promptTimer = 0;
let promptSeq = 0;
function schedulePrompt() {
  clearTimeout(promptTimer);
  promptTimer = setTimeout(() => updatePrompt(chatMessages($("chat-input").value.trim())), 350);
}

async function updatePrompt(messages) {
  clearTimeout(promptTimer);
  const seq = ++promptSeq;
  if (messages.length === 0) {
    $("prompt-text").textContent = "(no messages yet)";
    $("prompt-tokens").textContent = "0 tokens";
    return;
  }
  try {
    const { prompt } = await postJson("/apply-template", { messages, add_generation_prompt: true });
    if (seq !== promptSeq) return;
    $("prompt-text").textContent = prompt;
    // The template's own special-token strings are special tokens (as the server tokenizes the chat).
    const { tokens } = await postJson("/tokenize", { content: prompt, parse_special: true });
    if (seq !== promptSeq) return;
    $("prompt-tokens").textContent = `${n(tokens.length)} tokens`;
  } catch (e) {
    if (seq !== promptSeq) return;
    $("prompt-tokens").textContent = "?";
    $("prompt-text").textContent = `could not render: ${messageOf(e)}`;
  }
}
$("chat-input").addEventListener("input", schedulePrompt);
$("system-prompt").addEventListener("input", schedulePrompt);

// ------------------------------------------------------------------------------------------- sessions

const sessions = { selected: null, logs: new Map(), ask: null, create: null, list: [] };

async function refreshSessions() {
  try {
    const { data } = await getJson("/v1/sessions");
    sessions.list = data;
    renderSessionList();
    if (sessions.selected && !data.some((s) => s.id === sessions.selected)) selectSession(null);
  } catch (e) {
    toast(`listing sessions: ${messageOf(e)}`);
  }
}

function renderSessionList() {
  const body = $("session-list");
  body.replaceChildren();
  if (sessions.list.length === 0) {
    const row = el("tr");
    const cell = el("td", "muted", "no sessions");
    cell.colSpan = 5;
    row.append(cell);
    body.append(row);
    return;
  }
  for (const s of sessions.list) {
    const row = el("tr");
    row.dataset.id = s.id;
    if (s.id === sessions.selected) row.classList.add("selected");
    row.append(
      el("td", "id", s.id),
      el("td", "num", s.tokens_read !== undefined ? n(s.tokens_read) : "–"),
      el("td", "num", s.tokens_resident !== undefined ? n(s.tokens_resident) : "–"),
      el("td", "num", s.kv_bytes !== undefined ? bytes(s.kv_bytes) : "–"),
      el("td", "muted", s.busy ? "busy" : s.in_memory ? "memory" : "store"),
    );
    row.addEventListener("click", () => selectSession(s.id));
    body.append(row);
  }
}

function selectSession(id) {
  sessions.selected = id;
  for (const row of $("session-list").querySelectorAll("tr")) row.classList.toggle("selected", row.dataset.id === id && id !== null);
  $("session-detail").hidden = id === null;
  resetDelete();
  if (id === null) return;
  $("detail-title").textContent = id;
  const log = $("session-log");
  log.replaceChildren(...(sessions.logs.get(id) ?? [el("p", "empty", "Ask a question below; each turn shows how many prompt tokens came from the session's cache.")]));
  log.scrollTop = log.scrollHeight;
  loadSessionInfo(id);
}

async function loadSessionInfo(id) {
  try {
    const info = await getJson(`/v1/sessions/${encodeURIComponent(id)}`);
    if (sessions.selected !== id) return;
    showSessionInfo(info);
  } catch (e) {
    toast(`session ${id}: ${messageOf(e)}`);
  }
}

function showSessionInfo(info) {
  const stats = $("detail-stats");
  stats.replaceChildren();
  const add = (name, value) => stats.append(el("dt", "", name), el("dd", "", value));
  add("tokens read", n(info.tokens_read));
  add("tokens resident", n(info.tokens_resident));
  add("KV", bytes(info.kv_bytes ?? 0) + (info.kv_cold_bytes ? ` + ${bytes(info.kv_cold_bytes)} cold` : ""));
  add("messages", n(info.messages ?? 0));
  add("where", info.busy ? "busy" : info.in_memory ? "in memory" : "in the store");
  if (info.recalled_blocks) add("recalled blocks", n(info.recalled_blocks));
  const share = info.tokens_read > 0 ? info.tokens_resident / info.tokens_read : 1;
  $("resident-bar").firstElementChild.style.width = `${Math.min(100, share * 100).toFixed(1)}%`;
  $("resident-text").textContent = `${n(info.tokens_resident)} of ${n(info.tokens_read)} tokens read are resident in KV (${(share * 100).toFixed(share < 0.995 ? 1 : 0)}%)`;
}

// Creating: the document, streamed progress while it is read.
$("doc-file").addEventListener("change", async () => {
  const file = $("doc-file").files?.[0];
  if (!file) return;
  $("doc-size").textContent = `reading ${file.name}…`;
  try {
    $("doc-text").value = await file.text();
    $("doc-size").textContent = `${bytes(file.size)} · ${n($("doc-text").value.length)} characters`;
    if (!$("new-id").value) $("new-id").value = file.name.replace(/\.[^.]*$/, "").replace(/[^A-Za-z0-9_-]+/g, "-").replace(/^-+|-+$/g, "").slice(0, 64);
  } catch (e) {
    $("doc-size").textContent = `could not read ${file.name}: ${messageOf(e)}`;
  }
});
$("doc-text").addEventListener("input", () => {
  const length = $("doc-text").value.length;
  $("doc-size").textContent = length ? `${n(length)} characters` : "";
});

function setProgress(done, total, text) {
  const bar = $("ingest-progress");
  if (total > 0) {
    bar.max = total;
    bar.value = done;
  } else {
    bar.removeAttribute("value"); // indeterminate
  }
  $("ingest-status").textContent = text;
}

$("create-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  if (sessions.create) return;
  const text = $("doc-text").value;
  const id = $("new-id").value.trim();
  const system = $("new-system").value.trim();
  if (id && !ID_PATTERN.test(id)) return toast("A session id is 1-64 letters, digits, '_' or '-'.");
  if (!text.trim()) return toast("Paste a document or choose a file first.");
  const body = { stream: true, document: text, ...(id ? { id } : {}), ...(system ? { system } : {}) };
  sessions.create = new AbortController();
  $("session-create").disabled = true;
  $("create-stop").disabled = false;
  $("ingest-progress").classList.remove("complete", "failed");
  setProgress(0, 0, "tokenizing…");
  const started = performance.now();
  let first = null;
  let result = null;
  try {
    await streamEvents(
      "/v1/sessions",
      body,
      (e) => {
        if (e.object === "session.progress") {
          const now = performance.now();
          first ??= { t: now, done: e.tokens_done };
          const rate = now > first.t ? ((e.tokens_done - first.done) * 1000) / (now - first.t) : 0;
          const seconds = (now - started) / 1000;
          setProgress(e.tokens_done, e.tokens_total, `${n(e.tokens_done)} / ${n(e.tokens_total)} tokens read${rate > 0 ? ` · ${n(rate)} tok/s` : ""} · ${seconds.toFixed(1)} s`);
        } else if (e.object === "session") {
          result = e;
        }
      },
      sessions.create.signal,
    );
    if (!result) throw new Error("the stream ended without the session");
    const ingest = result.ingest;
    const rate = ingest && ingest.ms > 0 ? (ingest.prefilled_tokens * 1000) / ingest.ms : 0;
    setProgress(1, 1, `done: ${n(result.tokens_read)} tokens read${ingest ? ` in ${(ingest.ms / 1000).toFixed(1)} s` : ""}${rate ? ` · ${n(rate)} tok/s` : ""} · ${n(result.tokens_resident)} resident`);
    $("ingest-progress").classList.add("complete");
    $("ingest-status").dataset.state = "done";
    $("new-id").value = "";
    await refreshSessions();
    selectSession(result.id);
  } catch (e) {
    $("ingest-progress").classList.add("failed");
    $("ingest-status").dataset.state = "failed";
    $("ingest-status").textContent = aborted(e) ? "stopped (no session was created)" : messageOf(e);
  } finally {
    sessions.create = null;
    $("session-create").disabled = false;
    $("create-stop").disabled = true;
  }
});
$("create-stop").addEventListener("click", () => sessions.create?.abort());

// Asking: a streamed turn; its usage says how much of the prompt came from the session's cache.
$("ask-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const id = sessions.selected;
  const content = $("session-input").value.trim();
  if (!id || !content || sessions.ask) return;
  $("session-input").value = "";
  const log = $("session-log");
  const entries = sessions.logs.get(id) ?? [];
  sessions.logs.set(id, entries);
  entries.push(addBubble(log, "user", content).box);
  sessions.ask = new AbortController();
  $("session-ask").disabled = true;
  $("ask-stop").disabled = false;
  const before = log.childElementCount;
  await streamReply(`/v1/sessions/${encodeURIComponent(id)}/messages`, { content, ...sampling() }, log, sessions.ask);
  entries.push(...[...log.children].slice(before));
  sessions.ask = null;
  $("session-ask").disabled = false;
  $("ask-stop").disabled = true;
  if (sessions.selected === id) loadSessionInfo(id);
  refreshSessions();
});
$("session-input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("ask-form").requestSubmit();
  }
});
$("ask-stop").addEventListener("click", () => sessions.ask?.abort());

// Snapshots, forks, delete.
$("snapshot-download").addEventListener("click", async () => {
  const id = sessions.selected;
  if (!id) return;
  const path = `/v1/sessions/${encodeURIComponent(id)}/snapshot`;
  const link = el("a");
  link.download = `${id}.ulsnap`;
  let url = null;
  if (hasKey()) {
    // A link cannot carry the Authorization header: fetch it, then save the blob.
    try {
      url = URL.createObjectURL(await (await request(path)).blob());
    } catch (e) {
      return toast(`download: ${messageOf(e)}`);
    }
    link.href = url;
  } else {
    link.href = path; // the browser streams it to disk
  }
  document.body.append(link);
  link.click();
  link.remove();
  if (url) setTimeout(() => URL.revokeObjectURL(url), 60_000);
});

$("snapshot-file").addEventListener("change", () => {
  const file = $("snapshot-file").files?.[0];
  if (file && !$("upload-id").value) $("upload-id").value = file.name.replace(/\.ulsnap$/, "").replace(/[^A-Za-z0-9_-]+/g, "-").slice(0, 64);
});

$("upload-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const file = $("snapshot-file").files?.[0];
  const id = $("upload-id").value.trim();
  if (!file) return toast("Choose a snapshot file (.ulsnap) first.");
  if (!ID_PATTERN.test(id)) return toast("A session id is 1-64 letters, digits, '_' or '-'.");
  $("snapshot-upload").disabled = true;
  try {
    const res = await request(`/v1/sessions/${encodeURIComponent(id)}/snapshot`, { method: "PUT", headers: { "content-type": "application/octet-stream" }, body: file });
    const info = await res.json();
    toast(`${res.status === 201 ? "Uploaded" : "Replaced"} session ${info.id}: ${n(info.tokens_read)} tokens.`, "info");
    $("upload-id").value = "";
    $("snapshot-file").value = "";
    await refreshSessions();
    selectSession(info.id);
  } catch (e) {
    toast(`upload: ${messageOf(e)}`);
  } finally {
    $("snapshot-upload").disabled = false;
  }
});

$("session-fork").addEventListener("click", async () => {
  const id = sessions.selected;
  const forkId = $("fork-id").value.trim();
  if (!id) return;
  if (forkId && !ID_PATTERN.test(forkId)) return toast("A session id is 1-64 letters, digits, '_' or '-'.");
  try {
    const info = await postJson(`/v1/sessions/${encodeURIComponent(id)}/fork`, forkId ? { id: forkId } : {});
    $("fork-id").value = "";
    toast(`Forked ${id} as ${info.id}.`, "info");
    await refreshSessions();
    selectSession(info.id);
  } catch (e) {
    toast(`fork: ${messageOf(e)}`);
  }
});

// Delete asks twice: the first click arms it for a few seconds.
let deleteArmed = 0;
function resetDelete() {
  clearTimeout(deleteArmed);
  deleteArmed = 0;
  $("session-delete").textContent = "Delete";
  $("session-delete").classList.remove("armed");
}
$("session-delete").addEventListener("click", async () => {
  const id = sessions.selected;
  if (!id) return;
  if (!deleteArmed) {
    $("session-delete").textContent = "Really delete?";
    $("session-delete").classList.add("armed");
    deleteArmed = setTimeout(resetDelete, 4000);
    return;
  }
  resetDelete();
  try {
    await request(`/v1/sessions/${encodeURIComponent(id)}`, { method: "DELETE" });
    sessions.logs.delete(id);
    toast(`Deleted ${id}.`, "info");
    selectSession(null);
    await refreshSessions();
  } catch (e) {
    toast(`delete: ${messageOf(e)}`);
  }
});
$("sessions-refresh").addEventListener("click", refreshSessions);

// ------------------------------------------------------------------------------------------------ go

await loadServerInfo();
await refreshSessions();
document.body.dataset.ready = "true";
