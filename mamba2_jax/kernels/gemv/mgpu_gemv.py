"""Small-batch GEMV on Mosaic GPU (Hopper: a TMA copy ring feeding wgmma): ``out = x @ w``.

The product is computed transposed, ``out^T [N, m] = w^T [N, K] @ x^T [K, m]``, so that the
weights are wgmma's M side (64 / 128 output columns a program) and the few rows of x its N side
(``mp`` = 8 or 16: x is padded to that many rows by XLA): no tensor-core work is spent on padding
rows of x beyond ``mp``, and the weights go from a TMA copy straight to the tensor cores, never
through registers. A w tile is [bk, bn] of w [K, N] (``w_layout="in_out"``, read transposed by
wgmma) or [bn, bk] of w [N, K] (``"out_in"``, e.g. a tied embedding as the LM head).

Grid (cdiv(N, bn), S): program (j, s) owns columns ``n0 = min(j bn, N - bn)`` (the last block is
moved back to end at N, so a ragged N reads and writes in bounds; the columns it shares with its
neighbour are computed twice, equal, and stored twice) and the K slab ``s ks : (s + 1) ks``. It
copies its slab of x (``[mp, ks]``) into shared memory once, keeps ``stages`` w tiles in flight
(a ring of shared-memory slots, one barrier each), and per tile issues one wgmma into a float32
[bn, mp] accumulator in registers, waits for it and refills the slot with the tile ``stages``
ahead. The accumulator goes to ``partials[s, n0 : n0 + bn]`` ([S, N, mp] float32); XLA sums the
slabs, drops the padding rows and transposes (a small fusion that XLA can merge with the
consumer).

Scope (``mgpu_gemv_unsupported``; on the GPU only m <= 8, i.e. 8 padded rows, and the default
blocks have run so far): a Hopper GPU (or interpret mode), bf16 / f16, m <= 16, K a
multiple of bk, N >= bn and a multiple of 8 (TMA row strides of 16-byte multiples), the x slab
within ``X_SLAB_BYTES`` of shared memory (S grows until it fits).
Dtype policy: x and w in one 16-bit float dtype; products and sums in float32 on the tensor
cores; the API casts the output.

Measured on an H200 (jax 0.11.2, ``scripts/bench_gemv.py``, one run beside the Triton kernel,
benchmarks/results/gemv_sweep_mgpu_NVIDIA_H200.json), best config of each, µs: in_proj
2560 x 10576 20.6 (m = 1) / 20.4 (m = 4) against Triton's 20.7 / 19.7; out_proj 5120 x 2560
11.7 / 11.6 against 11.0 / 11.3; the LM head 50280 x 2560 (out_in) 70.8 / 72.8 against 70.3 /
69.7. Deeper rings (8, 12 stages) were slower, not faster: at ~55-60 % of the read rate neither
kernel is bound by the bytes in flight. A tie, so ``kernel="auto"`` stays on the Triton kernel.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mamba2_jax.kernels.common import cdiv
from mamba2_jax.kernels.ssd.mgpu_output import _device_reason, _plgpu, interpret_params, tiled_smem

BLOCK_N, BLOCK_K, STAGES = 64, 64, 4
X_SLAB_BYTES = 64 * 1024
MAX_ROWS = 16
DTYPES = (jnp.bfloat16, jnp.float16)


def padded_rows(m: int) -> int:
    return 8 if m <= 8 else 16


def mgpu_plan(m: int, K: int, N: int, *, block_n=None, block_k=None, splits=None, stages=None,
              sm_count: int = 132):
    """The launch plan (dict: mp, bn, bk, n_k tiles a slab, S slabs, stages, grid). ``splits``
    None: the smallest divisor of the k-tile count giving >= 2 programs an SM whose x slab
    fits X_SLAB_BYTES."""
    bn = BLOCK_N if block_n is None else block_n
    bk = BLOCK_K if block_k is None else block_k
    mp = padded_rows(m)
    n_tiles = K // bk
    nb = cdiv(N, bn)
    fits = [s for s in range(1, n_tiles + 1)
            if n_tiles % s == 0 and mp * (K // s) * 2 <= X_SLAB_BYTES]
    if splits is None:
        S = next((s for s in fits if nb * s >= 2 * sm_count), fits[-1] if fits else n_tiles)
    else:
        S = splits
    n_k = n_tiles // S
    st = min(STAGES if stages is None else stages, n_k)
    return dict(mp=mp, bn=bn, bk=bk, n_k=n_k, S=S, stages=st, grid=(nb, S))


def mgpu_gemv_unsupported(m: int, K: int, N: int, dtype, *, w_layout="in_out", block_n=None,
                          block_k=None, splits=None, interpret: bool = False) -> str | None:
    """Why the Mosaic GPU GEMV cannot take an [m, K] x [K, N] product (None when it can)."""
    bn = BLOCK_N if block_n is None else block_n
    bk = BLOCK_K if block_k is None else block_k
    if jnp.dtype(dtype) not in [jnp.dtype(d) for d in DTYPES]:
        return f"dtype {jnp.dtype(dtype).name} (the Mosaic GPU GEMV takes bf16 / f16)"
    if not 1 <= m <= MAX_ROWS:
        return f"m={m} rows (the Mosaic GPU GEMV takes 1..{MAX_ROWS})"
    # a w tile's rows are 64 elements (128 bytes: one swizzled row); the other side is free
    row, other = (bk, bn) if w_layout == "out_in" else (bn, bk)
    if row != 64 or other not in (64, 128, 256):
        return (f"block_n={bn} / block_k={bk}: the {'k' if w_layout == 'out_in' else 'n'} block "
                f"must be 64 and the other 64, 128 or 256 (w_layout={w_layout!r})")
    if K % bk:
        return f"K={K} is not a multiple of block_k={bk}"
    if N < bn or N % 8:
        return f"N={N} is below block_n={bn} or not a multiple of 8"
    p = mgpu_plan(m, K, N, block_n=bn, block_k=bk, splits=splits)
    if (K // bk) % p["S"]:
        return f"splits={p['S']} does not divide the {K // bk} k-tiles"
    if p["mp"] * p["n_k"] * bk * 2 > X_SLAB_BYTES:
        return f"the x slab of {p['mp']} x {p['n_k'] * bk} is over {X_SLAB_BYTES} bytes"
    return None if interpret else _device_reason()


def _gemv_kernel(x_ref, w_ref, o_ref, *, N, bn, bk, n_k, stages, out_in, interpret):
    plgpu = _plgpu()
    j, s = lax.axis_index("cols"), lax.axis_index("split")
    n0 = jnp.minimum(j * bn, N - bn)
    ks = n_k * bk
    mp = x_ref.shape[0]

    def w_tile(t):
        k0 = s * ks + t * bk
        return (w_ref.at[pl.ds(n0, bn), pl.ds(k0, bk)] if out_in
                else w_ref.at[pl.ds(k0, bk), pl.ds(n0, bn)])

    def body(w_smem, x_s, bars, x_bar, *scratch):
        # the w ring, written by TMA through a swizzle-only view (a tiled one would need N to
        # be a multiple of 64 in global memory) and read by wgmma through the tiled view of
        # the same bytes (with 64-element rows the two layouts coincide)
        w_in, w_s = (w_smem, w_smem) if interpret else tuple(w_smem)
        plgpu.copy_gmem_to_smem(x_ref.at[:, pl.ds(s * ks, ks)], x_s, x_bar.at[0])
        for t in range(stages):
            plgpu.copy_gmem_to_smem(w_tile(t), w_in.at[t], bars.at[t])
        plgpu.barrier_wait(x_bar.at[0])

        def product(acc_ref):
            def step(t, carry):
                slot = lax.rem(t, stages)
                plgpu.barrier_wait(bars.at[slot])
                w_t, x_t = w_s.at[slot], x_s.at[:, pl.ds(pl.multiple_of(t * bk, bk), bk)]
                if interpret:  # the interpreter takes untransposed operands (mgpu_output.wgmma)
                    a, b = scratch
                    a[...] = w_t[...] if out_in else w_t[...].T
                    b[...] = x_t[...].T
                else:
                    a, b = (w_t if out_in else w_t.T), x_t.T  # [bn, bk], [bk, mp]
                plgpu.wgmma(acc_ref, a, b)
                plgpu.wgmma_wait(0)  # the tile is read: its slot may be refilled

                @pl.when(t + stages < n_k)
                def _():
                    plgpu.copy_gmem_to_smem(w_tile(t + stages), w_in.at[slot], bars.at[slot])
                return carry

            lax.fori_loop(0, n_k, step, 0)
            return acc_ref[...]

        acc = pl.run_scoped(product, plgpu.ACC((bn, mp), jnp.float32))
        o_ref.at[s, pl.ds(n0, bn)][...] = acc

    dtype = x_ref.dtype
    tiled = tiled_smem(dtype)
    ring = (stages, *((bn, bk) if out_in else (bk, bn)))
    w_ring = tiled(*ring) if interpret else plgpu.RefUnion(
        plgpu.SMEM(ring, dtype, transforms=(plgpu.SwizzleTransform(128),)), tiled(*ring))
    pl.run_scoped(
        body, w_ring, tiled(mp, ks),
        plgpu.Barrier(num_barriers=stages), plgpu.Barrier(num_barriers=1),
        *([tiled(bn, bk), plgpu.SMEM((bk, mp), dtype)] if interpret else []))


@functools.partial(jax.jit, static_argnames=("w_layout", "block_n", "block_k", "splits",
                                             "stages", "sm_count", "interpret"))
def gemv_mgpu_partials(x, w, *, w_layout="in_out", block_n=None, block_k=None, splits=None,
                       stages=None, sm_count: int = 132, interpret: bool = False):
    """The float32 partial products ``[S, N, mp]`` of ``(x [m, K] @ w)^T`` (rows of x padded to
    ``mp``); ``sum(axis=0)[:, :m].T`` is the product. Shapes are the caller's to check
    (``mgpu_gemv_unsupported``)."""
    plgpu = _plgpu()
    m, K = x.shape
    out_in = w_layout == "out_in"
    N = w.shape[0] if out_in else w.shape[1]
    p = mgpu_plan(m, K, N, block_n=block_n, block_k=block_k, splits=splits, stages=stages,
                  sm_count=sm_count)
    xp = jnp.pad(x, ((0, p["mp"] - m), (0, 0)))

    def gemv_mgpu(*refs):  # the kernel's name in profiles
        _gemv_kernel(*refs, N=N, bn=p["bn"], bk=p["bk"], n_k=p["n_k"], stages=p["stages"],
                     out_in=out_in, interpret=interpret)

    return plgpu.kernel(
        gemv_mgpu, out_type=jax.ShapeDtypeStruct((p["S"], N, p["mp"]), jnp.float32),
        grid=p["grid"], grid_names=("cols", "split"), interpret=interpret_params(interpret),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Lane),
    )(xp, w)


def gemv_mgpu(x, w, bias=None, *, w_layout="in_out", out_dtype=None, **config):
    """``x [m, K] @ w (+ bias)`` in ``out_dtype`` (None: x.dtype) through the Mosaic GPU kernel;
    ``config``: ``gemv_mgpu_partials``'s launch keywords."""
    m = x.shape[0]
    out = jnp.sum(gemv_mgpu_partials(x, w, w_layout=w_layout, **config), axis=0)[:, :m].T
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype if out_dtype is None else out_dtype)
