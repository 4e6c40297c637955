/**
 * A model folder whose weights are written by hand instead of trained, so that greedy decoding says
 * exactly what a test scripts: a bigram table. Every layer adds nothing to the residual stream (o_proj and
 * down_proj are zero), so the last hidden state is the embedding of the token just read; each scripted
 * token's embedding is a one-hot row of its own, and lm_head gives each of its successors the scripted
 * logit (every other token 0). The folder is built by the real builder (scripts/lib/model-folder.ts: the
 * same graphs, tokenizer and chat template as the built-in model) and served by the real engine; only
 * the weights say what comes next. logit_bias in a request picks among a token's scripted successors.
 */
import { buildModelFolder } from "../../scripts/lib/model-folder.ts";
import { TINY_LLAMA_CONFIG, llamaWeightSpecs, type LlamaConfig, type LlamaWeights } from "../../scripts/lib/onnx-llama.ts";

/** token id -> its successors and their logits (the highest wins under greedy decoding). */
export type Bigrams = Map<number, { id: number; logit: number }[]>;

/** Adds `chain[0] -> chain[1] -> ... -> end` to `table` at `logit`; a token may lead on in only one chain. */
export function addChain(table: Bigrams, chain: number[], end: number, logit = 30): void {
  const path = [...chain, end];
  for (let i = 0; i + 1 < path.length; i++) {
    const from = path[i]!;
    if (i > 0 && table.has(from)) throw new Error(`token ${from} already leads somewhere: the script would be ambiguous`);
    const next = table.get(from) ?? [];
    next.push({ id: path[i + 1]!, logit });
    table.set(from, next);
  }
}

export const SCRIPTED_CONFIG: LlamaConfig = { ...TINY_LLAMA_CONFIG, num_hidden_layers: 1 };

/** The weights of a model that follows `table` greedily. */
export function scriptedWeights(table: Bigrams, config: LlamaConfig = SCRIPTED_CONFIG): LlamaWeights {
  const H = config.hidden_size;
  const sources = [...table.keys()];
  if (sources.length > H) throw new Error(`${sources.length} scripted tokens need a hidden size of at least that (${H})`);
  const weights: LlamaWeights = {};
  for (const spec of llamaWeightSpecs(config)) {
    const data = new Float32Array(spec.dims.reduce((a, b) => a * b, 1));
    if (spec.kind === "norm") data.fill(1);
    weights[spec.name] = { dims: spec.dims, data };
  }
  const embed = weights["model.embed_tokens.weight"]!.data;
  const head = weights["lm_head.weight"]!.data;
  // The final RMSNorm turns a one-hot row into sqrt(H) in its slot (eps aside): lm_head divides that out.
  const scale = Math.sqrt(1 / H + config.rms_norm_eps);
  sources.forEach((token, slot) => {
    embed[token * H + slot] = 1;
    for (const { id, logit } of table.get(token)!) head[id * H + slot] = logit * scale;
  });
  return weights;
}

/** Builds the folder at `dir` (about two seconds). */
export async function buildScriptedModel(dir: string, table: Bigrams): Promise<void> {
  await buildModelFolder(dir, SCRIPTED_CONFIG, scriptedWeights(table));
}
