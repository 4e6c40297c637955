export { Engine, type EngineOptions, type EngineInfo, type CompletionJob } from "./engine.ts";
export { RuntimeError, ModelFolderError, invalidRequest, type RuntimeErrorKind } from "./errors.ts";
export type { ChatMessage, ToolDefinition, ToolCall, RenderOptions } from "./chat-template.ts";
export type { GenerateResult, FinishReason } from "./generate.ts";
export type { SamplingParams } from "./sampling.ts";
export { MODEL_VARIANT_NAMES, type ModelVariant } from "./model-folder.ts";
export type { BackendName, BackendRequest } from "./backend.ts";
export { parseToolCall, type ParsedToolCall } from "./tool-calls.ts";
