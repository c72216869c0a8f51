"""The decode-step row RMS norm (kernels/rms_norm): Triton interpret mode vs the reference and
the model's norms, validation, lowering for "cuda"; on a GPU (marker ``gpu``) the 2.7B rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.rms_norm import rms_norm, rms_norm_ref
from mamba2_jax.kernels.rms_norm.pallas_norm import rms_norm_pallas
from mamba2_jax.nn.norm import GatedGroupRMSNorm, RMSNorm

ON_GPU = jax.default_backend() == "gpu"
BF16, F32 = jnp.bfloat16, jnp.float32


def arrays(seed, m, D, x_dtype, w_dtype, delta_dtype=None):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), F32)
    return (f(m, D).astype(x_dtype), (1 + 0.2 * f(D)).astype(w_dtype),
            None if delta_dtype is None else f(m, D).astype(delta_dtype))


def same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=1e-6 if a.dtype == F32 else 0, atol=1e-6 if a.dtype == F32
                               else 0)


@pytest.mark.parametrize("m,D,groups,x_dtype,w_dtype,delta_dtype,in_dtype,norm_dtype", [
    (2, 80, 1, BF16, BF16, None, None, None),  # ragged block (80 of 128)
    (3, 96, 4, F32, BF16, None, None, BF16),  # the gated norm's case
    (2, 40, 1, F32, BF16, BF16, BF16, None),  # residual add in float32, the block norm's case
    (1, 64, 1, BF16, F32, BF16, None, None)])
def test_matches_the_reference(m, D, groups, x_dtype, w_dtype, delta_dtype, in_dtype,
                               norm_dtype):
    x, w, d = arrays(m + D, m, D, x_dtype, w_dtype, delta_dtype)
    kw = dict(eps=1e-5, groups=groups, delta=d, in_dtype=in_dtype, norm_dtype=norm_dtype)
    got = rms_norm(x, w, impl="pallas", interpret=not ON_GPU, **kw)
    want = rms_norm_ref(x, w, **kw)
    for a, b in zip(*((got, want) if d is not None else ((got,), (want,)))):
        same(a, b)


def numpy_norm(x, w, eps, groups=1):
    """float64 oracle: per group x / sqrt(mean(x^2) + eps), times w (no roundings)."""
    x = np.asarray(x, np.float64)
    g = x.reshape(*x.shape[:-1], groups, -1)
    y = (g / np.sqrt(np.mean(g * g, axis=-1, keepdims=True) + eps)).reshape(x.shape)
    return y * np.asarray(w, np.float64)


def test_the_models_norms_match_a_float64_oracle():
    """The modules of nn/norm.py are rms_norm_ref (prefill's [b, l, d] too): against numpy in
    float64, within the bf16 roundings of the normalised value and the product."""
    x, _, _ = arrays(1, 6, 64, F32, BF16)
    block = RMSNorm(64, eps=1e-5, param_dtype=BF16)
    block.weight[...] = (1 + 0.3 * x[0]).astype(BF16)
    xb = x.astype(BF16).reshape(2, 3, 64)
    got = block(xb)
    assert got.dtype == BF16 and got.shape == (2, 3, 64)
    np.testing.assert_allclose(np.asarray(got, F32), numpy_norm(xb, block.weight[...], 1e-5),
                               rtol=2 ** -7, atol=2 ** -7)
    gated = GatedGroupRMSNorm(64, 4, eps=1e-6, param_dtype=BF16)
    gated.weight[...] = (1 - 0.3 * x[1]).astype(BF16)
    y, z = x.astype(BF16), x[::-1].astype(BF16)
    pre = np.asarray(y, np.float64) * np.asarray(jax.nn.silu(z.astype(F32)), np.float64)
    got = gated(y, z)
    assert got.dtype == BF16
    np.testing.assert_allclose(np.asarray(got, F32), numpy_norm(pre, gated.weight[...], 1e-6, 4),
                               rtol=2 ** -7, atol=2 ** -7)
    # the decode step's one-launch form of the gated norm equals the module's (exactly in
    # interpret mode; on a GPU its rsqrt may move one bf16 rounding)
    pre32 = y.astype(F32) * jax.nn.silu(z.astype(F32))
    fused = gated.normalize(pre32, BF16, impl="pallas" if ON_GPU else "interpret")
    assert fused.dtype == got.dtype
    np.testing.assert_allclose(np.asarray(fused, F32), np.asarray(got, F32),
                               rtol=2 ** -7 if ON_GPU else 0, atol=2 ** -7 if ON_GPU else 0)


def test_bad_input():
    x, w, d = arrays(2, 2, 48, F32, F32, F32)
    with pytest.raises(ValueError, match="weight must be"):
        rms_norm(x, w[:4], eps=1e-5)
    with pytest.raises(ValueError, match="groups must be"):
        rms_norm(x, w, eps=1e-5, groups=5)
    with pytest.raises(ValueError, match="delta must be"):
        rms_norm(x, w, eps=1e-5, delta=d[:1])
    with pytest.raises(ValueError, match="x must be"):
        rms_norm(x[0], w, eps=1e-5)


def test_kernel_lowers_for_cuda():
    S = jax.ShapeDtypeStruct
    text = jax.jit(lambda x, w, d: rms_norm_pallas(x, w, d, eps=1e-5, in_dtype="bfloat16")
                   ).trace(S((1, 2560), F32), S((2560,), BF16), S((1, 2560), BF16)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 64])
def test_gpu_real_sizes(m):
    x, w, d = arrays(m, m, 2560, F32, BF16, BF16)
    got = rms_norm(x, w, eps=1e-5, delta=d, in_dtype=BF16, impl="pallas")
    want = rms_norm_ref(x, w, eps=1e-5, delta=d, in_dtype=BF16)
    for a, b in zip(got, want):  # (rsqrt on the GPU vs XLA's: allow one bf16 rounding)
        np.testing.assert_allclose(np.asarray(a, F32), np.asarray(b, F32), rtol=1e-2, atol=1e-2)
    y, wg, _ = arrays(m + 1, m, 5120, F32, BF16)
    got = rms_norm(y, wg, eps=1e-5, groups=1, norm_dtype=BF16, impl="pallas")
    want = rms_norm_ref(y, wg, eps=1e-5, groups=1, norm_dtype=BF16)
    np.testing.assert_allclose(np.asarray(got, F32), np.asarray(want, F32), rtol=1e-2, atol=1e-2)
