"""The decode block's residual add + block norm + in_proj in one launch (``gemv.residual_gemv``)
and the norms' 1 / RMS scales applied after the products (``mixer_step(in_ss=...,
norm_weight=...)``): the Triton kernels (interpret mode on the CPU, the real kernels on a GPU)
against their references and float64 numpy oracles; validation; lowering for "cuda"."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.gemv import residual_gemv, residual_gemv_ref
from mamba2_jax.kernels.gemv.pallas_gemv import plan, residual_gemv_call

ON_GPU = jax.default_backend() == "gpu"
F32, BF16 = jnp.float32, jnp.bfloat16
EPS, DELTA_EPS, DELTA_COUNT = 1e-5, 1e-6, 300.0


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(seed, m, K, N, *, h_dtype=F32, w_dtype=BF16, delta=True, slots=7):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(2 * rng.standard_normal((m, K)), F32).astype(h_dtype)
    d = jnp.asarray(30 * rng.standard_normal((m, K)), F32).astype(BF16) if delta else None
    dss = jnp.asarray(rng.uniform(1, 4, (m, slots)) * 80, F32) if delta else None
    wn = jnp.asarray(1 + 0.2 * rng.standard_normal(K), F32).astype(w_dtype)
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), F32).astype(w_dtype)
    return h, d, dss, wn, w


def numpy_oracle(h, d, dss, wn, w, in_dtype):
    """float64: h' = h + d / RMS(delta's statistics); the RMS norm of h' (rounded to in_dtype)
    times wn, @ w."""
    hp = np.asarray(h, np.float64)
    if d is not None:
        scale = 1 / np.sqrt(np.asarray(dss, np.float64).sum(-1, keepdims=True) / DELTA_COUNT
                            + DELTA_EPS)
        hp = hp + scale * np.asarray(d, np.float64)
    r = np.asarray(jnp.asarray(hp, F32).astype(in_dtype), np.float64)
    y = r / np.sqrt(np.mean(r * r, -1, keepdims=True) + EPS)
    return hp, (np.asarray(wn, np.float64) * y) @ np.asarray(w, np.float64)


def normalised(parts, ss, K):
    """What the consumer computes: the partials' sum times the norm's 1 / RMS."""
    return np.asarray(parts, np.float64).sum(0) / np.sqrt(
        np.asarray(ss, np.float64).sum(-1, keepdims=True) / K + EPS)


@pytest.mark.parametrize("m,K,N,h_dtype,w_dtype,delta,kw", [
    (1, 256, 200, F32, BF16, True, {}),  # the 2.7B block: float32 stream, bf16 weights
    (3, 320, 100, F32, BF16, True, dict(block_k=32, splits=3)),  # ragged K slabs and columns
    (2, 256, 64, F32, BF16, False, {}),  # the first block: no delta
    (5, 192, 48, F32, F32, True, dict(block_n=16)),  # float32 weights
    (2, 128, 96, BF16, BF16, True, {}),  # residual_in_fp32=False: a bf16 stream
])
def test_matches_reference_and_numpy(m, K, N, h_dtype, w_dtype, delta, kw):
    h, d, dss, wn, w = inputs(m + K, m, K, N, h_dtype=h_dtype, w_dtype=w_dtype, delta=delta)
    args = dict(delta_count=DELTA_COUNT if delta else None,
                delta_eps=DELTA_EPS if delta else None, in_dtype=w_dtype)
    parts, hn, ss = residual_gemv(h, wn, w, d, dss, impl="pallas", interpret=not ON_GPU,
                                  **args, **kw)
    p0, hn0, ss0 = residual_gemv_ref(h, wn, w, d, dss, **args)
    hp, oracle = numpy_oracle(h, d, dss, wn, w, w_dtype)
    assert parts.dtype == F32 and parts.ndim == 3 and parts.shape[1:] == (m, N)
    assert ss.shape[0] == m and ss.dtype == F32
    assert hn.dtype == hn0.dtype == jnp.promote_types(h.dtype, BF16 if delta else h.dtype)
    assert rel(hn, hn0) < 1e-6 and rel(hn, hp) < (1e-2 if h_dtype == BF16 else 1e-6)
    hb = np.asarray(hn.astype(w_dtype), np.float64)  # the norm's input
    np.testing.assert_allclose(np.asarray(ss, np.float64).sum(-1), (hb * hb).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ss0, np.float64).sum(-1), (hb * hb).sum(-1), rtol=1e-5)
    assert rel(parts.sum(0), p0.sum(0)) < 1e-5
    tol = 2e-2 if w_dtype == BF16 else 1e-5  # bf16: the weighted input rounded
    assert rel(normalised(parts, ss, K), oracle) < tol


def test_validation():
    h, d, dss, wn, w = inputs(1, 2, 64, 32)
    kw = dict(delta_count=DELTA_COUNT, delta_eps=DELTA_EPS, impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="come together"):
        residual_gemv(h, wn, w, d, None, **kw)
    with pytest.raises(ValueError, match="delta must be"):
        residual_gemv(h, wn, w, d[:, :10], dss, **kw)
    with pytest.raises(ValueError, match="delta_ss must be float32"):
        residual_gemv(h, wn, w, d, dss.astype(BF16), **kw)
    with pytest.raises(ValueError, match="delta_count"):
        residual_gemv(h, wn, w, d, dss, **{**kw, "delta_count": 0})
    with pytest.raises(ValueError, match="norm_weight must be"):
        residual_gemv(h, wn[:10], w, d, dss, **kw)
    with pytest.raises(ValueError, match="h must be"):
        residual_gemv(h, wn, w.T, d, dss, **kw)


def test_kernel_lowers_for_cuda():
    """The 2.7B in_proj (2560 x 10576) after a block's delta."""
    m, K, N = 1, 2560, 10576
    S = jax.ShapeDtypeStruct
    fn = functools.partial(residual_gemv_call, p=plan(m, K, N, method="dot"),
                           delta_count=5120, delta_eps=EPS, in_dtype=BF16)
    args = [S((m, K), F32), S((K,), BF16), S((K, N), BF16), S((m, K), BF16), S((m, 320), F32)]
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


def test_mixer_step_sums_the_gated_squares():
    """``mixer_step(..., sum_squares=True)``: slots whose sum over a group's heads is the gated
    norm's statistic, in the kernel (block_p 8: two slots a head) and in the reference."""
    from test_mixer_step import inputs as step_inputs

    from mamba2_jax.kernels.mixer_step import mixer_step, mixer_step_ref

    v, shape = step_inputs(21, b=2, h=4, p=16, g=2, n=16)
    got = mixer_step(*v.values(), **shape, sum_squares=True, block_p=8, impl="pallas",
                     interpret=not ON_GPU)
    want = mixer_step_ref(*v.values(), **shape, sum_squares=True)
    y = np.asarray(got[0], np.float64).reshape(2, 2, -1)  # [b, groups, channels]
    assert got[3].shape == (2, 8) and want[3].shape == (2, 4)
    for ss in (got[3], want[3]):
        np.testing.assert_allclose(np.asarray(ss, np.float64).reshape(2, 2, -1).sum(-1),
                                   (y * y).sum(-1), rtol=1e-5)


def test_mixer_step_applies_the_norm_scales():
    """``mixer_step(in_ss=..., norm_weight=...)``: the partials' sum scaled by the in_proj
    input's 1 / RMS before rounding, the gated y times the gated norm's weight in its dtype;
    kernel against reference, and the reference against the unscaled call on scaled partials."""
    from test_mixer_step import inputs as step_inputs

    from mamba2_jax.kernels.mixer_step import mixer_step, mixer_step_ref

    v, shape = step_inputs(22, b=2, h=4, p=16, g=2, n=16)
    rng = np.random.default_rng(5)
    parts = jnp.asarray(rng.standard_normal((3,) + v["zxbcdt"].shape), F32) * 40
    in_ss = jnp.asarray(rng.uniform(1, 2, (2, 5)) * 1000, F32)
    gnw = jnp.asarray(1 + 0.3 * rng.standard_normal(64), F32).astype(BF16)
    v = dict(v, zxbcdt=parts)
    kw = dict(shape, zx_dtype=BF16, sum_squares=True)
    scaled = dict(in_ss=in_ss, in_count=640.0, in_eps=EPS, norm_weight=gnw)
    got = mixer_step(*v.values(), **kw, **scaled, impl="pallas", interpret=not ON_GPU)
    want = mixer_step_ref(*v.values(), **kw, **scaled)
    assert got[0].dtype == want[0].dtype == BF16
    for a, b in zip(got, want):
        assert rel(a, b) < 1e-2  # (y rounded to bf16; float32 states to float32 rounding)
    rstd = 1 / np.sqrt(np.asarray(in_ss, np.float64).sum(-1, keepdims=True) / 640.0 + EPS)
    plain = mixer_step_ref(*dict(v, zxbcdt=parts * jnp.asarray(rstd, F32)).values(), **kw)
    assert rel(want[2], plain[2]) < 1e-5 and rel(want[3], plain[3]) < 1e-5
    assert rel(want[0], plain[0] * np.asarray(gnw, np.float64)) < 1e-2
    with pytest.raises(ValueError, match="norm_weight must be"):
        mixer_step(*v.values(), **kw, norm_weight=gnw[:10], impl="xla")
    with pytest.raises(ValueError, match="in_ss must be"):
        mixer_step(*dict(v, zxbcdt=parts[0]).values(), **{**kw, "zx_dtype": None},
                   in_ss=in_ss, in_count=640.0, in_eps=EPS, impl="xla")


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_real_sizes(m):
    """The 2.7B in_proj after a block's delta (320 gated-norm slots over 5120 channels)."""
    h, d, dss, wn, w = inputs(m, m, 2560, 10576, slots=320)
    args = dict(delta_count=DELTA_COUNT, delta_eps=DELTA_EPS, in_dtype=BF16)
    parts, hn, ss = residual_gemv(h, wn, w, d, dss, impl="pallas", **args)
    p0, hn0, _ = residual_gemv_ref(h, wn, w, d, dss, **args)
    hp, oracle = numpy_oracle(h, d, dss, wn, w, BF16)
    assert rel(hn, hn0) < 1e-6 and rel(parts.sum(0), p0.sum(0)) < 1e-5
    hb = np.asarray(hn.astype(BF16), np.float64)
    np.testing.assert_allclose(np.asarray(ss, np.float64).sum(-1), (hb * hb).sum(-1), rtol=1e-5)
    assert rel(normalised(parts, ss, 2560), oracle) < 2e-2
