#!/usr/bin/env python3
"""Reference outputs of stick-breaking attention from fla's own `naive_stickbreaking_attn`
(fla-core, `fla/ops/stickbreaking_attn/naive.py`), for tests/fixtures/stick_breaking_fla.json,
which `tests/reference.rs` checks our attention layer against.

    python -m pip install --no-deps --target /tmp/fla-core fla-core==0.6.0   # next to torch
    FLA_CORE=/tmp/fla-core python scripts/stick-breaking-cases.py > tests/fixtures/stick_breaking_fla.json

The naive function's file imports only torch; it is loaded by path, so that fla's package
`__init__` (Triton kernels) is never imported and the script runs on a CPU.

Each case is one causal layer input: `x` `[T, d_model]`, the QKV projection (burn's `Linear`
layout: `weight` `[d_model, 3·d_model]`, `y = x·W + b`; q's heads, then k's, then v's), the
number of heads and `attend_current`, and fla's output `o` `[T, heads·d_head]` (heads side by
side) and the stick each query leaves over, `rem` `[T, heads]`. Values are drawn in float64 and
computed in float64.
"""
import importlib.util
import json
import os
import sys

import torch

ROOT = os.environ.get("FLA_CORE", "/tmp/fla-core")
PATH = os.path.join(ROOT, "fla", "ops", "stickbreaking_attn", "naive.py")
spec = importlib.util.spec_from_file_location("fla_sb_naive", PATH)
naive = importlib.util.module_from_spec(spec)
spec.loader.exec_module(naive)

# (name, T, d_model, heads, attend_current, weight scale): the last case drives the logits into
# saturation (|z| in the tens), where a naive log(1 - sigmoid) would lose everything.
CASES = [
    ("small", 7, 8, 2, False, 0.5),
    ("small attend_current", 7, 8, 2, True, 0.5),
    ("longer, four heads", 19, 16, 4, False, 0.4),
    ("saturated logits", 12, 8, 2, False, 4.0),
]


def case(name, t, d_model, heads, attend_current, scale, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, d_model, generator=g, dtype=torch.float64)
    weight = torch.randn(d_model, 3 * d_model, generator=g, dtype=torch.float64) * scale
    bias = torch.randn(3 * d_model, generator=g, dtype=torch.float64) * 0.1
    qkv = x @ weight + bias
    dh = d_model // heads
    q, k, v = (qkv[:, i * d_model:(i + 1) * d_model].reshape(1, t, heads, dh) for i in range(3))
    o, rem = naive.naive_stickbreaking_attn(q, k, v, attend_current=attend_current)
    return {
        "name": name,
        "heads": heads,
        "attend_current": attend_current,
        "x": x.flatten().tolist(),
        "shape": [t, d_model],
        "qkv_weight": weight.flatten().tolist(),
        "qkv_bias": bias.tolist(),
        "o": o.reshape(t, d_model).flatten().tolist(),
        "rem": rem.reshape(t, heads).flatten().tolist(),
    }


def main():
    cases = [case(*c, seed=i + 1) for i, c in enumerate(CASES)]
    json.dump({"source": "fla-core 0.6.0, fla/ops/stickbreaking_attn/naive.py",
               "cases": cases}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
