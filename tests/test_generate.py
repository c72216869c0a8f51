"""Sampling rules and the generation loop (HF token-for-token parity is in test_hf_parity.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2ForCausalLM, generate, sample_logits

CFG = Mamba2Config(hidden_size=32, num_heads=4, head_dim=16, n_groups=2, state_size=8,
                   chunk_size=8, num_hidden_layers=2, vocab_size=64, pad_token_id=7)


@pytest.fixture(scope="module")
def model():
    return Mamba2ForCausalLM(CFG, rngs=nnx.Rngs(3))


def test_greedy_is_argmax_and_topk1_is_greedy():
    logits = jnp.asarray(np.random.default_rng(0).standard_normal((5, 50)), jnp.float32)
    key = jax.random.key(0)
    greedy = sample_logits(logits, key)
    np.testing.assert_array_equal(greedy, np.argmax(logits, -1))
    np.testing.assert_array_equal(sample_logits(logits, key, temperature=1.0, top_k=1), greedy)
    np.testing.assert_array_equal(sample_logits(logits, key, temperature=1.0, top_p=1e-6), greedy)


def test_sampling_follows_softmax_within_top_k_and_top_p():
    logits = jnp.asarray([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]], jnp.float32)
    keys = jax.random.split(jax.random.key(1), 20000)
    def draw(**kw):
        return np.asarray(jax.vmap(lambda k: sample_logits(logits, k, **kw)[0])(keys))

    counts = np.bincount(draw(temperature=0.7), minlength=6) / len(keys)
    probs = np.exp(np.asarray(logits[0]) / 0.7)
    probs /= probs.sum()
    np.testing.assert_allclose(counts, probs, atol=0.015)
    topk = draw(temperature=1.0, top_k=3)
    assert set(np.unique(topk)) == {0, 1, 2}
    p = np.exp(np.asarray(logits[0]))
    p /= p.sum()  # cumulative: 0.55, 0.75, 0.88, ... -> top_p=0.8 keeps the first three
    topp = draw(temperature=1.0, top_p=0.8)
    assert set(np.unique(topp)) == {0, 1, 2}
    kept = p[:3] / p[:3].sum()
    np.testing.assert_allclose(np.bincount(topp, minlength=3)[:3] / len(keys), kept, atol=0.015)


def test_generate_greedy_equals_step_by_step_argmax(model):
    prompt = np.random.default_rng(0).integers(0, 64, (2, 5))
    out = np.asarray(generate(model, prompt, 6))
    assert out.shape == (2, 11) and (out[:, :5] == prompt).all()
    ids = jnp.asarray(prompt)
    for _ in range(6):  # re-run the whole sequence each time: the slow, obvious oracle
        ids = jnp.concatenate([ids, jnp.argmax(model(ids)[:, -1], -1)[:, None]], 1)
    np.testing.assert_array_equal(out, ids)


def test_sampling_is_seeded_and_pads_after_eos(model):
    prompt = np.random.default_rng(1).integers(0, 64, (4, 3))
    a = generate(model, prompt, 12, temperature=1.0, seed=5)
    b = generate(model, prompt, 12, temperature=1.0, seed=5)
    c = generate(model, prompt, 12, temperature=1.0, seed=6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    eos = int(a[0, 3 + 2])
    out = np.asarray(generate(model, prompt, 12, temperature=1.0, seed=5, eos_token_id=eos))
    for row in out[:, 3:]:
        hits = np.flatnonzero(row == eos)
        if hits.size:
            assert (row[hits[0] + 1:] == CFG.pad_token_id).all()
    np.testing.assert_array_equal(out[0, 3:6], np.asarray(a)[0, 3:6])


def test_generate_errors(model):
    ids = np.zeros((1, 3), np.int32) + 5
    with pytest.raises(ValueError, match="input_ids"):
        generate(model, ids[0], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, ids, 0)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, ids, 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, ids, 3, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, ids, 3, temperature=1.0, top_p=1.5)


def test_several_eos_ids(model):
    prompt = np.random.default_rng(2).integers(0, 64, (3, 4))
    free = np.asarray(generate(model, prompt, 8))
    eos = [int(free[0, 4 + 1]), int(free[1, 4 + 2])]
    out = np.asarray(generate(model, prompt, 8, eos_token_id=eos))
    for row, free_row in zip(out[:, 4:], free[:, 4:]):
        hits = np.flatnonzero(np.isin(free_row, eos))
        stop = hits[0] + 1 if hits.size else len(free_row)
        np.testing.assert_array_equal(row[:stop], free_row[:stop])
        assert (row[stop:] == CFG.pad_token_id).all()
