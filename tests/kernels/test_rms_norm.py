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


def test_reference_is_the_models_norms():
    x, _, _ = arrays(1, 3, 64, F32, BF16)
    block = RMSNorm(64, eps=1e-5, param_dtype=BF16)
    block.weight[...] = (1 + 0.3 * x[0]).astype(BF16)
    same(rms_norm_ref(x, block.weight[...], eps=1e-5, in_dtype=BF16), block(x.astype(BF16)))
    gated = GatedGroupRMSNorm(64, 4, eps=1e-6, param_dtype=BF16)
    gated.weight[...] = (1 - 0.3 * x[1]).astype(BF16)
    y, z = x.astype(BF16), x[::-1].astype(BF16)
    pre = y.astype(F32) * jax.nn.silu(z.astype(F32))
    same(rms_norm_ref(pre, gated.weight[...], eps=1e-6, groups=4, norm_dtype=BF16), gated(y, z))


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
