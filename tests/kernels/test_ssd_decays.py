"""The SSD decay terms: the Pallas kernel (interpret mode) vs its XLA twin and a float64 oracle,
and its lowering for "cuda"."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.ssd.decays import chunk_decays, chunk_decays_pallas, heads_per_block
from mamba2_jax.kernels.ssd.pallas import SSDKernelConfig, ssd_pallas


def oracle(dt, A, q):
    """float64 acum, to_end, total, dt, w in [b, c, h, q] (total [b, c, h])."""
    dt = np.asarray(dt, np.float64)
    b, L, h = dt.shape
    dtc = dt.reshape(b, L // q, q, h).transpose(0, 1, 3, 2)
    a = dtc * np.asarray(A, np.float64)[None, None, :, None]
    acum = np.cumsum(a, axis=-1)
    to_end = np.cumsum(a[..., ::-1], axis=-1)[..., ::-1] - a  # exact in float64 here
    return acum, to_end, a.sum(-1), dtc, np.exp(to_end) * dtc


def decay_inputs(seed, b, L, h, pad=0):
    rng = np.random.default_rng(seed)
    dt = np.log1p(np.exp(rng.standard_normal((b, L, h)))) * 2
    if pad:
        dt[:, -pad:] = 0.0  # padding tokens of a chunk layout
    A = -np.exp(rng.standard_normal(h)) * 3
    return jnp.asarray(dt, jnp.float32), jnp.asarray(A, jnp.float32)


@pytest.mark.parametrize("b,L,h,q,pad,launch", [
    (2, 64, 12, 32, 5, {}), (1, 48, 3, 16, 0, {}), (1, 128, 80, 64, 17, {}),
    (1, 64, 64, 64, 0, {}), (1, 128, 80, 64, 3, dict(max_heads=4, num_warps=1))])
def test_pallas_decays_match_xla_and_float64(b, L, h, q, pad, launch):
    dt, A = decay_inputs(L + h, b, L, h, pad)
    got = chunk_decays_pallas(dt, A, q, interpret=True, **launch)
    xla = chunk_decays(dt, A, q)
    for name, want in zip(got._fields, oracle(dt, A, q)):
        g = np.asarray(getattr(got, name), np.float64)
        assert g.shape == want.shape, name
        scale = np.max(np.abs(want)) + 1e-30
        assert np.max(np.abs(g - want)) / scale < 1e-6, name
        np.testing.assert_allclose(g, np.asarray(getattr(xla, name)), rtol=2e-6, atol=1e-6 * scale)


def test_reverse_sums_do_not_cancel_under_strong_decay():
    """Early tokens decay hard, the last ones barely: ``total - acum_j`` would leave nothing of
    the late to_end values (|total| ~ 1e5 against ~1e-3); the kernel's keep float32 accuracy."""
    q, h = 32, 4
    dt = np.full((1, q, h), 1e-4, np.float32)
    dt[:, : q // 2] = 50.0
    A = np.full(h, -100.0, np.float32)
    got = chunk_decays_pallas(jnp.asarray(dt), jnp.asarray(A), q, interpret=True)
    want = oracle(dt, A, q)[1]
    late = want[..., q // 2: -1]  # nonzero, tiny beside total
    assert np.all(np.abs(late) < 1.0) and np.abs(want).max() > 1e4
    np.testing.assert_allclose(np.asarray(got.to_end)[..., q // 2: -1], late, rtol=1e-5)
    cancelling = np.asarray(got.total)[..., None] - np.asarray(got.acum)
    assert np.max(np.abs(cancelling[..., q // 2: -1] - late) / np.abs(late)) > 1e-2  # the trap


@pytest.mark.parametrize("h,cap,want", [(80, 32, 16), (128, 32, 32), (3, 32, 1), (12, 32, 4),
                                         (64, 32, 32), (128, 8, 8), (80, 4, 4)])
def test_heads_per_block(h, cap, want):
    assert heads_per_block(h, cap) == want


def test_forward_is_the_same_with_either_decays():
    rng = np.random.default_rng(3)
    b, l, h, p, g, n, q = 1, 40, 4, 16, 2, 16, 16
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    x, dt, B, C = f(b, l, h, p), f(b, l, h), f(b, l, g, n), f(b, l, g, n)
    A = -jnp.asarray(rng.uniform(0.5, 4.0, h), jnp.float32)
    out = [ssd_pallas(SSDKernelConfig(chunk_size=q, dt_softplus=True, decays=d, interpret=True),
                      x, dt, A, B, C, None, None, None, None, None) for d in ("pallas", "xla")]
    for a, b_ in zip(out[0][:2], out[1][:2]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="decays"):
        SSDKernelConfig(chunk_size=q, decays="triton")


@pytest.mark.parametrize("b,L,h,q,launch", [(1, 8192, 80, 256, {}), (2, 1024, 3, 64, {}),
                                            (1, 8192, 128, 256, dict(max_heads=8, num_warps=1)),
                                            (1, 4096, 80, 256, dict(num_warps=8))])
def test_decays_kernel_lowers_for_cuda(b, L, h, q, launch):
    S = jax.ShapeDtypeStruct
    fn = lambda dt, A: chunk_decays_pallas(dt, A, q, **launch)
    text = (jax.jit(fn).trace(S((b, L, h), jnp.float32), S((h,), jnp.float32))
            .lower(lowering_platforms=("cuda",)).as_text())
    assert text.count("__gpu$xla.gpu.triton") == 1
