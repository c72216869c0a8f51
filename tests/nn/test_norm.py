"""Norms vs numpy float64."""

import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.nn.norm import GatedGroupRMSNorm, RMSNorm


def numpy_gated_group_norm(x, z, w, groups, eps):
    x, z = np.asarray(x, np.float64), np.asarray(z, np.float64)
    y = x * z / (1.0 + np.exp(-z))
    yg = y.reshape(*y.shape[:-1], groups, -1)
    yg = yg / np.sqrt(np.mean(yg**2, axis=-1, keepdims=True) + eps)
    return yg.reshape(y.shape) * (1.0 if w is None else np.asarray(w, np.float64))


@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_gated_group_norm_matches_numpy(groups):
    rng = np.random.default_rng(groups)
    i = 64
    x, z = (jnp.asarray(rng.standard_normal((3, 5, i)) * 2, jnp.float32) for _ in range(2))
    norm = GatedGroupRMSNorm(i, groups, eps=1e-5)
    w = rng.standard_normal(i) * 0.5 + 1
    norm.weight[...] = jnp.asarray(w, jnp.float32)
    want = numpy_gated_group_norm(x, z, w, groups, 1e-5)
    np.testing.assert_allclose(norm(x, z), want, rtol=2e-5, atol=2e-6)
    if groups > 1:  # per-group statistics differ from one norm over all of i
        other = numpy_gated_group_norm(x, z, w, 1, 1e-5)
        assert np.max(np.abs(other - want)) > 1e-2


def test_gated_norm_without_rms_norm_is_just_the_gate():
    rng = np.random.default_rng(0)
    x, z = (jnp.asarray(rng.standard_normal((4, 32)), jnp.float32) for _ in range(2))
    norm = GatedGroupRMSNorm(32, 4, use_rms_norm=False)
    assert norm.weight is None
    xx, zz = np.asarray(x, np.float64), np.asarray(z, np.float64)
    np.testing.assert_allclose(norm(x, z), xx * zz / (1 + np.exp(-zz)), rtol=1e-6, atol=1e-7)


def test_gated_norm_bf16_input_and_bad_groups():
    rng = np.random.default_rng(1)
    x, z = (jnp.asarray(rng.standard_normal((2, 48)), jnp.bfloat16) for _ in range(2))
    norm = GatedGroupRMSNorm(48, 3, param_dtype=jnp.bfloat16)
    out = norm(x, z)
    assert out.dtype == jnp.bfloat16
    want = numpy_gated_group_norm(x.astype(jnp.float32), z.astype(jnp.float32), None, 3, 1e-5)
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=2e-2, atol=2e-2)
    with pytest.raises(ValueError, match="multiple of n_groups"):
        GatedGroupRMSNorm(48, 5)


def test_rms_norm_matches_numpy():
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((3, 7, 40)) * 3, jnp.float32)
    norm = RMSNorm(40, eps=1e-6)
    w = rng.standard_normal(40)
    norm.weight[...] = jnp.asarray(w, jnp.float32)
    xx = np.asarray(x, np.float64)
    want = xx / np.sqrt(np.mean(xx**2, -1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(norm(x), want, rtol=2e-5, atol=2e-6)
