/** Reads an SSE response body into its `data:` payloads (the last one is "[DONE]" for a complete stream). */
export async function readSse(response: Response): Promise<string[]> {
  const text = await response.text();
  return text
    .split("\n\n")
    .map((block) => block.trim())
    .filter((block) => block.startsWith("data: "))
    .map((block) => block.slice("data: ".length));
}

export function sseJson(events: string[]): Record<string, any>[] {
  return events.filter((e) => e !== "[DONE]").map((e) => JSON.parse(e) as Record<string, any>);
}
