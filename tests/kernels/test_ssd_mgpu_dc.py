"""The Mosaic GPU dC kernel of the SSD backward (``bwd_dc_kernel="mgpu"``): Mosaic GPU interpret
mode on the CPU against the Triton kernel and a float32 oracle, gradients through it against the
reference's, lowering for "cuda" on the CPU, which calls it takes, and on the GPU (marker
``gpu``) the same at real sizes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.ssd import ssd_chunk_scan
from mamba2_jax.kernels.ssd.decays import chunk_decays
from mamba2_jax.kernels.ssd.mgpu_dc import dC_partials_mgpu
from mamba2_jax.kernels.ssd.pallas import SSDKernelConfig, ssd_pallas
from mamba2_jax.kernels.ssd.pallas_bwd import dC_partials, which_dc_kernel

from test_ssd_mgpu import gpu, rel  # (that module skips itself without absl, so this one too)


def kernel_inputs(seed, b, l, h, p, g, n, q):
    """Random bf16 operands of the dC kernel, decay terms of random dt and A, random bf16
    entering states (h0 for chunk 0, end states after) and the dense chunk flags."""
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    bf = jnp.bfloat16
    c = l // q
    dt = jax.nn.softplus(f(b, l, h) - 1.0)
    A = -jnp.asarray(rng.uniform(0.2, 2.0, h), jnp.float32)
    return dict(x=f(b, l, h, p).astype(bf), dY=f(b, l, h, p).astype(bf),
                B=f(b, l, g, n).astype(bf), C=f(b, l, g, n).astype(bf),
                dec=chunk_decays(dt, A, q), h0=(0.5 * f(b, h, p, n)).astype(bf),
                end=(0.5 * f(b, c, h, p, n)).astype(bf),
                first=jnp.zeros((b, c), jnp.int32).at[:, 0].set(1),
                index=jnp.broadcast_to(jnp.arange(b, dtype=jnp.int32)[:, None], (b, c)))


def inter_oracle(v, q):
    """exp(acum_i) dY_i . (S C_i) per head and token in float32 (S the entering state)."""
    b, l, h, p = v["x"].shape
    g, n = v["B"].shape[-2:]
    c = l // q
    S = jnp.concatenate([v["h0"][:, None], v["end"][:, :-1]], axis=1).astype(jnp.float32)
    Cr = jnp.repeat(v["C"].astype(jnp.float32).reshape(b, c, q, g, n), h // g, axis=3)
    dY = v["dY"].astype(jnp.float32).reshape(b, c, q, h, p)
    return jnp.einsum("bcihp,bchpn,bcihn->bchi", dY, S, Cr,
                      precision="highest") * jnp.exp(v["dec"].acum)


def both_kernels(v, q, hb, interpret):
    mgpu = dC_partials_mgpu(v["x"], v["B"], v["C"], v["dY"], v["dec"].acum, v["dec"].dt,
                            v["h0"], v["end"], chunk_size=q, heads_per_program=hb,
                            interpret=interpret)
    triton = dC_partials(v["x"], v["B"], v["C"], v["dY"], v["dec"], v["first"], v["index"],
                         v["h0"].astype(jnp.float32), v["end"].astype(jnp.float32),
                         chunk_size=q, heads=hb, interpret=interpret)
    return mgpu, triton


# b, l, h, p, g, n, q, heads per program: every warpgroup count (q / 64 = 1, 2, 4), groups
# shared by 2 heads, one and several heads per program, b > 1
CASES = [
    (2, 128, 4, 64, 2, 64, 64, 2),
    (1, 256, 2, 64, 1, 128, 128, 1),
    (2, 512, 4, 64, 1, 64, 256, 4),
]


@pytest.mark.parametrize("b,l,h,p,g,n,q,hb", CASES)
def test_interpret_matches_triton_kernel_and_oracle(b, l, h, p, g, n, q, hb):
    v = kernel_inputs(b + l + hb, b, l, h, p, g, n, q)
    (dc, inter), (dc_tri, inter_tri) = both_kernels(v, q, hb, interpret=True)
    assert dc.shape == dc_tri.shape == (b, l, h // hb, n) and dc.dtype == jnp.float32
    assert rel(dc, dc_tri) < 1e-5  # same bf16 operands, float32 sums in another order
    # the Triton kernel rounds exp(acum) dY to bf16 first; this one does not
    assert rel(inter, inter_oracle(v, q)) < 1e-5
    assert rel(inter_tri, inter_oracle(v, q)) < 1e-2


def scan_config(q, **kw):
    return SSDKernelConfig(chunk_size=q, dt_softplus=True, **kw)


def grads(cfg, v, D, h0, dy, impl="pallas"):
    def loss(x, dt, A, B, C, D, h0):
        if impl == "xla":
            y, final = ssd_chunk_scan(x, dt, A, B, C, chunk_size=cfg.chunk_size, D=D,
                                      dt_softplus=True, initial_states=h0,
                                      return_final_states=True, impl="xla")
        else:
            y, final, _ = ssd_pallas(cfg, x, dt, A, B, C, D, None, None, h0, None)
        return jnp.sum(y.astype(jnp.float32) * dy) + 0.1 * jnp.sum(final)
    return jax.grad(loss, argnums=tuple(range(7)))(v["x"], v["dt"], v["A"], v["B"], v["C"], D,
                                                   h0)


def scan_inputs(seed, b, l, h, p, g, n):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    return dict(x=f(b, l, h, p).astype(jnp.bfloat16), dt=f(b, l, h) - 1.0,
                A=-jnp.asarray(rng.uniform(0.5, 4.0, h), jnp.float32),
                B=(0.5 * f(b, l, g, n)).astype(jnp.bfloat16),
                C=(0.5 * f(b, l, g, n)).astype(jnp.bfloat16)), f


def test_gradients_through_it_match_the_reference():
    # two warpgroups, two chunks (the second enters from a state), h0, every input's gradient
    b, l, h, p, g, n, q = 1, 256, 2, 64, 1, 64, 128
    v, f = scan_inputs(5, b, l, h, p, g, n)
    D, h0, dy = f(h), f(b, h, p, n), f(b, l, h, p)
    cfg = scan_config(q, interpret=True)
    assert which_dc_kernel(cfg.bwd_dc_kernel, v["x"], v["B"], q, True, True) == "mgpu"
    got = grads(cfg, v, D, h0, dy)
    tri = grads(scan_config(q, interpret=True, bwd_dc_kernel="triton"), v, D, h0, dy)
    want = grads(cfg, {k: a.astype(jnp.float32) for k, a in v.items()}, D, h0, dy, impl="xla")
    for name, a, t, w in zip("x dt A B C D h0".split(), got, tri, want):
        assert rel(a, w) < 3e-2, name
        assert rel(a, t) < 1e-2, name


def _lowered_grad(dc_kernel="mgpu", q=256, n=128, varlen=False):
    b, l, h, p, g = 1, 512, 8, 64, 1
    S = jax.ShapeDtypeStruct
    cfg = scan_config(q, bwd_dc_kernel=dc_kernel)

    def loss(x, dt, A, B, C):
        cu = jnp.asarray([0, 100, l], jnp.int32) if varlen else None
        return jnp.sum(ssd_pallas(cfg, x, dt, A, B, C, None, None, None, None, cu)[0]
                       .astype(jnp.float32))

    args = (S((b, l, h, p), jnp.bfloat16), S((b, l, h), jnp.float32), S((h,), jnp.float32),
            S((b, l, g, n), jnp.bfloat16), S((b, l, g, n), jnp.bfloat16))
    return jax.jit(jax.grad(loss, argnums=(0, 3, 4))).trace(*args).lower(
        lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("q", [64, 256])
def test_backward_lowers_for_cuda(q):
    text = _lowered_grad(q=q)
    # the forward's output kernel and the backward's dC kernel; the output kernel is dead here
    # (no gate: no gradient reads y), so XLA may drop it: at least the dC kernel
    assert 1 <= text.count("custom_call @mosaic_gpu") <= 2
    assert text.count("custom_call @mosaic_gpu") == _lowered_grad("triton", q=q).count(
        "custom_call @mosaic_gpu") + 1


def test_calls_it_does_not_take_run_the_triton_kernel():
    assert _lowered_grad(n=256).count("custom_call @mosaic_gpu") == _lowered_grad(
        "triton", n=256).count("custom_call @mosaic_gpu")
    x = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    B = jnp.zeros((1, 256, 1, 128), jnp.bfloat16)
    take = lambda **kw: which_dc_kernel(**{**dict(
        choice="mgpu", x=x, B=B, chunk_size=256, dense=True), **kw})
    assert take() == "mgpu"
    assert take(choice="triton") == "triton"
    assert take(dense=False) == "triton"
    assert take(x=x.astype(jnp.float32)) == "triton"
    assert take(B=jnp.zeros((1, 256, 1, 256), jnp.bfloat16)) == "triton"  # n = 256
    assert take(chunk_size=32) == "triton"
    with pytest.raises(ValueError, match="dc_kernel"):
        take(choice="cuda")
    with pytest.raises(ValueError, match="bwd_dc_kernel"):
        SSDKernelConfig(chunk_size=64, bwd_dc_kernel="mosaic")
    for heads in (0, 2.0):
        with pytest.raises(ValueError, match="bwd_dc_heads"):
            SSDKernelConfig(chunk_size=64, bwd_dc_heads=heads)


@gpu
@pytest.mark.gpu
@pytest.mark.parametrize("b,l,h,p,g,n,q,hb", [
    (1, 8192, 80, 64, 1, 128, 256, 4), (2, 4096, 16, 64, 8, 128, 256, 2),
    (1, 4096, 8, 128, 1, 128, 128, 8), (1, 2048, 16, 64, 2, 64, 64, 4),
    (1, 4096, 32, 128, 4, 64, 64, 8)])
def test_gpu_kernel_real_sizes(b, l, h, p, g, n, q, hb):
    v = kernel_inputs(l, b, l, h, p, g, n, q)
    (dc, inter), (dc_tri, inter_tri) = jax.jit(functools.partial(
        both_kernels, q=q, hb=hb, interpret=False))(v)
    assert rel(dc, dc_tri) < 1e-3
    assert rel(inter, inter_oracle(v, q)) < 1e-3


@gpu
@pytest.mark.gpu
def test_gpu_gradients_real_size():
    b, l, h, p, g, n, q = 1, 4096, 16, 64, 2, 128, 256
    v, f = scan_inputs(6, b, l, h, p, g, n)
    D, h0, dy = f(h), f(b, h, p, n), f(b, l, h, p)
    got = grads(scan_config(q), v, D, h0, dy)
    tri = grads(scan_config(q, bwd_dc_kernel="triton"), v, D, h0, dy)
    want = grads(scan_config(q), {k: a.astype(jnp.float32) for k, a in v.items()}, D, h0, dy,
                 impl="xla")
    for name, a, t, w in zip("x dt A B C D h0".split(), got, tri, want):
        assert rel(a, w) < 3e-2, name
        assert rel(a, t) < 1e-2, name
