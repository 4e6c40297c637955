/**
 * Llama-3.1 tool calls as OpenAI tool_calls: the parser on strings (JSON calls, builtin calls with Python
 * keyword literals, code for code_interpreter), the streaming hold-back on the real tokenizer's output,
 * and the whole path over HTTP, streaming and not, from a model whose weights are written to say the call
 * (tests/helpers/scripted-model.ts: the real builder, engine, template and tokenizer; only the weights are
 * chosen, so that <|python_tag|> and <|eom_id|> come from generation itself).
 */
import { afterAll, beforeAll, describe, expect, test } from "bun:test";
import OpenAI from "openai";
import { readFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { ChatTemplate } from "../runtime/chat-template.ts";
import { Engine } from "../runtime/index.ts";
import { TextTokenizer } from "../runtime/tokenizer.ts";
import { PYTHON_TAG, ToolCallStream, builtinToolsOf, parseBuiltinCall, parseToolCall, type ToolOffer } from "../runtime/tool-calls.ts";
import { createApp } from "../src/app.ts";
import { MODEL_DIR, engineOptions, readJsonFile } from "./helpers/model.ts";
import { addChain, buildScriptedModel, type Bigrams } from "./helpers/scripted-model.ts";
import { sessionApp, tempDir } from "./helpers/sessions.ts";
import { readSse, sseJson } from "./helpers/sse.ts";

const offer = (functions: string[] = [], builtin: string[] = []): ToolOffer => ({ functions: new Set(functions), builtin: new Set(builtin) });
const reply = (text: string, pythonTag = false, finishReason = "stop") => ({ text, pythonTag, finishReason });

describe("parseToolCall: the JSON form", () => {
  const tools = offer(["get_weather"]);
  test("a JSON call to an offered tool becomes name + JSON arguments, with or without <|python_tag|>", () => {
    expect(parseToolCall(reply(' {"name": "get_weather", "parameters": {"city": "Paris"}} '), tools)).toEqual({ name: "get_weather", arguments: '{"city":"Paris"}' });
    expect(parseToolCall(reply('{"name": "get_weather", "parameters": {}}', true), tools)).toEqual({ name: "get_weather", arguments: "{}" });
    // "arguments" as vLLM's llama3_json parser takes it; Meta's {"type": "function", ...} form; no parameters at all.
    expect(parseToolCall(reply('{"name": "get_weather", "arguments": {"city": "Rome"}}'), tools)).toEqual({ name: "get_weather", arguments: '{"city":"Rome"}' });
    expect(parseToolCall(reply('{"type": "function", "name": "get_weather", "parameters": {"n": 1}}', true), tools)).toEqual({ name: "get_weather", arguments: '{"n":1}' });
    expect(parseToolCall(reply('{"name": "get_weather"}'), tools)).toEqual({ name: "get_weather", arguments: "{}" });
    // A builtin tool named in the JSON form (Meta's decoder takes it too).
    expect(parseToolCall(reply('{"name": "brave_search", "parameters": {"query": "x"}}', true), offer([], ["brave_search"]))).toEqual({ name: "brave_search", arguments: '{"query":"x"}' });
  });
  test("anything else stays content", () => {
    expect(parseToolCall(reply("The weather is fine."), tools)).toBeNull();
    expect(parseToolCall(reply('{"name": "launch_rockets", "parameters": {}}'), tools)).toBeNull();
    expect(parseToolCall(reply('{"name": "get_weather", "parameters": 3}'), tools)).toBeNull();
    expect(parseToolCall(reply('{"name": "get_weather", "parameters": [1]}'), tools)).toBeNull();
    expect(parseToolCall(reply('{"name": "get_weather", "parameters": null}'), tools)).toBeNull();
    expect(parseToolCall(reply('{"name": "get_weather", '), tools)).toBeNull();
    expect(parseToolCall(reply('Sure: {"name": "get_weather", "parameters": {}}'), tools)).toBeNull();
    expect(parseToolCall(reply('{"name": "get_weather", "parameters": {}}'), offer())).toBeNull();
  });
  test("a reply that was cut off (max_tokens, a client gone) is never a call", () => {
    expect(parseToolCall(reply('{"name": "get_weather", "parameters": {}}', false, "length"), tools)).toBeNull();
    expect(parseToolCall(reply('{"name": "get_weather", "parameters": {}}', true, "cancelled"), tools)).toBeNull();
  });
  test("the text <|python_tag|> is not the token: a reply that spells it is plain text", () => {
    // The generation's text never holds the token's text (special tokens are left out); spelled, it is content.
    expect(parseToolCall(reply('<|python_tag|>{"name": "get_weather", "parameters": {}}', true), tools)).toBeNull();
    expect(parseToolCall(reply('<|python_tag|>brave_search.call(query="x")', false), offer([], ["brave_search", "code_interpreter"]))).toBeNull();
  });
});

describe("parseToolCall: builtin calls, brave_search.call(query=\"...\")", () => {
  const builtin = offer([], ["brave_search", "wolfram_alpha"]);
  const args = (source: string) => {
    const call = parseBuiltinCall(source);
    return call && JSON.parse(call.arguments);
  };
  test("after <|python_tag|>, a call of an offered builtin tool; without the tag or the offer, content", () => {
    expect(parseToolCall(reply('brave_search.call(query="latest price of 1oz gold")', true), builtin)).toEqual({ name: "brave_search", arguments: '{"query":"latest price of 1oz gold"}' });
    expect(parseToolCall(reply(' wolfram_alpha.call(query="100th decimal of pi")\n', true), builtin)).toEqual({ name: "wolfram_alpha", arguments: '{"query":"100th decimal of pi"}' });
    expect(parseToolCall(reply('brave_search.call(query="x")', false), builtin)).toBeNull();
    expect(parseToolCall(reply('photogen.call(query="x")', true), builtin)).toBeNull();
    expect(parseToolCall(reply('brave_search.call(query="x")', true), offer(["brave_search"]))).toBeNull();
  });
  test("Python string literals: both quotes and every escape Python reads", () => {
    expect(args(`brave_search.call(query='it\\'s "quoted"')`)).toEqual({ query: `it's "quoted"` });
    expect(args(String.raw`brave_search.call(query="a\"b\\c\nd\te\x41\u00e9\U0001F600\101\0")`)).toEqual({ query: 'a"b\\c\nd\teAé😀A\0' });
    // An escape Python does not know keeps its backslash; a backslash-newline joins lines.
    expect(args(String.raw`brave_search.call(query="\d+")`)).toEqual({ query: "\\d+" });
    expect(args('brave_search.call(query="a\\\nb")')).toEqual({ query: "ab" });
    expect(args('brave_search.call(query="é 🎉 <|eot_id|>")')).toEqual({ query: "é 🎉 <|eot_id|>" });
  });
  test("numbers, True / False / None, several keywords, spaces, a trailing comma, no arguments", () => {
    expect(args("wolfram_alpha.call(n=5, neg=-3, f=1.5, e=1e3, x=0x1F, o=0o17, b=0b101, u=1_000, half=.5, big=123456789012345678901234567890)")).toEqual({
      n: 5,
      neg: -3,
      f: 1.5,
      e: 1000,
      x: 31,
      o: 15,
      b: 5,
      u: 1000,
      half: 0.5,
      big: 1.2345678901234568e29,
    });
    // A big int keeps its digits in the arguments text.
    expect(parseBuiltinCall("wolfram_alpha.call(big=123456789012345678901234567890)")!.arguments).toBe('{"big":123456789012345678901234567890}');
    expect(args("brave_search.call( query = 'x' , fresh=True, safe=False, region=None, )")).toEqual({ query: "x", fresh: true, safe: false, region: null });
    expect(args("brave_search.call(\n  query='x',\n  n=2\n)")).toEqual({ query: "x", n: 2 });
    expect(args("brave_search.call()")).toEqual({});
  });
  test("anything that is not keywords with literals is not a call", () => {
    for (const source of [
      'brave_search.call("x")', // positional
      'brave_search.call(query="x", query="y")', // repeated keyword (Python's SyntaxError)
      "brave_search.call(query=1+2)",
      "brave_search.call(query=x)",
      "brave_search.call(query=[1])",
      "brave_search.call(query={'a': 1})",
      'brave_search.call(query=f"x")',
      'brave_search.call(query="""x""")',
      'brave_search.call(query="x)',
      'brave_search.call(query="a\nb")', // a raw newline inside a one-line string
      "brave_search.call(n=007)",
      "brave_search.call(n=1e400)",
      "brave_search.call(n=1.2.3)",
      'brave_search.call(query="\\N{BULLET}")',
      'brave_search.call(query="\\x4")',
      'brave_search.call(query="x") and more',
      'brave_search.call(query="x");print(1)',
      'brave_search(query="x")',
      'os.system.call(cmd="x")', // a dotted name is no builtin tool
      "brave_search.call(query=True_)",
      'brave_search.call(class="x")', // a reserved word is no keyword argument
      "brave_search.call(query=Truex)",
    ]) {
      expect({ source, call: parseBuiltinCall(source) }).toEqual({ source, call: null });
    }
  });
});

describe("parseToolCall: code for code_interpreter", () => {
  test("<|python_tag|> and code, with code_interpreter offered, is a code_interpreter call with the code", () => {
    const code = "def is_prime(n):\n    return n > 1 and all(n % i for i in range(2, n))\n\nprint(is_prime(7))";
    expect(parseToolCall(reply(`${code}\n`, true), offer([], ["code_interpreter"]))).toEqual({ name: "code_interpreter", arguments: JSON.stringify({ code }) });
    // A builtin call of a tool not offered is code too, when code_interpreter is (it is Python).
    expect(parseToolCall(reply('wolfram_alpha.call(query="x")', true), offer([], ["brave_search", "code_interpreter"]))).toEqual({
      name: "code_interpreter",
      arguments: JSON.stringify({ code: 'wolfram_alpha.call(query="x")' }),
    });
  });
  test("without code_interpreter offered, or without the tag, or empty, it is content", () => {
    expect(parseToolCall(reply("print(1)", true), offer(["f"], ["brave_search"]))).toBeNull();
    expect(parseToolCall(reply("print(1)", false), offer([], ["code_interpreter"]))).toBeNull();
    expect(parseToolCall(reply("  ", true), offer([], ["code_interpreter"]))).toBeNull();
    expect(parseToolCall(reply("print(1)", true, "length"), offer([], ["code_interpreter"]))).toBeNull();
  });
  test("builtinToolsOf reads the strings of a builtin_tools list, nothing else", () => {
    expect([...builtinToolsOf({ builtin_tools: ["brave_search", 3, "code_interpreter"] })]).toEqual(["brave_search", "code_interpreter"]);
    expect(builtinToolsOf({ builtin_tools: "brave_search" }).size).toBe(0);
    expect(builtinToolsOf(undefined).size).toBe(0);
  });
});

describe("the built-in template's builtin calls parse back to what they were", () => {
  test("a call rendered by the template, read back from the prompt, gives the same arguments", async () => {
    const template = new ChatTemplate(await readJsonFile(join(MODEL_DIR, "tokenizer_config.json")));
    for (const args of [
      { query: "latest price of 1oz gold" },
      { query: 'say "hi" \\ \' é 🎉\n\ttab', n: 5, f: 2.5, yes: true, no: false, none: null },
      { query: "\u0000\u001f\u2028 end" },
    ]) {
      const text = template.render(
        [
          { role: "user", content: "x" },
          { role: "assistant", content: null, tool_calls: [{ type: "function", function: { name: "brave_search", arguments: args } }] },
        ],
        { extra: { builtin_tools: ["brave_search"] } },
      );
      const call = text.slice(text.indexOf(PYTHON_TAG) + PYTHON_TAG.length, text.indexOf("<|eom_id|>"));
      const parsed = parseToolCall(reply(call, true), offer([], ["brave_search"]));
      expect(parsed?.name).toBe("brave_search");
      expect(JSON.parse(parsed!.arguments)).toEqual(args);
    }
  });
});

describe("ToolCallStream on the real tokenizer's output", () => {
  const tokenizer = new TextTokenizer(JSON.parse(readFileSync(join(MODEL_DIR, "tokenizer.json"), "utf8")), JSON.parse(readFileSync(join(MODEL_DIR, "tokenizer_config.json"), "utf8")));
  const TAG = tokenizer.specialTokenId(PYTHON_TAG)!;
  /** What generation does: each id to token(), its text (special tokens left out) to text(); then finish. */
  const run = (ids: number[], o: ToolOffer | null, finishReason = "stop") => {
    const stream = new ToolCallStream(o, TAG);
    const decoder = tokenizer.streamDecoder(true);
    const content: string[] = [];
    for (const id of ids) {
      stream.token(id);
      const text = decoder.push(id);
      if (text) {
        const out = stream.text(text);
        if (out) content.push(out);
      }
    }
    const end = stream.finish(finishReason);
    if (end.content) content.push(end.content);
    return { content, toolCall: end.toolCall, pythonTag: stream.startedWithPythonTag };
  };
  const ids = (text: string) => tokenizer.encode(text);

  test("<|python_tag|> then a builtin call: nothing streams as content, the call comes at the end", () => {
    expect(TAG).toBe(128010);
    const r = run([TAG, ...ids('brave_search.call(query="gold price")')], offer([], ["brave_search"]));
    expect(r).toEqual({ content: [], toolCall: { name: "brave_search", arguments: '{"query":"gold price"}' }, pythonTag: true });
  });
  test("a JSON call with tools offered is held whole; a reply that only begins with { comes out as content at the end", () => {
    const json = run(ids('  {"name": "get_weather", "parameters": {"city": "Paris"}}'), offer(["get_weather"]));
    expect(json).toEqual({ content: [], toolCall: { name: "get_weather", arguments: '{"city":"Paris"}' }, pythonTag: false });
    const notACall = run(ids("{braces} are fine"), offer(["get_weather"]));
    expect(notACall).toEqual({ content: ["{braces} are fine"], toolCall: null, pythonTag: false });
  });
  test("plain text streams token by token, with tools offered or not; tool calls off streams even a call as content", () => {
    const text = "It is sunny in Paris today.";
    const withTools = run(ids(text), offer(["get_weather"], ["brave_search"]));
    expect(withTools.content.join("")).toBe(text);
    expect(withTools.content.length).toBe(ids(text).length);
    const noTools = run(ids('{"name": "get_weather", "parameters": {}}'), offer());
    expect(noTools.content.length).toBeGreaterThan(1);
    expect(noTools.toolCall).toBeNull();
    const off = run([TAG, ...ids('brave_search.call(query="x")')], null);
    expect(off.content.join("")).toBe('brave_search.call(query="x")');
    expect(off.content.length).toBeGreaterThan(1);
    expect(off.toolCall).toBeNull();
  });
  test("<|python_tag|> with nothing to call: the held text comes out as content; a cut-off call too", () => {
    expect(run([TAG, ...ids('brave_search.call(query="x")')], offer())).toEqual({ content: ['brave_search.call(query="x")'], toolCall: null, pythonTag: true });
    expect(run([TAG, ...ids('brave_search.call(query="x")')], offer([], ["brave_search"]), "length").toolCall).toBeNull();
  });
  test("a text that spells <|python_tag|> is plain tokens, never the special token", () => {
    const spelled = ids('<|python_tag|>brave_search.call(query="x")');
    expect(spelled).not.toContain(TAG);
    const r = run(spelled, offer([], ["brave_search", "code_interpreter"]));
    expect({ ...r, content: r.content.join("") }).toEqual({ content: '<|python_tag|>brave_search.call(query="x")', toolCall: null, pythonTag: false });
    expect(r.content.length).toBe(spelled.length); // streamed as it came, not held
  });
});

describe("over HTTP, from a model whose weights say the call", () => {
  const tokenizer = new TextTokenizer(JSON.parse(readFileSync(join(MODEL_DIR, "tokenizer.json"), "utf8")), JSON.parse(readFileSync(join(MODEL_DIR, "tokenizer_config.json"), "utf8")));
  const NL2 = 271; // "\n\n": the last token of every generation prompt (<|start_header_id|>assistant<|end_header_id|>\n\n)
  const TAG = 128010;
  const EOM = 128008;
  const EOT = 128009;
  const BUILTIN = 'brave_search.call(query="gold price")';
  const CODE = "print(6*7)";
  const JSON_CALL = '{"name":"get_weather","parameters":{"city": "Paris"}}';
  const PLAIN = "It is sunny today.";
  const builtinIds = tokenizer.encode(BUILTIN);
  const jsonIds = tokenizer.encode(JSON_CALL);
  // After "\n\n": <|python_tag|> (30) over the JSON call (20) over plain text (10); after the tag, the
  // builtin call (30) over code (20). logit_bias in a request takes a branch away.
  const table: Bigrams = new Map();
  addChain(table, [NL2, TAG, ...builtinIds], EOM, 30);
  addChain(table, [TAG, ...tokenizer.encode(CODE)], EOM, 20);
  addChain(table, [NL2, ...jsonIds], EOT, 20);
  addChain(table, [NL2, ...tokenizer.encode(PLAIN)], EOT, 10);
  const NO_TAG = { [TAG]: -100 };
  const CODE_BRANCH = { [builtinIds[0]!]: -100 };
  const PLAIN_BRANCH = { [TAG]: -100, [jsonIds[0]!]: -100 };

  const dir = tempDir("scripted-model");
  let engine: Engine;
  let app: ReturnType<typeof createApp>;
  beforeAll(async () => {
    await buildScriptedModel(dir, table);
    engine = await Engine.load(engineOptions({ modelDir: dir }));
    app = createApp({ engine, maxBodyBytes: 1024 * 1024, log: () => {} });
  }, 120_000);
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  const weatherTool = { type: "function", function: { name: "get_weather", parameters: { type: "object", properties: { city: { type: "string" } } } } };
  const ask = (body: Record<string, unknown>) =>
    app.request("/v1/chat/completions", {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ messages: [{ role: "user", content: "What is the price of gold?" }], temperature: 0, max_tokens: 32, ...body }),
    });
  const json = async (body: Record<string, unknown>) => {
    const res = await ask(body);
    expect(res.status).toBe(200);
    return (await res.json()) as { choices: { message: { role: string; content: string | null; tool_calls?: { id: string; type: string; function: { name: string; arguments: string } }[] }; finish_reason: string }[]; usage: { completion_tokens: number } };
  };
  const stream = async (body: Record<string, unknown>) => {
    const res = await ask({ ...body, stream: true });
    expect(res.status).toBe(200);
    const events = await readSse(res);
    expect(events.at(-1)).toBe("[DONE]");
    const chunks = sseJson(events);
    const deltas = chunks.flatMap((c) => c.choices).map((ch) => ch.delta as Record<string, unknown>);
    const content = deltas.map((d) => (typeof d.content === "string" ? d.content : "")).join("");
    const finish = chunks.flatMap((c) => c.choices).map((ch) => ch.finish_reason).filter((f) => f !== null);
    return { chunks, deltas, content, finish };
  };

  test("<|python_tag|>brave_search.call(...)<|eom_id|> with brave_search offered: tool_calls, finish_reason tool_calls", async () => {
    const body = await json({ chat_template_kwargs: { builtin_tools: ["brave_search", "wolfram_alpha"] } });
    const choice = body.choices[0]!;
    expect(choice.finish_reason).toBe("tool_calls");
    expect(choice.message.content).toBeNull();
    expect(choice.message.tool_calls).toHaveLength(1);
    expect(choice.message.tool_calls![0]!.type).toBe("function");
    expect(choice.message.tool_calls![0]!.id).toMatch(/^call-/);
    expect(choice.message.tool_calls![0]!.function).toEqual({ name: "brave_search", arguments: '{"query":"gold price"}' });
    // <|python_tag|> and the call's tokens; generation stopped at <|eom_id|> (an eos id, not counted).
    expect(body.usage.completion_tokens).toBe(1 + builtinIds.length);
  }, 60_000);

  test("streaming: the call comes as delta.tool_calls (id, type, name, then arguments), no content, then finish_reason tool_calls", async () => {
    const { chunks, deltas, content, finish } = await stream({ chat_template_kwargs: { builtin_tools: ["brave_search"] }, stream_options: { include_usage: true } });
    expect(content).toBe("");
    expect(deltas[0]).toEqual({ role: "assistant", content: "" });
    const calls = deltas.filter((d) => d.tool_calls);
    expect(calls).toEqual([
      { tool_calls: [{ index: 0, id: expect.stringMatching(/^call-/), type: "function", function: { name: "brave_search", arguments: "" } }] },
      { tool_calls: [{ index: 0, function: { arguments: '{"query":"gold price"}' } }] },
    ]);
    expect(finish).toEqual(["tool_calls"]);
    expect(chunks.at(-1)!.usage.completion_tokens).toBe(1 + builtinIds.length);
  }, 60_000);

  test("the openai npm client assembles the streamed call into the same message as the non-streaming answer", async () => {
    const client = new OpenAI({ baseURL: "http://scripted.test/v1", apiKey: "unused", maxRetries: 0, fetch: async (url, init) => app.request(String(url), init as RequestInit) });
    const request = { model: engine.info.modelId, messages: [{ role: "user" as const, content: "What is the price of gold?" }], temperature: 0, max_tokens: 32, chat_template_kwargs: { builtin_tools: ["brave_search"] } };
    const final = await client.chat.completions.stream(request).finalChatCompletion();
    const plain = await client.chat.completions.create(request);
    expect(final.choices[0]!.finish_reason).toBe("tool_calls");
    expect(final.choices[0]!.message.tool_calls!.map((c) => c.type === "function" && c.function)).toEqual([{ name: "brave_search", arguments: '{"query":"gold price"}' }]);
    expect(plain.choices[0]!.message.tool_calls!.map((c) => c.type === "function" && c.function)).toEqual([{ name: "brave_search", arguments: '{"query":"gold price"}' }]);
  }, 60_000);

  test("the same reply without builtin_tools, or with tool_choice none, is content (the tag left out)", async () => {
    for (const body of [{}, { tools: [weatherTool], tool_choice: "none", chat_template_kwargs: { builtin_tools: ["brave_search"] } }]) {
      const plain = await json(body);
      expect(plain.choices[0]!.message).toEqual({ role: "assistant", content: BUILTIN });
      expect(plain.choices[0]!.finish_reason).toBe("stop");
      const streamed = await stream(body);
      expect(streamed.content).toBe(BUILTIN);
      expect(streamed.deltas.some((d) => d.tool_calls)).toBe(false);
      expect(streamed.finish).toEqual(["stop"]);
    }
  }, 60_000);

  test("cut off by max_tokens: content and finish_reason length, never a call", async () => {
    const kwargs = { chat_template_kwargs: { builtin_tools: ["brave_search"] }, max_tokens: 4 };
    const plain = await json(kwargs);
    expect(plain.choices[0]!.finish_reason).toBe("length");
    expect(plain.choices[0]!.message.tool_calls).toBeUndefined();
    expect(plain.choices[0]!.message.content).toBe(tokenizer.decode(builtinIds.slice(0, 3)));
    const streamed = await stream(kwargs);
    expect(streamed.finish).toEqual(["length"]);
    expect(streamed.content).toBe(tokenizer.decode(builtinIds.slice(0, 3)));
  }, 60_000);

  test("<|python_tag|> and code with code_interpreter offered: a code_interpreter call, both ways", async () => {
    const body = { chat_template_kwargs: { builtin_tools: ["code_interpreter"] }, logit_bias: CODE_BRANCH };
    const plain = await json(body);
    expect(plain.choices[0]!.finish_reason).toBe("tool_calls");
    expect(plain.choices[0]!.message.tool_calls![0]!.function).toEqual({ name: "code_interpreter", arguments: JSON.stringify({ code: CODE }) });
    const streamed = await stream(body);
    expect(streamed.content).toBe("");
    expect(streamed.deltas.filter((d) => d.tool_calls).map((d) => (d.tool_calls as { function: Record<string, string> }[])[0]!.function)).toEqual([
      { name: "code_interpreter", arguments: "" },
      { arguments: JSON.stringify({ code: CODE }) },
    ]);
    expect(streamed.finish).toEqual(["tool_calls"]);
  }, 60_000);

  test("a JSON call to an offered tool (no tag, <|eot_id|>): tool_calls both ways; without tools it streams as content", async () => {
    const body = { tools: [weatherTool], logit_bias: NO_TAG };
    const plain = await json(body);
    expect(plain.choices[0]!.finish_reason).toBe("tool_calls");
    expect(plain.choices[0]!.message.tool_calls![0]!.function).toEqual({ name: "get_weather", arguments: '{"city":"Paris"}' });
    const streamed = await stream(body);
    expect(streamed.content).toBe("");
    expect(streamed.finish).toEqual(["tool_calls"]);
    expect(streamed.deltas.filter((d) => d.tool_calls)).toHaveLength(2);

    const untooled = await stream({ logit_bias: NO_TAG });
    expect(untooled.content).toBe(JSON_CALL);
    expect(untooled.deltas.filter((d) => typeof d.content === "string" && d.content !== "").length).toBe(jsonIds.length);
    expect(untooled.finish).toEqual(["stop"]);
  }, 60_000);

  test("plain text streams as it comes, token by token, even with tools and builtin tools offered", async () => {
    const body = { tools: [weatherTool], chat_template_kwargs: { builtin_tools: ["brave_search", "code_interpreter"] }, logit_bias: PLAIN_BRANCH };
    const streamed = await stream(body);
    expect(streamed.content).toBe(PLAIN);
    expect(streamed.deltas.filter((d) => typeof d.content === "string" && d.content !== "").length).toBe(tokenizer.encode(PLAIN).length);
    expect(streamed.finish).toEqual(["stop"]);
    const plain = await json(body);
    expect(plain.choices[0]!.message).toEqual({ role: "assistant", content: PLAIN });
  }, 60_000);

  test("a session: its pinned builtin_tools make the reply a call, streaming and not", async () => {
    const { post } = sessionApp(engine);
    expect((await post("/v1/sessions", { id: "tools", messages: [{ role: "system", content: "Search when unsure." }], chat_template_kwargs: { builtin_tools: ["brave_search"] } })).status).toBe(201);
    const res = await post("/v1/sessions/tools/messages", { content: "What is the price of gold?", temperature: 0, max_tokens: 32, stream: true });
    const chunks = sseJson(await readSse(res));
    expect(chunks.every((c) => c.session_id === "tools")).toBe(true);
    const deltas = chunks.flatMap((c) => c.choices).map((ch) => ch.delta);
    expect(deltas.filter((d) => d.tool_calls).map((d) => d.tool_calls[0].function)).toEqual([{ name: "brave_search", arguments: "" }, { arguments: '{"query":"gold price"}' }]);
    expect(chunks.flatMap((c) => c.choices).map((ch) => ch.finish_reason).filter((f) => f !== null)).toEqual(["tool_calls"]);
    const again = await post("/v1/chat/completions", {
      session_id: "tools",
      messages: [
        { role: "system", content: "Search when unsure." },
        { role: "user", content: "What is the price of gold?" },
      ],
      temperature: 0,
      max_tokens: 32,
    });
    const body = (await again.json()) as { choices: { message: { tool_calls: { function: unknown }[] }; finish_reason: string }[] };
    expect(body.choices[0]!.finish_reason).toBe("tool_calls");
    expect(body.choices[0]!.message.tool_calls[0]!.function).toEqual({ name: "brave_search", arguments: '{"query":"gold price"}' });
  }, 60_000);
});
