#!/usr/bin/env python3
"""Reference RoPE frequencies and attention factors from Hugging Face `transformers`
(`modeling_rope_utils`), for tests/fixtures/rope_hf.json, which `tests/reference.rs` checks
`RopeConfig` against.

    python -m pip install --target /tmp/hf transformers   # next to a torch install
    PYTHONPATH=/tmp/hf python scripts/rope-hf-cases.py > tests/fixtures/rope_hf.json

Each case names our `RopeConfig` fields, the encoding (`rope_linear`, `rope_dynamic_ntk`,
`rope_yarn`), the head size, the sequence length the frequencies are for (dynamic NTK), and
what `transformers` computes: `inv_freq` and `attention_factor`.
"""
import json
import sys

import torch
import transformers
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

# (name, encoding, head_dim, seq_len, our RopeConfig fields, extra HF rope_parameters)
CASES = [
    ("linear", "rope_linear", 64, None, {"base": 10000.0, "scale_factor": 4.0}, {}),
    ("linear partial", "rope_linear", 64, None,
     {"base": 500000.0, "scale_factor": 8.0, "rotary_fraction": 0.5}, {}),
    ("dynamic below L0", "rope_dynamic_ntk", 64, 300,
     {"base": 10000.0, "scale_factor": 2.0, "original_max_len": 512}, {}),
    ("dynamic above L0", "rope_dynamic_ntk", 64, 2048,
     {"base": 10000.0, "scale_factor": 2.0, "original_max_len": 512}, {}),
    ("dynamic partial", "rope_dynamic_ntk", 128, 9000,
     {"base": 10000.0, "scale_factor": 4.0, "original_max_len": 4096, "rotary_fraction": 0.25}, {}),
    ("yarn default", "rope_yarn", 64, None,
     {"base": 10000.0, "scale_factor": 4.0, "original_max_len": 512}, {}),
    ("yarn betas partial", "rope_yarn", 128, None,
     {"base": 500000.0, "scale_factor": 16.0, "original_max_len": 8192, "beta_fast": 16.0,
      "beta_slow": 2.0, "rotary_fraction": 0.5}, {}),
    ("yarn attention factor", "rope_yarn", 64, None,
     {"base": 10000.0, "scale_factor": 4.0, "original_max_len": 2048, "attention_factor": 1.25}, {}),
    ("yarn mscale (DeepSeek-V3 style)", "rope_yarn", 64, None,
     {"base": 10000.0, "scale_factor": 40.0, "original_max_len": 4096, "mscale": 1.0,
      "mscale_all_dim": 0.5}, {}),
    ("yarn mscale equal", "rope_yarn", 64, None,
     {"base": 10000.0, "scale_factor": 40.0, "original_max_len": 4096, "mscale": 0.707,
      "mscale_all_dim": 0.707}, {}),
    ("yarn mscale alone is ignored", "rope_yarn", 64, None,
     {"base": 10000.0, "scale_factor": 8.0, "original_max_len": 4096, "mscale": 2.0}, {}),
    ("yarn no truncation", "rope_yarn", 64, None,
     {"base": 150000.0, "scale_factor": 32.0, "original_max_len": 4096, "truncate": False}, {}),
    ("yarn wide ramp", "rope_yarn", 16, None,
     {"base": 50.0, "scale_factor": 4.0, "original_max_len": 65536}, {}),
]


def hf_parameters(encoding, fields):
    rope_type = {"rope_linear": "linear", "rope_dynamic_ntk": "dynamic", "rope_yarn": "yarn"}[encoding]
    params = {"rope_type": rope_type, "rope_theta": fields["base"], "factor": fields["scale_factor"]}
    if "rotary_fraction" in fields:
        params["partial_rotary_factor"] = fields["rotary_fraction"]
    if rope_type == "yarn":
        params["original_max_position_embeddings"] = fields["original_max_len"]
        for ours, theirs in [("beta_fast", "beta_fast"), ("beta_slow", "beta_slow"),
                             ("attention_factor", "attention_factor"), ("mscale", "mscale"),
                             ("mscale_all_dim", "mscale_all_dim"), ("truncate", "truncate")]:
            if ours in fields:
                params[theirs] = fields[ours]
    return rope_type, params


def main():
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "cases": []}
    for name, encoding, head_dim, seq_len, fields, extra in CASES:
        rope_type, params = hf_parameters(encoding, fields)
        params.update(extra)
        heads = 4
        # Dynamic NTK scales from `max_position_embeddings`; YaRN from the original length.
        max_pos = fields.get("original_max_len", 2048)
        if rope_type == "yarn":
            max_pos = int(fields["original_max_len"] * fields["scale_factor"])
        config = LlamaConfig(hidden_size=head_dim * heads, num_attention_heads=heads,
                             head_dim=head_dim, max_position_embeddings=max_pos,
                             rope_parameters=params)
        inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len)
        out["cases"].append({
            "name": name, "encoding": encoding, "head_dim": head_dim, "seq_len": seq_len,
            "config": fields, "inv_freq": [float(f) for f in inv_freq.tolist()],
            "attention_factor": float(attention_factor),
        })
    json.dump(out, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
