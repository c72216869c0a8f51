"""Model-level consistency: decode == forward, prefill continuation, mup_vector, D per channel."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mamba2_jax import Mamba2Config, Mamba2ForCausalLM, MambaMixer2

BASE = dict(hidden_size=32, num_heads=4, head_dim=16, n_groups=2, state_size=8, chunk_size=8,
            num_hidden_layers=2, vocab_size=64, tie_word_embeddings=False)


def random_model(seed=0, **overrides):
    model = Mamba2ForCausalLM(Mamba2Config(**{**BASE, **overrides}), rngs=nnx.Rngs(seed))
    # push the ones/zeros-initialised parameters (norm weights, D, biases) off their init values
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        if path[-1] in ("weight", "D", "bias") and "conv1d" not in path:
            value = var.get_value()
            var.set_value(value + jnp.asarray(0.3 * rng.standard_normal(value.shape), value.dtype))
    return model


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("overrides", [dict(n_groups=1), dict(n_groups=2, tie_word_embeddings=True),
                                       dict(n_groups=4, time_step_limit=(0.01, 0.5))])
def test_decode_steps_equal_full_forward(overrides):
    model = random_model(1, **overrides)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 13)))
    full = model(ids)
    logits, state = model.prefill(ids[:, :1])
    steps = [logits[:, 0]]
    for t in range(1, ids.shape[1]):
        step_logits, state = model.decode_step(ids[:, t], state)
        steps.append(step_logits)
    assert rel(jnp.stack(steps, 1), full) < 1e-4


def test_prefill_then_decode_equals_one_longer_prefill():
    model = random_model(2)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, 64, (3, 21)))
    full_logits, full_state = model.prefill(ids)
    # chunked prefill: 11 tokens (not a chunk multiple), then 7 more from the state, then decode
    logits_a, state = model.prefill(ids[:, :11])
    logits_b, state = model.prefill(ids[:, 11:18], state)
    tail = []
    for t in range(18, 21):
        step_logits, state = model.decode_step(ids[:, t], state)
        tail.append(step_logits[:, None])
    got = jnp.concatenate([logits_a, logits_b, *tail], axis=1)
    assert rel(got, full_logits) < 1e-4
    for (conv, ssm), (conv_f, ssm_f) in zip(state, full_state):
        assert ssm.dtype == jnp.float32 and conv.shape == (3, model.config.conv_dim, 3)
        assert rel(conv, conv_f) < 1e-5 and rel(ssm, ssm_f) < 1e-4


def test_state_dtype_is_configurable():
    model = random_model(3, ssm_state_dtype="bfloat16")
    ids = jnp.asarray(np.random.default_rng(2).integers(0, 64, (1, 5)))
    logits, state = model.prefill(ids)
    assert all(s.ssm.dtype == jnp.bfloat16 for s in state)
    step_logits, state = model.decode_step(ids[:, 0], state)
    assert all(s.ssm.dtype == jnp.bfloat16 for s in state)
    ref_logits, _ = random_model(3).prefill(jnp.concatenate([ids, ids[:, :1]], 1))
    assert rel(step_logits, ref_logits[:, -1]) < 3e-2


def test_mup_vector_scales_the_projection():
    cfg = Mamba2Config(**BASE)
    mixer = MambaMixer2(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(4)
    mup = jnp.asarray(rng.uniform(0.5, 2.0, cfg.in_proj_size), jnp.float32)
    u = jnp.asarray(rng.standard_normal((2, 9, cfg.hidden_size)), jnp.float32)
    got = mixer(u, mup_vector=mup)
    mixer.in_proj.kernel[...] = mixer.in_proj.kernel[...] * mup[None, :]
    assert rel(got, mixer(u)) < 1e-5
    assert rel(got, MambaMixer2(cfg, rngs=nnx.Rngs(0))(u)) > 1e-2


def test_per_channel_D_and_no_gated_norm():
    model = random_model(5, d_has_hdim=True, use_rms_norm=False)
    mixer = model.backbone.layers[0].mixer
    assert mixer.D[...].shape == (64,) and mixer.norm.weight is None
    ids = jnp.asarray(np.random.default_rng(5).integers(0, 64, (2, 10)))
    full = model(ids)
    _, state = model.prefill(ids[:, :9])
    step_logits, _ = model.decode_step(ids[:, 9], state)
    assert rel(step_logits, full[:, -1]) < 1e-4


def test_jit_forward_matches_eager():
    model = random_model(6)
    ids = jnp.asarray(np.random.default_rng(6).integers(0, 64, (2, 12)))
    jitted = nnx.jit(lambda m, x: m(x))(model, ids)
    np.testing.assert_allclose(jitted, model(ids), rtol=1e-5, atol=1e-5)
    assert isinstance(jax.tree.leaves(nnx.state(model))[0], jax.Array)
    assert dataclasses.is_dataclass(model.config)


@pytest.mark.parametrize("tied", [True, False])
def test_decode_step_lm_head_through_the_gemv_kernel(tied):
    """impl="interpret": the head through the Pallas GEMV (tied: the embedding as w [v, d])."""
    model = random_model(7, tie_word_embeddings=tied)
    ids = jnp.asarray(np.random.default_rng(7).integers(0, 64, (3, 6)))
    _, state = model.prefill(ids[:, :5])
    want, _ = model.decode_step(ids[:, 5], state, impl="xla")
    got, _ = model.decode_step(ids[:, 5], state, impl="interpret")
    assert got.dtype == jnp.float32 and got.shape == (3, 64)
    assert rel(got, want) < 1e-4
    h = jnp.asarray(np.random.default_rng(8).standard_normal((3, 32)), jnp.float32)
    assert rel(model._logits(h, head_impl="interpret"), model._logits(h)) < 1e-5
    head = lambda h, impl: model._logits(h, head_impl=impl)
    assert "pallas_call" in str(jax.make_jaxpr(lambda h: head(h, "interpret"))(h))
    assert "pallas_call" not in str(jax.make_jaxpr(lambda h: head(h, "auto"))(h))


def test_decode_step_projections_through_the_gemv_kernel(monkeypatch):
    """impl="interpret": in_proj and out_proj through the Pallas GEMV, equal to XLA's; "auto"
    takes the kernel for in_proj only, only on a GPU and for bf16 weights; prefill never."""
    model = random_model(9, use_bias=True)
    ids = jnp.asarray(np.random.default_rng(9).integers(0, 64, (3, 6)))
    _, state = model.prefill(ids[:, :5])
    want, _ = model.decode_step(ids[:, 5], state, impl="xla")
    got, _ = model.decode_step(ids[:, 5], state, impl="interpret")
    assert rel(got, want) < 1e-4
    mixer = model.backbone.layers[0].mixer
    u = jnp.asarray(np.random.default_rng(10).standard_normal((3, 32)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(11).standard_normal((3, mixer.config.intermediate_size)),
                    jnp.float32)

    def launches(impl, rows=3):  # GEMV launches in the step's in_proj and out_proj
        def count(lin, x, auto_kernel):
            f = lambda x: mixer._linear(lin, x, impl, auto_kernel=auto_kernel)
            return str(jax.make_jaxpr(f)(x[:1].repeat(rows, 0))).count("pallas_call")
        return count(mixer.in_proj, u, True), count(mixer.out_proj, y, False)

    assert launches("interpret") == (1, 1) and launches("xla") == (0, 0)
    assert launches("interpret", rows=17) == (0, 0)  # past MAX_AUTO_ROWS: XLA
    assert launches(None) == (0, 0)  # prefill
    assert launches("auto") == (0, 0)  # on the CPU
    np.testing.assert_allclose(mixer._linear(mixer.in_proj, u, "interpret", auto_kernel=True),
                               mixer.in_proj(u), rtol=1e-5, atol=1e-5)
    gemv_in = lambda f, *a: "gemv_splitk" in str(jax.make_jaxpr(f)(*a))
    assert gemv_in(lambda t, s: model.decode_step(t, s, impl="interpret"), ids[:, 5], state)
    assert not gemv_in(lambda i: model(i, impl="interpret"), ids)  # prefill
    bf16 = Mamba2ForCausalLM(Mamba2Config(**{**BASE, "use_bias": True}),
                             param_dtype=jnp.bfloat16, rngs=nnx.Rngs(12)).backbone.layers[0].mixer
    got = bf16._linear(bf16.in_proj, u, "interpret", auto_kernel=True)  # u float32: cast first
    want = bf16.in_proj(u)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2 ** -7, atol=2 ** -7)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # what "auto" picks on a GPU
    assert launches("auto") == (0, 0)  # float32 weights: XLA
    mixer = bf16
    assert launches("auto") == (1, 0)
