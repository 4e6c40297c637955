/**
 * Tool calls in a Llama-3.1 reply, as OpenAI `tool_calls`. The forms Meta's prompt format defines
 * (llama-models' chat_format.py decodes the same ones):
 *
 * - JSON, `{"name": ..., "parameters": {...}}` ("arguments" also taken, as vLLM's llama3_json parser takes
 *   it), with or without a leading <|python_tag|>: a call when the name is one of the tools offered.
 * - a builtin tool, `<|python_tag|>brave_search.call(query="...")`: a call when the name is one of the
 *   request's builtin_tools; every argument a keyword with a Python literal (a string with its escapes, a
 *   number, True / False / None), read here without evaluating anything. Anything else is not a call.
 * - code, `<|python_tag|>` followed by anything else, when code_interpreter is among builtin_tools: a call
 *   of "code_interpreter" with {"code": ...} (Meta's decoder does the same; vLLM's parser has no builtin tools).
 *
 * <|python_tag|> counts only as the special token at the start of the reply (the caller says whether the
 * first generated token was it): text that spells it, which a reply may echo from a request, is plain text.
 * A reply that was cut off (max_tokens, a client gone) is never a call.
 */

/** The special token that starts a builtin tool call or code in Llama-3.1's ipython mode. */
export const PYTHON_TAG = "<|python_tag|>";

export interface ParsedToolCall {
  name: string;
  /** JSON-encoded arguments, as OpenAI's API carries them. */
  arguments: string;
}

/** What a request offered the model. */
export interface ToolOffer {
  /** Names of the request's custom tools (OpenAI `tools`). */
  functions: ReadonlySet<string>;
  /** Llama-3.1 builtin tools the template was given (chat_template_kwargs.builtin_tools), code_interpreter included. */
  builtin: ReadonlySet<string>;
}

/** A generated reply as the parser sees it. */
export interface AssistantReply {
  /** The reply's text, special tokens left out (as generation returns it). */
  text: string;
  /** True when the reply's first token was the <|python_tag|> special token. */
  pythonTag: boolean;
  /** Only a reply that ended by itself ("stop") can be a call. */
  finishReason: string;
}

/** The builtin tool names of template variables: the strings of a `builtin_tools` list (anything else offers none). */
export function builtinToolsOf(kwargs: Record<string, unknown> | null | undefined): Set<string> {
  const list = kwargs?.builtin_tools;
  return new Set(Array.isArray(list) ? list.filter((t): t is string => typeof t === "string") : []);
}

export function parseToolCall(reply: AssistantReply, offer: ToolOffer): ParsedToolCall | null {
  if (reply.finishReason !== "stop") return null;
  const body = reply.text.trim();
  if (body === "") return null;
  const json = parseJsonCall(body, offer);
  if (json) return json;
  if (!reply.pythonTag) return null;
  const builtin = parseBuiltinCall(body);
  if (builtin && offer.builtin.has(builtin.name)) return builtin;
  if (offer.builtin.has("code_interpreter")) return { name: "code_interpreter", arguments: JSON.stringify({ code: body }) };
  return null;
}

function parseJsonCall(body: string, offer: ToolOffer): ParsedToolCall | null {
  if (!body.startsWith("{") || !body.endsWith("}")) return null;
  let value: unknown;
  try {
    value = JSON.parse(body);
  } catch {
    return null;
  }
  if (!isPlainObject(value)) return null;
  const { name } = value;
  if (typeof name !== "string" || !(offer.functions.has(name) || offer.builtin.has(name))) return null;
  // Arguments that are there must be a mapping (null, a list or a string is not a call); none at all is {}.
  const params = "parameters" in value ? value.parameters : "arguments" in value ? value.arguments : {};
  if (!isPlainObject(params)) return null;
  return { name, arguments: JSON.stringify(params) };
}

const isPlainObject = (v: unknown): v is Record<string, unknown> => typeof v === "object" && v !== null && !Array.isArray(v);

/**
 * `name.call(key=literal, ...)` -> the name and its arguments as JSON, or null when the text is anything
 * else: positional arguments, a repeated keyword, an expression, a literal Python would not accept.
 */
export function parseBuiltinCall(source: string): ParsedToolCall | null {
  const head = /^([A-Za-z_][A-Za-z0-9_]*)\.call\(/.exec(source);
  if (!head) return null;
  const reader = new LiteralReader(source, head[0].length);
  const entries: string[] = [];
  const seen = new Set<string>();
  reader.skipSpace();
  while (!reader.take(")")) {
    const key = reader.identifier();
    if (key === null || seen.has(key) || PYTHON_KEYWORDS.has(key)) return null;
    seen.add(key);
    reader.skipSpace();
    if (!reader.take("=")) return null;
    reader.skipSpace();
    const value = reader.literal();
    if (value === null) return null;
    entries.push(`${JSON.stringify(key)}:${value}`);
    reader.skipSpace();
    if (reader.take(",")) reader.skipSpace();
    else if (!reader.peek(")")) return null;
  }
  if (!reader.atEnd()) return null;
  return { name: head[1]!, arguments: `{${entries.join(",")}}` };
}

/** Names Python does not take as a keyword argument (its reserved words). */
const PYTHON_KEYWORDS = new Set(
  "False None True and as assert async await break class continue def del elif else except finally for from global if import in is lambda nonlocal not or pass raise return try while with yield".split(" "),
);

/** Reads Python keyword-argument literals, each as JSON text. */
class LiteralReader {
  constructor(
    private readonly s: string,
    private at: number,
  ) {}

  atEnd(): boolean {
    return this.at === this.s.length;
  }

  peek(text: string): boolean {
    return this.s.startsWith(text, this.at);
  }

  take(text: string): boolean {
    if (!this.peek(text)) return false;
    this.at += text.length;
    return true;
  }

  skipSpace(): void {
    // Inside the call's parentheses Python allows newlines too.
    while (this.at < this.s.length && " \t\r\n\f".includes(this.s[this.at]!)) this.at++;
  }

  identifier(): string | null {
    const m = /^[A-Za-z_][A-Za-z0-9_]*/.exec(this.s.slice(this.at));
    if (!m) return null;
    this.at += m[0].length;
    return m[0];
  }

  /** A string, number, True, False or None as JSON text; null for anything else. */
  literal(): string | null {
    const c = this.s[this.at];
    if (c === '"' || c === "'") return this.string();
    const word = /^(True|False|None)(?![A-Za-z0-9_])/.exec(this.s.slice(this.at));
    if (word) {
      this.at += word[0].length;
      return { True: "true", False: "false", None: "null" }[word[1] as "True" | "False" | "None"];
    }
    return this.number();
  }

  /** Python's int and float literals (with an optional sign, as ast.literal_eval takes them). */
  private number(): string | null {
    const rest = this.s.slice(this.at);
    const m =
      /^[+-]?(?:0[xX](?:_?[0-9a-fA-F])+|0[oO](?:_?[0-7])+|0[bB](?:_?[01])+|(?:(?:\d(?:_?\d)*)?\.\d(?:_?\d)*|\d(?:_?\d)*\.?)(?:[eE][+-]?\d(?:_?\d)*)?)(?![A-Za-z0-9_.])/.exec(rest);
    if (!m) return null;
    this.at += m[0].length;
    const text = m[0].replaceAll("_", "");
    const sign = text.startsWith("-") ? "-" : "";
    const digits = text.replace(/^[+-]/, "");
    if (/^0[xXoObB]/.test(digits)) return `${sign}${BigInt(digits).toString()}`;
    if (/^\d+$/.test(digits)) {
      // Python refuses leading zeros in a decimal int ("007"); zeros alone are fine.
      if (/^0\d/.test(digits) && !/^0+$/.test(digits)) return null;
      return `${sign}${BigInt(digits).toString()}`;
    }
    const value = Number(text);
    return Number.isFinite(value) ? JSON.stringify(value) : null;
  }

  /** A one-line string literal with Python's escapes (no prefixes, no triple quotes), as a JSON string. */
  private string(): string | null {
    const quote = this.s[this.at]!;
    if (this.s.startsWith(quote.repeat(3), this.at)) return null;
    let i = this.at + 1;
    let out = "";
    while (i < this.s.length) {
      const c = this.s[i]!;
      if (c === quote) {
        this.at = i + 1;
        return JSON.stringify(out);
      }
      if (c === "\n" || c === "\r") return null;
      if (c !== "\\") {
        out += c;
        i++;
        continue;
      }
      const e = this.s[i + 1];
      if (e === undefined) return null;
      const simple: Record<string, string> = { "\\": "\\", "'": "'", '"': '"', a: "\x07", b: "\b", f: "\f", n: "\n", r: "\r", t: "\t", v: "\v", "\n": "" };
      if (e in simple) {
        out += simple[e];
        i += 2;
        continue;
      }
      const hex = (n: number) => {
        const digits = this.s.slice(i + 2, i + 2 + n);
        return digits.length === n && /^[0-9a-fA-F]+$/.test(digits) ? parseInt(digits, 16) : null;
      };
      if (e === "x" || e === "u" || e === "U") {
        const n = e === "x" ? 2 : e === "u" ? 4 : 8;
        const cp = hex(n);
        if (cp === null || cp > 0x10ffff) return null;
        out += String.fromCodePoint(cp);
        i += 2 + n;
        continue;
      }
      const octal = /^[0-7]{1,3}/.exec(this.s.slice(i + 1));
      if (octal) {
        out += String.fromCodePoint(parseInt(octal[0], 8));
        i += 1 + octal[0].length;
        continue;
      }
      if (e === "N") return null; // \N{name}: not read here
      // Any other escape keeps its backslash, as Python does.
      out += `\\${e}`;
      i += 2;
    }
    return null;
  }
}

/**
 * Holds a streamed reply back while it may still be a tool call, so that a call goes out as OpenAI streams
 * one (delta.tool_calls) and never as content first. Generation reports each token id (`token`) before its
 * text (`text`): a reply that begins with <|python_tag|> is held whole; with tools offered, a reply whose
 * text begins with "{" (after whitespace) is held until it ends; any other reply streams as it comes.
 * `finish` then gives the call, or the content still held (to stream before the finish reason).
 */
export class ToolCallStream {
  private first = true;
  private pythonTag = false;
  private released: boolean;
  private held = "";

  /**
   * `offer`: what the request offered (null: tool calls are off, everything streams as content);
   * `pythonTagId`: the tokenizer's <|python_tag|> id, if it has one.
   */
  constructor(
    private readonly offer: ToolOffer | null,
    private readonly pythonTagId: number | null,
  ) {
    this.released = offer === null;
  }

  /** A generated token id, before its text. */
  token(id: number): void {
    if (!this.first) return;
    this.first = false;
    this.pythonTag = id === this.pythonTagId;
    if (this.pythonTag && this.offer) this.released = false;
  }

  /** A text delta of the reply; returns what may be streamed as content now. */
  text(delta: string): string {
    if (this.released) return delta;
    this.held += delta;
    if (this.pythonTag) return "";
    // With tools offered, a reply that begins with "{" may be a JSON call (leading whitespace: not known yet).
    const start = this.held.trimStart();
    const json = this.offer !== null && this.offer.functions.size + this.offer.builtin.size > 0;
    if (json && (start === "" || start.startsWith("{"))) return "";
    this.released = true;
    const out = this.held;
    this.held = "";
    return out;
  }

  /**
   * The generation ended: its tool call (under `offer`, by default the one given at the start; a session
   * knows its builtin tools only then), or null and the content still held back.
   */
  finish(finishReason: string, offer: ToolOffer | null = this.offer): { toolCall: ParsedToolCall | null; content: string } {
    const content = this.held;
    this.held = "";
    const toolCall = offer && this.offer ? parseToolCall({ text: content, pythonTag: this.pythonTag, finishReason }, offer) : null;
    return { toolCall, content: toolCall ? "" : content };
  }

  /** Whether the reply began with the <|python_tag|> token. */
  get startedWithPythonTag(): boolean {
    return this.pythonTag;
  }
}
