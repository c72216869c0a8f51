"""Logits and generation equal to HF transformers' Mamba2ForCausalLM (PyTorch, float32, CPU)."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_oracle import hf_logits, make_hf_model, max_rel, write_mamba_ssm_dir
from mamba2_jax import generate, load_pretrained

# (id, model overrides, how it is written, sequence length)
CONFIGS = [
    ("g1-tied-hf", dict(n_groups=1, tie_word_embeddings=True), "hf", 37),
    ("g2-untied-bias-limit-sharded", dict(n_groups=2, tie_word_embeddings=False, use_bias=True,
                                          time_step_limit=(0.05, 1.5)), "hf-sharded", 23),
    ("g4-untied-mamba_ssm-padded-vocab", dict(n_groups=4, tie_word_embeddings=False), "mamba_ssm", 50),
    ("g2-tied-mamba_ssm-no-conv-bias", dict(n_groups=2, tie_word_embeddings=True,
                                            use_conv_bias=False, chunk_size=8), "mamba_ssm", 29),
    ("g8-untied-residual-not-fp32", dict(n_groups=8, tie_word_embeddings=False,
                                         residual_in_fp32=False, chunk_size=32), "hf", 45),
]


def write(fmt, model, path):
    if fmt == "hf":
        model.save_pretrained(path)
    elif fmt == "hf-sharded":
        model.save_pretrained(path, max_shard_size="40KB")
        assert (path / "model.safetensors.index.json").exists()
    else:
        write_mamba_ssm_dir(model, path, vocab_size=model.config.vocab_size - 6)
    return path


@pytest.mark.parametrize("name,overrides,fmt,length", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_logits_equal_hf(tmp_path, name, overrides, fmt, length):
    hf = make_hf_model(seed=len(name), **overrides)
    ours = load_pretrained(write(fmt, hf, tmp_path / name))
    assert ours.config.n_groups == hf.config.n_groups
    assert ours.config.vocab_size == hf.config.vocab_size
    ids = np.random.default_rng(length).integers(0, hf.config.vocab_size, (2, length))
    got = np.asarray(ours(jnp.asarray(ids)))
    want = hf_logits(hf, ids)
    assert got.shape == want.shape == (2, length, hf.config.vocab_size)
    assert max_rel(got, want) < 1e-4, max_rel(got, want)


def test_greedy_generation_equals_hf(tmp_path):
    hf = make_hf_model(seed=11, n_groups=2, tie_word_embeddings=False)
    hf.generation_config.pad_token_id = hf.config.pad_token_id
    hf.generation_config.eos_token_id = None  # run all max_new_tokens, as ours does without eos
    ours = load_pretrained(write("hf", hf, tmp_path / "m"))
    prompt = np.random.default_rng(0).integers(3, 96, (3, 9))
    new = 14
    with torch.no_grad():
        want = hf.generate(torch.as_tensor(prompt), max_new_tokens=new,
                           do_sample=False).numpy()
    got = np.asarray(generate(ours, prompt, new))
    np.testing.assert_array_equal(got, want)


def test_greedy_generation_stops_at_eos_like_hf(tmp_path):
    hf = make_hf_model(seed=5, n_groups=1, tie_word_embeddings=True)
    ours = load_pretrained(write("hf", hf, tmp_path / "m"))
    prompt = np.random.default_rng(1).integers(3, 96, (2, 6))
    free = np.asarray(generate(ours, prompt, 10))
    eos = int(free[0, 6 + 3])  # a token the first row emits, so generation must stop there
    with torch.no_grad():
        want = hf.generate(torch.as_tensor(prompt), max_new_tokens=10, do_sample=False,
                           eos_token_id=eos, pad_token_id=hf.config.pad_token_id).numpy()
    got = np.asarray(generate(ours, prompt, 10, eos_token_id=eos))
    np.testing.assert_array_equal(got[:, : want.shape[1]], want)
    assert (got[:, want.shape[1]:] == hf.config.pad_token_id).all()
