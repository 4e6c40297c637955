import { describe, expect, test } from "bun:test";
import { parseToolCall } from "../runtime/tool-calls.ts";

describe("Llama-3.1 tool-call replies", () => {
  const tools = new Set(["get_weather"]);
  test("a JSON call to a known tool becomes name + JSON arguments", () => {
    expect(parseToolCall(' {"name": "get_weather", "parameters": {"city": "Paris"}} ', tools)).toEqual({ name: "get_weather", arguments: '{"city":"Paris"}' });
    expect(parseToolCall('<|python_tag|>{"name": "get_weather", "parameters": {}}', tools)).toEqual({ name: "get_weather", arguments: "{}" });
  });
  test("anything else stays content", () => {
    expect(parseToolCall("The weather is fine.", tools)).toBeNull();
    expect(parseToolCall('{"name": "launch_rockets", "parameters": {}}', tools)).toBeNull();
    expect(parseToolCall('{"name": "get_weather", "parameters": 3}', tools)).toBeNull();
    expect(parseToolCall('{"name": "get_weather", ', tools)).toBeNull();
  });
});
