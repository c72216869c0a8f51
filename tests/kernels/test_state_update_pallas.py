"""Pallas selective state update vs the XLA reference: interpret mode on CPU, the real kernel on a
GPU, and lowering for "cuda" on CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.state_update import selective_state_update
from mamba2_jax.kernels.state_update.pallas_ssu import selective_state_update_pallas

ON_GPU = jax.default_backend() == "gpu"


def inputs(seed, b, h, p, g, n, slots, pool_dtype=jnp.float32, x_dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    idx = rng.permutation(slots)[:b].astype(np.int32)
    idx[::3] = -1  # padding rows
    return dict(state=f(slots, h, p, n).astype(pool_dtype), x=f(b, h, p).astype(x_dtype),
                dt=f(b, h), A=-jnp.asarray(rng.uniform(0.5, 4, h), jnp.float32),
                B=f(b, g, n).astype(x_dtype), C=f(b, g, n).astype(x_dtype), D=f(h), Dhp=f(h, p),
                z=f(b, h, p).astype(x_dtype), dt_bias=f(h), idx=jnp.asarray(idx))


def both(v, kernel="triton", **kw):
    args = (v["state"], v["x"], v["dt"], v["A"], v["B"], v["C"])
    common = dict(dt_bias=v["dt_bias"], dt_softplus=True, state_batch_indices=v["idx"], **kw)
    ours = selective_state_update(*args, impl="pallas", interpret=not ON_GPU, kernel=kernel,
                                  **common)
    ref = selective_state_update(*args, impl="xla", **common)
    return ours, ref


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("g", [1, 2, 4])
@pytest.mark.parametrize("d_kind,with_z", [(None, False), ("h", True), ("hp", False)])
def test_matches_reference_with_slots_and_padding(g, d_kind, with_z):
    v = inputs(g, b=7, h=4, p=16, g=g, n=16, slots=11)
    D = {None: None, "h": v["D"], "hp": v["Dhp"]}[d_kind]
    (y, pool), (y_ref, pool_ref) = both(v, D=D, z=v["z"] if with_z else None)
    assert rel(y, y_ref) < 1e-5 and np.isfinite(np.asarray(y)).all()
    idx = np.asarray(v["idx"])
    untouched = np.setdiff1d(np.arange(11), idx[idx >= 0])
    np.testing.assert_array_equal(np.asarray(pool)[untouched], np.asarray(v["state"])[untouched])
    assert rel(pool, pool_ref) < 1e-6


def test_bf16_pool_and_dt_limit():
    v = inputs(5, b=6, h=8, p=32, g=2, n=32, slots=9, pool_dtype=jnp.bfloat16,
               x_dtype=jnp.bfloat16)
    (y, pool), (y_ref, pool_ref) = both(v, D=v["D"], z=v["z"], dt_limit=(0.05, 0.6))
    assert pool.dtype == jnp.bfloat16 and y.dtype == jnp.bfloat16
    assert rel(y, y_ref) < 1e-2 and rel(pool, pool_ref) < 1e-2


def test_in_place_under_jit_with_donation():
    v = inputs(6, b=4, h=4, p=16, g=1, n=16, slots=8)
    step = jax.jit(functools.partial(selective_state_update, impl="pallas", interpret=not ON_GPU,
                                     dt_softplus=True), donate_argnums=0)
    expected = selective_state_update(v["state"], v["x"], v["dt"], v["A"], v["B"], v["C"],
                                      dt_softplus=True, state_batch_indices=v["idx"], impl="xla")
    y, pool = step(jnp.array(v["state"]), v["x"], v["dt"], v["A"], v["B"], v["C"],
                   state_batch_indices=v["idx"])
    np.testing.assert_allclose(pool, expected[1], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(y, expected[0], rtol=1e-5, atol=1e-5)


def kernel_arg_shapes(pool_dtype, b=64, h=80, p=64, g=1, n=128, slots=128):
    """Abstract arguments of a kernel call (pool, x, dt, A, B, C, D, dt_bias, z, idx)."""
    S = jax.ShapeDtypeStruct
    return (S((slots, h, p, n), pool_dtype), S((b, h, p), jnp.bfloat16), S((b, h), jnp.float32),
            S((h,), jnp.float32), S((b, g, n), jnp.bfloat16), S((b, g, n), jnp.bfloat16),
            S((h,), jnp.float32), S((h,), jnp.float32), S((b, h, p), jnp.bfloat16),
            S((b,), jnp.int32))


@pytest.mark.parametrize("pool_dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_lowers_for_cuda(pool_dtype):
    fn = functools.partial(selective_state_update_pallas, softplus=True)
    text = jax.jit(fn).trace(*kernel_arg_shapes(pool_dtype)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("b,h,g", [(1, 80, 1), (64, 80, 1), (256, 128, 8)])
def test_gpu_real_sizes(b, h, g):
    v = inputs(b, b=b, h=h, p=64, g=g, n=128, slots=2 * b + 1, x_dtype=jnp.bfloat16)
    (y, pool), (y_ref, pool_ref) = both(v, D=v["D"], z=v["z"])
    assert rel(y, y_ref) < 1e-2 and rel(pool, pool_ref) < 1e-5


def test_out_of_range_slot_is_a_padding_row_like_the_reference():
    v = inputs(8, b=3, h=4, p=16, g=1, n=16, slots=5)
    v["idx"] = jnp.asarray([0, 7, 2], jnp.int32)  # 7 >= slots
    (y, pool), (y_ref, pool_ref) = both(v)
    assert rel(y, y_ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(pool)[[1, 3, 4]], np.asarray(v["state"])[[1, 3, 4]])
    assert rel(pool, pool_ref) < 1e-6
