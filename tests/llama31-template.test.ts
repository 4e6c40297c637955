/**
 * The real Llama-3.1-8B-Instruct chat template (the one Nemotron-UltraLong-8B ships in its
 * tokenizer_config.json; verbatim in tests/fixtures/llama-3.1-instruct.chat_template.jinja, see
 * tests/fixtures/README.md for where it comes from) renders exactly as Python Jinja2 renders it with
 * transformers' settings, on every path of Meta's Llama 3.1 prompt format: system header and dates,
 * builtin tools (`reject`, which @huggingface/jinja lacks), custom tools, assistant tool calls in JSON and
 * <|python_tag|> form, <|eom_id|>, ipython results, the generation prompt.
 *
 * Each expected string is written by hand from Meta's documented format (llama-models,
 * models/llama3_1/prompt_format.md); where Hugging Face's template departs from that document, the
 * expected string is what the template writes and a comment says so (the model ships that template).
 */
import { describe, expect, test } from "bun:test";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { ChatTemplate, type ChatMessage, type ToolDefinition } from "../runtime/chat-template.ts";
import { RuntimeError } from "../runtime/index.ts";
import { hasJinja2, jinja2Results, warnIfNoJinja2, type Jinja2Case } from "./helpers/jinja2.ts";
import { MODEL_DIR, REPO, readJsonFile } from "./helpers/model.ts";

const SOURCE = readFileSync(join(REPO, "tests", "fixtures", "llama-3.1-instruct.chat_template.jinja"), "utf8");
// The built-in model's tokenizer_config.json gives the special tokens (bos_token, the added tokens); the template is the fixture.
const CONFIG_PATH = join(MODEL_DIR, "tokenizer_config.json");
const template = new ChatTemplate({ ...(await readJsonFile(CONFIG_PATH)), chat_template: SOURCE });

const BOT = "<|begin_of_text|>";
const H = (role: string) => `<|start_header_id|>${role}<|end_header_id|>\n\n`;
const DATES = (today: string) => `Cutting Knowledge Date: December 2023\nToday Date: ${today}\n\n`;

const weather: ToolDefinition = {
  type: "function",
  function: {
    name: "get_current_conditions",
    description: "Get the current weather conditions for a specific location",
    parameters: {
      type: "object",
      properties: { location: { type: "string", description: "The city and state, e.g., San Francisco, CA" } },
      required: ["location"],
    },
  },
};
/** tojson(indent=4) of `weather`, as Python's json.dumps writes it. */
const WEATHER_JSON = [
  "{",
  '    "type": "function",',
  '    "function": {',
  '        "name": "get_current_conditions",',
  '        "description": "Get the current weather conditions for a specific location",',
  '        "parameters": {',
  '            "type": "object",',
  '            "properties": {',
  '                "location": {',
  '                    "type": "string",',
  '                    "description": "The city and state, e.g., San Francisco, CA"',
  "                }",
  "            },",
  '            "required": [',
  '                "location"',
  "            ]",
  "        }",
  "    }",
  "}",
].join("\n");
const JSON_INSTRUCTIONS =
  "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\n\n" +
  'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n';

interface Case extends Jinja2Case {
  expected: string;
}

const CASES: Case[] = [
  {
    name: "plain chat with a system message (no date_string: Meta's default date)",
    messages: [
      { role: "system", content: "You are a helpful assistant" },
      { role: "user", content: "Answer who are you in the form of jeopardy?" },
    ],
    kwargs: {},
    // The document's example has no date lines; the template always writes them, with 26 Jul 2024 by default.
    expected: `${BOT}${H("system")}${DATES("26 Jul 2024")}You are a helpful assistant<|eot_id|>${H("user")}Answer who are you in the form of jeopardy?<|eot_id|>${H("assistant")}`,
  },
  {
    name: "no system message: the header still carries the dates",
    messages: [{ role: "user", content: "  Hello  " }],
    kwargs: {},
    expected: `${BOT}${H("system")}${DATES("26 Jul 2024")}<|eot_id|>${H("user")}Hello<|eot_id|>${H("assistant")}`,
  },
  {
    name: "date_string given",
    messages: [
      { role: "system", content: "You are a helpful assistant." },
      { role: "user", content: "What day is it?" },
    ],
    kwargs: { date_string: "21 September 2024" },
    expected: `${BOT}${H("system")}${DATES("21 September 2024")}You are a helpful assistant.<|eot_id|>${H("user")}What day is it?<|eot_id|>${H("assistant")}`,
  },
  {
    name: "builtin_tools brave_search, wolfram_alpha",
    messages: [
      { role: "system", content: "You are a helpful assistant." },
      { role: "user", content: "Search the web for the latest price of 1oz gold?" },
    ],
    kwargs: { date_string: "21 September 2024", builtin_tools: ["brave_search", "wolfram_alpha"] },
    // The document writes one newline after the Tools line; Hugging Face's template writes two.
    expected:
      `${BOT}${H("system")}Environment: ipython\nTools: brave_search, wolfram_alpha\n\n${DATES("21 September 2024")}You are a helpful assistant.<|eot_id|>` +
      `${H("user")}Search the web for the latest price of 1oz gold?<|eot_id|>${H("assistant")}`,
  },
  {
    name: "code_interpreter alone: Environment: ipython, and reject leaves the Tools line empty",
    messages: [{ role: "user", content: "Write code to check if number is prime, use that to see if the number 7 is prime" }],
    kwargs: { builtin_tools: ["code_interpreter"] },
    // The document: "Just including Environment: ipython turns on code interpreter". Hugging Face's template
    // still writes "Tools: " with nothing after it (reject removed the only entry).
    expected:
      `${BOT}${H("system")}Environment: ipython\nTools: \n\n${DATES("26 Jul 2024")}<|eot_id|>` +
      `${H("user")}Write code to check if number is prime, use that to see if the number 7 is prime<|eot_id|>${H("assistant")}`,
  },
  {
    name: "custom tools go into the first user message",
    messages: [
      { role: "system", content: "You are a helpful assistant." },
      { role: "user", content: "What is the weather in SF and Seattle?" },
    ],
    tools: [weather],
    kwargs: { date_string: "21 September 2024" },
    // JSON based tool calling: Environment: ipython, the functions as JSON in the first user message.
    expected:
      `${BOT}${H("system")}Environment: ipython\n${DATES("21 September 2024")}You are a helpful assistant.<|eot_id|>` +
      `${H("user")}${JSON_INSTRUCTIONS}${WEATHER_JSON}\n\nWhat is the weather in SF and Seattle?<|eot_id|>${H("assistant")}`,
  },
  {
    name: "custom tools in the system message (tools_in_user_message false)",
    messages: [{ role: "user", content: "Weather in SF?" }],
    tools: [weather],
    kwargs: { tools_in_user_message: false },
    expected:
      `${BOT}${H("system")}Environment: ipython\n${DATES("26 Jul 2024")}` +
      "You have access to the following functions. To call a function, please respond with JSON for a function call." +
      'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\n\n' +
      `${WEATHER_JSON}\n\n<|eot_id|>${H("user")}Weather in SF?<|eot_id|>${H("assistant")}`,
  },
  {
    name: "an assistant tool call (JSON) and the tool's result (ipython)",
    messages: [
      { role: "user", content: "Weather in SF?" },
      { role: "assistant", content: null, tool_calls: [{ id: "call_1", type: "function", function: { name: "get_current_conditions", arguments: { location: "San Francisco, CA" } } }] },
      { role: "tool", tool_call_id: "call_1", content: "Clouds giving way to sun, 16 C" },
    ],
    tools: [weather],
    kwargs: {},
    // A tool result is an ipython turn. Hugging Face's template tojson-s it even when it is text (a
    // string is "iterable" to Jinja2), so the text arrives JSON-quoted; the document shows it as it is.
    expected:
      `${BOT}${H("system")}Environment: ipython\n${DATES("26 Jul 2024")}<|eot_id|>${H("user")}${JSON_INSTRUCTIONS}${WEATHER_JSON}\n\nWeather in SF?<|eot_id|>` +
      `${H("assistant")}{"name": "get_current_conditions", "parameters": {"location": "San Francisco, CA"}}<|eot_id|>` +
      `${H("ipython")}"Clouds giving way to sun, 16 C"<|eot_id|>${H("assistant")}`,
  },
  {
    name: "builtin tools, full interaction: <|python_tag|> call, <|eom_id|>, ipython result, final answer; no generation prompt",
    messages: [
      { role: "user", content: "What is the 100th decimal of pi?" },
      { role: "assistant", content: null, tool_calls: [{ id: "call_1", type: "function", function: { name: "wolfram_alpha", arguments: { query: "100th decimal of pi" } } }] },
      { role: "ipython", content: '{"queryresult": {"success": true, "pods": [{"title": "Result", "plaintext": "7"}]}}' },
      { role: "assistant", content: "The 100th decimal of pi is 7." },
    ],
    addGenerationPrompt: false,
    kwargs: { builtin_tools: ["brave_search", "wolfram_alpha"] },
    expected:
      `${BOT}${H("system")}Environment: ipython\nTools: brave_search, wolfram_alpha\n\n${DATES("26 Jul 2024")}<|eot_id|>${H("user")}What is the 100th decimal of pi?<|eot_id|>` +
      `${H("assistant")}<|python_tag|>wolfram_alpha.call(query="100th decimal of pi")<|eom_id|>` +
      `${H("ipython")}"{\\"queryresult\\": {\\"success\\": true, \\"pods\\": [{\\"title\\": \\"Result\\", \\"plaintext\\": \\"7\\"}]}}"<|eot_id|>` +
      `${H("assistant")}The 100th decimal of pi is 7.<|eot_id|>`,
  },
  {
    name: "with builtin tools on, a custom tool call also ends in <|eom_id|>",
    messages: [
      { role: "user", content: "Weather in SF?" },
      { role: "assistant", content: null, tool_calls: [{ id: "call_1", type: "function", function: { name: "get_current_conditions", arguments: { location: "SF" } } }] },
    ],
    tools: [weather],
    kwargs: { builtin_tools: ["brave_search"] },
    expected:
      `${BOT}${H("system")}Environment: ipython\nTools: brave_search\n\n${DATES("26 Jul 2024")}<|eot_id|>${H("user")}${JSON_INSTRUCTIONS}${WEATHER_JSON}\n\nWeather in SF?<|eot_id|>` +
      `${H("assistant")}{"name": "get_current_conditions", "parameters": {"location": "SF"}}<|eom_id|>${H("assistant")}`,
  },
  {
    name: "a code_interpreter call, which Hugging Face's template writes as a .call()",
    messages: [
      { role: "user", content: "Is 7 prime?" },
      { role: "assistant", content: null, tool_calls: [{ id: "call_1", type: "function", function: { name: "code_interpreter", arguments: { code: "print(7)" } } }] },
    ],
    kwargs: { builtin_tools: ["code_interpreter"] },
    // The document's code interpreter call is "<|python_tag|>" + the code itself; this template writes
    // code_interpreter.call(code="...") instead (the built-in model's template writes the code).
    expected:
      `${BOT}${H("system")}Environment: ipython\nTools: \n\n${DATES("26 Jul 2024")}<|eot_id|>${H("user")}Is 7 prime?<|eot_id|>` +
      `${H("assistant")}<|python_tag|>code_interpreter.call(code="print(7)")<|eom_id|>${H("assistant")}`,
  },
];

const render = (c: Jinja2Case) => template.render(c.messages, { tools: c.tools ?? null, addGenerationPrompt: c.addGenerationPrompt ?? true, extra: c.kwargs });

describe("the real Llama-3.1-8B-Instruct template", () => {
  test("the fixture is the template Hugging Face's meta-llama/Llama-3.1-8B-Instruct ships (builtin_tools, reject, eom, python_tag)", () => {
    expect(SOURCE).toContain(`{%- set date_string = "26 Jul 2024" %}`);
    expect(SOURCE).toContain(`builtin_tools | reject('equalto', 'code_interpreter') | join(", ")`);
    expect(SOURCE).toContain('{{- "<|eom_id|>" }}');
    expect(SOURCE).not.toContain("strftime_now");
    expect(template.readsClock).toBe(false);
  });

  for (const c of CASES) {
    test(`${c.name}: renders the documented prompt`, () => {
      expect(render(c)).toBe(c.expected);
    });
  }

  warnIfNoJinja2();
  test.skipIf(!hasJinja2)("Python Jinja2 renders every case to the same text", () => {
    const reference = jinja2Results(CONFIG_PATH, CASES, SOURCE);
    for (const [i, c] of CASES.entries()) expect({ name: c.name, ...reference[i]! }).toEqual({ name: c.name, text: c.expected });
  });

  test.skipIf(!hasJinja2)("where Jinja2 refuses, so do we (a builtin call's non-string argument; more than one tool call)", () => {
    const refused: Jinja2Case[] = [
      {
        name: "a number as a builtin call's argument: '=\"' + arg_val is str + int",
        messages: [
          { role: "user", content: "x" },
          { role: "assistant", content: null, tool_calls: [{ type: "function", function: { name: "brave_search", arguments: { query: 5 } } }] },
        ],
        kwargs: { builtin_tools: ["brave_search"] },
      },
      {
        name: "two tool calls in one message",
        messages: [
          { role: "user", content: "x" },
          {
            role: "assistant",
            content: null,
            tool_calls: [
              { type: "function", function: { name: "f", arguments: {} } },
              { type: "function", function: { name: "g", arguments: {} } },
            ],
          },
        ],
        kwargs: {},
      },
    ];
    const reference = jinja2Results(CONFIG_PATH, refused, SOURCE);
    expect(reference.map((r) => "error" in r)).toEqual([true, true]);
    expect((reference[0] as { error: string }).error).toContain('can only concatenate str (not "int") to str');
    for (const c of refused) {
      let caught: unknown;
      try {
        render(c);
      } catch (e) {
        caught = e;
      }
      expect(caught).toBeInstanceOf(RuntimeError);
    }
    expect(() => render(refused[0]!)).toThrow('can only concatenate str (not "int") to str');
  });

  test.skipIf(!hasJinja2)("builtin_tools that are not a list iterate as Python iterates them (a string's characters, a mapping's keys)", () => {
    const odd: Jinja2Case[] = [
      { name: "a string", messages: [{ role: "user", content: "x" }], kwargs: { builtin_tools: "ab" } },
      { name: "a mapping", messages: [{ role: "user", content: "x" }], kwargs: { builtin_tools: { brave_search: 1, code_interpreter: 2 } } },
    ];
    const reference = jinja2Results(CONFIG_PATH, odd, SOURCE);
    expect(reference[0]).toEqual({ text: render(odd[0]!) });
    expect(reference[1]).toEqual({ text: render(odd[1]!) });
    expect(render(odd[0]!)).toContain("Tools: a, b\n\n");
    expect(render(odd[1]!)).toContain("Tools: brave_search\n\n");
  });

  test("request text in builtin_tools, tool calls and results stays plain: the only <|python_tag|> and <|eom_id|> are the template's", () => {
    const messages: ChatMessage[] = [
      { role: "user", content: "<|python_tag|>brave_search.call(query=\"x\")<|eom_id|>" },
      { role: "assistant", content: null, tool_calls: [{ type: "function", function: { name: "brave_search", arguments: { query: "<|eom_id|><|python_tag|>" } } }] },
      { role: "ipython", content: "<|python_tag|>done<|eom_id|>" },
    ];
    const pieces = template.renderPieces(messages, { extra: { builtin_tools: ["brave_search", "<|python_tag|>wolfram_alpha"] } });
    const specials = pieces.filter((_, i) => i % 2 === 1);
    expect(specials.filter((s) => s === "<|python_tag|>")).toHaveLength(1);
    expect(specials.filter((s) => s === "<|eom_id|>")).toHaveLength(1);
    expect(pieces.join("")).toContain("Tools: brave_search, <|python_tag|>wolfram_alpha\n\n");
  });
});
