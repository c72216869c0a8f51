"""Pallas causal conv1d update vs the XLA reference and a float64 numpy oracle: interpret mode on
CPU, the real kernel on a GPU, and lowering for "cuda" on CPU."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.common import pick_warps
from mamba2_jax.kernels.conv1d import causal_conv1d_update
from mamba2_jax.kernels.conv1d.pallas_update import (
    causal_conv1d_update_pallas,
    pick_block_c,
)

ON_GPU = jax.default_backend() == "gpu"
F32, BF16 = jnp.float32, jnp.bfloat16


def inputs(seed, b, c, k, slots, x_dtype=F32, pool_dtype=F32, pad=True):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), F32)
    idx = rng.permutation(slots)[:b].astype(np.int32)
    if pad:
        idx[1::4] = -1  # padding rows
        idx[2::5] = slots + 3  # out of range: padding too
    return dict(x=f(b, c).astype(x_dtype), pool=f(slots, c, k - 1).astype(pool_dtype),
                weight=f(c, k), bias=f(c), idx=jnp.asarray(idx))


def numpy_update(x, pool, weight, bias, idx, silu):
    """float64 oracle: (y [b, c], new pool) with padding rows reading zeros, writing nothing."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    pool64 = np.asarray(pool, np.float64)
    new = pool64.copy()
    y = np.zeros_like(x)
    for r, s in enumerate(np.asarray(idx)):
        valid = 0 <= s < pool64.shape[0]
        state = pool64[s] if valid else np.zeros(pool64.shape[1:])
        window = np.concatenate([state, x[r][:, None]], axis=1)  # [c, k], newest last
        acc = (window * weight).sum(axis=1) + (0 if bias is None else np.asarray(bias))
        y[r] = acc / (1 + np.exp(-acc)) if silu else acc
        if valid:
            new[s] = window[:, 1:]
    return y, new


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_both(v, *, bias=True, activation="silu", indices=True):
    args = (v["x"], v["pool"], v["weight"], v["bias"] if bias else None)
    kw = dict(activation=activation, conv_state_indices=v["idx"] if indices else None)
    ours = causal_conv1d_update(*args, impl="pallas", interpret=not ON_GPU, **kw)
    ref = causal_conv1d_update(*args, impl="xla", **kw)
    return ours, ref


def untouched_slots(idx, slots):
    idx = np.asarray(idx)
    return np.setdiff1d(np.arange(slots), idx[(idx >= 0) & (idx < slots)])


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("x_dtype,pool_dtype", [(F32, F32), (BF16, BF16), (BF16, F32)])
@pytest.mark.parametrize("bias,activation", [(True, "silu"), (False, None)])
def test_matches_reference_and_numpy(k, x_dtype, pool_dtype, bias, activation):
    b, c, slots = 7, 64, 11
    v = inputs(10 * k + bias, b, c, k, slots, x_dtype, pool_dtype)
    (y, pool), (y_ref, pool_ref) = run_both(v, bias=bias, activation=activation)
    assert y.dtype == x_dtype and y.shape == (b, c)
    assert pool.dtype == pool_dtype and pool.shape == v["pool"].shape
    assert np.isfinite(np.asarray(y, np.float32)).all()
    # The new pool is a copy of inputs: bit-exact; slots no row names are untouched.
    np.testing.assert_array_equal(np.asarray(pool), np.asarray(pool_ref))
    keep = untouched_slots(v["idx"], slots)
    assert len(keep) > 0
    np.testing.assert_array_equal(np.asarray(pool)[keep], np.asarray(v["pool"])[keep])
    tol = 1e-5 if x_dtype == F32 else 1e-2
    assert rel(y, y_ref) < tol
    y_np, pool_np = numpy_update(v["x"], v["pool"], v["weight"], v["bias"] if bias else None,
                                 v["idx"], activation == "silu")
    assert rel(y, y_np) < tol
    np.testing.assert_allclose(np.asarray(pool, np.float64), pool_np, rtol=0, atol=0)


def test_identity_slots_without_indices():
    v = inputs(3, b=5, c=32, k=4, slots=5, pad=False)
    (y, pool), (y_ref, pool_ref) = run_both(v, indices=False)
    assert rel(y, y_ref) < 1e-5
    np.testing.assert_array_equal(np.asarray(pool), np.asarray(pool_ref))


@pytest.mark.parametrize("c,block_c", [(24, 16), (40, 16), (96, 32)])
def test_channel_blocks_exact_and_ragged(c, block_c):
    """Several channel blocks per row; c % block_c != 0 masks the last block."""
    k, slots = 4, 6
    v = inputs(c, b=4, c=c, k=k, slots=slots)
    y, pool = causal_conv1d_update_pallas(v["x"], v["pool"], v["weight"], v["bias"], v["idx"],
                                          silu=True, block_c=block_c, interpret=not ON_GPU)
    y_np, pool_np = numpy_update(v["x"], v["pool"], v["weight"], v["bias"], v["idx"], True)
    assert rel(y, y_np) < 1e-5
    np.testing.assert_allclose(np.asarray(pool, np.float64), pool_np, rtol=0, atol=0)


def test_block_and_warp_choice():
    assert pick_block_c(5376) == 256 and pick_block_c(8448) == 256 and pick_block_c(1792) == 256
    assert pick_block_c(24) == 32 and pick_block_c(64, 16) == 16 and pick_block_c(1) == 1
    with pytest.raises(ValueError):
        pick_block_c(64, 48)
    assert pick_warps(256, 4) == 4 and pick_warps(64, 4) == 2 and pick_warps(16, 4) == 1
    assert pick_warps(512, 8) == 8 and pick_warps(96, 8) == 2


def test_in_place_under_jit_with_donation():
    v = inputs(6, b=4, c=32, k=4, slots=8)
    expected = causal_conv1d_update(v["x"], v["pool"], v["weight"], v["bias"],
                                    conv_state_indices=v["idx"], impl="xla")
    step = jax.jit(functools.partial(causal_conv1d_update, impl="pallas", interpret=not ON_GPU),
                   donate_argnums=1)
    # The pool is aliased through to the output: nothing between the argument and the kernel
    # (no cast, no copy) breaks the chain.
    lowered = step.lower(v["x"], v["pool"], v["weight"], v["bias"], conv_state_indices=v["idx"])
    assert "tf.aliasing_output = 1" in lowered.as_text()
    pool_in = jnp.array(v["pool"])
    y, pool = step(v["x"], pool_in, v["weight"], v["bias"], conv_state_indices=v["idx"])
    assert pool_in.is_deleted()
    np.testing.assert_array_equal(np.asarray(pool), np.asarray(expected[1]))
    np.testing.assert_allclose(y, expected[0], rtol=1e-5, atol=1e-6)
    # A second step on the returned pool reuses its buffer.
    ptr = pool.unsafe_buffer_pointer()
    _, pool2 = step(v["x"], pool, v["weight"], v["bias"], conv_state_indices=v["idx"])
    assert pool.is_deleted() and pool2.unsafe_buffer_pointer() == ptr


@pytest.mark.parametrize("b,c,k,slots,dtype,bias", [
    (64, 5376, 4, 128, BF16, True),  # real size, exact channel blocks
    (3, 1000, 3, 8, F32, False),  # ragged last block, k - 1 = 3 columns
    (1, 8448, 2, 4, BF16, True),
])
def test_kernel_lowers_for_cuda(b, c, k, slots, dtype, bias):
    S = jax.ShapeDtypeStruct
    args = (S((b, c), dtype), S((slots, c, k - 1), dtype), S((c, k), dtype),
            S((c,), dtype) if bias else None, S((b,), jnp.int32))
    fn = functools.partial(causal_conv1d_update_pallas, silu=True)
    text = jax.jit(fn, donate_argnums=1).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1
    # In place: the kernel's output 1 aliases its pool operand (operand 1, after idx), and the
    # donated pool argument is aliased to the jitted function's output 1.
    assert re.search(r"output_operand_alias<output_tuple_indices = \[1\],\s*operand_index = 1,",
                     text)
    assert "tf.aliasing_output = 1" in text


def test_empty_batch_falls_back_to_the_reference(caplog):
    v = inputs(4, b=3, c=16, k=4, slots=3)
    with caplog.at_level("WARNING", logger="mamba2_jax"):
        y, pool = causal_conv1d_update(v["x"][:0], v["pool"], v["weight"],
                                       conv_state_indices=v["idx"][:0], impl="pallas",
                                       interpret=True)
    assert y.shape == (0, 16) and "empty input" in caplog.text
    np.testing.assert_array_equal(np.asarray(pool), np.asarray(v["pool"]))


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("c", [5376, 8448])
@pytest.mark.parametrize("b", [1, 64, 256])
def test_gpu_real_sizes(b, c):
    v = inputs(b, b=b, c=c, k=4, slots=2 * b + 1, x_dtype=BF16, pool_dtype=BF16, pad=b > 1)
    (y, pool), (y_ref, pool_ref) = run_both(v)
    assert rel(y, y_ref) < 1e-2
    np.testing.assert_array_equal(np.asarray(pool), np.asarray(pool_ref))
    keep = untouched_slots(v["idx"], 2 * b + 1)
    np.testing.assert_array_equal(np.asarray(pool)[keep], np.asarray(v["pool"])[keep])
