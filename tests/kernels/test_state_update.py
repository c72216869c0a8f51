"""Selective state update (one decode step) vs a float64 numpy loop over rows and heads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.state_update import selective_state_update


def numpy_step(s, x, dt, A, B, C, *, D=None, z=None, dt_bias=None, softplus_dt=False,
               dt_limit=None):
    """float64 loop: s [b, h, p, n] (one state per row), x [b, h, p], dt [b, h], B/C [b, g, n].

    Returns (y [b, h, p], new states [b, h, p, n]); head j reads group j // (h // g).
    """
    s, x, dt, A, B, C = (np.array(v, np.float64) for v in (s, x, dt, A, B, C))
    b, h, p, n = s.shape
    g = B.shape[1]
    y = np.zeros((b, h, p))
    for r in range(b):
        for j in range(h):
            d = dt[r, j] + (0.0 if dt_bias is None else float(dt_bias[j]))
            if softplus_dt:
                d = np.log1p(np.exp(d))
            if dt_limit is not None:
                d = min(max(d, dt_limit[0]), dt_limit[1])
            grp = j // (h // g)
            s[r, j] = np.exp(d * A[j]) * s[r, j] + d * np.outer(x[r, j], B[r, grp])
            y[r, j] = s[r, j] @ C[r, grp]
            if D is not None:
                Dj = np.asarray(D, np.float64)[j]
                y[r, j] += Dj * x[r, j]
            if z is not None:
                zz = np.asarray(z[r, j], np.float64)
                y[r, j] *= zz / (1.0 + np.exp(-zz))
    return y, s


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def bits(a):
    a = np.asarray(a)
    return a.view(np.uint16 if a.dtype.itemsize == 2 else np.uint32)


def make_inputs(rng, b, h, p, g, n, slots=None, dtype=jnp.float32):
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return dict(
        state=f(b if slots is None else slots, h, p, n), x=f(b, h, p).astype(dtype),
        dt=f(b, h).astype(dtype), A=-jnp.asarray(rng.uniform(0.5, 4.0, h), jnp.float32),
        B=f(b, g, n).astype(dtype), C=f(b, g, n).astype(dtype), D=f(h), Dhp=f(h, p),
        z=f(b, h, p).astype(dtype), dt_bias=f(h))


@pytest.mark.parametrize("g", [1, 2, 4])
@pytest.mark.parametrize("d_kind", [None, "h", "hp"])
@pytest.mark.parametrize("with_z", [False, True])
def test_matches_numpy(g, d_kind, with_z):
    rng = np.random.default_rng(10 * g + 3 * with_z + len(d_kind or ""))
    b, h, p, n = 3, 8, 4, 16
    v = make_inputs(rng, b, h, p, g, n)
    D = {None: None, "h": v["D"], "hp": v["Dhp"]}[d_kind]
    z = v["z"] if with_z else None
    y, new = selective_state_update(v["state"], v["x"], v["dt"], v["A"], v["B"], v["C"], D=D,
                                    z=z, dt_bias=v["dt_bias"], dt_softplus=True)
    y_np, s_np = numpy_step(v["state"], v["x"], v["dt"], v["A"], v["B"], v["C"], D=D, z=z,
                            dt_bias=v["dt_bias"], softplus_dt=True)
    assert y.shape == (b, h, p) and y.dtype == jnp.float32
    assert new.shape == v["state"].shape and new.dtype == jnp.float32
    assert rel(y, y_np) < 1e-5 and rel(new, s_np) < 1e-5


def test_raw_dt_and_dt_limit_clip():
    rng = np.random.default_rng(5)
    b, h, p, g, n = 4, 6, 8, 3, 8
    v = make_inputs(rng, b, h, p, g, n)
    # No bias, no softplus, default limit: a raw (possibly negative) dt is used as is.
    y, new = selective_state_update(v["state"], v["x"], v["dt"], v["A"], v["B"], v["C"])
    y_np, s_np = numpy_step(v["state"], v["x"], v["dt"], v["A"], v["B"], v["C"])
    assert rel(y, y_np) < 1e-5 and rel(new, s_np) < 1e-5
    # A limit that clips on both sides.
    limit = (0.4, 1.1)
    d = np.log1p(np.exp(np.asarray(v["dt"]) + np.asarray(v["dt_bias"])))
    assert (d < limit[0]).any() and (d > limit[1]).any()
    kw = dict(D=v["D"], z=v["z"], dt_bias=v["dt_bias"])
    y, new = selective_state_update(v["state"], v["x"], v["dt"], v["A"], v["B"], v["C"],
                                    dt_softplus=True, dt_limit=limit, **kw)
    y_np, s_np = numpy_step(v["state"], v["x"], v["dt"], v["A"], v["B"], v["C"],
                            softplus_dt=True, dt_limit=limit, **kw)
    assert rel(y, y_np) < 1e-5 and rel(new, s_np) < 1e-5
    y_unclipped, _ = selective_state_update(v["state"], v["x"], v["dt"], v["A"], v["B"],
                                            v["C"], dt_softplus=True, **kw)
    assert rel(y_unclipped, y_np) > 1e-3


def test_bf16_state_pool_y_from_float32_state():
    rng = np.random.default_rng(6)
    b, h, p, g, n = 3, 4, 8, 2, 32
    v = make_inputs(rng, b, h, p, g, n)
    state = v["state"].astype(jnp.bfloat16)
    kw = dict(D=v["Dhp"], dt_bias=v["dt_bias"])
    y, new = selective_state_update(state, v["x"], v["dt"], v["A"], v["B"], v["C"],
                                    dt_softplus=True, **kw)
    assert y.dtype == jnp.float32 and new.dtype == jnp.bfloat16
    y_np, s_np = numpy_step(np.asarray(state, np.float32), v["x"], v["dt"], v["A"], v["B"],
                            v["C"], softplus_dt=True, **kw)
    assert rel(y, y_np) < 1e-5  # y comes from the float32 state, before the bf16 cast
    assert rel(new, s_np) < 1e-2
    # bf16 activations too: loose tolerance against the oracle on the rounded inputs.
    xb = {k: v[k].astype(jnp.bfloat16) for k in ("x", "dt", "B", "C", "z")}
    y, new = selective_state_update(state, xb["x"], xb["dt"], v["A"], xb["B"], xb["C"],
                                    z=xb["z"], dt_softplus=True, **kw)
    assert y.dtype == jnp.bfloat16 and new.dtype == jnp.bfloat16
    f32 = lambda a: np.asarray(a, np.float32)
    y_np, s_np = numpy_step(f32(state), f32(xb["x"]), f32(xb["dt"]), v["A"], f32(xb["B"]),
                            f32(xb["C"]), z=f32(xb["z"]), softplus_dt=True, **kw)
    assert rel(y, y_np) < 2e-2 and rel(new, s_np) < 2e-2


@pytest.mark.parametrize("pool_dtype", [jnp.float32, jnp.bfloat16])
def test_permuted_slots_and_padding_rows(pool_dtype):
    rng = np.random.default_rng(9)
    b, h, p, g, n, slots = 5, 4, 4, 2, 8, 9
    v = make_inputs(rng, b, h, p, g, n, slots=slots)
    pool = np.array(v["state"].astype(pool_dtype))
    pool[[0, 5]] = np.nan  # poison slots no row names: they must neither leak nor change
    idx = np.array([6, -1, 2, 8, -3], np.int32)
    kw = dict(D=v["D"], z=v["z"], dt_bias=v["dt_bias"], dt_softplus=True)
    step = jax.jit(lambda pool, idx: selective_state_update(
        pool, v["x"], v["dt"], v["A"], v["B"], v["C"], state_batch_indices=idx, **kw))
    y, new = step(jnp.asarray(pool), jnp.asarray(idx))
    assert new.dtype == pool_dtype
    assert np.isfinite(np.asarray(y)).all()
    live = idx >= 0
    y_np, s_np = numpy_step(np.asarray(pool[np.where(live, idx, 1)], np.float32), v["x"],
                            v["dt"], v["A"], v["B"], v["C"], D=v["D"], z=v["z"],
                            dt_bias=v["dt_bias"], softplus_dt=True)
    assert rel(np.asarray(y)[live], y_np[live]) < 1e-5
    tol = 1e-5 if pool_dtype == jnp.float32 else 1e-2
    assert rel(np.asarray(new, np.float32)[idx[live]], s_np[live]) < tol
    untouched = [s for s in range(slots) if s not in idx]
    np.testing.assert_array_equal(bits(new)[untouched], bits(pool)[untouched])


# -- errors ----------------------------------------------------------------------------------------

ERROR_CASES = ["state_3d", "x_shape", "dt_shape", "A_shape", "B_shape", "C_shape", "h_mod_g",
               "D_shape", "z_shape", "dt_bias_shape", "idx_shape", "idx_float", "no_idx_slots",
               "dt_limit", "x_int"]


@pytest.mark.parametrize("case", ERROR_CASES)
def test_errors(case):
    rng = np.random.default_rng(0)
    b, h, p, g, n = 2, 4, 3, 2, 5
    v = make_inputs(rng, b, h, p, g, n)
    args = {k: v[k] for k in ("state", "x", "dt", "A", "B", "C")}
    kw = {}
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    if case == "state_3d":
        args["state"] = f(b, h, p)
    elif case == "x_shape":
        args["x"] = f(b, h, p + 1)
    elif case == "dt_shape":
        args["dt"] = f(b, h, p)
    elif case == "A_shape":
        args["A"] = f(h, p, n)
    elif case == "B_shape":
        args["B"] = f(b, g, n + 1)
    elif case == "C_shape":
        args["C"] = f(b, g + 2, n)
    elif case == "h_mod_g":
        args["B"], args["C"] = f(b, 3, n), f(b, 3, n)
    elif case == "D_shape":
        kw["D"] = f(p)
    elif case == "z_shape":
        kw["z"] = f(b, h)
    elif case == "dt_bias_shape":
        kw["dt_bias"] = f(h, p)
    elif case == "idx_shape":
        kw["state_batch_indices"] = jnp.asarray([0, 1, 1], jnp.int32)
    elif case == "idx_float":
        kw["state_batch_indices"] = jnp.asarray([0.0, 1.0])
    elif case == "no_idx_slots":
        args["state"] = f(b + 1, h, p, n)
    elif case == "dt_limit":
        kw["dt_limit"] = (1.0, 0.5)
    elif case == "x_int":
        args["x"] = args["x"].astype(jnp.int32)
    with pytest.raises(ValueError, match="selective_state_update"):
        selective_state_update(*args.values(), **kw)


def test_impl_selection():
    rng = np.random.default_rng(1)
    v = make_inputs(rng, 2, 4, 3, 2, 5)
    args = [v[k] for k in ("state", "x", "dt", "A", "B", "C")]
    y_auto, s_auto = selective_state_update(*args, impl="auto")
    y_xla, s_xla = selective_state_update(*args, impl="xla")
    np.testing.assert_array_equal(y_auto, y_xla)
    np.testing.assert_array_equal(s_auto, s_xla)
    with pytest.raises(ValueError, match="impl"):
        selective_state_update(*args, impl="bogus")
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="needs a GPU"):
            selective_state_update(*args, impl="pallas")
