"""The SSD chunk-output kernel on Mosaic GPU (Hopper: TMA copies, wgmma on the tensor cores).

The same math as ``pallas_fwd._output_kernel``: for chunk c of q tokens and head h (group
g = h // (heads / groups)), with the decay terms of ``decays.py``,

    y_i = exp(acum_i) C_i S_prev^T + sum_{j <= i} (C_i . B_j) exp(acum_i - acum_j) dt_j x_j
          + D x_i,      then y_i *= silu(z_i)

where ``S_prev`` [p, n] is the state entering the chunk (h0 at a sequence's first chunk).

One program per (head, chunk); ``q / 64`` warpgroups, warpgroup r owning rows
[64 r, 64 r + 64) of the chunk. Every warpgroup issues the TMA copies of its own 64-row blocks
of C, B and x (and z) into shared memory, warpgroup 0 also those of the entering state and the
per-token vectors (acum, dt, D); a warpgroup then waits only for the blocks it reads: C_r, the
state, and B_j, x_j for j <= r. Per column block j: ``S = C_r B_j^T`` (wgmma, float32
accumulator), ``S *= exp(acum_i - acum_j) dt_j`` (masked above the diagonal on j = r),
``acc += bf16(S) x_j`` (wgmma with S from registers). The inter-chunk term comes first, one
wgmma ``(exp(acum_i) C_r) S_prev^T`` with C's rows scaled in float32 and rounded to bf16 in
registers, as the Triton kernel does. Exponents are differences ``acum_i - acum_j <= 0`` taken
before ``exp``, as in the Triton kernel.

Scope (``mgpu_unsupported`` says why a call cannot take it; the caller then runs the Triton
kernel): a Hopper-class GPU (or Mosaic GPU's interpret mode on the CPU), bf16 operands, dense
batches (no ``cu_seqlens``: a row's first chunk is chunk 0 and it starts from ``h0[row]``),
chunk 64 / 128 / 256, head_dim 64 / 128, state size 64 / 128 / 256, within the 227 KiB of shared
memory of one program. The states are read as a bf16 copy (the state pass writes one beside
the float32 states when those are kept). Dtype policy: bf16 operands (h0 rounded to bf16, as
the Triton kernel rounds the entering state), float32 accumulation and elementwise math (the
exponentials with ``approx_math``), y in bf16.

On the CPU the kernel runs in Mosaic GPU's interpret mode (jax 0.10.2), which lacks three
things the GPU path uses: ``layout_cast`` (skipped there: layouts only steer the lowering),
a register operand of wgmma and transposed shared-memory operands (:func:`wgmma` copies both
through scratch buffers there). With four warpgroups (chunk 256) it hung on a 2-core machine
with one CPU device and ran with eight (``jax_num_cpu_devices``, as the tests set). Lowering
for "cuda" on the CPU runs the real Lane-semantics lowering.

Measured alone on an H200 (jax 0.11.2; scripts/bench_ssd_output.py,
benchmarks/results/ssd_output_NVIDIA_H200.json): 0.194 ms against 0.255 ms for the Triton
output kernel on (b, l, h, p, g, n, q) = (1, 8192, 80, 64, 1, 128, 256), 0.302 against 0.395 ms
with 128 heads in 8 groups (Warpgroup lowering semantics: 0.195 / 0.297).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

ROWS = 64  # rows per warpgroup: one wgmma M tile
SMEM_BYTES = 227 * 1024  # dynamic shared memory of one Hopper thread block


def _plgpu():
    # Imported on use (it needs absl-py, which optax and orbax bring along).
    from jax.experimental.pallas import mosaic_gpu as plgpu
    return plgpu


def smem_bytes(q: int, p: int, n: int) -> int:
    """Shared memory of one program: C, B (q x n), x (q x p), the state (p x n), the output (and
    z) blocks (q x p) in bf16; the float32 vectors; barriers."""
    return 2 * (2 * q * n + 2 * q * p + p * n) + 4 * (2 * q + p) + 1024


def _device_reason() -> str | None:
    try:
        _plgpu()
    except ImportError as e:
        return f"jax.experimental.pallas.mosaic_gpu does not import ({e})"
    device = jax.devices()[0]
    if device.platform == "gpu":  # (on a CPU host: lowering for "cuda", or interpret mode)
        cc = getattr(device, "compute_capability", None)  # "9.0" on an H100 / H200
        if cc is None or str(cc).split(".")[0] != "9":  # wgmma: Hopper only (not sm_100)
            return f"{device.device_kind} is not a Hopper GPU (compute capability {cc})"
    return None


def mgpu_unsupported(x, B, chunk_size: int, *, varlen: bool, interpret: bool = False
                     ) -> str | None:
    """Why the Mosaic GPU output kernel cannot take this call (None when it can)."""
    p, n = x.shape[-1], B.shape[-1]
    if x.dtype != jnp.bfloat16:
        return f"dtype {x.dtype} (the Mosaic GPU output kernel takes bf16)"
    if varlen:
        return "packed varlen input (the Mosaic GPU output kernel takes dense batches)"
    if chunk_size not in (64, 128, 256):
        return f"chunk_size={chunk_size} is not 64, 128 or 256"
    if p not in (64, 128):
        return f"head_dim p={p} is not 64 or 128"
    if n not in (64, 128, 256):
        return f"state size n={n} is not 64, 128 or 256"
    if smem_bytes(chunk_size, p, n) > SMEM_BYTES:
        return f"{smem_bytes(chunk_size, p, n)} bytes of shared memory per program"
    return None if interpret else _device_reason()


def layout_caster(interpret: bool):
    """``plgpu.layout_cast``, or the identity in GPU interpret mode, which has no rule for it
    (register layouts steer the lowering only)."""
    return (lambda v, layout: v) if interpret else _plgpu().layout_cast


def copy_entering_state(h0_ref, end_ref, bi, ci, hi, dst, barriers, k):
    """TMA copy of the state entering chunk ``ci`` of row ``bi``, head ``hi`` into ``dst`` on
    barrier ``k`` of ``barriers``: h0 at chunk 0 (a dense row is one sequence), else the state
    leaving chunk ``ci - 1``."""
    plgpu = _plgpu()

    @pl.when(ci == 0)
    def _():
        plgpu.copy_gmem_to_smem(h0_ref.at[bi, hi], dst, barriers.at[k])

    @pl.when(ci != 0)
    def _():
        plgpu.copy_gmem_to_smem(end_ref.at[bi, jnp.maximum(ci - 1, 0), hi], dst, barriers.at[k])


def wgmma(acc_ref, a, b_ref, scratch, wg, *, transpose_b=False, interpret=False):
    """``acc += a @ b`` on the tensor cores (``b^T`` with ``transpose_b``; ``a`` from registers
    unless a ref). GPU interpret mode (jax 0.10) takes untransposed shared-memory operands only:
    there both go through warpgroup ``wg``'s slot of the scratch pair ``scratch`` first."""
    plgpu = _plgpu()
    if not interpret:
        return plgpu.wgmma(acc_ref, a, b_ref.transpose((1, 0)) if transpose_b else b_ref)
    if not isinstance(a, jax.Array):
        a = a[...]
    a_s, b_s = scratch[0].at[wg], scratch[1].at[wg]
    a_s[...] = a
    b_s[...] = b_ref[...].T if transpose_b else b_ref[...]
    plgpu.wgmma(acc_ref, a_s, b_s)


def decayed(s, acum_i, acum_s, dt_s, j, diagonal, interpret=False):
    """``s_ij exp(acum_i - acum_j) dt_j`` for the 64-column block j of a [64, 64] float32 score
    block in the WGMMA layout (rows i: ``acum_i`` in its row layout; ``acum_s`` / ``dt_s``: the
    chunk's vectors in shared memory); with ``diagonal`` zero above the diagonal (j the row
    block). The exponent is the difference, <= 0 on and below the diagonal."""
    plgpu = _plgpu()
    cast = layout_caster(interpret)
    col_layout = plgpu.Layout.WGMMA.reduce(0)
    acum_j = cast(acum_s.at[pl.ds(j * ROWS, ROWS)][...], col_layout)
    dt_j = cast(dt_s.at[pl.ds(j * ROWS, ROWS)][...], col_layout)
    shape = (ROWS, ROWS)
    diff = lax.broadcast_in_dim(acum_i, shape, [0]) - lax.broadcast_in_dim(acum_j, shape, [1])
    if diagonal:
        row = cast(lax.broadcasted_iota(jnp.int32, shape, 0), plgpu.Layout.WGMMA)
        col = cast(lax.broadcasted_iota(jnp.int32, shape, 1), plgpu.Layout.WGMMA)
        diff = jnp.where(col <= row, diff, -jnp.inf)
    return s * jnp.exp(diff) * lax.broadcast_in_dim(dt_j, shape, [1])


def causal_blocks(mma, acc_ref, rows, cols_s, vals_s, acum_i, acum_s, dt_s, wg, wait, slots,
                  interpret=False):
    """``acc += sum_{j <= wg} decayed(rows cols_j^T) vals_j`` over the 64-row column blocks j
    of a chunk, the diagonal block masked: ``rows`` [64, k] (warpgroup ``wg``'s block),
    ``cols_s`` / ``vals_s`` the chunk's blocks in shared memory; ``wait(j)`` before block j is
    read; ``slots`` the (scores, product) scratch slots of ``mma`` (see :func:`wgmma`)."""
    plgpu = _plgpu()

    def column_block(j, carry, diagonal):
        wait(j)

        def scores(s_ref):  # rows cols_j^T
            mma(s_ref, rows, cols_s.at[j], slots[0], transpose_b=True)
            return s_ref[...]

        s = pl.run_scoped(scores, plgpu.ACC((ROWS, ROWS), jnp.float32))
        s = decayed(s, acum_i, acum_s, dt_s, j, diagonal, interpret)
        mma(acc_ref, s.astype(vals_s.dtype), vals_s.at[j], slots[1])  # acc += S vals_j
        return carry

    lax.fori_loop(0, wg, functools.partial(column_block, diagonal=False), 0)
    column_block(wg, 0, diagonal=True)


def tiled_smem(dtype):
    """A shared-memory allocator of wgmma operands: 128-byte swizzle, (8, 64) tiles."""
    plgpu = _plgpu()
    return lambda *shape: plgpu.SMEM(shape, dtype, transforms=(
        plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128)))


def interpret_params(interpret: bool):
    """Mosaic GPU's interpret-mode parameters for ``plgpu.kernel`` (None: compile)."""
    if not interpret:
        return None
    params = getattr(_plgpu(), "InterpretGPUParams", None)  # public from jax 0.11 on
    if params is None:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams as params
    return params()


def _output_kernel(x_ref, C_ref, B_ref, acum_ref, dt_ref, h0_ref, end_ref, D_ref, z_ref, y_ref,
                   *pre_ref, q, nc, heads_per_group, has_z, interpret):
    plgpu = _plgpu()
    cast = layout_caster(interpret)
    nb, p, n = q // ROWS, x_ref.shape[-1], C_ref.shape[-1]
    dtype = x_ref.dtype
    hi, bc, wg = lax.axis_index("heads"), lax.axis_index("chunks"), lax.axis_index("wg")
    bi, ci = lax.div(bc, nc), lax.rem(bc, nc)
    gi = lax.div(hi, heads_per_group)
    rows = pl.ds(ci * q + wg * ROWS, ROWS)  # this warpgroup's rows of the sequence
    row_layout = plgpu.Layout.WGMMA.reduce(1)
    col_layout = plgpu.Layout.WGMMA.reduce(0)

    def body(C_s, B_s, x_s, S_s, io_s, acum_s, dt_s, D_s, bar_c, bar_b, bar_x, bar_z, bar_v,
             *lhs_s):
        def mma(acc_ref, a, b_ref, k, transpose_b=False):
            wgmma(acc_ref, a, b_ref, lhs_s[2 * k:2 * k + 2], wg, transpose_b=transpose_b,
                  interpret=interpret)

        plgpu.copy_gmem_to_smem(C_ref.at[bi, rows, gi], C_s.at[wg], bar_c.at[wg])
        plgpu.copy_gmem_to_smem(B_ref.at[bi, rows, gi], B_s.at[wg], bar_b.at[wg])
        plgpu.copy_gmem_to_smem(x_ref.at[bi, rows, hi], x_s.at[wg], bar_x.at[wg])
        if has_z:
            plgpu.copy_gmem_to_smem(z_ref.at[bi, rows, hi], io_s.at[wg], bar_z.at[wg])

        @pl.when(wg == 0)
        def _vectors():
            plgpu.copy_gmem_to_smem(acum_ref.at[bi, ci, hi], acum_s, bar_v.at[0])
            plgpu.copy_gmem_to_smem(dt_ref.at[bi, ci, hi], dt_s, bar_v.at[1])
            plgpu.copy_gmem_to_smem(D_ref.at[hi], D_s, bar_v.at[2])
            copy_entering_state(h0_ref, end_ref, bi, ci, hi, S_s, bar_v, 3)

        for k in range(4):
            plgpu.barrier_wait(bar_v.at[k])
        plgpu.barrier_wait(bar_c.at[wg])
        acum_i = cast(acum_s.at[pl.ds(wg * ROWS, ROWS)][...], row_layout)

        def row_block(acc_ref):
            # inter-chunk term first: (exp(acum_i) C_i) S_prev^T, C scaled in registers
            Ci = cast(C_s.at[wg][...], plgpu.Layout.WGMMA).astype(jnp.float32)
            Cs = (Ci * lax.broadcast_in_dim(jnp.exp(acum_i), (ROWS, n), [0])).astype(dtype)
            mma(acc_ref, Cs, S_s, 0, transpose_b=True)

            def wait(j):
                plgpu.barrier_wait(bar_b.at[j])
                plgpu.barrier_wait(bar_x.at[j])

            # acc += sum_j decayed(C_r B_j^T) x_j
            causal_blocks(mma, acc_ref, C_s.at[wg], B_s, x_s, acum_i, acum_s, dt_s, wg, wait,
                          (2, 1), interpret)
            return acc_ref[...]

        acc = pl.run_scoped(row_block, plgpu.ACC((ROWS, p), jnp.float32))

        x_i = cast(x_s.at[wg][...], plgpu.Layout.WGMMA).astype(jnp.float32)
        d = cast(D_s[...], col_layout)
        y = acc + x_i * lax.broadcast_in_dim(d, (ROWS, p), [1])
        out_s = io_s.at[wg]  # z's block, then the output's

        def store(value, ref):
            out_s[...] = value.astype(dtype)
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(out_s, ref.at[bi, rows, hi])
            plgpu.wait_smem_to_gmem(0)

        if has_z:
            plgpu.barrier_wait(bar_z.at[wg])
            zg = cast(out_s[...], plgpu.Layout.WGMMA).astype(jnp.float32)
            if pre_ref:  # the output before the gate (the backward's residual for dz)
                store(y, pre_ref[0])
            y = y * (zg * jax.nn.sigmoid(zg))
        elif pre_ref:
            store(y, pre_ref[0])
        store(y, y_ref)

    tiled = tiled_smem(dtype)
    pl.run_scoped(
        body,
        tiled(nb, ROWS, n), tiled(nb, ROWS, n), tiled(nb, ROWS, p), tiled(p, n),
        tiled(nb, ROWS, p),
        plgpu.SMEM((q,), jnp.float32), plgpu.SMEM((q,), jnp.float32),
        plgpu.SMEM((p,), jnp.float32),
        plgpu.Barrier(num_barriers=nb), plgpu.Barrier(num_barriers=nb),
        plgpu.Barrier(num_barriers=nb), plgpu.Barrier(num_barriers=nb),
        plgpu.Barrier(num_barriers=4),
        # interpret mode: the (a, b) operand pairs of the three products (see mma)
        *([tiled(nb, ROWS, n), tiled(nb, n, p), tiled(nb, ROWS, ROWS), tiled(nb, ROWS, p),
           tiled(nb, ROWS, n), tiled(nb, n, ROWS)] if interpret else []),
        collective_axes="wg")


def chunk_outputs_mgpu(x, B, C, acum, dt, h0, end, D, z, *, chunk_size, return_pre_gate=False,
                       interpret=False, semantics="lane"):
    """y [b, c*q, h, p] (bf16) from the Mosaic GPU kernel.

    x [b, c*q, h, p], B / C [b, c*q, g, n], z [b, c*q, h, p] or None (bf16); acum / dt
    [b, c, h, q] float32 (``decays.py``); h0 [b, h, p, n] (each row's initial state, taken in
    bf16); end [b, c, h, p, n] bf16 (the state leaving every chunk); D [h] or [h, p].
    ``return_pre_gate``: also return y before the gate (``y_ssd + D x``), second.
    ``interpret``: run in Mosaic GPU's interpret mode (CPU; jax's ``InterpretGPUParams``);
    ``semantics``: Mosaic GPU's lowering, "lane" (explicit register layouts, as written) or
    "warpgroup" (the default of jax 0.11).
    """
    plgpu = _plgpu()
    b, L, h, p = x.shape
    g = B.shape[-2]
    q = chunk_size
    nc = L // q
    has_z = z is not None
    Dp = jnp.broadcast_to(D.astype(jnp.float32).reshape(h, -1), (h, p))

    y = jax.ShapeDtypeStruct(x.shape, x.dtype)

    def ssd_chunk_output_mgpu(*refs):  # the kernel's name in profiles
        _output_kernel(*refs, q=q, nc=nc, heads_per_group=h // g, has_z=has_z,
                       interpret=interpret)

    return plgpu.kernel(
        ssd_chunk_output_mgpu, out_type=(y, y) if return_pre_gate else y,
        grid=(h, b * nc), grid_names=("heads", "chunks"), num_threads=q // ROWS,
        thread_name="wg", interpret=interpret_params(interpret),
        compiler_params=plgpu.CompilerParams(
            approx_math=True, lowering_semantics={
                "lane": plgpu.LoweringSemantics.Lane,
                "warpgroup": plgpu.LoweringSemantics.Warpgroup}[semantics]),
    )(x, C, B, acum, dt, h0.astype(x.dtype), end, Dp, z if has_z else x)
