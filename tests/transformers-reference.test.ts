/**
 * An independent reference: transformers.js loads the same built-in model folder on the same ORT backend
 * (onnxruntime-web WASM, 1 thread) and its greedy generation must give exactly our token ids, for chat
 * prompts of different lengths, in fp32 and fp16. Both sides see identical prompt ids (our template and
 * tokenizer), and neither stops at eos. The built-in model has untied random weights, so its greedy output
 * is a long, varied sequence: any difference in KV handling, positions, masks or sampling shows up here.
 */
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import type { ChatMessage, Engine } from "../runtime/index.ts";
import { loadTransformersPeer, type PeerDtype, type TransformersPeer } from "../scripts/lib/transformers-peer.ts";
import { REPO, sharedEngine } from "./helpers/model.ts";

const NEW_TOKENS = 32;
const RENDER = { extra: { date_string: "26 Jul 2024" } };

const filler = (n: number) =>
  Array.from({ length: n }, (_, i) => `Line ${i + 1}: the tide came in at ${(i * 7) % 24}:${String((i * 13) % 60).padStart(2, "0")} and went out again.`).join("\n");

const CHATS: { name: string; messages: ChatMessage[] }[] = [
  { name: "short", messages: [{ role: "user", content: "Hi!" }] },
  {
    name: "medium",
    messages: [
      { role: "system", content: "You are a terse assistant who answers in one sentence." },
      { role: "user", content: "Why is the sky blue during the day but red at sunset? Explain it simply." },
    ],
  },
  {
    name: "long multi-turn",
    messages: [
      { role: "system", content: "You keep a harbour log and answer questions about it." },
      { role: "user", content: `Here is today's log:\n${filler(24)}` },
      { role: "assistant", content: "Noted. The log has 24 lines about the tide." },
      { role: "user", content: "At what time did the tide come in on line 17, and what does that say about the moon?" },
    ],
  },
];

async function peerFor(dtype: PeerDtype): Promise<TransformersPeer> {
  return loadTransformersPeer({ backend: "wasm", modelsDir: join(REPO, "models"), modelId: "random", dtype, threads: 1 });
}

async function compareOn(engine: Engine, peer: TransformersPeer): Promise<void> {
  const outputs: number[][] = [];
  const lengths = new Set<number>();
  for (const chat of CHATS) {
    const promptIds = await engine.encodeChat(chat.messages, RENDER);
    lengths.add(promptIds.length);
    const ours = await engine.complete({ promptIds, maxTokens: NEW_TOKENS, sampling: { temperature: 0 }, stop: [], ignoreEos: true });
    const theirs = await peer.generate(promptIds, NEW_TOKENS);
    expect(ours.tokenIds.length).toBe(NEW_TOKENS);
    expect(theirs.tokenIds.length).toBe(NEW_TOKENS);
    // A collapsed or constant sequence would make equality meaningless.
    expect(new Set(ours.tokenIds).size).toBeGreaterThan(8);
    expect({ chat: chat.name, promptTokens: promptIds.length, ids: ours.tokenIds }).toEqual({
      chat: chat.name,
      promptTokens: promptIds.length,
      ids: theirs.tokenIds,
    });
    outputs.push(ours.tokenIds);
  }
  // Prompts of clearly different lengths (from a handful of tokens to several hundred)...
  expect(lengths.size).toBe(CHATS.length);
  expect(Math.max(...lengths)).toBeGreaterThan(300);
  // ...that lead to different continuations, so the comparison is not one sequence seen three times.
  expect(new Set(outputs.map((o) => o.join(","))).size).toBe(CHATS.length);
}

describe("transformers.js reference (onnxruntime-web WASM, same model folder)", () => {
  test("fp32: greedy token ids equal transformers.js for short, medium and long chats", async () => {
    const engine = await sharedEngine();
    expect(engine.info.backend).toBe("wasm");
    const peer = await peerFor("fp32");
    try {
      await compareOn(engine, peer);
    } finally {
      await peer.dispose();
    }
  });

  test("fp16: greedy token ids equal transformers.js on model_fp16.onnx", async () => {
    const engine = await sharedEngine({ variant: "fp16" });
    expect(engine.info.variant).toBe("fp16");
    expect(engine.info.kvDtype).toBe("float16");
    const peer = await peerFor("fp16");
    try {
      await compareOn(engine, peer);
    } finally {
      await peer.dispose();
    }
  });

  test("the comparison can fail: a one-token change to the prompt changes transformers.js's continuation", async () => {
    const engine = await sharedEngine();
    const peer = await peerFor("fp32");
    try {
      const promptIds = await engine.encodeChat(CHATS[1]!.messages, RENDER);
      const ours = await engine.complete({ promptIds, maxTokens: NEW_TOKENS, sampling: { temperature: 0 }, stop: [], ignoreEos: true });
      const altered = [...promptIds];
      altered[altered.length - 6] = 9906; // "Hello" in place of a token near the end of the user turn
      const theirs = await peer.generate(altered, NEW_TOKENS);
      expect(theirs.tokenIds).not.toEqual(ours.tokenIds);
    } finally {
      await peer.dispose();
    }
  });
});
