"""The SSD backward's dC kernel on Mosaic GPU (Hopper: TMA copies, wgmma on the tensor cores).

The same math as ``pallas_bwd._dC_kernel``: for chunk c of q tokens, a block of ``hb`` heads of
one group, with the decay terms of ``decays.py`` (``w = dt``), ``S`` [p, n] the state entering
the chunk and dY the cotangent of y_ssd,

    dC_i    = sum over the block's heads of
              [ exp(acum_i) dY_i S + sum_{j <= i} (dY_i . x_j) exp(acum_i - acum_j) w_j B_j ]
    inter_i = exp(acum_i) dY_i . (S C_i)      (per head: the entering state's part of d acum_i)

It is the output kernel's structure (``mgpu_output.py``) with dY, x, B in the roles of C, B, x.
One program per (block of heads, chunk); ``q / 64`` warpgroups, warpgroup r owning rows
[64 r, 64 r + 64). Each warpgroup copies its own 64-row blocks of B and C once and, per head,
of dY and x (warpgroup 0 also the head's state and per-token vectors); the float32 [64, n]
accumulator stays in registers over the heads. Per head: ``S C_r^T`` (wgmma) gives the inter
row sums, ``acc += bf16(exp(acum_i) dY_r) S`` (register operand), and per column block
``j <= r`` the scores ``dY_r x_j^T`` (wgmma, float32), scaled by ``exp(acum_i - acum_j) w_j``
(masked above the diagonal on j = r), then ``acc += bf16(scores) B_j``. After a head every
warpgroup waits for its products and meets the others at a barrier before the next head's
copies overwrite the blocks. The accumulator and the row sums are stored from registers to
global memory. The Triton kernel forms ``inter`` from the rounded ``bf16(exp(acum_i) dY_i) S``;
here it comes from dY in float32 and ``S C_i^T``, the same sum without that rounding.

Scope (``mgpu_dc_unsupported`` says why a call cannot take it; the caller then runs the Triton
kernel): the output kernel's (Hopper, bf16, dense batches, chunk 64 / 128 / 256, head_dim 64 /
128) with state size n 64 or 128 (the accumulator's registers), within the shared memory of one
program. The states are read as a bf16 copy (as the output kernel's). Dtype policy: bf16
operands, float32 accumulation and elementwise math (``approx_math`` exponentials); the dC
partials [b, c*q, h / hb, n] and row sums [b, c, h, q] in float32.

Interpret mode on the CPU (jax 0.10.2) routes products through scratch buffers as the output
kernel does (``mgpu_output.wgmma``).

Measured alone on an H200 (jax 0.11.2; scripts/bench_ssd_dc.py,
benchmarks/results/ssd_dc_NVIDIA_H200.json), 8 heads per program: 0.267 ms against 0.352 ms for
the Triton dC kernel on (b, l, h, p, g, n, q) = (1, 8192, 80, 64, 1, 128, 256), 0.467 against
0.659 on (4, 4096, ...), 0.363 against 0.551 with 128 heads in 8 groups.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mamba2_jax.kernels.ssd.mgpu_output import (ROWS, SMEM_BYTES, _plgpu, causal_blocks,
                                                copy_entering_state, interpret_params,
                                                layout_caster, mgpu_unsupported, tiled_smem,
                                                wgmma)


def smem_bytes(q: int, p: int, n: int) -> int:
    """Shared memory of one program: B and C (q x n), dY and x (q x p), the state (p x n) in
    bf16; two float32 vectors of q; barriers."""
    return 2 * (2 * q * n + 2 * q * p + p * n) + 4 * 2 * q + 1024


def mgpu_dc_unsupported(x, B, chunk_size: int, *, varlen: bool, interpret: bool = False
                        ) -> str | None:
    """Why the Mosaic GPU dC kernel cannot take this call (None when it can)."""
    n = B.shape[-1]
    if n not in (64, 128):
        return f"state size n={n} is not 64 or 128 (the Mosaic GPU dC kernel's accumulator)"
    if smem_bytes(chunk_size, x.shape[-1], n) > SMEM_BYTES:
        return f"{smem_bytes(chunk_size, x.shape[-1], n)} bytes of shared memory per program"
    return mgpu_unsupported(x, B, chunk_size, varlen=varlen, interpret=interpret)


def _dc_kernel(x_ref, dY_ref, B_ref, C_ref, acum_ref, dt_ref, h0_ref, end_ref, dC_ref,
               inter_ref, *, q, nc, hb, heads_per_group, interpret):
    plgpu = _plgpu()
    cast = layout_caster(interpret)
    nb, p, n = q // ROWS, x_ref.shape[-1], B_ref.shape[-1]
    dtype = x_ref.dtype
    hk, bc, wg = lax.axis_index("heads"), lax.axis_index("chunks"), lax.axis_index("wg")
    bi, ci = lax.div(bc, nc), lax.rem(bc, nc)
    gi = lax.div(hk * hb, heads_per_group)
    rows = pl.ds(ci * q + wg * ROWS, ROWS)  # this warpgroup's rows of the sequence
    row_layout = plgpu.Layout.WGMMA.reduce(1)

    def body(B_s, C_s, dY_s, x_s, S_s, acum_s, dt_s, bar_b, bar_c, bar_dy, bar_x, bar_v,
             bar_done, *scratch):
        mma = lambda acc_ref, a, b_ref, k, transpose_b=False: wgmma(
            acc_ref, a, b_ref, scratch[2 * k:2 * k + 2], wg, transpose_b=transpose_b,
            interpret=interpret)

        def load_head(k):
            hi = hk * hb + k
            plgpu.copy_gmem_to_smem(dY_ref.at[bi, rows, hi], dY_s.at[wg], bar_dy.at[wg])
            plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hi], x_s.at[wg], bar_x.at[wg])

            @pl.when(wg == 0)
            def _vectors():
                plgpu.copy_gmem_to_smem(acum_ref.at[bi, ci, hi], acum_s, bar_v.at[0])
                plgpu.copy_gmem_to_smem(dt_ref.at[bi, ci, hi], dt_s, bar_v.at[1])
                copy_entering_state(h0_ref, end_ref, bi, ci, hi, S_s, bar_v, 2)

        plgpu.copy_gmem_to_smem(B_ref.at[bi, rows, gi], B_s.at[wg], bar_b.at[wg])
        plgpu.copy_gmem_to_smem(C_ref.at[bi, rows, gi], C_s.at[wg], bar_c.at[wg])
        load_head(0)
        plgpu.barrier_wait(bar_c.at[wg])

        @pl.loop(0, wg + 1)
        def _(j):  # the B blocks this warpgroup reads, once for all heads
            plgpu.barrier_wait(bar_b.at[j])

        def head(acc_ref, k, carry):
            hi = hk * hb + k
            for v in range(3):
                plgpu.barrier_wait(bar_v.at[v])
            plgpu.barrier_wait(bar_dy.at[wg])
            acum_i = cast(acum_s.at[pl.ds(wg * ROWS, ROWS)][...], row_layout)
            e_i = jnp.exp(acum_i)

            def inter_sums(cs_ref):  # S C_r^T: [64, p]
                mma(cs_ref, C_s.at[wg], S_s, 0, transpose_b=True)
                return cs_ref[...]

            cs = pl.run_scoped(inter_sums, plgpu.ACC((ROWS, p), jnp.float32))
            dY_i = cast(dY_s.at[wg][...], plgpu.Layout.WGMMA).astype(jnp.float32)
            inter_ref.at[bi, ci, hi, pl.ds(wg * ROWS, ROWS)][...] = (
                jnp.sum(dY_i * cs, axis=1) * e_i)
            dYs = (dY_i * lax.broadcast_in_dim(e_i, (ROWS, p), [0])).astype(dtype)
            mma(acc_ref, dYs, S_s, 1)  # acc += exp(acum_i) dY_r S

            # acc += sum_j decayed(dY_r x_j^T) B_j
            causal_blocks(mma, acc_ref, dY_s.at[wg], x_s, B_s, acum_i, acum_s, dt_s, wg,
                          lambda j: plgpu.barrier_wait(bar_x.at[j]), (2, 3), interpret)
            plgpu.wgmma_wait(0)  # this warpgroup's products have read the head's blocks
            plgpu.barrier_arrive(bar_done)
            plgpu.barrier_wait(bar_done)  # ... and every other warpgroup's have

            @pl.when(k + 1 < hb)
            def _():
                load_head(k + 1)

            return carry

        def heads(acc_ref):
            lax.fori_loop(0, hb, functools.partial(head, acc_ref), 0)
            return acc_ref[...]

        acc = pl.run_scoped(heads, plgpu.ACC((ROWS, n), jnp.float32))
        dC_ref.at[bi, rows, hk][...] = acc

    tiled = tiled_smem(dtype)
    pl.run_scoped(
        body,
        tiled(nb, ROWS, n), tiled(nb, ROWS, n), tiled(nb, ROWS, p), tiled(nb, ROWS, p),
        tiled(p, n), plgpu.SMEM((q,), jnp.float32), plgpu.SMEM((q,), jnp.float32),
        plgpu.Barrier(num_barriers=nb), plgpu.Barrier(num_barriers=nb),
        plgpu.Barrier(num_barriers=nb), plgpu.Barrier(num_barriers=nb),
        plgpu.Barrier(num_barriers=3), plgpu.Barrier(num_arrivals=nb),
        # interpret mode: the (a, b) operand pairs of the four products (see wgmma)
        *([tiled(nb, ROWS, n), tiled(nb, n, p), tiled(nb, ROWS, p), tiled(nb, p, n),
           tiled(nb, ROWS, p), tiled(nb, p, ROWS), tiled(nb, ROWS, ROWS), tiled(nb, ROWS, n)]
          if interpret else []),
        collective_axes="wg")


def dC_partials_mgpu(x, B, C, dY, acum, dt, h0, end, *, chunk_size, heads_per_program,
                     interpret=False):
    """(dC partials [b, c*q, h / hb, n], row sums ``dY_i . exp(acum_i) S C_i`` [b, c, h, q]),
    float32, from the Mosaic GPU kernel; ``pallas_bwd.dC_partials``'s contract.

    x / dY [b, c*q, h, p], B / C [b, c*q, g, n] (bf16); acum / dt [b, c, h, q] float32; h0
    [b, h, p, n] (each row's initial state, taken in bf16); end [b, c, h, p, n] bf16 (the
    state leaving every chunk); ``heads_per_program`` (hb) heads of one group per program.
    """
    plgpu = _plgpu()
    b, L, h, p = x.shape
    g, n = B.shape[-2:]
    q, hb = chunk_size, heads_per_program
    nc = L // q
    out = (jax.ShapeDtypeStruct((b, L, h // hb, n), jnp.float32),
           jax.ShapeDtypeStruct((b, nc, h, q), jnp.float32))

    def ssd_bwd_dC_mgpu(*refs):  # the kernel's name in profiles
        _dc_kernel(*refs, q=q, nc=nc, hb=hb, heads_per_group=h // g, interpret=interpret)

    return plgpu.kernel(
        ssd_bwd_dC_mgpu, out_type=out, grid=(h // hb, b * nc), grid_names=("heads", "chunks"),
        num_threads=q // ROWS, thread_name="wg", interpret=interpret_params(interpret),
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane),
    )(x, dY.astype(x.dtype), B, C, acum, dt, h0.astype(x.dtype), end.astype(x.dtype))
