/**
 * Llama-3.1 answers a custom tool call as one JSON object, {"name": ..., "parameters": {...}} (the format
 * its chat template asks for). This turns such a reply into an OpenAI tool call when the name is one of
 * the request's tools; anything else stays plain content.
 */
export interface ParsedToolCall {
  name: string;
  /** JSON-encoded arguments, as OpenAI's API carries them. */
  arguments: string;
}

export function parseToolCall(text: string, toolNames: ReadonlySet<string>): ParsedToolCall | null {
  let trimmed = text.trim();
  if (trimmed.startsWith("<|python_tag|>")) trimmed = trimmed.slice("<|python_tag|>".length).trim();
  if (!trimmed.startsWith("{") || !trimmed.endsWith("}")) return null;
  let value: unknown;
  try {
    value = JSON.parse(trimmed);
  } catch {
    return null;
  }
  if (!value || typeof value !== "object") return null;
  const { name, parameters, arguments: args } = value as { name?: unknown; parameters?: unknown; arguments?: unknown };
  if (typeof name !== "string" || !toolNames.has(name)) return null;
  const params = parameters ?? args ?? {};
  if (typeof params !== "object" || params === null) return null;
  return { name, arguments: JSON.stringify(params) };
}
