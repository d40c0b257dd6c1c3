#!/usr/bin/env python3
"""Reference outputs of PaTH and PaTH-FoX attention from fla's own `naive_path_attn` (fla-core,
`fla/ops/path_attn/naive.py`), for tests/fixtures/path_fla.json, which `tests/path.rs` checks
our attention layer against.

    python -m pip install --no-deps --target /tmp/fla-core fla-core==0.6.0   # next to torch
    python -m pip install einops                                              # naive.py imports it
    FLA_CORE=/tmp/fla-core python scripts/path-cases.py > tests/fixtures/path_fla.json

The naive function's file imports only torch and einops; it is loaded by path, so that fla's
package `__init__` (Triton kernels) is never imported and the script runs on a CPU.

Each case is one causal layer input `x` `[T, d_model]` and every parameter of the layer, in
burn's `Linear` layout (`weight` `[d_in, d_out]`, `y = x·W + b`):
- the QKV projection (q's heads, then k's, then v's);
- PaTH's `w` projection `w_down` `[d_model, rank]`, `w_up` `[rank, d_model]` (no biases), the
  causal depthwise convolution's taps `conv` `[3, d_model]` (oldest first);
- the strengths' projection `beta_weight` `[d_model, heads]`, `beta_bias` `[heads]`;
- for PaTH-FoX, the forget gate's `gate_weight` `[d_model, heads]`, `gate_bias` `[heads]`.

The layer's input to the attention core follows fla's `PaTHAttention` (fla/layers/path_attn.py):
`w = l2norm(silu(conv(x·w_down·w_up)))` per head, `β = 2σ(x·W_β + b_β)`,
`g = logsigmoid(x·W_g + b_g)` (zeros for PaTH); fla's naive function then gives the output
`o` `[T, heads·d_head]` (heads side by side). fla's function computes in float32; its block size
is set small (`chunk`), so that its inter-block sweep runs at these lengths.
"""
import importlib.util
import json
import os
import sys

import torch
import torch.nn.functional as F

ROOT = os.environ.get("FLA_CORE", "/tmp/fla-core")
PATH = os.path.join(ROOT, "fla", "ops", "path_attn", "naive.py")
spec = importlib.util.spec_from_file_location("fla_path_naive", PATH)
naive = importlib.util.module_from_spec(spec)
spec.loader.exec_module(naive)

# (name, T, d_model, heads, rank, forget gate, fla's block size, weight scale)
CASES = [
    ("path small", 7, 8, 2, 4, False, 4, 0.5),
    ("path four heads, several blocks", 19, 16, 4, 8, False, 4, 0.4),
    ("path_fox small", 9, 8, 2, 4, True, 4, 0.5),
    ("path_fox longer", 21, 16, 4, 8, True, 8, 0.4),
]


def case(name, t, d_model, heads, rank, gate, chunk, scale, seed):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, s=scale):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * s

    x = draw(t, d_model, s=1.0)
    qkv_weight, qkv_bias = draw(d_model, 3 * d_model), draw(3 * d_model, s=0.1)
    w_down, w_up = draw(d_model, rank), draw(rank, d_model)
    conv = draw(3, d_model, s=0.6)
    beta_weight, beta_bias = draw(d_model, heads), draw(heads, s=0.5)
    gate_weight, gate_bias = draw(d_model, heads), draw(heads, s=0.5) + 2.0

    dh = d_model // heads
    qkv = x @ qkv_weight + qkv_bias
    q, k, v = (qkv[:, i * d_model:(i + 1) * d_model].reshape(1, t, heads, dh) for i in range(3))
    pre = x @ w_down @ w_up
    padded = torch.cat([torch.zeros(2, d_model, dtype=torch.float64), pre], 0)
    mixed = sum(conv[tap] * padded[tap:tap + t] for tap in range(3))
    w = F.silu(mixed).reshape(1, t, heads, dh)
    w = w / torch.sqrt((w * w).sum(-1, keepdim=True) + 1e-6)
    beta = (2 * torch.sigmoid(x @ beta_weight + beta_bias)).reshape(1, t, heads)
    if gate:
        g_log = F.logsigmoid(x @ gate_weight + gate_bias).reshape(1, t, heads)
    else:
        g_log = torch.zeros(1, t, heads, dtype=torch.float64)
    o = naive.naive_path_attn(q, k, v, w, beta, g_log, scale=dh ** -0.5, chunk_size=chunk)
    out = {
        "name": name,
        "encoding": "path_fox" if gate else "path",
        "heads": heads,
        "rank": rank,
        "shape": [t, d_model],
        "x": x.flatten().tolist(),
        "qkv_weight": qkv_weight.flatten().tolist(),
        "qkv_bias": qkv_bias.tolist(),
        "w_down": w_down.flatten().tolist(),
        "w_up": w_up.flatten().tolist(),
        "conv": conv.flatten().tolist(),
        "beta_weight": beta_weight.flatten().tolist(),
        "beta_bias": beta_bias.tolist(),
        "o": o.reshape(t, d_model).flatten().tolist(),
    }
    if gate:
        out["gate_weight"] = gate_weight.flatten().tolist()
        out["gate_bias"] = gate_bias.tolist()
    return out


def main():
    cases = [case(*c, seed=i + 1) for i, c in enumerate(CASES)]
    json.dump({"source": "fla-core 0.6.0, fla/ops/path_attn/naive.py (naive_path_attn)",
               "cases": cases}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
