"""The Mosaic GPU SSD output kernel (``out_kernel="mgpu"``): Mosaic GPU interpret mode on the CPU
against the reference, lowering for "cuda" on the CPU, which calls it takes, and on the GPU
(marker ``gpu``) the same at real sizes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.ssd import ssd_chunk_scan, ssd_sequential_ref
from mamba2_jax.kernels.ssd.pallas import SSDKernelConfig, ssd_pallas
from mamba2_jax.kernels.ssd.pallas_fwd import output_kernel

pytest.importorskip("absl")  # jax.experimental.pallas.mosaic_gpu imports it
ON_GPU = jax.default_backend() == "gpu"
gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def inputs(seed, b, l, h, p, g, n):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return dict(x=f(b, l, h, p).astype(jnp.bfloat16), dt=f(b, l, h),
                A=-jnp.asarray(rng.uniform(0.5, 4.0, h), jnp.float32),
                B=(0.5 * f(b, l, g, n)).astype(jnp.bfloat16),
                C=(0.5 * f(b, l, g, n)).astype(jnp.bfloat16))


def scan(v, q, impl, *, out_kernel="triton", z=None, D=None, h0=None, interpret=False):
    """(y, final states) from the Pallas kernels with this output kernel, or the reference."""
    if impl == "xla":
        return ssd_chunk_scan(v["x"], v["dt"], v["A"], v["B"], v["C"], chunk_size=q, D=D, z=z,
                              dt_softplus=True, initial_states=h0, return_final_states=True,
                              impl="xla")
    cfg = SSDKernelConfig(chunk_size=q, dt_softplus=True, out_kernel=out_kernel,
                          interpret=interpret)
    return ssd_pallas(cfg, v["x"], v["dt"], v["A"], v["B"], v["C"], D, z, None, h0, None)[:2]


# b, l, h, p, g, n, q, options: l not a multiple of q, groups shared by 2 heads, every
# warpgroup count (q / 64 = 1, 2, 4); D per head or per channel, a gate, initial states
CASES = [
    (2, 100, 4, 64, 2, 64, 64, ("z", "D", "h0")),
    (1, 256, 2, 64, 1, 128, 128, ("Dhp",)),
    (1, 256, 1, 64, 1, 64, 256, ("z", "h0")),
]


@pytest.mark.parametrize("b,l,h,p,g,n,q,opts", CASES)
def test_interpret_matches_reference(b, l, h, p, g, n, q, opts):
    v = inputs(l + q, b, l, h, p, g, n)
    rng = np.random.default_rng(1)
    kw = dict(z=jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.bfloat16) if "z" in opts else None,
              D=(jnp.asarray(rng.standard_normal((h, p)), jnp.float32) if "Dhp" in opts else
                 jnp.asarray(rng.standard_normal(h), jnp.float32) if "D" in opts else None),
              h0=jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32) if "h0" in opts else None)
    y, final = scan(v, q, "pallas", out_kernel="mgpu", interpret=True, **kw)
    y_ref, final_ref = scan(v, q, "xla", **kw)
    assert y.dtype == jnp.bfloat16 and y.shape == v["x"].shape
    assert rel(y, y_ref) < 2e-2 and rel(final, final_ref) < 2e-2
    y_seq, final_seq = ssd_sequential_ref(  # the token-by-token scan
        v["x"], v["dt"], v["A"], v["B"], v["C"], dt_softplus=True, D=kw["D"], z=kw["z"],
        initial_states=kw["h0"])
    assert rel(y, y_seq) < 2e-2 and rel(final, final_seq) < 2e-2


def _lowered(q=256, out_kernel="mgpu", dtype=jnp.bfloat16, varlen=False):
    b, l, h, p, g, n = 1, 512, 8, 64, 1, 128
    S = jax.ShapeDtypeStruct
    cfg = SSDKernelConfig(chunk_size=q, dt_softplus=True, out_kernel=out_kernel)

    def f(x, dt, A, B, C, z):
        cu = jnp.asarray([0, 100, l], jnp.int32) if varlen else None
        return ssd_pallas(cfg, x, dt, A, B, C, None, z, None, None, cu)[0]

    args = (S((b, l, h, p), dtype), S((b, l, h), jnp.float32), S((h,), jnp.float32),
            S((b, l, g, n), dtype), S((b, l, g, n), dtype), S((b, l, h, p), dtype))
    return jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("q", [64, 256])
def test_lowers_for_cuda(q):
    text = _lowered(q)
    assert text.count("custom_call @mosaic_gpu") == 1  # the outputs
    assert text.count("__gpu$xla.gpu.triton") == 3  # decay terms, chunk states, state pass


def test_calls_it_does_not_take_run_the_triton_kernel():
    assert "mosaic_gpu" not in _lowered(varlen=True)
    assert "mosaic_gpu" not in _lowered(dtype=jnp.float32)
    assert "mosaic_gpu" not in _lowered(out_kernel="triton")
    x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    B = jnp.zeros((1, 256, 1, 128), jnp.bfloat16)
    take = lambda **kw: output_kernel(**{**dict(
        choice="mgpu", x=x, B=B, chunk_size=256, dense=True), **kw})
    assert take() == "mgpu"
    assert take(dense=False) == "triton"
    assert take(x=x.astype(jnp.float16)) == "triton"
    assert take(chunk_size=32) == "triton"
    assert take(x=x[..., :32]) == "triton"  # head_dim 32
    assert take(B=B[..., :32]) == "triton"  # state size 32
    with pytest.raises(ValueError, match="out_kernel"):
        take(choice="cuda")
    with pytest.raises(ValueError, match="out_kernel"):
        SSDKernelConfig(chunk_size=64, out_kernel="mosaic")


def test_training_forward_gradients():
    # under jax.grad the forward keeps y before the gate (for dz) and float32 states (for the
    # backward): the Mosaic GPU kernel writes the first, the state pass a bf16 copy of the second
    b, l, h, p, g, n, q = 1, 128, 2, 64, 1, 64, 64
    v = inputs(3, b, l, h, p, g, n)
    rng = np.random.default_rng(4)
    z = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.bfloat16)
    D = jnp.asarray(rng.standard_normal(h), jnp.float32)
    w = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.float32)

    def loss(impl, interpret=True):
        def f(x, B, C, z):
            y = scan(dict(v, x=x, B=B, C=C), q, impl, out_kernel="mgpu", z=z, D=D,
                     interpret=interpret)[0]
            return jnp.sum(y.astype(jnp.float32) * w)
        return f

    args = (v["x"], v["B"], v["C"], z)
    got = jax.grad(loss("pallas"), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(loss("xla"), argnums=(0, 1, 2, 3))(*args)
    for a, b_ in zip(got, want):
        assert rel(a, b_) < 3e-2
    text = jax.jit(jax.grad(loss("pallas", interpret=False), argnums=3)).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text  # dz reads y before the gate: the kernel is live


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("b,l,h,p,g,n,q", [
    (1, 8192, 80, 64, 1, 128, 256), (2, 3000, 16, 64, 8, 128, 256), (1, 4096, 8, 128, 1, 256, 128),
    (1, 2048, 16, 64, 2, 64, 64)])
def test_gpu_real_sizes(b, l, h, p, g, n, q):
    v = inputs(l, b, l, h, p, g, n)
    rng = np.random.default_rng(2)
    z = jnp.asarray(rng.standard_normal((b, l, h, p)), jnp.bfloat16)
    D = jnp.asarray(rng.standard_normal(h), jnp.float32)
    h0 = jnp.asarray(rng.standard_normal((b, h, p, n)), jnp.float32)
    y, final = scan(v, q, "pallas", out_kernel="mgpu", z=z, D=D, h0=h0)
    y_tri, _ = scan(v, q, "pallas", z=z, D=D, h0=h0)
    vf = {k: a.astype(jnp.float32) for k, a in v.items()}
    y_ref, final_ref = scan(vf, q, "xla", z=z.astype(jnp.float32), D=D, h0=h0)
    assert rel(y, y_ref) < 2e-2 and rel(final, final_ref) < 2e-2
    assert rel(y, y_tri) < 1e-2
