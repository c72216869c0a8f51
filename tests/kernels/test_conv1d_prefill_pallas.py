"""Pallas prefill causal conv1d vs the XLA reference and a float64 numpy oracle: interpret mode
on CPU (small shapes: the grid runs sequentially), the real kernel on a GPU, and lowering for
"cuda" on CPU so Triton lowering errors fail CI."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.conv1d import causal_conv1d
from mamba2_jax.kernels.conv1d.pallas_prefill import causal_conv1d_pallas, pick_blocks

ON_GPU = jax.default_backend() == "gpu"
INTERPRET = not ON_GPU
F32, BF16 = jnp.float32, jnp.bfloat16
# Small blocks so the tiny test shapes have several, ragged, token and channel blocks.
SMALL = dict(block_t=8, block_c=16)


def randn(rng, *shape, dtype=F32):
    return jnp.asarray(rng.standard_normal(shape), F32).astype(dtype)


def numpy_seq(x, weight, bias, state, silu):
    """float64 oracle for one sequence: x [l, c], weight [c, k], state [c, k-1] or None.
    Returns (y [l, c], final state [c, k-1])."""
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    l, c = x.shape
    k = weight.shape[1]
    hist = np.zeros((k - 1, c)) if state is None else np.asarray(state, np.float64).T
    xin = np.concatenate([hist, x], axis=0)  # [k-1+l, c]
    y = sum(weight[:, w] * xin[w:w + l] for w in range(k))
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    if silu:
        y = y / (1 + np.exp(-y))
    return y, xin[l:l + k - 1].T


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def run_both(x, weight, bias, init, cu, activation, **blocks):
    kw = dict(initial_states=init, cu_seqlens=cu, activation=activation,
              return_final_states=True)
    if blocks:  # the kernel entry point directly, with test-sized blocks
        ours = causal_conv1d_pallas(x, weight, bias, init, cu, silu=activation is not None,
                                    return_final_states=True, interpret=INTERPRET, **blocks)
    else:
        ours = causal_conv1d(x, weight, bias, impl="pallas", interpret=INTERPRET, **kw)
    return ours, causal_conv1d(x, weight, bias, impl="xla", **kw)


def check(ours, ref, oracle, x_dtype, state_dtype):
    (y, fs), (y_ref, fs_ref), (y_np, fs_np) = ours, ref, oracle
    assert y.dtype == x_dtype and y.shape == y_ref.shape
    assert fs.dtype == state_dtype and fs.shape == fs_ref.shape
    assert np.isfinite(np.asarray(y, np.float32)).all()
    tol = 1e-5 if x_dtype == F32 else 1e-2
    assert rel(y, y_ref) < tol and rel(y, y_np) < tol
    # Final states are copies of inputs: exact.
    np.testing.assert_array_equal(np.asarray(fs), np.asarray(fs_ref))
    np.testing.assert_array_equal(np.asarray(fs, np.float64), fs_np)


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("dtype", [F32, BF16])
@pytest.mark.parametrize("with_init", [True, False])
def test_dense_matches_reference_and_numpy(k, dtype, with_init):
    """b=2, l=13 (not a multiple of bt=8), c=24 (not a multiple of bc=16)."""
    b, l, c = 2, 13, 24
    rng = np.random.default_rng(100 * k + 10 * with_init + (dtype == F32))
    has_bias = (k + with_init) % 2 == 0  # both bias/activation pairs for every k
    activation = "silu" if has_bias else None
    x, w = randn(rng, b, l, c, dtype=dtype), randn(rng, c, k, dtype=dtype)
    bias = randn(rng, c, dtype=dtype) if has_bias else None
    init = randn(rng, b, c, k - 1, dtype=dtype) if with_init else None
    ours, ref = run_both(x, w, bias, init, None, activation, **SMALL)
    oracle = [numpy_seq(x[r], w, bias, None if init is None else init[r], has_bias)
              for r in range(b)]
    oracle = tuple(np.stack(a) for a in zip(*oracle))
    check(ours, ref, oracle, dtype, dtype)


def test_dense_short_sequences_and_api_default_blocks():
    """l < k-1 (the final state keeps part of the initial state), default blocks through the
    API, y only."""
    rng = np.random.default_rng(7)
    b, l, c, k = 3, 2, 40, 4
    x, w, bias, init = (randn(rng, b, l, c), randn(rng, c, k), randn(rng, c),
                        randn(rng, b, c, k - 1))
    ours, ref = run_both(x, w, bias, init, None, "silu")
    oracle = tuple(np.stack(a) for a in zip(*[numpy_seq(x[r], w, bias, init[r], True)
                                              for r in range(b)]))
    check(ours, ref, oracle, F32, F32)
    y = causal_conv1d(x, w, bias, initial_states=init, impl="pallas", interpret=INTERPRET)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ours[0]))


# An empty sequence, sequences shorter than k-1 (1 and 2 tokens), one spanning several blocks.
CU = [0, 3, 3, 4, 6, 21, 30]


def varlen_inputs(seed, k, c, x_dtype, init_dtype, bias=True, cu=CU):
    rng = np.random.default_rng(seed)
    nseq, t = len(cu) - 1, cu[-1]
    return dict(x=randn(rng, t, c, dtype=x_dtype), weight=randn(rng, c, k),
                bias=randn(rng, c) if bias else None,
                init=None if init_dtype is None else randn(rng, nseq, c, k - 1, dtype=init_dtype),
                cu=jnp.asarray(cu, jnp.int32))


def varlen_oracle(v, silu):
    x, cu, init = np.asarray(v["x"], np.float64), list(np.asarray(v["cu"])), v["init"]
    ys, states = [], []
    for s in range(len(cu) - 1):
        y, st = numpy_seq(x[cu[s]:cu[s + 1]], v["weight"], v["bias"],
                          None if init is None else init[s], silu)
        ys.append(y)
        states.append(st)
    return np.concatenate(ys), np.stack(states)


@pytest.mark.parametrize("k,x_dtype,init_dtype,bias,activation", [
    (4, F32, F32, True, "silu"),
    (3, BF16, F32, False, None),  # states keep their own dtype
    (4, BF16, None, True, "silu"),  # no initial states: zeros, final states in x.dtype
    (2, F32, F32, True, None),
])
def test_varlen_matches_reference_and_numpy(k, x_dtype, init_dtype, bias, activation):
    v = varlen_inputs(k, k, 24, x_dtype, init_dtype, bias)
    ours, ref = run_both(v["x"], v["weight"], v["bias"], v["init"], v["cu"], activation, **SMALL)
    check(ours, ref, varlen_oracle(v, activation is not None), x_dtype, init_dtype or x_dtype)
    if v["init"] is not None:  # the empty sequence returns its initial state unchanged
        np.testing.assert_array_equal(np.asarray(ours[1][1]), np.asarray(v["init"][1]))


def test_varlen_traced_cu_seqlens_under_jit():
    """cu_seqlens is a traced argument: one compilation serves different packings."""
    k, c = 4, 24
    v = varlen_inputs(11, k, c, F32, F32)
    fn = jax.jit(functools.partial(causal_conv1d, impl="pallas", interpret=INTERPRET,
                                   return_final_states=True))
    for cu in (CU, [0, 10, 10, 11, 12, 29, 30], [0, 0, 1, 30, 30, 30, 30]):
        v["cu"] = jnp.asarray(cu, jnp.int32)
        y, fs = fn(v["x"], v["weight"], v["bias"], initial_states=v["init"], cu_seqlens=v["cu"])
        y_np, fs_np = varlen_oracle(v, True)
        assert rel(y, y_np) < 1e-5
        np.testing.assert_array_equal(np.asarray(fs, np.float64), fs_np)
    assert fn._cache_size() == 1


@pytest.mark.parametrize("c,block_c", [(40, 16), (100, 32), (32, 16)])
def test_channel_blocks_ragged_and_exact(c, block_c):
    """Ragged last channel block (masked), and exact blocks (no channel mask)."""
    v = varlen_inputs(c, 3, c, F32, F32, cu=[0, 5, 17])
    ours, ref = run_both(v["x"], v["weight"], v["bias"], v["init"], v["cu"], "silu",
                         block_t=16, block_c=block_c)
    check(ours, ref, varlen_oracle(v, True), F32, F32)


def test_auto_dispatch_and_empty_input_falls_back(caplog):
    rng = np.random.default_rng(3)
    x, w, bias = randn(rng, 2, 5, 16), randn(rng, 16, 4), randn(rng, 16)
    # auto: the kernel on a GPU (measured faster there), the XLA reference elsewhere.
    jaxpr = str(jax.make_jaxpr(functools.partial(causal_conv1d, impl="auto"))(x, w, bias))
    assert ("pallas_call" in jaxpr) == ON_GPU
    jaxpr = str(jax.make_jaxpr(functools.partial(causal_conv1d, impl="pallas",
                                                 interpret=True))(x, w, bias))
    assert "pallas_call" in jaxpr
    with caplog.at_level("WARNING", logger="mamba2_jax"):
        y, fs = causal_conv1d(x[:, :0], w, bias, return_final_states=True, impl="pallas",
                              interpret=True)
    assert y.shape == (2, 0, 16) and fs.shape == (2, 16, 3) and "empty input" in caplog.text
    if not ON_GPU:
        with pytest.raises(ValueError, match="interpret=True"):
            causal_conv1d(x, w, bias, impl="pallas")


def test_block_choice():
    assert pick_blocks(8192, 5376) == (32, 256)
    assert pick_blocks(13, 24, 8, 16) == (8, 16) and pick_blocks(3, 5) == (4, 8)
    with pytest.raises(ValueError):
        pick_blocks(64, 64, block_t=24)
    with pytest.raises(ValueError):
        pick_blocks(64, 64, block_c=0)


S = jax.ShapeDtypeStruct


@pytest.mark.parametrize("case", ["dense_real", "varlen_real", "dense_ragged_f32"])
def test_kernel_lowers_for_cuda(case):
    if case == "dense_real":
        args = (S((1, 8192, 5376), BF16), S((5376, 4), BF16), S((5376,), BF16),
                S((1, 5376, 3), BF16), None)
    elif case == "varlen_real":
        args = (S((8192, 5376), BF16), S((5376, 4), BF16), S((5376,), BF16),
                S((4, 5376, 3), F32), S((5,), jnp.int32))
    else:  # ragged tokens and channels, k = 3, no bias / initial states
        args = (S((3, 100, 1000), F32), S((1000, 3), F32), None, None, None)
    fn = functools.partial(causal_conv1d_pallas, silu=True, return_final_states=True)
    text = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True])
def test_gpu_real_sizes(varlen):
    c, k, t = 5376, 4, 8192
    cu = [0, 1000, 1003, 5000, 8192] if varlen else None
    rng = np.random.default_rng(5)
    nseq = 4 if varlen else 1
    x = randn(rng, *((t, c) if varlen else (1, t, c)), dtype=BF16)
    w, bias = randn(rng, c, k, dtype=BF16), randn(rng, c, dtype=BF16)
    init = randn(rng, nseq, c, k - 1, dtype=BF16)
    cu = None if cu is None else jnp.asarray(cu, jnp.int32)
    (y, fs), (y_ref, fs_ref) = run_both(x, w, bias, init, cu, "silu")
    assert rel(y, y_ref) < 1e-2
    np.testing.assert_array_equal(np.asarray(fs), np.asarray(fs_ref))


@pytest.mark.parametrize("packed", [False, True])
def test_gradients_through_the_kernel(packed):
    """custom_vjp: gradients of the Pallas prefill (named XLA fallback) equal the reference's."""
    rng = np.random.default_rng(9)
    c, k = 16, 4
    if packed:
        cu = jnp.asarray([0, 2, 2, 9, 14], jnp.int32)
        x, init = randn(rng, 14, c), randn(rng, 4, c, k - 1)
    else:
        cu, x, init = None, randn(rng, 2, 7, c), randn(rng, 2, c, k - 1)
    w, bias = randn(rng, c, k), randn(rng, c)
    cot_y = randn(rng, *x.shape)

    def loss(impl, x, w, bias, init):
        kw = dict(interpret=True) if impl == "pallas" else {}
        y, fs = causal_conv1d(x, w, bias, initial_states=init, cu_seqlens=cu, impl=impl,
                              return_final_states=True, **kw)
        return jnp.sum(y * cot_y) + jnp.sum(fs ** 2)

    want = jax.grad(functools.partial(loss, "xla"), argnums=(0, 1, 2, 3))(x, w, bias, init)
    got = jax.grad(functools.partial(loss, "pallas"), argnums=(0, 1, 2, 3))(x, w, bias, init)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
