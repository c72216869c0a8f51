"""Small-batch GEMV: the Pallas split-K kernel (interpret mode on CPU, the real kernel on a GPU)
vs the XLA reference and a float64 numpy oracle; validation; dispatch; lowering for "cuda"."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.gemv import api, gemv, gemv_ref
from mamba2_jax.kernels.gemv.pallas_gemv import (PROGRAMS_PER_SM, SM_COUNT, default_config,
                                                 gemv_pallas, plan)

ON_GPU = jax.default_backend() == "gpu"
F32, BF16 = jnp.float32, jnp.bfloat16
REAL = [(2560, 10576), (5120, 2560), (1536, 6656), (3072, 1536)]  # 2.7b and 1.3b in/out_proj


def inputs(seed, m, K, N, dtype, bias=True, lead=None):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(lead or (m, K)), F32).astype(dtype)
    w = jnp.asarray(rng.standard_normal((K, N)) / np.sqrt(K), F32).astype(dtype)
    b = jnp.asarray(rng.standard_normal(N), F32).astype(dtype) if bias else None
    return x, w, b


def numpy_gemv(x, w, b):
    out = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    return out if b is None else out + np.asarray(b, np.float64)


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def check(out, x, w, b):
    assert out.dtype == x.dtype and out.shape == x.shape[:-1] + (w.shape[1],)
    assert np.isfinite(np.asarray(out, np.float32)).all()
    tol = 1e-6 if x.dtype == F32 else 8e-3  # bf16: one rounding of the output
    assert rel(out, numpy_gemv(x, w, b)) < tol
    assert rel(out, gemv_ref(x, w, b)) < tol


@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("method", ["fma", "dot"])
def test_matches_reference_and_numpy(m, dtype, bias, method):
    """Ragged K and N, several column blocks and K slabs, the last of each masked."""
    K, N = 100, 70
    x, w, b = inputs(m + 10 * bias, m, K, N, dtype, bias)
    out = gemv(x, w, b, impl="pallas", interpret=not ON_GPU, block_n=32, block_k=16, splits=3,
               method=method)
    p = plan(m, K, N, block_n=32, block_k=16, splits=3, method=method)
    assert p["grid"] == (3, 3) and p["S"] * p["ks"] > K  # ragged: 3 slabs of 2 tiles of 16
    check(out, x, w, b)


@pytest.mark.parametrize("m,K,N,dtype", [(1, 256, 192, BF16), (2, 200, 64, F32),
                                         (5, 128, 130, BF16)])
def test_default_config(m, K, N, dtype):
    x, w, b = inputs(K + m, m, K, N, dtype)
    check(gemv(x, w, b, impl="pallas", interpret=not ON_GPU), x, w, b)


@pytest.mark.parametrize("m,dtype,blocks", [(12, F32, {}), (3, BF16, dict(method="dot")),
                                            (16, BF16, dict(block_n=16, block_k=32))])
def test_dot_method(m, dtype, blocks):
    """The default method: x padded to 16 rows in registers, tensor-core dot."""
    K, N = 96, 40
    assert plan(m, K, N, **blocks)["method"] == "dot"
    x, w, b = inputs(m, m, K, N, dtype)
    check(gemv(x, w, b, impl="pallas", interpret=not ON_GPU, **blocks), x, w, b)


def test_exact_blocks_and_single_tile():
    """No masks at all (K, N multiples of the blocks, m a power of two) and one k-tile per
    slab (no loop)."""
    x, w, b = inputs(7, 4, 64, 64, F32)
    assert plan(4, 64, 64, block_n=32, block_k=16, splits=4)["n_k"] == 1
    for kw in (dict(block_n=32, block_k=16, splits=4), dict(block_n=32, block_k=16, splits=2)):
        check(gemv(x, w, b, impl="pallas", interpret=not ON_GPU, **kw), x, w, b)


def test_leading_axes_are_flattened():
    x, w, b = inputs(8, None, 48, 24, F32, lead=(2, 3, 48))
    out = gemv(x, w, b, impl="pallas", interpret=not ON_GPU, block_n=16, block_k=16)
    assert out.shape == (2, 3, 24)
    check(out, x, w, b)


def test_matches_nnx_linear_bf16():
    from flax import nnx

    lin = nnx.Linear(96, 80, dtype=BF16, param_dtype=BF16, rngs=nnx.Rngs(0))
    lin.bias[...] = jnp.asarray(np.random.default_rng(1).standard_normal(80), BF16)
    x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 96)), BF16)
    ours = gemv(x, lin.kernel[...], lin.bias[...], impl="pallas", interpret=not ON_GPU,
                block_n=16, block_k=32)
    theirs = lin(x)
    assert ours.dtype == theirs.dtype == BF16
    # Within bf16 rounding of the output (the two may round the float32 sum differently).
    np.testing.assert_allclose(np.asarray(ours, np.float32), np.asarray(theirs, np.float32),
                               rtol=2 ** -7, atol=2 ** -7)


def test_default_plans_for_real_sizes():
    for K, N in REAL:
        for m in (1, 2, 4, 8, 16):
            p = plan(m, K, N)
            bn, bk, S = p["bn"], p["bk"], p["S"]
            assert bn & (bn - 1) == 0 and bk & (bk - 1) == 0
            assert p["grid"] == (-(-N // bn), S)
            assert p["grid"][0] * S >= PROGRAMS_PER_SM * SM_COUNT  # enough programs per SM
            assert S * p["ks"] >= K > (S - 1) * p["ks"]  # covers K, no empty slab
            assert p["method"] == "dot" and p["mp"] == 16
            fma = plan(m, K, N, method="fma")
            assert fma["mp"] * fma["bk"] * fma["bn"] <= 8192  # accumulator register budget
    # The 2.7b in_proj at batch 1: 83 column blocks (the last masked) x 8 exact slabs of 320.
    assert default_config(1, 2560, 10576) == (128, 64, 8)
    assert plan(1, 2560, 10576)["grid"] == (83, 8)


def test_validation_errors():
    x, w, b = inputs(0, 2, 32, 16, F32)
    cases = [
        (dict(x=x, w=w[:, :, None]), "w must be"),
        (dict(x=x[:, :8], w=w), r"x.shape\[-1\] must equal"),
        (dict(x=x.astype(BF16), w=w), "w must have x's dtype"),
        (dict(x=x.astype(jnp.int32), w=w.astype(jnp.int32)), "bfloat16, float16 or float32"),
        (dict(x=x, w=w, bias=b[:3]), r"bias must be \[N\]"),
        (dict(x=x, w=w, bias=jnp.ones(16, jnp.int32)), "bias must be a floating"),
        (dict(x=x, w=w, block_n=48), "block_n must be a positive power of two"),
        (dict(x=x, w=w, block_k=0), "block_k must be"),
        (dict(x=x, w=w, splits=0), "splits must be a positive integer"),
        (dict(x=x, w=w, method="wmma"), "method must be one of"),
        (dict(x=x, w=w, method="dot", block_k=8), "needs block_n and block_k >= 16"),
        (dict(x=x, w=w, block_k=8), r"method='dot' \(the default\)"),
        (dict(x=x, w=w, impl="cuda"), "impl must be one of"),
        (dict(x=x[0, 0], w=w), "x must be"),
    ]
    for kw, msg in cases:
        kw.setdefault("impl", "pallas")
        kw.setdefault("interpret", True)
        with pytest.raises(ValueError, match=msg):
            gemv(**kw)
    if not ON_GPU:
        with pytest.raises(ValueError, match="needs a GPU"):
            gemv(x, w, impl="pallas")


def test_auto_dispatch(monkeypatch):
    x, w, b = inputs(3, 4, 64, 32, BF16)
    if not ON_GPU:  # auto on CPU is the XLA reference, bit for bit
        np.testing.assert_array_equal(np.asarray(gemv(x, w, b), np.float32),
                                      np.asarray(gemv_ref(x, w, b), np.float32))
    # On a GPU: the kernel for m <= 16, XLA above (simulated here).
    calls = []
    monkeypatch.setattr(api, "resolve_impl",
                        lambda impl, **kw: "pallas" if impl in ("auto", "pallas") else impl)
    monkeypatch.setattr(api, "gemv_pallas",
                        lambda *a, **kw: calls.append(a[0].shape) or gemv_ref(*a))
    gemv(x, w, b)
    gemv(jnp.ones((17, 64), BF16), w)
    gemv(jnp.ones((2, 8, 64), BF16), w)  # m = 16 rows
    gemv(jnp.ones((17, 64), BF16), w, impl="pallas")  # asked for: no row limit
    assert calls == [(4, 64), (16, 64), (17, 64)]


def test_empty_input_falls_back_to_the_reference(caplog):
    x, w, b = inputs(4, 0, 32, 16, F32)
    with caplog.at_level("WARNING", logger="mamba2_jax"):
        out = gemv(x, w, b, impl="pallas", interpret=True)
    assert out.shape == (0, 16) and "empty input" in caplog.text


@pytest.mark.parametrize("m,K,N,dtype,kw", [
    (1, 2560, 10576, BF16, {}),  # in_proj, ragged last column block
    (1, 5120, 2560, BF16, {}),  # out_proj
    (4, 2560, 10576, BF16, {}),
    (12, 5120, 2560, BF16, {}),  # dot method
    (3, 1000, 333, F32, {}),  # ragged everything, fp32
    (1, 2560, 10576, BF16, dict(block_n=256, block_k=32, splits=5)),  # ragged slabs
    (1, 2560, 10576, BF16, dict(method="fma")),
    (3, 1000, 333, F32, dict(method="fma")),
])
def test_kernel_lowers_for_cuda(m, K, N, dtype, kw):
    S = jax.ShapeDtypeStruct
    fn = functools.partial(gemv_pallas, **kw)
    text = (jax.jit(fn).trace(S((m, K), dtype), S((K, N), dtype), S((N,), dtype))
            .lower(lowering_platforms=("cuda",)).as_text())
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("K,N", REAL)
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_real_sizes(m, K, N):
    x, w, b = inputs(m + K, m, K, N, BF16)
    out = gemv(x, w, b, impl="pallas")
    assert rel(out, gemv_ref(x, w, b)) < 8e-3
    assert rel(out, numpy_gemv(x, w, b)) < 8e-3
    assert rel(gemv(x, w, b), numpy_gemv(x, w, b)) < 8e-3  # auto


# ---- w as [N, K] ("out_in": a tied embedding matrix as the LM head) -------------------------

@pytest.mark.parametrize("m,dtype,kw", [
    (1, BF16, dict(block_n=32, block_k=16, splits=3)),  # ragged K and N, split K
    (1, BF16, dict(block_n=32, block_k=16, splits=3, method="fma")),
    (3, F32, dict(block_n=16, block_k=32, method="fma")),
    (12, BF16, {}),  # dot method
    (5, F32, dict(method="dot", block_n=16, block_k=16, splits=2)),
    (2, BF16, {}),
])
def test_out_in_layout_matches_reference_and_numpy(m, dtype, kw):
    K, N = 100, 70
    x, w, b = inputs(m + 40, m, K, N, dtype)
    wt = jnp.asarray(w.T)  # [N, K], its own contiguous copy
    out = gemv(x, wt, b, w_layout="out_in", impl="pallas", interpret=not ON_GPU, **kw)
    check(out, x, w, b)
    np.testing.assert_allclose(np.asarray(gemv_ref(x, wt, b, w_layout="out_in"), np.float32),
                               np.asarray(gemv_ref(x, w, b), np.float32), rtol=1e-6, atol=1e-6)


def test_float32_output_keeps_the_accumulator():
    x, w, b = inputs(5, 2, 300, 90, BF16)
    want = numpy_gemv(x, w, b)
    out = gemv(x, w, b, out_dtype=F32, impl="pallas", interpret=not ON_GPU)
    ref = gemv_ref(x, w, b, out_dtype=F32)
    assert out.dtype == ref.dtype == F32
    assert rel(out, want) < 1e-5 and rel(ref, want) < 1e-5  # no bf16 rounding of the output
    assert rel(gemv(x, w, b, impl="pallas", interpret=not ON_GPU), want) > 1e-4
    with pytest.raises(ValueError, match="out_dtype"):
        gemv(x, w, b, out_dtype=jnp.int32, impl="xla")


def test_out_in_layout_validation():
    x, w, _ = inputs(0, 1, 32, 48, F32, bias=False)
    with pytest.raises(ValueError, match="w_layout must be one of"):
        gemv(x, w, w_layout="transposed", impl="pallas", interpret=True)
    with pytest.raises(ValueError, match=r"w.shape\[1\] == 48"):
        gemv(x, w, w_layout="out_in", impl="pallas", interpret=True)  # w is [K, N] here
    out = gemv(x, w.T, w_layout="out_in", impl="xla")
    assert out.shape == (1, 48)


@pytest.mark.parametrize("m,dtype,kw", [(1, BF16, {}), (4, BF16, {}), (16, BF16, {}),
                                        (1, BF16, dict(block_n=64, block_k=128)),
                                        (2, BF16, dict(method="fma"))])
def test_out_in_kernel_lowers_for_cuda(m, dtype, kw):
    K, N = 2560, 50280  # the 2.7b tied LM head
    S = jax.ShapeDtypeStruct
    fn = functools.partial(gemv_pallas, w_layout="out_in", **kw)
    text = (jax.jit(fn).trace(S((m, K), dtype), S((N, K), dtype))
            .lower(lowering_platforms=("cuda",)).as_text())
    assert text.count("__gpu$xla.gpu.triton") == 1


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16])
def test_gpu_out_in_lm_head_size(m):
    K, N = 2560, 50280
    x, w, _ = inputs(m, m, K, N, BF16, bias=False)
    out = gemv(x, jnp.asarray(w.T), w_layout="out_in", impl="pallas")
    assert rel(out, numpy_gemv(x, w, None)) < 8e-3


# -- the Mosaic GPU kernel (kernel="mgpu": Mosaic GPU interpret mode on the CPU) --------------

@pytest.mark.parametrize("m,K,N,layout,kw", [
    (1, 256, 200, "in_out", {}),  # ragged N: the last column block moved back
    (3, 256, 192, "in_out", dict(splits=2, stages=2)),
    (9, 256, 128, "in_out", dict(block_k=128)),  # 16 padded rows
    (2, 128, 264, "out_in", dict(block_n=128)),
    (1, 128, 136, "out_in", {})])
def test_mgpu_kernel_matches_numpy(m, K, N, layout, kw):
    pytest.importorskip("absl")  # jax.experimental.pallas.mosaic_gpu imports it
    x, w, b = inputs(30 + m, m, K, N, BF16)
    if layout == "out_in":
        w = w.T.copy()
    out = gemv(x, w, b, w_layout=layout, impl="pallas", interpret=not ON_GPU, kernel="mgpu",
               out_dtype=F32, **kw)
    want = numpy_gemv(x, w.T if layout == "out_in" else w, b)
    assert out.dtype == F32 and out.shape == (m, N)
    assert rel(out, want) < 1e-5  # float32 output: only the bf16 inputs' products are rounded


def test_mgpu_kernel_scope_and_lowering():
    pytest.importorskip("absl")
    x, w, _ = inputs(40, 1, 96, 128, BF16)
    with pytest.raises(ValueError, match="kernel='mgpu' cannot take this call: K=96"):
        gemv(x, w, impl="pallas", interpret=True, kernel="mgpu")
    with pytest.raises(ValueError, match="kernel must be one of"):
        gemv(x, w, impl="pallas", interpret=True, kernel="cuda")
    with pytest.raises(ValueError, match="stages must be a positive integer"):
        gemv(x, w, impl="pallas", interpret=True, kernel="mgpu", stages=0)
    S = jax.ShapeDtypeStruct
    text = jax.jit(api.gemv_mgpu).trace(S((1, 2560), BF16), S((2560, 10576), BF16)).lower(
        lowering_platforms=("cuda",)).as_text()
    assert text.count("custom_call @mosaic_gpu") == 1


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU")
@pytest.mark.gpu
@pytest.mark.parametrize("m,K,N,layout", [(1, 2560, 10576, "in_out"), (4, 5120, 2560, "in_out"),
                                          (1, 2560, 50280, "out_in")])
def test_gpu_mgpu_kernel_real_sizes(m, K, N, layout):
    x, w, _ = inputs(50 + m, m, K, N, BF16, bias=False)
    if layout == "out_in":
        w = w.T.copy()
    out = gemv(x, w, w_layout=layout, impl="pallas", kernel="mgpu", out_dtype=F32)
    assert rel(out, numpy_gemv(x, w.T if layout == "out_in" else w, None)) < 1e-5
