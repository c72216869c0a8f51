"""The oracle side of the tests: tiny random HF transformers Mamba-2 models as real checkpoints."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

TINY = dict(hidden_size=64, num_heads=8, head_dim=16, expand=2, state_size=16, conv_kernel=4,
            chunk_size=16, num_hidden_layers=2, vocab_size=96, layer_norm_epsilon=1e-5)


def perturb_(model, seed):
    """Move every parameter away from its init value, so no default hides a bug."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("A_log"):
                p.copy_(torch.log(torch.rand(p.shape, generator=gen) * 15 + 1))
            elif name.endswith("dt_bias"):
                p.copy_(noise * 0.5 - 1.0)
            elif name.endswith(".D"):
                p.copy_(noise)
            elif name.endswith("norm.weight") or name.endswith("norm_f.weight"):
                p.copy_(1.0 + 0.3 * noise)
            elif "conv1d" in name:
                p.copy_(0.4 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:  # projections and embeddings: keep their scale, change their values
                p.add_(noise * p.std().clamp(min=0.02))


def make_hf_model(seed=0, **overrides):
    import torch
    import transformers

    cfg = transformers.Mamba2Config(**{**TINY, **overrides})
    version = tuple(int(v) for v in transformers.__version__.split(".")[:2])
    if cfg.n_groups > 1 and version < (5, 23):
        # Before 5.23 HF's gated RMSNorm normalises over all of d_inner, not per group: no oracle.
        pytest.skip(f"transformers {transformers.__version__} has the grouped-norm bug (fixed in 5.23)")
    torch.manual_seed(seed)
    model = transformers.Mamba2ForCausalLM(cfg).eval()
    perturb_(model, seed + 1)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model


def write_mamba_ssm_dir(model, path, *, pad_vocab_size_multiple=16, vocab_size=None):
    """Write ``model`` as a state-spaces/mamba_ssm checkpoint: config.json + pytorch_model.bin."""
    import torch

    c = model.config
    assert c.residual_in_fp32 and c.layer_norm_epsilon == 1e-5
    ssm_cfg = {"layer": "Mamba2", "d_state": c.state_size, "d_conv": c.conv_kernel,
               "expand": c.expand, "headdim": c.head_dim, "ngroups": c.n_groups,
               "chunk_size": c.chunk_size, "bias": c.use_bias, "conv_bias": c.use_conv_bias}
    if tuple(c.time_step_limit) != (0.0, math.inf):
        ssm_cfg["dt_limit"] = list(c.time_step_limit)
    vocab = c.vocab_size if vocab_size is None else vocab_size
    assert -(-vocab // pad_vocab_size_multiple) * pad_vocab_size_multiple == c.vocab_size
    config = {"d_model": c.hidden_size, "d_intermediate": 0, "n_layer": c.num_hidden_layers,
              "vocab_size": vocab, "ssm_cfg": ssm_cfg, "attn_layer_idx": [], "attn_cfg": {},
              "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
              "pad_vocab_size_multiple": pad_vocab_size_multiple,
              "tie_embeddings": c.tie_word_embeddings}
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    sd = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone()
          for k, v in model.state_dict().items()}
    if c.tie_word_embeddings:  # mamba_ssm state dicts carry the tied head as its own entry
        sd["lm_head.weight"] = sd["backbone.embedding.weight"].clone()
    torch.save(sd, path / "pytorch_model.bin")
    return path


def hf_logits(model, ids):
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids), dtype=torch.long)).logits.float().numpy()


def max_rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))
