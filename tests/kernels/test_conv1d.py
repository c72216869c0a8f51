"""Causal depthwise conv1d (prefill + decode update) vs a float64 numpy token loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.conv1d import causal_conv1d, causal_conv1d_update


def numpy_conv(x, weight, bias=None, state=None, activation="silu"):
    """float64 token loop for one sequence: x [l, c], weight [c, k], state [c, k-1] (oldest first).

    Returns (y [l, c], final state [c, k-1]).
    """
    x, weight = np.asarray(x, np.float64), np.asarray(weight, np.float64)
    l, c = x.shape
    k = weight.shape[1]
    state = np.zeros((c, k - 1)) if state is None else np.array(state, np.float64)
    y = np.zeros((l, c))
    for t in range(l):
        window = np.concatenate([state, x[t][:, None]], axis=1)  # [c, k], newest last
        for ch in range(c):
            acc = 0.0 if bias is None else float(bias[ch])
            for w in range(k):
                acc += weight[ch, w] * window[ch, w]
            y[t, ch] = acc / (1.0 + np.exp(-acc)) if activation == "silu" else acc
        state = window[:, 1:]
    return y, state


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def randn(rng, *shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


# -- prefill, batched ------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
def test_batched_matches_numpy(k, with_init, with_bias, activation):
    rng = np.random.default_rng(100 * k + 10 * with_init + 2 * with_bias + (activation is None))
    b, l, c = 3, 11, 6
    x, w = randn(rng, b, l, c), randn(rng, c, k)
    bias = randn(rng, c) if with_bias else None
    init = randn(rng, b, c, k - 1) if with_init else None
    y, final = causal_conv1d(x, w, bias, initial_states=init, activation=activation,
                             return_final_states=True)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert final.shape == (b, c, k - 1) and final.dtype == jnp.float32
    for i in range(b):
        y_np, f_np = numpy_conv(x[i], w, bias, None if init is None else init[i], activation)
        assert rel(y[i], y_np) < 1e-5
        np.testing.assert_allclose(final[i], f_np, rtol=0, atol=0)  # a copy of inputs
    y_only = causal_conv1d(x, w, bias, initial_states=init, activation=activation)
    np.testing.assert_array_equal(y_only, y)


def test_swish_is_silu_and_short_sequence_keeps_initial_state():
    rng = np.random.default_rng(7)
    k, c = 4, 5
    x, w, bias = randn(rng, 2, 2, c), randn(rng, c, k), randn(rng, c)  # l = 2 < k - 1
    init = randn(rng, 2, c, k - 1)
    y1, f1 = causal_conv1d(x, w, bias, initial_states=init, activation="swish",
                           return_final_states=True)
    y2 = causal_conv1d(x, w, bias, initial_states=init)
    np.testing.assert_array_equal(y1, y2)
    # The final state is [newest initial input, x0, x1].
    np.testing.assert_array_equal(f1[..., 0], init[..., 2])
    np.testing.assert_array_equal(f1[..., 1:], jnp.swapaxes(x, 1, 2))


def test_bf16_input_and_state_dtypes():
    rng = np.random.default_rng(8)
    b, l, c, k = 2, 9, 16, 4
    x, w, bias = randn(rng, b, l, c, dtype=jnp.bfloat16), randn(rng, c, k), randn(rng, c)
    y, final = causal_conv1d(x, w, bias, return_final_states=True)
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.bfloat16
    for i in range(b):
        y_np, f_np = numpy_conv(np.asarray(x[i], np.float32), w, bias)
        assert rel(y[i], y_np) < 2e-2
        np.testing.assert_array_equal(np.asarray(final[i], np.float32), f_np)
    # float32 input with bfloat16 initial states: final states follow initial_states.dtype.
    init = randn(rng, b, c, k - 1, dtype=jnp.bfloat16)
    y, final = causal_conv1d(x.astype(jnp.float32), w, bias, initial_states=init,
                             return_final_states=True)
    assert y.dtype == jnp.float32 and final.dtype == jnp.bfloat16
    y_np, _ = numpy_conv(np.asarray(x[0], np.float32), w, bias, np.asarray(init[0], np.float32))
    assert rel(y[0], y_np) < 1e-5


# -- prefill, packed varlen ------------------------------------------------------------------------

SEQLENS = [
    [5, 0, 1, 2, 7, 3],  # empty and shorter-than-(k-1) sequences in the middle
    [0, 4, 1, 0],  # empty at both ends
    [13],
]


@pytest.mark.parametrize("seqlens", SEQLENS)
@pytest.mark.parametrize("with_init", [False, True])
@pytest.mark.parametrize("k", [2, 4])
def test_packed_matches_each_sequence_alone(seqlens, with_init, k):
    rng = np.random.default_rng(sum(seqlens) * 10 + k + with_init)
    c, nseq = 6, len(seqlens)
    cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    t = int(cu[-1])
    x, w, bias = randn(rng, t, c), randn(rng, c, k), randn(rng, c)
    init = randn(rng, nseq, c, k - 1) if with_init else None

    y, final = causal_conv1d(x, w, bias, initial_states=init, cu_seqlens=jnp.asarray(cu),
                             return_final_states=True)
    assert y.shape == (t, c) and final.shape == (nseq, c, k - 1)
    for s in range(nseq):
        a, e = cu[s], cu[s + 1]
        s_init = None if init is None else init[s]
        y_np, f_np = numpy_conv(x[a:e], w, bias, s_init)
        if e > a:
            assert rel(y[a:e], y_np) < 1e-5
            y_b, f_b = causal_conv1d(x[None, a:e], w, bias, return_final_states=True,
                                     initial_states=None if init is None else init[s:s + 1])
            np.testing.assert_allclose(y[a:e], y_b[0], rtol=1e-6, atol=1e-6)
            np.testing.assert_array_equal(final[s], f_b[0])
        np.testing.assert_array_equal(final[s], f_np)


def test_packed_cu_seqlens_traced_under_jit():
    rng = np.random.default_rng(11)
    c, k, t = 4, 3, 12
    x, w, bias = randn(rng, t, c), randn(rng, c, k), randn(rng, c)
    init = randn(rng, 4, c, k - 1)
    traces = []

    @jax.jit
    def run(x, cu, init):
        traces.append(1)
        return causal_conv1d(x, w, bias, initial_states=init, cu_seqlens=cu,
                             return_final_states=True)

    for seqlens in ([3, 0, 1, 8], [1, 6, 5, 0]):  # same nseq: one trace, new values
        cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
        y, final = run(x, jnp.asarray(cu), init)
        for s in range(4):
            y_np, f_np = numpy_conv(x[cu[s]:cu[s + 1]], w, bias, init[s])
            if seqlens[s]:
                assert rel(y[cu[s]:cu[s + 1]], y_np) < 1e-5
            np.testing.assert_array_equal(final[s], f_np)
    assert len(traces) == 1


def test_packed_bf16_loose():
    rng = np.random.default_rng(12)
    seqlens, c, k = [6, 2, 9], 8, 4
    cu = np.concatenate([[0], np.cumsum(seqlens)]).astype(np.int32)
    x, w, bias = randn(rng, int(cu[-1]), c, dtype=jnp.bfloat16), randn(rng, c, k), randn(rng, c)
    init = randn(rng, 3, c, k - 1, dtype=jnp.bfloat16)
    y, final = causal_conv1d(x, w, bias, initial_states=init, cu_seqlens=jnp.asarray(cu),
                             return_final_states=True)
    assert y.dtype == jnp.bfloat16 and final.dtype == jnp.bfloat16
    for s in range(3):
        y_np, f_np = numpy_conv(np.asarray(x[cu[s]:cu[s + 1]], np.float32), w, bias,
                                np.asarray(init[s], np.float32))
        assert rel(y[cu[s]:cu[s + 1]], y_np) < 2e-2
        np.testing.assert_array_equal(np.asarray(final[s], np.float32), f_np)


# -- decode update ---------------------------------------------------------------------------------


@pytest.mark.parametrize("activation", [None, "silu"])
def test_update_permuted_slots_and_padding(activation):
    rng = np.random.default_rng(21)
    b, c, k, slots = 5, 6, 4, 9
    x, w, bias = randn(rng, b, c), randn(rng, c, k), randn(rng, c)
    pool = np.array(randn(rng, slots, c, k - 1))
    pool[[0, 4]] = np.nan  # poison slots no row names: they must neither leak nor change
    idx = np.array([7, -1, 2, 3, -1], np.int32)
    y, new_pool = causal_conv1d_update(x, jnp.asarray(pool), w, bias, activation=activation,
                                       conv_state_indices=jnp.asarray(idx))
    assert y.dtype == x.dtype and new_pool.dtype == jnp.float32
    assert np.isfinite(np.asarray(y)).all()
    for r, slot in enumerate(idx):
        if slot < 0:
            continue
        y_np, s_np = numpy_conv(x[r:r + 1], w, bias, pool[slot], activation)
        assert rel(y[r], y_np[0]) < 1e-5
        np.testing.assert_array_equal(new_pool[slot], s_np)
    untouched = [s for s in range(slots) if s not in idx]
    np.testing.assert_array_equal(bits(new_pool)[untouched], bits(pool)[untouched])


def test_update_identity_slots_bf16_pool():
    rng = np.random.default_rng(22)
    b, c, k = 3, 8, 3
    x, w = randn(rng, b, c, dtype=jnp.bfloat16), randn(rng, c, k)
    pool = randn(rng, b, c, k - 1, dtype=jnp.bfloat16)
    y, new_pool = causal_conv1d_update(x, pool, w)
    assert y.dtype == jnp.bfloat16 and new_pool.dtype == jnp.bfloat16
    for r in range(b):
        y_np, s_np = numpy_conv(np.asarray(x[r:r + 1], np.float32), w, None,
                                np.asarray(pool[r], np.float32))
        assert rel(y[r], y_np[0]) < 2e-2
        np.testing.assert_array_equal(np.asarray(new_pool[r], np.float32), s_np)


@pytest.mark.parametrize("k", [2, 3, 4])
def test_update_token_by_token_equals_prefill(k):
    rng = np.random.default_rng(30 + k)
    b, l, c, slots = 3, 7, 5, 6
    x, w, bias = randn(rng, b, l, c), randn(rng, c, k), randn(rng, c)
    pool = randn(rng, slots, c, k - 1)
    idx = jnp.asarray([4, 1, 5], jnp.int32)
    y_full, final = causal_conv1d(x, w, bias, initial_states=pool[idx], return_final_states=True)
    step = jax.jit(lambda xt, pool: causal_conv1d_update(xt, pool, w, bias,
                                                         conv_state_indices=idx))
    ys = []
    for t in range(l):
        y_t, pool = step(x[:, t], pool)
        ys.append(y_t)
    np.testing.assert_allclose(jnp.stack(ys, 1), y_full, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(pool[idx], final)


# -- errors ----------------------------------------------------------------------------------------


def _conv_args(rng, b=2, l=5, c=4, k=3):
    return randn(rng, b, l, c), randn(rng, c, k), randn(rng, c)


@pytest.mark.parametrize("case", [
    "x_1d", "x_2d_no_cu", "x_3d_with_cu", "weight_c", "weight_k1", "weight_3d", "bias",
    "init_batched", "init_packed", "cu_2d", "cu_float", "activation", "x_int",
])
def test_conv1d_errors(case):
    rng = np.random.default_rng(0)
    x, w, bias = _conv_args(rng)
    cu = jnp.asarray([0, 3, 5], jnp.int32)
    kw = {}
    if case == "x_1d":
        x = x[0, 0]
    elif case == "x_2d_no_cu":
        x = x[0]
    elif case == "x_3d_with_cu":
        kw["cu_seqlens"] = cu
    elif case == "weight_c":
        w = randn(rng, 3, 3)
    elif case == "weight_k1":
        w = w[:, :1]
    elif case == "weight_3d":
        w = w[:, None, :]
    elif case == "bias":
        bias = bias[:3]
    elif case == "init_batched":
        kw["initial_states"] = randn(rng, 2, 4, 3)
    elif case == "init_packed":
        x, kw["cu_seqlens"], kw["initial_states"] = x[0], cu, randn(rng, 3, 4, 2)
    elif case == "cu_2d":
        x, kw["cu_seqlens"] = x[0], cu[None]
    elif case == "cu_float":
        x, kw["cu_seqlens"] = x[0], cu.astype(jnp.float32)
    elif case == "activation":
        kw["activation"] = "relu"
    elif case == "x_int":
        x = x.astype(jnp.int32)
    with pytest.raises(ValueError, match="causal_conv1d"):
        causal_conv1d(x, w, bias, **kw)


def test_conv1d_error_message_names_shapes():
    rng = np.random.default_rng(0)
    x, w = randn(rng, 1, 2, 96), randn(rng, 80, 4)
    with pytest.raises(ValueError, match=r"weight must be \[c, k\] with c == x.shape\[-1\] == 96, "
                                         r"got \(80, 4\)"):
        causal_conv1d(x, w)


@pytest.mark.parametrize("case", ["x_3d", "state_c", "state_k", "no_idx_slots", "idx_shape",
                                  "idx_float", "activation", "weight_c"])
def test_conv1d_update_errors(case):
    rng = np.random.default_rng(1)
    b, c, k = 3, 4, 3
    x, w, bias, pool = randn(rng, b, c), randn(rng, c, k), randn(rng, c), randn(rng, b, c, k - 1)
    kw = {}
    if case == "x_3d":
        x = x[None]
    elif case == "state_c":
        pool = randn(rng, b, c + 1, k - 1)
    elif case == "state_k":
        pool = randn(rng, b, c, k)
    elif case == "no_idx_slots":
        pool = randn(rng, b + 2, c, k - 1)
    elif case == "idx_shape":
        kw["conv_state_indices"] = jnp.asarray([0, 1], jnp.int32)
    elif case == "idx_float":
        kw["conv_state_indices"] = jnp.asarray([0.0, 1.0, 2.0])
    elif case == "activation":
        kw["activation"] = "gelu"
    elif case == "weight_c":
        w = randn(rng, c + 2, k)
    with pytest.raises(ValueError, match="causal_conv1d_update"):
        causal_conv1d_update(x, pool, w, bias, **kw)


def test_impl_selection():
    rng = np.random.default_rng(2)
    x, w, bias = _conv_args(rng)
    pool = randn(rng, 2, 4, 2)
    y_auto = causal_conv1d(x, w, bias, impl="auto")
    np.testing.assert_array_equal(causal_conv1d(x, w, bias, impl="xla"), y_auto)
    with pytest.raises(ValueError, match="impl"):
        causal_conv1d(x, w, bias, impl="bogus")
    with pytest.raises(ValueError, match="impl"):
        causal_conv1d_update(x[:, 0], pool, w, bias, impl="bogus")
    # The prefill has a Pallas kernel too (tests/kernels/test_conv1d_prefill_pallas.py).
    np.testing.assert_allclose(causal_conv1d(x, w, bias, impl="pallas", interpret=True), y_auto,
                               rtol=1e-5, atol=1e-6)
    # The update has a Pallas kernel (tests/kernels/test_conv1d_update_pallas.py).
    y_p, pool_p = causal_conv1d_update(x[:, 0], pool, w, bias, impl="pallas", interpret=True)
    y_x, pool_x = causal_conv1d_update(x[:, 0], pool, w, bias, impl="xla")
    np.testing.assert_allclose(y_p, y_x, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pool_p, pool_x)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="interpret=True"):
            causal_conv1d_update(x[:, 0], pool, w, bias, impl="pallas")
