#!/usr/bin/env python3
"""
A plain Llama forward pass over a Hugging Face checkpoint folder, in float32, as an outside reference for
the graphs this repository builds and imports (issue 13). No transformers, no safetensors package: the
checkpoint is read with json/struct/numpy, the math is PyTorch's (Debian python3-torch) or, without torch,
the same steps in numpy float32.

  python3 scripts/torch_llama_reference.py --model DIR --ids 1,2,3 [--positions 0,1,2] [--out logits.f32]
                                           [--backend auto|torch|numpy]

DIR holds config.json and model.safetensors, or shards model-0000X-of-0000N.safetensors with
model.safetensors.index.json. Tensors F32, F16 or BF16 (BF16 widened to float32 by shifting its 16 bits into
the high half of a uint32). Weights are read per layer through a memory map, so memory stays near one
layer's worth plus the embedding and lm_head.

Writes the logits of every position, [S, vocab_size], as raw little-endian float32 to --out, and prints one
JSON object to stdout: {"argmax": [...], "backend": ..., "rope": {"type", "seq_len", "attention_factor"}}.

The forward is transformers' LlamaForCausalLM (eager attention, no cache, batch 1) written out:
  embed_tokens -> per layer: x + o_proj(attn(rms(x))), then x + down(silu(gate(rms(x))) * up(rms(x))) -> rms -> lm_head
  RMSNorm: w * (x * rsqrt(mean(x^2) + eps)), float32.
  q/k/v/o: nn.Linear (x @ W.T, plus a bias if the checkpoint has one); GQA by repeat_kv.
  RoPE: rotate_half, cos/sin = cos/sin(position * inv_freq) * attention_factor, inv_freq and attention_factor
        from scripts/rope_reference.py for the config's rope type, picked for this forward from
        seq_len = max(position_ids) + 1 as dynamic_rope_update does on a freshly loaded model (dynamic NTK,
        longrope).
  attention: softmax(q k^T / sqrt(head_dim) + causal mask) v, the mask by token index (as transformers' mask
        on cache positions; position ids only feed RoPE), masked scores at float32's lowest value.
"""
import argparse
import json
import math
import os
import struct
import sys

import numpy as np

sys.dont_write_bytecode = True  # no scripts/__pycache__ in the working tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import rope_reference  # noqa: E402  (same directory)

F32 = np.float32


# ---- checkpoint reading ----


class Checkpoint:
    """name -> float32 numpy array, read lazily from one or many safetensors files."""

    def __init__(self, folder):
        self.folder = folder
        index = os.path.join(folder, "model.safetensors.index.json")
        single = os.path.join(folder, "model.safetensors")
        if os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            files = sorted(set(weight_map.values()))
        elif os.path.exists(single):
            files = ["model.safetensors"]
        else:
            raise SystemExit(f"{folder}: neither model.safetensors nor model.safetensors.index.json")
        self.entries = {}
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.exists(path):
                raise SystemExit(f"{path}: shard named by the index is missing")
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            for tensor, meta in header.items():
                if tensor == "__metadata__":
                    continue
                self.entries[tensor] = (path, 8 + n, meta)
        self.maps = {}

    def __contains__(self, name):
        return name in self.entries

    def get(self, name):
        if name not in self.entries:
            raise SystemExit(f"{self.folder}: tensor {name} is missing")
        path, base, meta = self.entries[name]
        if path not in self.maps:
            self.maps[path] = np.memmap(path, dtype=np.uint8, mode="r")
        start, end = meta["data_offsets"]
        raw = self.maps[path][base + start : base + end]
        shape = tuple(meta["shape"])
        dtype = meta["dtype"]
        if dtype == "F32":
            out = raw.view("<f4")
        elif dtype == "F16":
            out = raw.view("<f2").astype(F32)
        elif dtype == "BF16":
            out = (raw.view("<u2").astype(np.uint32) << 16).view(F32)
        else:
            raise SystemExit(f"{path}: tensor {name} has dtype {dtype} (F32, F16 and BF16 are read)")
        if out.size != int(np.prod(shape, dtype=np.int64)):
            raise SystemExit(f"{path}: tensor {name} has {out.size} values for shape {list(shape)}")
        return np.array(out, dtype=F32).reshape(shape)


# ---- the two backends: the same steps, torch or numpy ----


class TorchOps:
    def __init__(self):
        import torch

        self.torch = torch
        self.name = "torch " + torch.__version__

    def array(self, a):
        return self.torch.from_numpy(np.ascontiguousarray(a, dtype=F32))

    def numpy(self, t):
        return t.numpy()

    def rms_norm(self, x, w, eps):
        variance = x.pow(2).mean(-1, keepdim=True)
        return w * (x * self.torch.rsqrt(variance + eps))

    def linear(self, x, w, b=None):
        return self.torch.nn.functional.linear(x, w, b)

    def swap_last(self, x):
        return x.transpose(-1, -2)

    def heads(self, x, n, d):  # [S, n*d] -> [n, S, d]
        return x.view(x.shape[0], n, d).transpose(0, 1)

    def merge_heads(self, x):  # [n, S, d] -> [S, n*d]
        return x.transpose(0, 1).reshape(x.shape[1], -1)

    def repeat_kv(self, x, groups):
        return x.repeat_interleave(groups, dim=0)

    def cat_last(self, a, b):
        return self.torch.cat((a, b), dim=-1)

    def softmax(self, x):
        return self.torch.nn.functional.softmax(x, dim=-1, dtype=self.torch.float32)

    def silu(self, x):
        return self.torch.nn.functional.silu(x)

    def cos(self, x):
        return x.cos()

    def sin(self, x):
        return x.sin()


class NumpyOps:
    name = "numpy " + np.__version__

    def array(self, a):
        return np.ascontiguousarray(a, dtype=F32)

    def numpy(self, t):
        return t

    def rms_norm(self, x, w, eps):
        variance = np.mean(x * x, axis=-1, keepdims=True, dtype=F32)
        return w * (x * (F32(1) / np.sqrt(variance + F32(eps))))

    def linear(self, x, w, b=None):
        y = x @ w.T
        return y if b is None else y + b

    def swap_last(self, x):
        return np.swapaxes(x, -1, -2)

    def heads(self, x, n, d):
        return x.reshape(x.shape[0], n, d).transpose(1, 0, 2)

    def merge_heads(self, x):
        return np.ascontiguousarray(x.transpose(1, 0, 2)).reshape(x.shape[1], -1)

    def repeat_kv(self, x, groups):
        return np.repeat(x, groups, axis=0)

    def cat_last(self, a, b):
        return np.concatenate((a, b), axis=-1)

    def softmax(self, x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    def silu(self, x):
        return x / (F32(1) + np.exp(-x))

    def cos(self, x):
        return np.cos(x)

    def sin(self, x):
        return np.sin(x)


# ---- the forward ----


def forward(folder, ids, positions, ops):
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    arch = config.get("architectures") or ["LlamaForCausalLM"]
    if config.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in arch:
        raise SystemExit(f"model_type {config.get('model_type')} / {arch}: only Llama is implemented")
    if config.get("hidden_act", "silu") != "silu":
        raise SystemExit(f"hidden_act {config['hidden_act']}: only silu is implemented")
    H = config["hidden_size"]
    NH = config["num_attention_heads"]
    KV = config.get("num_key_value_heads") or NH
    D = config.get("head_dim") or H // NH
    eps = config.get("rms_norm_eps", 1e-6)
    V = config["vocab_size"]
    S = len(ids)
    ckpt = Checkpoint(folder)
    w = lambda name: ops.array(ckpt.get(name))  # noqa: E731
    bias = lambda name: w(name) if name in ckpt else None  # noqa: E731

    # RoPE: as LlamaRotaryEmbedding on a freshly loaded model, for this forward's max(position_ids) + 1.
    rope_config = dict(config, head_dim=D)
    state = rope_reference.RotaryState(rope_config)
    seq_len = int(max(positions)) + 1
    inv_freq, attention_factor = state.forward(seq_len)
    pos = ops.array(np.asarray(positions, dtype=F32)[:, None])  # position_ids.float()
    freqs = pos @ ops.array(inv_freq[None, :])  # [S, D/2]: inv_freq_expanded @ position_ids_expanded, transposed
    emb = ops.cat_last(freqs, freqs)
    cos = ops.cos(emb) * attention_factor
    sin = ops.sin(emb) * attention_factor

    def rope(x):  # x: [heads, S, D]
        x1, x2 = x[..., : D // 2], x[..., D // 2 :]
        return x * cos + ops.cat_last(-x2, x1) * sin

    lowest = float(np.finfo(F32).min)
    mask = np.triu(np.full((S, S), lowest, dtype=F32), k=1)  # query row i sees key slots 0..i
    mask = ops.array(mask)
    scaling = D**-0.5

    emb_table = ckpt.get("model.embed_tokens.weight")
    if emb_table.shape != (V, H):
        raise SystemExit(f"model.embed_tokens.weight has shape {list(emb_table.shape)}, expected [{V}, {H}]")
    hidden = ops.array(emb_table[np.asarray(ids, dtype=np.int64)])  # [S, H]
    for layer in range(config["num_hidden_layers"]):
        p = f"model.layers.{layer}"
        x = ops.rms_norm(hidden, w(f"{p}.input_layernorm.weight"), eps)
        q = ops.linear(x, w(f"{p}.self_attn.q_proj.weight"), bias(f"{p}.self_attn.q_proj.bias"))
        k = ops.linear(x, w(f"{p}.self_attn.k_proj.weight"), bias(f"{p}.self_attn.k_proj.bias"))
        v = ops.linear(x, w(f"{p}.self_attn.v_proj.weight"), bias(f"{p}.self_attn.v_proj.bias"))
        q = rope(ops.heads(q, NH, D))  # [NH, S, D]
        k = rope(ops.heads(k, KV, D))  # [KV, S, D]
        v = ops.heads(v, KV, D)
        k = ops.repeat_kv(k, NH // KV)  # query head h reads kv head h // (NH / KV)
        v = ops.repeat_kv(v, NH // KV)
        scores = (q @ ops.swap_last(k)) * scaling + mask
        context = ops.merge_heads(ops.softmax(scores) @ v)  # [S, NH * D]
        hidden = hidden + ops.linear(context, w(f"{p}.self_attn.o_proj.weight"), bias(f"{p}.self_attn.o_proj.bias"))
        y = ops.rms_norm(hidden, w(f"{p}.post_attention_layernorm.weight"), eps)
        gate = ops.linear(y, w(f"{p}.mlp.gate_proj.weight"), bias(f"{p}.mlp.gate_proj.bias"))
        up = ops.linear(y, w(f"{p}.mlp.up_proj.weight"), bias(f"{p}.mlp.up_proj.bias"))
        hidden = hidden + ops.linear(ops.silu(gate) * up, w(f"{p}.mlp.down_proj.weight"), bias(f"{p}.mlp.down_proj.bias"))
    hidden = ops.rms_norm(hidden, w("model.norm.weight"), eps)
    if "lm_head.weight" in ckpt:
        head = w("lm_head.weight")
    elif config.get("tie_word_embeddings", False):
        head = ops.array(emb_table)
    else:
        raise SystemExit("lm_head.weight is missing and tie_word_embeddings is not set")
    logits = ops.numpy(ops.linear(hidden, head)).astype(F32)
    rope_info = {"type": state.rope_type, "seq_len": seq_len, "attention_factor": attention_factor}
    return logits, rope_info


NUMPY = NumpyOps()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--ids", required=True, help="comma-separated token ids")
    parser.add_argument("--positions", help="comma-separated position ids (default 0..S-1)")
    parser.add_argument("--out", help="file for the [S, vocab] float32 logits")
    parser.add_argument("--backend", choices=["auto", "torch", "numpy"], default="auto")
    args = parser.parse_args()
    ids = [int(x) for x in args.ids.split(",") if x != ""]
    positions = [int(x) for x in args.positions.split(",")] if args.positions else list(range(len(ids)))
    if not ids or len(positions) != len(ids):
        raise SystemExit("--ids must be non-empty and --positions as long as --ids")
    if args.backend == "numpy" or (args.backend == "auto" and rope_reference.torch is None):
        ops = NUMPY
        if rope_reference.torch is not None:
            rope_reference.torch = None  # the rope values in numpy too
            rope_reference.BACKEND = NUMPY.name
    else:
        if rope_reference.torch is None:
            raise SystemExit("--backend torch: torch is not importable")
        ops = TorchOps()
        ops.torch.set_grad_enabled(False)
    logits, rope_info = forward(args.model, ids, positions, ops)
    if args.out:
        logits.astype("<f4").tofile(args.out)
    json.dump({"argmax": logits.argmax(axis=-1).tolist(), "backend": ops.name, "rope": rope_info, "shape": list(logits.shape)}, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
