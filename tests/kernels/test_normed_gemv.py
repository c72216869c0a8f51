"""The norms folded into the decode projections (``gemv.normed_gemv``): the Triton kernel
(interpret mode on the CPU, the real kernel on a GPU) against its reference and a float64
numpy oracle that normalises x from x itself; validation; lowering for "cuda"; and the fused
mixer step's sums of squares (the gated norm's statistics)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.gemv import normed_gemv, normed_gemv_ref
from mamba2_jax.kernels.gemv.pallas_gemv import normed_gemv_call, plan, residual_sum

ON_GPU = jax.default_backend() == "gpu"
F32, BF16 = jnp.float32, jnp.bfloat16
EPS = 1e-5


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(seed, m, K, N, groups, *, in_dtype, w_dtype, slots=3, residual=False):
    """x (float32, the norm's raw input), its sums of squares of x.astype(in_dtype) split into
    ``slots`` partial sums a group (as a producer writes them), the norm weight, w, residual."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(2 * rng.standard_normal((m, K)), F32)
    r = np.asarray(x.astype(in_dtype), np.float64).reshape(m, groups, K // groups)
    parts = np.array_split(r * r, slots, axis=-1)
    ss = jnp.asarray(np.stack([p.sum(-1) for p in parts], -1).reshape(m, -1), F32)
    wn = jnp.asarray(1 + 0.2 * rng.standard_normal(K), F32).astype(w_dtype)
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), F32).astype(w_dtype)
    res = jnp.asarray(rng.standard_normal((m, N)), F32) if residual else None
    return x, ss, wn, w, res


def numpy_oracle(x, wn, w, res, groups, in_dtype):
    """float64: the RMS norm of x (rounded to in_dtype) per group, times wn, @ w (+ res)."""
    m, K = x.shape
    r = np.asarray(x.astype(in_dtype), np.float64).reshape(m, groups, -1)
    y = (r / np.sqrt(np.mean(r * r, -1, keepdims=True) + EPS)).reshape(m, K)
    out = (np.asarray(wn, np.float64) * y) @ np.asarray(w, np.float64)
    return out if res is None else out + np.asarray(res, np.float64)


@pytest.mark.parametrize("m,K,N,groups,in_dtype,w_dtype,kw", [
    (1, 256, 96, 1, BF16, BF16, {}),  # the block norm before in_proj: bf16 in, bf16 weights
    (3, 200, 100, 1, BF16, BF16, dict(block_k=16, splits=3)),  # ragged K slabs and columns
    (2, 256, 64, 1, F32, BF16, {}),  # the gated norm: float32 y
    (5, 192, 48, 1, F32, F32, dict(block_n=16)),  # float32 throughout
    (2, 256, 64, 4, F32, BF16, {}),  # groups: the reference (no kernel for them)
    (5, 192, 48, 3, F32, F32, {}),
])
@pytest.mark.parametrize("residual", [False, True])
def test_matches_reference_and_numpy(m, K, N, groups, in_dtype, w_dtype, kw, residual):
    x, ss, wn, w, res = inputs(m + K + groups, m, K, N, groups, in_dtype=in_dtype,
                               w_dtype=w_dtype, residual=residual)
    norm_dtype = BF16 if w_dtype == BF16 else F32
    args = dict(eps=EPS, groups=groups, in_dtype=in_dtype, norm_dtype=norm_dtype)
    if residual:
        args["res_in_dtype"] = BF16
    impl = dict(impl="pallas", interpret=not ON_GPU)
    if groups > 1:
        with pytest.raises(NotImplementedError):  # asked for a kernel it has not: no fallback
            normed_gemv(x, ss, wn, w, res, **impl, **args, **kw)
        impl = dict(impl="auto")  # the reference, on a GPU too
    got = normed_gemv(x, ss, wn, w, res, **impl, **args, **kw)
    want = normed_gemv_ref(x, ss, wn, w, res, **args)
    oracle = numpy_oracle(x, wn, w, res, groups, in_dtype)
    tol = 2e-2 if w_dtype == BF16 else 1e-5  # bf16: the normalised x and the product rounded
    if not residual:
        assert got.dtype == w.dtype and got.shape == (m, N)
        assert rel(got, want) < (1e-2 if w_dtype == BF16 else 1e-6)
        assert rel(got, oracle) < tol
        parts = normed_gemv(x, ss, wn, w, partials=True, **impl, **args, **kw)
        assert parts.dtype == F32 and parts.ndim == 3 and parts.shape[1:] == (m, N)
        assert rel(jnp.sum(parts, 0), want) < (1e-2 if w_dtype == BF16 else 1e-6)
        return
    (h, ssh), (h0, ssh0) = got, want
    assert h.dtype == h0.dtype == F32 and h.shape == (m, N) and ssh.shape[0] == m
    assert rel(h, h0) < (1e-3 if w_dtype == BF16 else 1e-6)
    assert rel(h, oracle) < tol
    # the sums of squares of the new stream (rounded to bf16): its next norm's statistics
    hb = np.asarray(h.astype(BF16), np.float64)
    np.testing.assert_allclose(np.asarray(ssh, np.float64).sum(-1), (hb * hb).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(ssh0, np.float64).sum(-1), (hb * hb).sum(-1),
                               rtol=1e-2)  # (the reference's h rounds differently in bf16)


def test_validation():
    x, ss, wn, w, res = inputs(1, 2, 64, 32, 2, in_dtype=F32, w_dtype=BF16, residual=True)
    kw = dict(eps=EPS, groups=2, impl="pallas", interpret=True)
    with pytest.raises(ValueError, match="ss must be float32"):
        normed_gemv(x, ss.astype(BF16), wn, w, **kw)
    with pytest.raises(ValueError, match="ss must be float32"):
        normed_gemv(x, ss[:, :5], wn, w, **kw)  # 5 slots are not a multiple of 2 groups
    with pytest.raises(ValueError, match="norm_weight must be"):
        normed_gemv(x, ss, wn[:10], w, **kw)
    with pytest.raises(ValueError, match="residual must be"):
        normed_gemv(x, ss, wn, w, res, partials=True, **kw)
    with pytest.raises(ValueError, match="groups must be"):
        normed_gemv(x, ss, wn, w, **{**kw, "groups": 3})


def test_kernels_lower_for_cuda():
    """The 2.7B out_proj after the gated norm, and the residual sum after it."""
    m, K, N = 1, 5120, 2560
    S = jax.ShapeDtypeStruct
    p = plan(m, K, N)
    fn = functools.partial(normed_gemv_call, p=p, eps=EPS, in_dtype=F32, norm_dtype=BF16,
                           out_dtype=BF16)
    args = [S((m, K), F32), S((m, 80), F32), S((K,), BF16), S((K, N), BF16)]
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    fn = functools.partial(residual_sum, out_dtype=BF16, in_dtype=BF16)
    text = jax.jit(fn).trace(S((p["S"], m, N), F32), S((m, N), F32)).lower(
        lowering_platforms=("cuda",)).as_text()
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


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_real_sizes(m):
    """The 2.7B shapes: in_proj after the block norm, out_proj after the gated norm with the
    residual."""
    x, ss, wn, w, _ = inputs(m, m, 2560, 10576, 1, in_dtype=BF16, w_dtype=BF16)
    args = dict(eps=EPS, in_dtype=BF16)
    got = normed_gemv(x, ss, wn, w, impl="pallas", **args)
    assert rel(got, normed_gemv_ref(x, ss, wn, w, **args)) < 1e-2
    assert rel(got, numpy_oracle(x, wn, w, None, 1, BF16)) < 2e-2
    x, ss, wn, w, res = inputs(m + 1, m, 5120, 2560, 1, in_dtype=F32, w_dtype=BF16,
                               residual=True)
    args = dict(eps=EPS, in_dtype=F32, norm_dtype=BF16, res_in_dtype=BF16)
    h, ssh = normed_gemv(x, ss, wn, w, res, impl="pallas", **args)
    assert rel(h, normed_gemv_ref(x, ss, wn, w, res, **args)[0]) < 1e-3
    assert rel(h, numpy_oracle(x, wn, w, res, 1, F32)) < 2e-2
    hb = np.asarray(h.astype(BF16), np.float64)
    np.testing.assert_allclose(np.asarray(ssh, np.float64).sum(-1), (hb * hb).sum(-1), rtol=1e-5)
