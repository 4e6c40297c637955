/**
 * The model's own chat template (tokenizer_config.json "chat_template"), rendered with @huggingface/jinja
 * the way transformers' apply_chat_template renders it: messages, tools, add_generation_prompt, and the
 * special-token strings as variables. Llama-3.1's template also reads `date_string` (fixed dates in tests)
 * and otherwise calls the built-in strftime_now.
 */
import { Template } from "@huggingface/jinja";
import { ModelFolderError, invalidRequest } from "./errors.ts";

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

function specialString(v: unknown): string {
  if (typeof v === "string") return v;
  if (v && typeof v === "object" && typeof (v as { content?: unknown }).content === "string") {
    return (v as { content: string }).content;
  }
  return "";
}

export class ChatTemplate {
  private readonly template: Template;
  private readonly toolTemplate: Template | null;
  private readonly specials: Record<string, string>;
  readonly source: string;

  constructor(tokenizerConfig: Record<string, unknown>) {
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
  }

  render(messages: ChatMessage[], options: RenderOptions = {}): string {
    if (messages.length === 0) throw invalidRequest("messages must not be empty", "messages");
    const tools = options.tools && options.tools.length > 0 ? options.tools : null;
    const template = tools && this.toolTemplate ? this.toolTemplate : this.template;
    const context: Record<string, unknown> = {
      ...this.specials,
      messages: messages.map(normalizeMessage),
      add_generation_prompt: options.addGenerationPrompt ?? true,
      ...(options.extra ?? {}),
    };
    // Templates test `tools is defined` / `tools is not none`: only set it when tools were given.
    if (tools) context.tools = tools;
    try {
      return template.render(context);
    } catch (e) {
      // A RangeError (a stack overflow in the renderer) is ours, not the client's: no message of it goes out.
      if (e instanceof RangeError) throw e;
      // raise_exception(...) in a template reports a user error ("single tool-calls only", role order, ...).
      throw invalidRequest(`chat template rejected the messages: ${(e as Error).message}`, "messages");
    }
  }
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
