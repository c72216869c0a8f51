"""The fused mixer decode step (conv update + state update + gate) vs its reference (the unfused
ops composed): Triton interpret mode on the CPU, lowering for "cuda", the model's decode step
through it, and on a GPU (marker ``gpu``) the 2.7B shapes in place."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.mixer_step import mixer_step, mixer_step_ref, mixer_step_unsupported
from mamba2_jax.kernels.mixer_step.pallas_step import mixer_step_pallas

ON_GPU = jax.default_backend() == "gpu"


def inputs(seed, b, h, p, g, n, k=4, dtype=jnp.bfloat16, ssm_dtype=jnp.float32, d_hp=False,
           bias=True):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    i, c = h * p, h * p + 2 * g * n
    return dict(zxbcdt=f(b, i + c + h).astype(dtype), conv_state=f(b, c, k - 1).astype(dtype),
                conv_weight=(0.5 * f(c, k)).astype(dtype),
                conv_bias=f(c).astype(dtype) if bias else None,
                ssm_state=f(b, h, p, n).astype(ssm_dtype),
                A=-jnp.asarray(rng.uniform(0.5, 4, h), jnp.float32), D=f(h, p) if d_hp else f(h),
                dt_bias=f(h)), dict(heads=h, head_dim=p, groups=g, state_size=n)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check(v, shape, ssm_tol, y_tol=1e-5, launch=None, **kw):
    got = mixer_step(*v.values(), **shape, impl="pallas", interpret=not ON_GPU, **(launch or {}),
                     **kw)
    want = mixer_step_ref(*v.values(), **shape, **kw)
    for a, w, name in zip(got, want, ("y", "conv", "ssm")):
        assert a.shape == w.shape and a.dtype == w.dtype, name
    assert got[0].dtype == jnp.float32
    assert rel(got[0], want[0]) < y_tol
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))
    assert rel(got[2], want[2]) < ssm_tol
    return got


@pytest.mark.parametrize("b,h,g,d_hp,bias,limit", [
    (2, 4, 1, False, True, (0.0, float("inf"))),
    (3, 4, 2, True, False, (0.01, 0.4)),
    (1, 8, 4, False, True, (0.0, float("inf")))])
def test_matches_the_unfused_reference(b, h, g, d_hp, bias, limit):
    v, shape = inputs(b, b=b, h=h, p=16, g=g, n=32, d_hp=d_hp, bias=bias)
    check(v, shape, 1e-6, dt_limit=limit)


@pytest.mark.parametrize("block_p,num_warps", [(4, 1), (8, 2), (16, 4)])
def test_row_blocks_and_a_log(block_p, num_warps):
    v, shape = inputs(9, b=2, h=4, p=16, g=2, n=32, d_hp=True)
    want = mixer_step_ref(*v.values(), **shape)
    v["A"] = jnp.log(-v["A"])  # the same A, given as A_log
    got = mixer_step(*v.values(), **shape, a_is_log=True, block_p=block_p, num_warps=num_warps,
                     impl="pallas", interpret=not ON_GPU)
    assert rel(got[0], want[0]) < 1e-5 and rel(got[2], want[2]) < 1e-6
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))
    ref = mixer_step(*v.values(), **shape, a_is_log=True, impl="xla")
    assert rel(ref[0], want[0]) < 1e-6


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gemv_partials_summed_in_the_kernel(dtype):
    from mamba2_jax.kernels.gemv import gemv

    v, shape = inputs(10, b=2, h=4, p=16, g=2, n=32, dtype=dtype)
    rng = np.random.default_rng(11)
    u = jnp.asarray(rng.standard_normal((2, 48)), jnp.float32).astype(dtype)
    w = jnp.asarray(rng.standard_normal((48, v["zxbcdt"].shape[1])) / 7, jnp.float32).astype(dtype)
    parts = gemv(u, w, partials=True, impl="pallas", interpret=not ON_GPU, block_k=16)
    assert parts.shape[0] == 3 and parts.dtype == jnp.float32  # 48 / 16 slabs, unsummed
    summed = gemv(u, w, impl="pallas", interpret=not ON_GPU, block_k=16)
    np.testing.assert_array_equal(np.asarray(jnp.sum(parts, 0).astype(dtype), np.float32),
                                  np.asarray(summed, np.float32))
    want = mixer_step_ref(summed, *list(v.values())[1:], **shape)
    got = mixer_step(parts, *list(v.values())[1:], **shape, zx_dtype=dtype, impl="pallas",
                     interpret=not ON_GPU)
    assert rel(got[0], want[0]) < 1e-5 and rel(got[2], want[2]) < 1e-6
    np.testing.assert_array_equal(np.asarray(got[1], np.float32), np.asarray(want[1], np.float32))
    ref = mixer_step(parts, *list(v.values())[1:], **shape, zx_dtype=dtype, impl="xla")
    assert rel(ref[0], want[0]) < 1e-6
    with pytest.raises(ValueError, match="partials zxbcdt"):
        mixer_step(parts, *list(v.values())[1:], **shape, impl="xla")  # no zx_dtype


@pytest.mark.parametrize("folded", [False, True])
def test_loads_first_is_the_same_step(folded):
    """``loads_first`` (every load issued before any compute) changes the order only: the
    outputs equal the default order's, and the reference's; plain (D per channel, a dt clip,
    no conv bias) and the folded step's call (partials, in_ss, norm_weight, sum_squares)."""
    v, shape = inputs(13, b=2, h=4, p=16, g=2, n=32, d_hp=not folded, bias=folded)
    kw = dict(shape, dt_limit=(0.01, 0.4))
    if folded:
        rng = np.random.default_rng(14)
        v["zxbcdt"] = jnp.asarray(rng.standard_normal((3,) + v["zxbcdt"].shape), jnp.float32)
        kw.update(zx_dtype=jnp.bfloat16, sum_squares=True, in_count=48.0, in_eps=1e-5,
                  in_ss=jnp.asarray(rng.uniform(1, 2, (2, 3)) * 16, jnp.float32),
                  norm_weight=jnp.asarray(1 + 0.3 * rng.standard_normal(64), jnp.bfloat16))
    run = lambda first: mixer_step(*v.values(), **kw, loads_first=first, block_p=8,
                                   impl="pallas", interpret=not ON_GPU)
    got, base, want = run(True), run(False), mixer_step_ref(*v.values(), **kw)
    assert len(got) == len(base) == len(want) == (4 if folded else 3)
    if folded:  # the kernel's squares: one slot a program (two a head at block_p 8)
        got, base = ([*o[:3], o[3].reshape(2, 4, 2).sum(-1)] for o in (got, base))
    for a, b0, w in zip(got, base, want):
        assert a.dtype == w.dtype and a.shape == w.shape
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b0, np.float32),
                                   rtol=1e-6, atol=1e-6)
        assert rel(a, w) < (1e-2 if folded else 1e-5)  # (folded: y in bf16)


def test_float32_inputs_bf16_state_and_conv_kernel_2():
    v, shape = inputs(4, b=2, h=2, p=32, g=1, n=16, k=2, dtype=jnp.float32,
                      ssm_dtype=jnp.bfloat16)
    got = check(v, shape, 1e-2)
    assert got[2].dtype == jnp.bfloat16 and got[1].shape == (2, 2 * 32 + 2 * 16, 1)


def test_bad_input_and_scope():
    v, shape = inputs(5, b=1, h=2, p=16, g=1, n=16)
    with pytest.raises(ValueError, match="ssm_state must be"):
        mixer_step(*{**v, "ssm_state": v["ssm_state"][:, :1]}.values(), **shape, impl="xla")
    with pytest.raises(ValueError, match="D must be"):
        mixer_step(*{**v, "D": v["D"][:1]}.values(), **shape, impl="xla")
    assert mixer_step_unsupported(heads=2, head_dim=24, groups=1, state_size=16, conv_kernel=4)
    assert mixer_step_unsupported(heads=2, head_dim=16, groups=1, state_size=16,
                                  conv_kernel=4) is None
    with pytest.raises(ValueError, match="zx_dtype .* is for partials"):
        mixer_step(*v.values(), **shape, zx_dtype=jnp.float32, impl="xla")  # zxbcdt is bf16
    with pytest.raises(ValueError, match="zxbcdt must be"):
        mixer_step(*{**v, "zxbcdt": v["zxbcdt"][None, None]}.values(), **shape, impl="xla")
    with pytest.raises(ValueError, match="block_p must be"):
        mixer_step(*v.values(), **shape, block_p=32, impl="pallas", interpret=True)
    with pytest.raises(NotImplementedError):  # a shape the kernel does not take: no silent XLA
        mixer_step(*inputs(6, b=1, h=2, p=24, g=1, n=16)[0].values(), heads=2, head_dim=24,
                   groups=1, state_size=16, impl="pallas", interpret=True)


def test_kernel_lowers_for_cuda_with_the_ssm_state_aliased():
    v, shape = inputs(7, b=1, h=80, p=64, g=1, n=128)
    S = lambda a: None if a is None else jax.ShapeDtypeStruct(a.shape, a.dtype)
    fn = functools.partial(mixer_step_pallas, **shape)
    lower = lambda fn: jax.jit(fn, donate_argnums=4).trace(*map(S, v.values())).lower(
        lowering_platforms=("cuda",)).as_text()
    text = lower(fn)
    assert text.count("__gpu$xla.gpu.triton") == 1
    assert "tf.aliasing_output" in text  # the donated ssm state is the kernel's output buffer
    assert lower(functools.partial(fn, loads_first=True)) != text  # another kernel body
    wide = functools.partial(fn, block_p=32)  # above LOADS_FIRST_MAX_BLOCK_P: the default order
    assert lower(functools.partial(wide, loads_first=True)) == lower(wide)


@pytest.mark.parametrize("dtype,tol,extra", [
    (jnp.float32, 1e-5, dict(residual_in_fp32=True, n_groups=1)),
    (jnp.float32, 1e-5, dict(residual_in_fp32=False, d_has_hdim=True, n_groups=1)),
    (jnp.float32, 1e-5, dict(use_bias=True)),  # projection biases: the norms not folded
    (jnp.float32, 1e-5, {}),  # two gated norm groups: not folded (its 1 / RMS not a row scale)
    (jnp.bfloat16, 2e-2, dict(n_groups=1)),  # bf16: the GEMV kernels' roundings differ
    (jnp.bfloat16, 2e-2, dict(use_bias=True, residual_in_fp32=False))])
def test_model_decode_step_runs_the_fused_kernel(dtype, tol, extra):
    from flax import nnx

    from mamba2_jax.config import Mamba2Config
    from mamba2_jax.nn.model import Mamba2ForCausalLM

    cfg = Mamba2Config(**{**dict(hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                                 n_groups=2, state_size=16, vocab_size=64, chunk_size=8,
                                 expand=2, use_conv_bias=True), **extra})
    model = Mamba2ForCausalLM(cfg, param_dtype=dtype, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(8).integers(0, 64, (2, 7)))
    _, state = model.prefill(ids[:, :6])
    want, want_state = model.decode_step(ids[:, 6], state, impl="xla")  # the unfused ops
    got, got_state = model.decode_step(ids[:, 6], state, impl="interpret")
    assert rel(got, want) < tol
    for (c1, s1), (c2, s2) in zip(got_state, want_state):
        assert c1.dtype == c2.dtype and s1.dtype == s2.dtype
        assert rel(c1, c2) < tol and rel(s1, s2) < tol
    jaxpr = str(jax.make_jaxpr(lambda t, s: model.decode_step(t, s, impl="interpret"))(
        ids[:, 6], state))
    L = cfg.num_hidden_layers
    assert jaxpr.count("name=mixer_step_pallas") == L  # one call a layer
    if cfg.use_bias or cfg.n_groups > 1:  # a block norm (+ the residual add) and a gated norm
        # a layer, one launch each
        assert jaxpr.count("name=rms_norm_pallas") == 2 * L
        assert "residual_gemv" not in jaxpr
    else:  # both folded: the residual add + block norm in in_proj's launch, the gated norm's
        # weight in mixer_step's, both 1 / RMS scales after the products
        assert "rms_norm" not in jaxpr
        assert jaxpr.count("name=residual_gemv\n") == L
        assert jaxpr.count("name=gemv_splitk\n") == L  # out_proj
    assert "mixer_step" not in str(jax.make_jaxpr(
        lambda t, s: model.decode_step(t, s, impl="xla"))(ids[:, 6], state))


def test_model_loads_first_knob_reaches_the_kernel(monkeypatch):
    """mixer.STEP_LOADS_FIRST (a benchmark knob) reaches the folded step's mixer_step calls,
    and the decode step's outputs stay those of the default order."""
    from flax import nnx

    import mamba2_jax.nn.mixer as mixer_module
    from mamba2_jax.config import Mamba2Config
    from mamba2_jax.nn.model import Mamba2ForCausalLM

    cfg = Mamba2Config(hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16,
                       n_groups=1, state_size=16, vocab_size=64, chunk_size=8, expand=2)
    model = Mamba2ForCausalLM(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(2))
    ids = jnp.asarray(np.random.default_rng(15).integers(0, 64, (1, 5)))
    _, state = model.prefill(ids[:, :4])
    want, want_state = model.decode_step(ids[:, 4], state, impl="interpret")
    seen, step = [], mixer_module.mixer_step
    monkeypatch.setattr(mixer_module, "mixer_step", lambda *a, **kw: (
        seen.append(kw["loads_first"]), step(*a, **kw))[1])
    monkeypatch.setattr(mixer_module, "STEP_LOADS_FIRST", True)
    got, got_state = model.decode_step(ids[:, 4], state, impl="interpret")
    assert seen == [True] * cfg.num_hidden_layers
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    for new, old in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(np.asarray(new), np.asarray(old), rtol=1e-5, atol=1e-5)


def test_mixer_step_with_a_float32_mup_vector_keeps_the_promoted_dtype():
    """A float32 mup_vector promotes a bf16 mixer's in_proj output to float32: the fused step
    then runs in float32 as the separate ops do (no rounding to the weights' bf16)."""
    from flax import nnx

    from mamba2_jax.config import Mamba2Config
    from mamba2_jax.nn.mixer import MambaMixer2, init_mixer_state

    cfg = Mamba2Config(hidden_size=32, num_hidden_layers=1, num_heads=4, head_dim=16,
                       n_groups=2, state_size=16, vocab_size=64, chunk_size=8, expand=2)
    mixer = MambaMixer2(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(13)
    mup = jnp.asarray(rng.uniform(0.5, 2.0, cfg.in_proj_size), jnp.float32)
    u = jnp.asarray(rng.standard_normal((2, 32)), jnp.bfloat16)
    state = init_mixer_state(cfg, 2, jnp.bfloat16)
    state = state._replace(ssm=jnp.asarray(rng.standard_normal(state.ssm.shape), jnp.float32))
    got, got_state = mixer.step(u, state, mup_vector=mup, impl="interpret")
    want, want_state = mixer.step(u, state, mup_vector=mup, impl="xla")
    assert got.dtype == want.dtype and rel(got, want) < 2e-2  # (bf16 GEMV roundings)
    assert rel(got_state.ssm, want_state.ssm) < 2e-2


def test_when_the_model_takes_the_fused_step(monkeypatch):
    from flax import nnx

    import mamba2_jax.nn.mixer as mixer_module
    from mamba2_jax.config import Mamba2Config

    cfg = Mamba2Config(hidden_size=32, num_hidden_layers=1, num_heads=4, head_dim=16,
                       n_groups=1, state_size=16, vocab_size=64, chunk_size=8, expand=2)
    mixer = mixer_module.MambaMixer2(cfg, rngs=nnx.Rngs(0))
    assert mixer._fused_step("interpret", 64) and mixer._fused_step("pallas", 1)
    assert not mixer._fused_step("xla", 1)
    assert mixer._fused_step("auto", 1) == ON_GPU  # (off a GPU "auto" is XLA's)
    monkeypatch.setattr(mixer_module.jax, "default_backend", lambda: "gpu")
    assert mixer._fused_step("auto", 16) and not mixer._fused_step("auto", 17)
    monkeypatch.setattr(mixer_module, "FUSED_STEP_AUTO", False)
    assert not mixer._fused_step("auto", 1) and mixer._fused_step("pallas", 1)
    odd = mixer_module.MambaMixer2(Mamba2Config(**{**cfg.__dict__, "head_dim": 24,
                                                   "hidden_size": 48}), rngs=nnx.Rngs(0))
    assert not odd._fused_step("pallas", 1)  # outside the kernel's scope: the separate ops


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("b,loads_first", [(1, False), (64, False), (1, True)])
def test_gpu_real_sizes_in_place(b, loads_first):
    v, shape = inputs(b, b=b, h=80, p=64, g=1, n=128)
    # y_tol: y is rounded to bf16 before the gate; where the GPU's exp / softplus differ from
    # XLA's by an ulp a rounding flips (seen: 1.2e-5 at b = 64)
    check(v, shape, 1e-5, y_tol=1e-4, launch=dict(loads_first=loads_first))
    step = jax.jit(functools.partial(mixer_step, **shape, impl="pallas",
                                     loads_first=loads_first), donate_argnums=4)
    ssm = jnp.array(v["ssm_state"])
    address = ssm.unsafe_buffer_pointer()
    want = mixer_step_ref(*v.values(), **shape)
    y, conv, new = step(*{**v, "ssm_state": ssm}.values())
    assert ssm.is_deleted() and new.unsafe_buffer_pointer() == address  # no copy of the state
    assert rel(y, want[0]) < 1e-4 and rel(new, want[2]) < 1e-5


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.gpu
def test_gpu_model_decode_step_fused_matches_the_separate_ops(monkeypatch):
    """impl="auto" on a GPU at b = 1 (the fused step with the norms folded, FOLD_NORMS_AUTO;
    and without it the norm kernels and the GEMV partials) against the same model with
    FUSED_STEP_AUTO off (the separate ops), 2.7B mixer widths."""
    from flax import nnx

    import mamba2_jax.nn.mixer as mixer_module
    from mamba2_jax.config import Mamba2Config
    from mamba2_jax.nn.model import Mamba2ForCausalLM

    cfg = Mamba2Config(hidden_size=2560, num_hidden_layers=2, num_heads=80, head_dim=64,
                       n_groups=1, state_size=128, vocab_size=1024, chunk_size=64, expand=2)
    model = Mamba2ForCausalLM(cfg, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    ids = jnp.asarray(np.random.default_rng(12).integers(0, 1024, (1, 9)))
    _, state = model.prefill(ids[:, :8])
    step = lambda: jax.jit(lambda t, s: model.decode_step(t, s))(ids[:, 8], state)
    got = [step()]
    monkeypatch.setattr(mixer_module, "FOLD_NORMS_AUTO", False)  # the norms' own launches
    got.append(step())
    monkeypatch.setattr(mixer_module, "FUSED_STEP_AUTO", False)
    want, want_state = step()
    for logits, new_state in got:
        assert rel(logits, want) < 2e-2  # bf16: the in_proj sum's and norms' roundings differ
        for (c1, s1), (c2, s2) in zip(new_state, want_state):
            assert rel(c1, c2) < 1e-2 and rel(s1, s2) < 2e-2
