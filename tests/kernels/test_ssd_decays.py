"""The SSD decay terms: the Pallas kernel (interpret mode) vs its XLA twin and a float64 oracle,
and its lowering for "cuda"."""

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

from mamba2_jax.kernels.ssd.decays import chunk_decays, chunk_decays_pallas, heads_per_block
from mamba2_jax.kernels.ssd.pallas import SSDKernelConfig, ssd_pallas


def oracle(dt, A, q):
    """float64 acum, to_end, total, dt, w in [b, c, h, q] (total [b, c, h])."""
    dt = np.asarray(dt, np.float64)
    b, L, h = dt.shape
    dtc = dt.reshape(b, L // q, q, h).transpose(0, 1, 3, 2)
    a = dtc * np.asarray(A, np.float64)[None, None, :, None]
    acum = np.cumsum(a, axis=-1)
    to_end = np.cumsum(a[..., ::-1], axis=-1)[..., ::-1] - a  # exact in float64 here
    return acum, to_end, a.sum(-1), dtc, np.exp(to_end) * dtc


def decay_inputs(seed, b, L, h, pad=0):
    rng = np.random.default_rng(seed)
    dt = np.log1p(np.exp(rng.standard_normal((b, L, h)))) * 2
    if pad:
        dt[:, -pad:] = 0.0  # padding tokens of a chunk layout
    A = -np.exp(rng.standard_normal(h)) * 3
    return jnp.asarray(dt, jnp.float32), jnp.asarray(A, jnp.float32)


@pytest.mark.parametrize("b,L,h,q,pad,launch", [
    (2, 64, 12, 32, 5, {}), (1, 48, 3, 16, 0, {}), (1, 128, 80, 64, 17, {}),
    (1, 64, 64, 64, 0, {}), (1, 128, 80, 64, 3, dict(max_heads=4, num_warps=1))])
def test_pallas_decays_match_xla_and_float64(b, L, h, q, pad, launch):
    dt, A = decay_inputs(L + h, b, L, h, pad)
    got = chunk_decays_pallas(dt, A, q, interpret=True, **launch)
    xla = chunk_decays(dt, A, q)
    for name, want in zip(got._fields, oracle(dt, A, q)):
        g = np.asarray(getattr(got, name), np.float64)
        assert g.shape == want.shape, name
        scale = np.max(np.abs(want)) + 1e-30
        assert np.max(np.abs(g - want)) / scale < 1e-6, name
        np.testing.assert_allclose(g, np.asarray(getattr(xla, name)), rtol=2e-6, atol=1e-6 * scale)


def test_reverse_sums_do_not_cancel_under_strong_decay():
    """Early tokens decay hard, the last ones barely: ``total - acum_j`` would leave nothing of
    the late to_end values (|total| ~ 1e5 against ~1e-3); the kernel's keep float32 accuracy."""
    q, h = 32, 4
    dt = np.full((1, q, h), 1e-4, np.float32)
    dt[:, : q // 2] = 50.0
    A = np.full(h, -100.0, np.float32)
    got = chunk_decays_pallas(jnp.asarray(dt), jnp.asarray(A), q, interpret=True)
    want = oracle(dt, A, q)[1]
    late = want[..., q // 2: -1]  # nonzero, tiny beside total
    assert np.all(np.abs(late) < 1.0) and np.abs(want).max() > 1e4
    np.testing.assert_allclose(np.asarray(got.to_end)[..., q // 2: -1], late, rtol=1e-5)
    cancelling = np.asarray(got.total)[..., None] - np.asarray(got.acum)
    assert np.max(np.abs(cancelling[..., q // 2: -1] - late) / np.abs(late)) > 1e-2  # the trap


@pytest.mark.parametrize("h,cap,want", [(80, 32, 16), (128, 32, 32), (3, 32, 1), (12, 32, 4),
                                         (64, 32, 32), (128, 8, 8), (80, 4, 4)])
def test_heads_per_block(h, cap, want):
    assert heads_per_block(h, cap) == want


@pytest.mark.parametrize("decays,lens", [("xla", None), ("xla", (9, 0, 40, 3))])
def test_forward_and_gradients_are_the_same_with_any_decays(decays, lens):
    """The decay terms from XLA (the twin) or the Pallas kernel: the same forward and gradients,
    batched and packed."""
    rng = np.random.default_rng(3)
    b, l, h, p, g, n, q = (1, 52, 4, 32, 2, 16, 32) if lens else (2, 40, 4, 32, 2, 16, 32)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    x, dt, B, C = f(b, l, h, p), f(b, l, h), f(b, l, g, n), f(b, l, g, n)
    A = -jnp.asarray(rng.uniform(0.5, 4.0, h), jnp.float32)
    h0 = f(len(lens) if lens else b, h, p, n)
    cu = None if lens is None else jnp.asarray(np.concatenate([[0], np.cumsum(lens)]), jnp.int32)

    def run(d):
        cfg = SSDKernelConfig(chunk_size=q, dt_softplus=True, decays=d, block_k=16, block_p=16,
                              interpret=True)
        fwd = lambda x, dt, A, B: ssd_pallas(cfg, x, dt, A, B, C, None, None, None, h0, cu)[:2]
        loss = lambda *a: sum(jnp.sum(jnp.sin(o)) for o in fwd(*a))
        return fwd(x, dt, A, B), jax.grad(loss, argnums=(0, 1, 2, 3))(x, dt, A, B)

    (out, grads), (want, want_grads) = run(decays), run("pallas")
    for a, b_ in zip(out + grads, want + want_grads):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b_), rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="decays"):
        SSDKernelConfig(chunk_size=q, decays="triton")


@pytest.mark.parametrize("b,L,h,q,launch", [(1, 8192, 80, 256, {}), (2, 1024, 3, 64, {}),
                                            (1, 8192, 128, 256, dict(max_heads=8, num_warps=1)),
                                            (1, 4096, 80, 256, dict(num_warps=8))])
def test_decays_kernel_lowers_for_cuda(b, L, h, q, launch):
    S = jax.ShapeDtypeStruct
    fn = lambda dt, A: chunk_decays_pallas(dt, A, q, **launch)
    text = (jax.jit(fn).trace(S((b, L, h), jnp.float32), S((h,), jnp.float32))
            .lower(lowering_platforms=("cuda",)).as_text())
    assert text.count("__gpu$xla.gpu.triton") == 1


def kernel_names(closed):
    """Names of the pallas_calls in a (closed) jaxpr, nested ones included, in order."""
    names = []

    def walk(jaxpr):
        for e in jaxpr.eqns:
            if e.primitive.name == "pallas_call":
                name = e.params.get("name", e.params.get("name_and_src_info"))  # jax 0.10 / 0.11
                names.append(str(name).split(" ")[0])
            for v in e.params.values():
                if isinstance(v, jex.ClosedJaxpr):
                    walk(v.jaxpr)
                elif isinstance(v, jex.Jaxpr):
                    walk(v)

    walk(closed.jaxpr)
    return names


@pytest.mark.parametrize("decays,launches", [("pallas", 1), ("xla", 0)])
def test_the_backward_reuses_the_forward_decay_terms(decays, launches):
    """One decays launch per forward + backward: the backward reads the forward's terms."""
    rng = np.random.default_rng(5)
    f = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
    x, dt, B, C = f(1, 32, 4, 16), f(1, 32, 4), f(1, 32, 1, 16), f(1, 32, 1, 16)
    cfg = SSDKernelConfig(chunk_size=16, dt_softplus=True, decays=decays, interpret=True)
    loss = lambda x, dt: jnp.sum(ssd_pallas(cfg, x, dt, -jnp.ones(4), B, C, None, None, None,
                                            None, None)[0])
    names = kernel_names(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(x, dt))
    assert names.count("ssd_chunk_decays") == launches
    assert names.count("ssd_bwd_dx_dB") == 1 and names.count("ssd_chunk_output") == 1
