/**
 * Backend choice: one ORT API (onnxruntime-common) driven through three builds.
 *
 *   webgpu  onnxruntime-web/webgpu on navigator.gpu (hardware adapters only under "auto")
 *   native  onnxruntime-node on the CPU (optional dependency; ~5x faster than WASM on server CPUs)
 *   wasm    onnxruntime-web's WASM SIMD build, the fallback that runs everywhere
 */
import type * as OrtWeb from "onnxruntime-web";
import { RuntimeError } from "./errors.ts";

export type Ort = typeof OrtWeb;
export type BackendName = "webgpu" | "native" | "wasm";
export type BackendRequest = BackendName | "auto";

export interface Backend {
  name: BackendName;
  ort: Ort;
  /** Execution providers passed to InferenceSession.create. */
  executionProviders: string[];
  /** Human-readable detail for logs and /health (adapter name, thread count, ORT version). */
  detail: string;
  threads: number;
}

const SOFTWARE_ADAPTER = /llvmpipe|lavapipe|swiftshader|software|microsoft basic render/i;

interface GpuAdapterLike {
  isFallbackAdapter?: boolean;
  info?: { vendor?: string; architecture?: string; device?: string; description?: string; isFallbackAdapter?: boolean };
}
interface GpuLike {
  requestAdapter(options?: Record<string, unknown>): Promise<GpuAdapterLike | null>;
}

/** Describes the WebGPU adapter the runtime can see, or null when there is none. */
async function probeWebGpu(): Promise<{ name: string; software: boolean } | null> {
  const gpu = (globalThis as { navigator?: { gpu?: GpuLike } }).navigator?.gpu;
  if (!gpu) return null;
  try {
    const adapter = await gpu.requestAdapter({ powerPreference: "high-performance" });
    if (!adapter) return null;
    const info = adapter.info ?? {};
    const name = [info.vendor, info.architecture, info.device, info.description].filter(Boolean).join(" ") || "unknown adapter";
    const fallback = adapter.isFallbackAdapter === true || info.isFallbackAdapter === true;
    return { name, software: fallback || SOFTWARE_ADAPTER.test(name) };
  } catch {
    return null;
  }
}

async function loadNative(): Promise<Ort | null> {
  try {
    // The specifier is held in a variable so bundlers and type checkers treat the package as optional.
    const specifier = "onnxruntime-node";
    return (await import(specifier)) as Ort;
  } catch {
    return null;
  }
}

async function loadWasm(threads: number): Promise<Ort> {
  const ort = (await import("onnxruntime-web")) as Ort;
  ort.env.wasm.numThreads = threads;
  ort.env.logLevel = "error";
  return ort;
}

/**
 * onnxruntime-node 1.30 hands float16 tensors to JS as Float16Array where the runtime has one (Bun, Deno),
 * and then cannot read them back as inputs ("not enough space: expected N, got 0"). A graph with float16
 * KV therefore runs natively only under Node.
 */
function nativeFloat16Broken(): boolean {
  return typeof (globalThis as { Float16Array?: unknown }).Float16Array !== "undefined";
}

export interface BackendNeeds {
  /** The graph takes and returns float16 tensors (fp16 / q4f16 variants). */
  float16Io: boolean;
}

export async function selectBackend(request: BackendRequest, threads: number, needs: BackendNeeds = { float16Io: false }): Promise<Backend> {
  if (request === "webgpu" || request === "auto") {
    const adapter = await probeWebGpu();
    if (adapter && (request === "webgpu" || !adapter.software)) {
      const ort = (await import("onnxruntime-web/webgpu")) as Ort;
      ort.env.logLevel = "error";
      return {
        name: "webgpu",
        ort,
        executionProviders: ["webgpu"],
        detail: `webgpu on ${adapter.name}${adapter.software ? " (software)" : ""}`,
        threads: 1,
      };
    }
    if (request === "webgpu") {
      throw new RuntimeError(
        "backend_unavailable",
        "backend=webgpu was requested but no WebGPU adapter is available (navigator.gpu is missing or returned no adapter)",
      );
    }
  }
  const float16Blocked = needs.float16Io && nativeFloat16Broken();
  if (request === "native" && float16Blocked) {
    throw new RuntimeError(
      "backend_unavailable",
      "backend=native cannot run a float16 graph in this JS runtime (onnxruntime-node cannot take back its own Float16Array outputs outside Node); use backend=wasm or an fp32 variant",
    );
  }
  if (request === "native" || (request === "auto" && !float16Blocked)) {
    const ort = await loadNative();
    if (ort) {
      return { name: "native", ort, executionProviders: ["cpu"], detail: `onnxruntime-node ${ort.env.versions?.node ?? ""} cpu, ${threads} thread(s)`, threads };
    }
    if (request === "native") {
      throw new RuntimeError(
        "backend_unavailable",
        "backend=native was requested but onnxruntime-node is not installed or failed to load in this runtime",
      );
    }
  }
  const ort = await loadWasm(threads);
  return { name: "wasm", ort, executionProviders: ["wasm"], detail: `onnxruntime-web ${ort.env.versions?.web ?? ""} wasm, ${threads} thread(s)`, threads };
}
