/**
 * The model's own chat template (tokenizer_config.json "chat_template"), rendered with @huggingface/jinja
 * the way transformers' apply_chat_template renders it: messages, tools, add_generation_prompt, and the
 * special-token strings as variables. Llama-3.x templates also read `date_string` (Today Date); without it
 * Llama-3.1's writes "26 Jul 2024" and Llama-3.2's calls the built-in strftime_now (today).
 *
 * Special tokens come only from the template's own text and the special-token variables: renderPieces
 * cuts the rendered text at those, and every string a request brings (content, names, tool calls and
 * definitions, chat_template_kwargs values) stays plain text even where it spells a special token.
 */
import { Template } from "@huggingface/jinja";
import { ModelFolderError, invalidRequest } from "./errors.ts";
import { installJinjaFilters } from "./jinja-filters.ts";

installJinjaFilters();

export interface ToolCall {
  id?: string;
  type?: "function";
  function: { name: string; arguments: unknown };
}

export interface ChatMessage {
  role: string;
  content: string | null;
  name?: string;
  tool_calls?: ToolCall[];
  tool_call_id?: string;
}

export interface ToolDefinition {
  type: "function";
  function: { name: string; description?: string; parameters?: Record<string, unknown> };
}

export interface RenderOptions {
  tools?: ToolDefinition[] | null;
  addGenerationPrompt?: boolean;
  /** Extra template variables (e.g. date_string), as transformers' chat_template_kwargs. */
  extra?: Record<string, unknown>;
}

/**
 * Context variables the server sets on every render (and @huggingface/jinja's own globals): a
 * chat_template_kwargs entry may not replace them.
 */
/** Throws invalid_request if template variables from a request would replace one the server sets. */
export function assertTemplateKwargsAllowed(kwargs: Record<string, unknown>): void {
  for (const key of Object.keys(kwargs)) {
    if (RESERVED_TEMPLATE_VARIABLES.has(key)) {
      throw invalidRequest(`chat_template_kwargs may not set "${key}": the server sets that template variable`, "chat_template_kwargs");
    }
  }
}

export const RESERVED_TEMPLATE_VARIABLES: ReadonlySet<string> = new Set([
  "messages",
  "tools",
  "add_generation_prompt",
  "bos_token",
  "eos_token",
  "pad_token",
  "unk_token",
  // @huggingface/jinja declares these in every render; redeclaring one throws inside the template engine.
  "true",
  "false",
  "none",
  "True",
  "False",
  "None",
  "raise_exception",
  "range",
  "strftime_now",
]);

/**
 * A rendered chat cut at the special tokens the template itself wrote: [text, special, text, ..., text].
 * Even indices are plain text (possibly empty), odd indices one special-token string each.
 */
export type TemplatePieces = string[];

function specialString(v: unknown): string {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof (v as { content?: unknown }).content === "string") {
    return (v as { content: string }).content;
  }
  return "";
}

/** Special-token strings from tokenizer_config.json's added_tokens_decoder (when no tokenizer list is given). */
function configSpecialTokens(tokenizerConfig: Record<string, unknown>): string[] {
  const decoder = tokenizerConfig.added_tokens_decoder;
  if (!decoder || typeof decoder !== "object") return [];
  return Object.values(decoder as Record<string, { content?: unknown; special?: unknown }>)
    .filter((t) => t?.special === true && typeof t.content === "string")
    .map((t) => t.content as string);
}

const escapeRegExp = (s: string) => s.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");

/** Private-use code points: a marker is picked among those no input contains. */
const PRIVATE_USE = /[\uE000-\uF8FF\u{F0000}-\u{FFFFD}\u{100000}-\u{10FFFD}]/gu;
const PRIVATE_USE_RANGES: [number, number][] = [
  [0xe000, 0xf8ff],
  [0xf0000, 0xffffd],
  [0x100000, 0x10fffd],
];

/** The template variables whose strings come from a request. */
interface RequestValues {
  messages: Record<string, unknown>[];
  tools: ToolDefinition[] | null;
  extra: Record<string, unknown>;
}

export class ChatTemplate {
  private readonly template: Template;
  private readonly toolTemplate: Template | null;
  private readonly toolSource: string | null;
  private readonly specials: Record<string, string>;
  /** Matches any special-token string, longest first (as the tokenizer's own splitter prefers). */
  private readonly specialPattern: RegExp | null;
  readonly source: string;
  /**
   * Whether the template dates the prompt by the clock (Llama-3.2's calls strftime_now when no date_string
   * is given); Llama-3.1's writes a fixed date instead. Sessions pin today's date only for the former.
   */
  readonly readsClock: boolean;

  /**
   * `specialTokens`: the strings the tokenizer turns into special tokens (TextTokenizer.specialTokens);
   * by default those tokenizer_config.json's added_tokens_decoder marks special.
   */
  constructor(tokenizerConfig: Record<string, unknown>, specialTokens: Iterable<string> = configSpecialTokens(tokenizerConfig)) {
    const raw = tokenizerConfig.chat_template;
    let main: string | undefined;
    let tools: string | undefined;
    if (typeof raw === "string") main = raw;
    else if (Array.isArray(raw)) {
      // Named templates, as in newer tokenizer_config.json files: [{ name: "default" | "tool_use", template }]
      for (const entry of raw as { name?: unknown; template?: unknown }[]) {
        if (typeof entry?.template !== "string") continue;
        if (entry.name === "tool_use") tools = entry.template;
        else if (entry.name === "default" || main === undefined) main = entry.template;
      }
    }
    if (!main) throw new ModelFolderError("tokenizer_config.json has no chat_template");
    this.source = main;
    this.toolSource = tools ?? null;
    this.readsClock = [main, tools ?? ""].some((t) => t.includes("strftime_now"));
    try {
      this.template = new Template(main);
      this.toolTemplate = tools ? new Template(tools) : null;
    } catch (e) {
      throw new ModelFolderError(`tokenizer_config.json chat_template does not parse: ${(e as Error).message}`);
    }
    this.specials = {
      bos_token: specialString(tokenizerConfig.bos_token),
      eos_token: specialString(tokenizerConfig.eos_token),
      pad_token: specialString(tokenizerConfig.pad_token),
      unk_token: specialString(tokenizerConfig.unk_token),
    };
    const strings = [...new Set(specialTokens)].filter((t) => t.length > 0).sort((a, b) => b.length - a.length);
    this.specialPattern = strings.length > 0 ? new RegExp(`(${strings.map(escapeRegExp).join("|")})`, "g") : null;
  }

  /** The rendered text, exactly as the template writes it (what /apply-template returns). */
  render(messages: ChatMessage[], options: RenderOptions = {}): string {
    return this.renderPieces(messages, options).join("");
  }

  /**
   * The rendered text cut at the special tokens the template wrote. A special-token string inside a
   * request value is plain text: before rendering, a marker code point (one that occurs in no input) goes
   * inside every such occurrence, so the cut cannot match it; the markers are then removed. The text is
   * byte for byte the plain render: when markers were placed this is checked, and a template that
   * transforms such a value in a way the marker changes (slicing, length, replace) is refused.
   */
  renderPieces(messages: ChatMessage[], options: RenderOptions = {}): TemplatePieces {
    if (messages.length === 0) throw invalidRequest("messages must not be empty", "messages");
    const extra = options.extra ?? {};
    assertTemplateKwargsAllowed(extra);
    const tools = options.tools && options.tools.length > 0 ? options.tools : null;
    const template = tools && this.toolTemplate ? this.toolTemplate : this.template;
    // Everything a request brings, after normalizeMessage (parsed tool-call arguments are marked too).
    const request: RequestValues = { messages: messages.map(normalizeMessage), tools, extra };
    const addGenerationPrompt = options.addGenerationPrompt ?? true;
    const pattern = this.specialPattern;
    if (!pattern || !someString(request, (s) => hasMatch(pattern, s))) {
      return this.cut(this.renderContext(template, request, addGenerationPrompt), null);
    }
    const marker = this.pickMarker(request);
    const mark = (s: string) => markSpecials(s, pattern, marker);
    const pieces = this.cut(this.renderContext(template, mapStrings(request, mark), addGenerationPrompt), marker);
    if (pieces.join("") !== this.renderContext(template, request, addGenerationPrompt)) {
      throw invalidRequest(
        "the chat template transforms text that contains special-token strings in a way that cannot be kept plain; remove them from the request",
        "messages",
      );
    }
    return pieces;
  }

  private renderContext(template: Template, request: RequestValues, addGenerationPrompt: boolean): string {
    const context: Record<string, unknown> = {
      ...this.specials,
      messages: request.messages,
      add_generation_prompt: addGenerationPrompt,
      ...request.extra,
    };
    // Templates test `tools is defined` / `tools is not none`: only set it when tools were given.
    if (request.tools) context.tools = request.tools;
    try {
      return template.render(context);
    } catch (e) {
      // A RangeError (a stack overflow in the renderer) is ours, not the client's: no message of it goes out.
      if (e instanceof RangeError) throw e;
      // raise_exception(...) in a template reports a user error ("single tool-calls only", role order, ...).
      throw invalidRequest(`chat template rejected the messages: ${(e as Error).message}`, "messages");
    }
  }

  /** Cuts at special-token strings (marked request text cannot match) and removes the markers from the text. */
  private cut(text: string, marker: string | null): TemplatePieces {
    const pieces = this.specialPattern ? text.split(this.specialPattern) : [text];
    if (marker !== null) for (let i = 0; i < pieces.length; i += 2) pieces[i] = pieces[i]!.replaceAll(marker, "");
    return pieces;
  }

  /** A private-use code point that occurs in no request string, in the template or in a special token. */
  private pickMarker(request: unknown): string {
    const used = new Set<number>();
    const collect = (s: string) => {
      for (const m of s.matchAll(PRIVATE_USE)) used.add(m[0].codePointAt(0)!);
      return false;
    };
    someString(request, collect);
    collect(this.source);
    if (this.toolSource) collect(this.toolSource);
    for (const v of Object.values(this.specials)) collect(v);
    for (const [lo, hi] of PRIVATE_USE_RANGES) {
      for (let cp = lo; cp <= hi; cp++) if (!used.has(cp)) return String.fromCodePoint(cp);
    }
    throw invalidRequest("the request uses every private-use character; it cannot be rendered safely", "messages");
  }
}

function hasMatch(pattern: RegExp, s: string): boolean {
  pattern.lastIndex = 0;
  const found = pattern.test(s);
  pattern.lastIndex = 0;
  return found;
}

/** Puts `marker` after the first code point of every special-token string in `s`, until none is left. */
function markSpecials(s: string, pattern: RegExp, marker: string): string {
  let out = s;
  // One pass breaks every match; repeat for a special that overlapped one broken before it.
  while (hasMatch(pattern, out)) {
    out = out.replace(pattern, (m) => {
      const first = String.fromCodePoint(m.codePointAt(0)!);
      return first + marker + m.slice(first.length);
    });
  }
  return out;
}

/** True when `test` holds for some string in a JSON-like value (object keys included). */
function someString(value: unknown, test: (s: string) => boolean): boolean {
  if (typeof value === "string") return test(value);
  if (Array.isArray(value)) return value.some((v) => someString(v, test));
  if (value && typeof value === "object") {
    return Object.entries(value).some(([k, v]) => test(k) || someString(v, test));
  }
  return false;
}

/** A copy of a JSON-like value with every string (object keys included) passed through `f`. */
function mapStrings<T>(value: T, f: (s: string) => string): T {
  if (typeof value === "string") return f(value) as T;
  if (Array.isArray(value)) return value.map((v) => mapStrings(v, f)) as T;
  if (value && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [f(k), mapStrings(v, f)])) as T;
  }
  return value;
}

/** Templates expect tool-call arguments as a mapping (transformers' convention), OpenAI sends a JSON string. */
function normalizeMessage(m: ChatMessage): Record<string, unknown> {
  const out: Record<string, unknown> = { role: m.role, content: m.content ?? "" };
  if (m.name !== undefined) out.name = m.name;
  if (m.tool_call_id !== undefined) out.tool_call_id = m.tool_call_id;
  if (m.tool_calls && m.tool_calls.length > 0) {
    out.tool_calls = m.tool_calls.map((c) => {
      let args = c.function.arguments;
      if (typeof args === "string") {
        try {
          args = JSON.parse(args);
        } catch {
          // leave a non-JSON argument string as it is
        }
      }
      return { ...c, function: { name: c.function.name, arguments: args } };
    });
  }
  return out;
}
