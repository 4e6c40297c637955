#!/usr/bin/env python3
"""
RoPE inverse frequencies and attention scaling for Llama-family configs, transcribed from Hugging Face
transformers, as an outside reference for runtime/rope.ts (tests/rope.test.ts) and for
scripts/torch_llama_reference.py.

Transcribed from transformers 5.18.0 (src/transformers/modeling_rope_utils.py: the `_compute_*_parameters`
functions, `dynamic_rope_update` with its `dynamic_frequency_update` / `longrope_frequency_update`,
`RotaryEmbeddingConfigMixin.standardize_rope_params` / `validate_rope`; models/llama/modeling_llama.py:
`LlamaRotaryEmbedding`), checked against 4.57.6 (the last 4.x), from the PyPI wheels. Where the two differ
for a Llama config the 5.x behaviour is followed and the 4.x one is named in a comment.

With torch importable the functions run the same torch ops transformers runs (float32 tensors, python-float
scalars), so the values are transformers' own up to the CPU kernels of this torch build. Without torch the
same steps are computed in numpy float32 (each op rounded to float32, pow correctly rounded), which may
differ from torch by an ulp or two where torch's vectorized pow is not correctly rounded.

CLI (what the test runs):  python3 scripts/rope_reference.py < cases.json > out.json
  cases.json: [{"name": str, "config": {config.json fields}, "seq_lens": [int, ...],
                "stateful_seq_lens": [int, ...]}, ...]
  out.json:   {"backend": "torch 1.13.0" | "numpy 1.24.2",
               "cases": [{"name", "rope_type", "dim", "attention_factor",
                          "inv_freq": [float32 bits as uint32, ...]   (what a fresh model holds before any forward),
                          "per_run": [{"seq_len", "inv_freq", "attention_factor"}]   (one forward from a fresh model),
                          "stateful": [{"seq_len", "inv_freq", "attention_factor"}]  (consecutive forwards, one model)
                         } | {"name", "error": "KeyError: ..."}]}
"""
import json
import math
import sys

import numpy as np

try:
    import torch

    BACKEND = "torch " + torch.__version__
except ImportError:  # numpy float32 fallback
    torch = None
    BACKEND = "numpy " + np.__version__

F32 = np.float32


class RopeConfigError(KeyError):
    pass


# ---- config standardization (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict / standardize_rope_params) ----


def standardize(config):
    """config.json fields -> (rope parameters dict, head_dim, max_position_embeddings), as transformers 5.x builds them.

    5.x reads `rope_parameters` (what it writes) or the legacy `rope_scaling`; `rope_theta` and
    `partial_rotary_factor` move into it; `type` is the legacy name of `rope_type`; for llama3 / yarn / longrope
    a top-level `original_max_position_embeddings` (Phi-3 style) wins over the dict's, which defaults to
    max_position_embeddings. (4.57: LlamaConfig copies `type` over `rope_type`; yarn reads the dict's value or
    max_position_embeddings; longrope ignores the dict's value, see _longrope below.)
    """
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    if config.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", config["partial_rotary_factor"])
    params.setdefault("rope_type", params.get("type", "default"))
    max_pos = config.get("max_position_embeddings", 2048)  # LlamaConfig's default
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if config.get("original_max_position_embeddings") is not None:
            params["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", max_pos)
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    validate(params)
    return params, head_dim, max_pos


REQUIRED = {
    "default": {"rope_type"},
    "linear": {"rope_type", "factor"},
    "dynamic": {"rope_type", "factor"},
    "yarn": {"rope_type", "factor", "original_max_position_embeddings"},
    "longrope": {"rope_type", "short_factor", "long_factor", "original_max_position_embeddings"},
    "llama3": {"rope_type", "factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor", "rope_theta"},
}


def validate(params):
    rope_type = params["rope_type"]
    if rope_type not in REQUIRED:
        # validate_rope only warns; LlamaRotaryEmbedding.__init__ then fails on ROPE_INIT_FUNCTIONS[rope_type].
        raise RopeConfigError(rope_type)
    missing = REQUIRED[rope_type] - set(params)
    if missing:  # _check_received_keys
        raise RopeConfigError(f"Missing required keys in `rope_parameters` for 'rope_type'='{rope_type}': {sorted(missing)}")


def rotary_dim(params, head_dim):
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


# ---- torch: the transformers functions ----


def _t_default(params, head_dim, max_pos, seq_len=None):
    # LlamaRotaryEmbedding.compute_default_rope_parameters (5.x): dim = head_dim, partial_rotary_factor unused.
    base = params["rope_theta"]
    dim = head_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    return inv_freq, 1.0


def _t_linear(params, head_dim, max_pos, seq_len=None):
    factor = params["factor"]
    base = params["rope_theta"]
    dim = rotary_dim(params, head_dim)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    inv_freq /= factor
    return inv_freq, 1.0


def _t_dynamic(params, head_dim, max_pos, seq_len=None):
    base = params["rope_theta"]
    dim = rotary_dim(params, head_dim)
    factor = params["factor"]
    if seq_len is None:
        seq_len = max_pos
    elif isinstance(seq_len, torch.Tensor):
        seq_len = torch.maximum(seq_len, torch.tensor(max_pos, dtype=seq_len.dtype, device=seq_len.device))
    else:
        seq_len = max(seq_len, max_pos)
    base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    return inv_freq, 1.0


def _yarn_scalars(params, head_dim, max_pos):
    """The python-float part of _compute_yarn_parameters: factor, attention_factor, ramp bounds."""
    base = params["rope_theta"]
    dim = rotary_dim(params, head_dim)
    factor = params["factor"]
    attention_factor = params.get("attention_factor")
    mscale = params.get("mscale")
    mscale_all_dim = params.get("mscale_all_dim")
    original_max_position_embeddings = params["original_max_position_embeddings"]
    if factor is None:
        factor = max_pos / original_max_position_embeddings

    def get_mscale(scale, mscale=1):
        if scale <= 1:
            return 1.0
        return 0.1 * mscale * math.log(scale) + 1.0

    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim))
        else:
            attention_factor = get_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def find_correction_dim(num_rotations, dim, base, max_position_embeddings):
        return (dim * math.log(max_position_embeddings / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    def find_correction_range(low_rot, high_rot, dim, base, max_position_embeddings, truncate):
        low = find_correction_dim(low_rot, dim, base, max_position_embeddings)
        high = find_correction_dim(high_rot, dim, base, max_position_embeddings)
        if truncate:
            low = math.floor(low)
            high = math.ceil(high)
        return max(low, 0), min(high, dim - 1)

    truncate = params.get("truncate", True)
    low, high = find_correction_range(beta_fast, beta_slow, dim, base, original_max_position_embeddings, truncate)
    if low == high:
        high += 0.001  # linear_ramp_factor: prevent singularity
    return base, dim, factor, attention_factor, low, high


def _t_yarn(params, head_dim, max_pos, seq_len=None):
    base, dim, factor, attention_factor, low, high = _yarn_scalars(params, head_dim, max_pos)
    linear_func = (torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)
    ramp = torch.clamp(linear_func, 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    inv_freq_extrapolation = 1.0 / pos_freqs
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq_extrapolation_factor = 1 - ramp.to(dtype=torch.float)
    inv_freq = (
        inv_freq_interpolation * (1 - inv_freq_extrapolation_factor)
        + inv_freq_extrapolation * inv_freq_extrapolation_factor
    )
    return inv_freq, attention_factor


def _longrope_scalars(params, head_dim, max_pos):
    # 5.x. (4.57: original = a top-level config.original_max_position_embeddings, and then factor =
    # max_position_embeddings / original whatever rope_scaling.factor says; without the top-level field,
    # original = max_position_embeddings and rope_scaling's own original_max_position_embeddings is ignored.)
    factor = params.get("factor")
    attention_factor = params.get("attention_factor")
    original = params["original_max_position_embeddings"]
    if factor is None:
        factor = max_pos / original
    if attention_factor is None:
        if factor <= 1.0:
            attention_factor = 1.0
        else:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
    return factor, attention_factor, original


def _t_longrope(params, head_dim, max_pos, seq_len=None):
    base = params["rope_theta"]
    dim = rotary_dim(params, head_dim)
    _, attention_factor, original = _longrope_scalars(params, head_dim, max_pos)
    if seq_len and seq_len > original:
        ext_factors = torch.tensor(params["long_factor"], dtype=torch.float32)
    else:
        ext_factors = torch.tensor(params["short_factor"], dtype=torch.float32)
    inv_freq_shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    inv_freq = 1.0 / (ext_factors * base**inv_freq_shape)
    return inv_freq, attention_factor


def _t_llama3(params, head_dim, max_pos, seq_len=None):
    base = params["rope_theta"]
    dim = rotary_dim(params, head_dim)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))
    factor = params["factor"]
    low_freq_factor = params["low_freq_factor"]
    high_freq_factor = params["high_freq_factor"]
    old_context_len = params["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    inv_freq_llama = torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    return inv_freq_llama, 1.0


# ---- numpy: the same steps, each rounded to float32 ----
# torch evaluates `scalar / tensor` as tensor.reciprocal() * scalar (Tensor.__rtruediv__), and casts python
# scalars to the tensor's float32 before an elementwise op; both are mirrored here.


def _rdiv(scalar, t):
    return (F32(1) / t).astype(F32) * F32(scalar)


def _pow32(base, exponents):
    """float32 base ** float32 exponents, correctly rounded (float64 pow, rounded once); numpy's own float32
    power is off by a few ulps on some builds, torch's within one or two."""
    return (np.float64(F32(base)) ** np.asarray(exponents, dtype=F32).astype(np.float64)).astype(F32)


def _n_inv_freq(base, dim):
    exponents = (np.arange(0, dim, 2).astype(F32) / F32(dim)).astype(F32)
    return _rdiv(1.0, _pow32(base, exponents))


def _n_default(params, head_dim, max_pos, seq_len=None):
    return _n_inv_freq(params["rope_theta"], head_dim), 1.0


def _n_linear(params, head_dim, max_pos, seq_len=None):
    return (_n_inv_freq(params["rope_theta"], rotary_dim(params, head_dim)) / F32(params["factor"])).astype(F32), 1.0


def _n_dynamic(params, head_dim, max_pos, seq_len=None):
    base = params["rope_theta"]
    dim = rotary_dim(params, head_dim)
    factor = params["factor"]
    if seq_len is None or seq_len <= max_pos:  # the python-float path (init)
        s = max_pos
        base = base * ((factor * s / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    else:  # seq_len is a 0-d int64 tensor in transformers: float32 arithmetic
        a = F32(F32(factor) * F32(seq_len))
        b = F32(a / F32(max_pos))
        c = F32(b - F32(factor - 1))
        d = F32(np.float64(c) ** (dim / (dim - 2)))  # torch: float32 tensor ** python float is computed in double
        base = F32(F32(base) * d)
    return _n_inv_freq(base, dim), 1.0


def _n_yarn(params, head_dim, max_pos, seq_len=None):
    base, dim, factor, attention_factor, low, high = _yarn_scalars(params, head_dim, max_pos)
    linear_func = ((np.arange(dim // 2).astype(F32) - F32(low)) / F32(high - low)).astype(F32)
    ramp = np.clip(linear_func, F32(0), F32(1)).astype(F32)
    exponents = (np.arange(0, dim, 2).astype(F32) / F32(dim)).astype(F32)
    pos_freqs = _pow32(base, exponents)
    extrapolation = _rdiv(1.0, pos_freqs)
    interpolation = _rdiv(1.0, (F32(factor) * pos_freqs).astype(F32))
    ext_factor = (F32(1) - ramp).astype(F32)
    inv_freq = ((interpolation * (F32(1) - ext_factor)).astype(F32) + (extrapolation * ext_factor).astype(F32)).astype(F32)
    return inv_freq, attention_factor


def _n_longrope(params, head_dim, max_pos, seq_len=None):
    dim = rotary_dim(params, head_dim)
    _, attention_factor, original = _longrope_scalars(params, head_dim, max_pos)
    ext = np.asarray(params["long_factor"] if seq_len and seq_len > original else params["short_factor"], dtype=F32)
    exponents = (np.arange(0, dim, 2).astype(F32) / F32(dim)).astype(F32)
    return _rdiv(1.0, (ext * _pow32(params["rope_theta"], exponents)).astype(F32)), attention_factor


def _n_llama3(params, head_dim, max_pos, seq_len=None):
    dim = rotary_dim(params, head_dim)
    inv_freq = _n_inv_freq(params["rope_theta"], dim)
    factor = F32(params["factor"])
    low = params["low_freq_factor"]
    high = params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    low_wavelen = F32(old / low)
    high_wavelen = F32(old / high)
    wavelen = _rdiv(2 * math.pi, inv_freq)
    llama = np.where(wavelen > low_wavelen, (inv_freq / factor).astype(F32), inv_freq)
    smooth = ((_rdiv(old, wavelen) - F32(low)).astype(F32) / F32(high - low)).astype(F32)
    smoothed = ((((F32(1) - smooth) * llama).astype(F32) / factor).astype(F32) + (smooth * llama).astype(F32)).astype(F32)
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(medium, smoothed, llama).astype(F32), 1.0


TORCH_FUNCTIONS = {"default": _t_default, "linear": _t_linear, "dynamic": _t_dynamic, "yarn": _t_yarn, "longrope": _t_longrope, "llama3": _t_llama3}
NUMPY_FUNCTIONS = {"default": _n_default, "linear": _n_linear, "dynamic": _n_dynamic, "yarn": _n_yarn, "longrope": _n_longrope, "llama3": _n_llama3}


def rope_init(config, seq_len=None):
    """(inv_freq as numpy float32, attention_factor) as the rope init function of the config's type returns them."""
    params, head_dim, max_pos = standardize(config)
    if torch is not None:
        if seq_len is not None and not isinstance(seq_len, torch.Tensor):
            seq_len = torch.tensor(seq_len, dtype=torch.int64)  # torch.max(position_ids) + 1 in the forward
        inv_freq, attention_factor = TORCH_FUNCTIONS[params["rope_type"]](params, head_dim, max_pos, seq_len)
        return inv_freq.numpy().astype(F32), attention_factor
    if seq_len is not None:
        seq_len = int(seq_len)
    return NUMPY_FUNCTIONS[params["rope_type"]](params, head_dim, max_pos, seq_len)


class RotaryState:
    """LlamaRotaryEmbedding's frequency state across forwards (dynamic_rope_update), minus the cos/sin.

    dynamic: recomputes when seq_len = max(position_ids) + 1 grows past max_seq_len_cached (which starts at
    max_position_embeddings), and goes back to the original frequencies when seq_len drops below
    max_position_embeddings after having grown; so it depends on the forwards before. longrope: long factors
    iff seq_len > original_max_position_embeddings, no memory. Others: fixed.
    """

    def __init__(self, config):
        self.config = config
        self.params, _, self.max_pos = standardize(config)
        self.rope_type = self.params["rope_type"]
        self.inv_freq, self.attention_scaling = rope_init(config)
        self.original_inv_freq = self.inv_freq
        self.max_seq_len_cached = self.max_pos
        self.original_max_seq_len = self.max_pos
        self.long_inv_freq = None

    def forward(self, seq_len):
        """Frequencies and attention scaling a forward whose max(position_ids) + 1 is seq_len uses."""
        if self.rope_type == "dynamic":
            if seq_len > self.max_seq_len_cached:  # growth
                self.inv_freq, self.attention_scaling = rope_init(self.config, seq_len)
                self.max_seq_len_cached = seq_len
            if seq_len < self.original_max_seq_len and self.max_seq_len_cached > self.original_max_seq_len:  # reset
                self.inv_freq = self.original_inv_freq
                self.max_seq_len_cached = self.original_max_seq_len
        elif self.rope_type == "longrope":
            original = self.params["original_max_position_embeddings"]
            if seq_len > original:
                if self.long_inv_freq is None:
                    self.long_inv_freq, _ = rope_init(self.config, original + 1)
                self.inv_freq = self.long_inv_freq
            else:
                self.inv_freq = self.original_inv_freq
        return self.inv_freq, self.attention_scaling


def _bits(a):
    return np.asarray(a, dtype=F32).view(np.uint32).tolist()


def main():
    cases = json.load(sys.stdin)
    out = []
    for case in cases:
        try:
            params, head_dim, _ = standardize(case["config"])
            state = RotaryState(case["config"])
            entry = {
                "name": case["name"],
                "rope_type": params["rope_type"],
                "dim": rotary_dim(params, head_dim),
                "attention_factor": state.attention_scaling,
                "inv_freq": _bits(state.inv_freq),
                "per_run": [],
                "stateful": [],
            }
            for s in case.get("seq_lens", []):
                inv, att = RotaryState(case["config"]).forward(s)
                entry["per_run"].append({"seq_len": s, "inv_freq": _bits(inv), "attention_factor": att})
            for s in case.get("stateful_seq_lens", []):
                inv, att = state.forward(s)
                entry["stateful"].append({"seq_len": s, "inv_freq": _bits(inv), "attention_factor": att})
            out.append(entry)
        except KeyError as e:
            out.append({"name": case["name"], "error": f"KeyError: {e.args[0] if e.args else e}"})
    json.dump({"backend": BACKEND, "cases": out}, sys.stdout)


if __name__ == "__main__":
    main()
