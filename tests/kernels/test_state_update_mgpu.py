"""The Mosaic GPU selective state update (``kernel="mgpu"``): Mosaic GPU interpret mode on the
CPU against the XLA reference, its lowering for "cuda" (in place: the pool aliased), the kernel
choice, and on a GPU (marker ``gpu``) the same at real sizes, in place on a donated pool."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.state_update import selective_state_update
from mamba2_jax.kernels.state_update.api import which_kernel
from mamba2_jax.kernels.state_update.mgpu_ssu import in_place_route, selective_state_update_mgpu
from test_state_update_pallas import both as pool_both
from test_state_update_pallas import inputs as pool_inputs
from test_state_update_pallas import kernel_arg_shapes, rel

pytest.importorskip("absl")  # jax.experimental.pallas.mosaic_gpu imports it
ON_GPU = jax.default_backend() == "gpu"


def inputs(seed, b, h, p, g, n, slots, pool_dtype=jnp.float32, x_dtype=jnp.bfloat16):
    v = pool_inputs(seed, b, h, p, g, n, slots, pool_dtype, x_dtype)  # every third row pads
    if b > 2:
        v["idx"] = v["idx"].at[2].set(slots + 3)  # out of range: a padding row too
    return v


def both(v, **kw):
    assert which_kernel("mgpu", v["state"], v["x"], v["B"], interpret=not ON_GPU) == "mgpu"
    return pool_both(v, kernel="mgpu", **kw)


def assert_matches(v, got, want, y_tol, pool_tol):
    (y, pool), (y_ref, pool_ref) = got, want
    assert y.dtype == v["x"].dtype and pool.dtype == v["state"].dtype
    assert np.isfinite(np.asarray(y, np.float32)).all()
    assert rel(y, y_ref) < y_tol and rel(pool, pool_ref) < pool_tol
    idx = np.asarray(v["idx"])
    untouched = np.setdiff1d(np.arange(v["state"].shape[0]), idx[idx >= 0])
    np.testing.assert_array_equal(np.asarray(pool, np.float32)[untouched],
                                  np.asarray(v["state"], np.float32)[untouched])


@pytest.mark.parametrize("g,d_kind,with_z", [(1, "h", True), (2, "hp", False), (2, None, True)])
def test_matches_reference_with_slots_and_padding(g, d_kind, with_z):
    v = inputs(g, b=4, h=4, p=64, g=g, n=128, slots=6)
    D = {None: None, "h": v["D"], "hp": v["Dhp"]}[d_kind]
    got, want = both(v, D=D, z=v["z"] if with_z else None)
    assert_matches(v, got, want, 1e-5, 1e-6)


def test_bf16_pool_head_dim_128_and_dt_limit():
    v = inputs(5, b=3, h=2, p=128, g=1, n=64, slots=4, pool_dtype=jnp.bfloat16)
    got, want = both(v, D=v["D"], z=v["z"], dt_limit=(0.05, 0.6))
    assert_matches(v, got, want, 1e-2, 1e-2)


def test_float32_inputs():
    v = inputs(6, b=2, h=2, p=64, g=1, n=64, slots=3, x_dtype=jnp.float32)
    got, want = both(v, D=v["D"])
    assert_matches(v, got, want, 1e-5, 1e-6)


@pytest.mark.parametrize("pool_dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_lowers_for_cuda_with_the_pool_aliased(pool_dtype):
    if in_place_route() is None:
        pytest.skip(f"jax {jax.__version__} cannot run the kernel in place")
    fn = functools.partial(selective_state_update_mgpu, softplus=True)
    text = jax.jit(fn, donate_argnums=0).trace(*kernel_arg_shapes(pool_dtype)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1 and "triton" not in text
    assert "output_operand_aliases" in text  # the kernel writes the pool operand in place
    assert "tf.aliasing_output" in text  # ... which is the donated argument's buffer


def test_kernel_choice():
    S = jax.ShapeDtypeStruct
    pool, B = S((256, 8, 64, 128), jnp.float32), S((64, 1, 128), jnp.bfloat16)
    x64, x1 = S((64, 8, 64), jnp.bfloat16), S((1, 8, 64), jnp.bfloat16)
    assert which_kernel("auto", pool, x64, B, interpret=True) == "mgpu"  # b >= 64
    assert which_kernel("auto", pool, x1, B, interpret=True) == "triton"
    assert which_kernel("auto", S((256, 8, 64, 32), jnp.float32), x64,  # out of its scope
                        S((64, 1, 32), jnp.bfloat16), interpret=True) == "triton"
    assert which_kernel("mgpu", pool, x1, B, interpret=True) == "mgpu"
    assert which_kernel("mgpu", pool, x64, B, interpret=True) == "mgpu"
    assert which_kernel("triton", pool, x64, B, interpret=True) == "triton"
    # n = 32: bf16 rows of B are 64 bytes; p = 32: not a WGMMA row block -> the Triton kernel
    assert which_kernel("mgpu", S((256, 8, 64, 32), jnp.float32), x64,
                        S((64, 1, 32), jnp.bfloat16), interpret=True) == "triton"
    assert which_kernel("mgpu", S((256, 8, 32, 128), jnp.float32), S((64, 8, 32), jnp.bfloat16),
                        B, interpret=True) == "triton"
    with pytest.raises(ValueError, match="kernel must be one of"):
        which_kernel("cuda", pool, x64, B)
    v = inputs(0, b=2, h=2, p=16, g=1, n=16, slots=2)
    with pytest.raises(ValueError, match="kernel must be one of"):
        selective_state_update(v["state"], v["x"], v["dt"], v["A"], v["B"], v["C"],
                               state_batch_indices=v["idx"], impl="xla", kernel="fast")


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("b,h,g,pool_dtype", [(1, 80, 1, jnp.float32), (64, 80, 1, jnp.float32),
                                              (256, 128, 8, jnp.float32),
                                              (64, 128, 8, jnp.bfloat16)])
def test_gpu_real_sizes_in_place(b, h, g, pool_dtype):
    if in_place_route() is None:
        pytest.skip(f"jax {jax.__version__} cannot run the kernel in place")
    v = inputs(b, b=b, h=h, p=64, g=g, n=128, slots=2 * b + 1, pool_dtype=pool_dtype)
    got, want = both(v, D=v["D"], z=v["z"])
    bf16 = pool_dtype == jnp.bfloat16
    assert_matches(v, got, want, 1e-2, 1e-2 if bf16 else 1e-5)
    step = jax.jit(functools.partial(selective_state_update, dt_softplus=True, impl="pallas",
                                     kernel="mgpu"), donate_argnums=0)
    pool = jnp.array(v["state"])
    address = pool.unsafe_buffer_pointer()
    y, new = step(pool, v["x"], v["dt"], v["A"], v["B"], v["C"], D=v["D"], z=v["z"],
                  dt_bias=v["dt_bias"], state_batch_indices=v["idx"])
    assert pool.is_deleted() and new.unsafe_buffer_pointer() == address  # no copy of the pool
    assert_matches(v, (y, new), want, 1e-2, 1e-2 if bf16 else 1e-5)


@pytest.mark.parametrize("b,h,g", [
    (4, 2, 1),
    pytest.param(1, 80, 1, marks=[pytest.mark.gpu, pytest.mark.skipif(
        not ON_GPU, reason="needs a GPU")]),
    pytest.param(64, 128, 8, marks=[pytest.mark.gpu, pytest.mark.skipif(
        not ON_GPU, reason="needs a GPU")])])
def test_fresh_pool_variant_matches_on_the_named_slots(b, h, g):
    # alias=False (the benchmarks' variant where the in-place form cannot lower): y and the
    # slots the rows name are the reference's; the other slots of its pool are undefined
    v = inputs(b, b=b, h=h, p=64, g=g, n=128, slots=2 * b + 1)
    if b == 1:  # (inputs() makes every third row, here the only one, a padding row)
        v["idx"] = jnp.asarray([1], jnp.int32)
    y, pool = selective_state_update_mgpu(v["state"], v["x"], v["dt"], v["A"], v["B"], v["C"],
                                          v["D"], v["dt_bias"], v["z"], v["idx"], softplus=True,
                                          alias=False, interpret=not ON_GPU)
    y_ref, pool_ref = selective_state_update(
        v["state"], v["x"], v["dt"], v["A"], v["B"], v["C"], D=v["D"], z=v["z"],
        dt_bias=v["dt_bias"], dt_softplus=True, state_batch_indices=v["idx"], impl="xla")
    idx = np.asarray(v["idx"])
    named = idx[(idx >= 0) & (idx < v["state"].shape[0])]
    assert named.size and rel(y, y_ref) < 1e-2
    assert rel(np.asarray(pool)[named], np.asarray(pool_ref)[named]) < 1e-5
