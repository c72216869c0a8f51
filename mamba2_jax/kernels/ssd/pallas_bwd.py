"""Pallas (Triton backend) SSD backward on the chunk layout of ``pallas_fwd.py``.

Per head and chunk, with ``w = dt``, ``acum`` the in-chunk cumsum of ``a = dt A``,
``L_ij = exp(acum_i - acum_j)`` for ``j <= i`` (0 above the diagonal), ``e_j = exp(to_end_j)``
and ``S`` the state entering the chunk, the forward is

    y_i   = sum_j (C_i . B_j) L_ij w_j x_j + exp(acum_i) S C_i                (y_ssd)
    S_end = exp(total) S + sum_j e_j w_j x_j B_j^T.

Given ``dY`` (the cotangent of y_ssd: the gate and D skip are undone in XLA) and ``G`` (the
cotangent of S_end, all paths summed), the kernels compute

1. ``local_states(dY, C, exp(acum))``: ``K_c = sum_i exp(acum_i) dY_i^T C_i``, every chunk in
   parallel (the forward's chunk-state kernel with other operands);
2. ``_reverse_pass_kernel``, sequential over chunks from the end (grid b, h, p / bp):
   ``G_c = dend_c + [c + 1 not a first chunk] (K_{c+1} + exp(total_{c+1}) G_{c+1})`` (dend_c:
   the chunk state's cotangent, plus the final state's where chunk c ends a sequence), and
   ``exp(total_c) <S_c, G_c>`` (the chunk decay's part of every d a_t);
3. ``_dx_dB_kernel`` (per column block j, looping over the rows i >= j in steps, the products
   formed transposed, [j, i]):
       dx_j  = w_j [sum_i (L o CB^T)_ij dY_i + e_j G B_j] + D dY_j
       dB_j  = sum over the program's heads of w_j sum_i (L o dY x^T)_ij C_i + e_j w_j G^T x_j
       ddt_j = x_j . [the bracket of dx_j],  colsum_j = sum_{i > j} M_ij,  T_j = e_j w_j x_j^T G B_j
   with ``M_ij = (C_i . B_j) L_ij w_j (dY_i . x_j)``;
4. ``_dC_kernel`` (per row block i, looping over j <= i):
       dC_i = sum over the program's heads of sum_j (L o dY x^T)_ij w_j B_j + exp(acum_i) dY_i S,
   and ``dY_i . (exp(acum_i) S C_i)`` per head (the entering state's part of d acum_i). On
   Hopper its Mosaic GPU twin (``mgpu_dc.py``: TMA, wgmma) takes the bf16 dense calls
   (``dc_kernel="mgpu"``), measured faster on an H200.

With ``a`` entering through ``acum``, ``to_end`` and ``total``,
``d a_t = sum_{i >= t > j} M_ij + sum_{i >= t} dY_i . (exp(acum_i) S C_i) + sum_{j < t} T_j
+ exp(total) <S, G>``; the first sum is the reverse cumsum of ``rowsum - colsum`` of M off its
diagonal (the diagonal, L = 1, cancels exactly and dominates under strong decay). Row and column
sums are taken from the same tiles in ``_dx_dB_kernel`` (the row sums as one partial per column
block), so their roundings cancel too. Then ``d dt += A d a`` and ``d A = sum dt d a`` (XLA).
dB and dC are summed per program over ``heads_per_program`` heads of one group and over the
programs of a group in XLA.
Dtype policy: matmul operands in the input dtype (dY, G, S and the decayed products cast to it;
float32 beside float16 inputs, whose range they can exceed; fp32 at HIGHEST precision),
float32 accumulation; dx in x.dtype, the rest float32 until cast to the inputs'.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from mamba2_jax.kernels.ssd.mgpu_dc import dC_partials_mgpu, mgpu_dc_unsupported
from mamba2_jax.kernels.ssd.pallas_fwd import (DECAYS_LAUNCH, _causal_decay, _dot,
                                              _entering_state, _last_of_sequence, decays_for,
                                              kernel_choice, launcher, local_states,
                                              operand_dtype, step_size)


def _reverse_pass_kernel(K_ref, dfinal_ref, total_ref, first_ref, index_ref, h0_ref, end_ref,
                         *refs, bp, with_dchunks):
    """``refs``: (the chunk states' cotangent [b, c, h, p, n] if ``with_dchunks``), G, sg."""
    dchunks_ref = refs[0] if with_dchunks else None
    G_ref, sg_ref = refs[-2:]
    bi, hi, pb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nc = G_ref.shape[1]
    ps = pl.ds(pb * bp, bp)

    def body(r, carry):
        c = nc - 1 - r
        # the final state's cotangent enters at the chunk that wrote it (see _pass_kernel)
        G = carry + jnp.where(_last_of_sequence(index_ref, bi, c, nc),
                              dfinal_ref[index_ref[bi, c], hi, ps, :], 0.0)
        if with_dchunks:
            G = G + dchunks_ref[bi, c, hi, ps, :]
        G_ref[bi, c, hi, ps, :] = G
        decay = jnp.exp(total_ref[bi, c, hi])
        S = _entering_state(first_ref, index_ref, h0_ref, end_ref, bi, c, hi, ps)
        sg_ref[bi, c, hi, pl.ds(pb, 1)] = jnp.full((1,), decay * jnp.sum(S * G), jnp.float32)
        return jnp.where(first_ref[bi, c] != 0, 0.0, K_ref[bi, c, hi, ps, :] + decay * G)

    lax.fori_loop(0, nc, body, jnp.zeros((bp, G_ref.shape[-1]), jnp.float32))


def _dx_dB_kernel(x_ref, B_ref, C_ref, dY_ref, dt_ref, acum_ref, to_end_ref, G_ref, D_ref,
                  dx_ref, dB_ref, ddt_ref, colsum_ref, rowsum_ref, T_ref, *dD_ref, q, bm, bn,
                  hb, heads_per_group, fp32, d_per_channel):
    hk, jb, bc = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nc = G_ref.shape[1]
    bi, ci = bc // nc, bc % nc
    gi = hk * hb // heads_per_group
    cols = pl.ds(ci * q + jb * bm, bm)
    sub_j = pl.ds(jb * bm, bm)
    Bj = B_ref[bi, cols, gi, :]  # [bm, n]
    dtype = operand_dtype(Bj.dtype)  # of float32 intermediates fed to matmuls
    n = Bj.shape[-1]

    def head(k, dB_acc):
        hi = hk * hb + k
        xj = x_ref[bi, cols, hi, :]  # [bm, p]
        acum_j, w_j = acum_ref[bi, ci, hi, sub_j], dt_ref[bi, ci, hi, sub_j]
        e_j = jnp.exp(to_end_ref[bi, ci, hi, sub_j])
        G = G_ref[bi, ci, hi, :, :].astype(dtype)  # [p, n]
        dx_state = _dot(Bj, G, trans_b=True, fp32=fp32) * e_j[:, None]  # e_j G B_j: [bm, p]
        dB_state = _dot(xj, G, fp32=fp32) * (e_j * w_j)[:, None]  # [bm, n]

        # bn rows a step, products formed as [j, i] tiles so every dot keeps M = bm (H200,
        # b=1 l=8192 h=80: bn 32 1.60 ms fwd+bwd against 1.74 with untransposed 64-row blocks)
        def row_step(ib, carry):
            dx_acc, dB_acc, colsum = carry
            rows = pl.ds(ci * q + ib * bn, bn)
            Ci, dYi = C_ref[bi, rows, gi, :], dY_ref[bi, rows, hi, :]
            # [bm (j), bn (i)] tiles: L transposed, exp(acum_i - acum_j) for j <= i, else 0
            j = jb * bm + lax.broadcasted_iota(jnp.int32, (bm, bn), 0)
            i = ib * bn + lax.broadcasted_iota(jnp.int32, (bm, bn), 1)
            acum_i = acum_ref[bi, ci, hi, pl.ds(ib * bn, bn)]
            Lt = jnp.exp(jnp.where(j <= i, acum_i[None, :] - acum_j[:, None], -jnp.inf))
            cbLt = _dot(Bj, Ci, trans_b=True, fp32=fp32) * Lt
            dyxwt = _dot(xj, dYi, trans_b=True, fp32=fp32) * w_j[:, None]
            dx_acc = dx_acc + _dot(cbLt.astype(dtype), dYi, fp32=fp32)
            dB_acc = dB_acc + _dot((dyxwt * Lt).astype(dtype), Ci, fp32=fp32)
            # M off its diagonal: the diagonal terms (L = 1, the largest under strong decay)
            # leave d a unchanged (they enter the row and the column sum of one token)
            Mt = jnp.where(j < i, cbLt * dyxwt, 0.0)
            rowsum_ref[bi, ci, hi, jb, pl.ds(ib * bn, bn)] = jnp.sum(Mt, axis=0)
            return dx_acc, dB_acc, colsum + jnp.sum(Mt, axis=1)

        def no_rows(ib, carry):  # rows above this column block: no M entries
            rowsum_ref[bi, ci, hi, jb, pl.ds(ib * bn, bn)] = jnp.zeros((bn,), jnp.float32)
            return carry

        steps = bm // bn  # row steps per row block
        lax.fori_loop(0, jb * steps, no_rows, 0)
        init = (dx_state, dB_acc + dB_state, jnp.zeros((bm,), jnp.float32))
        dx_acc, dB_acc, colsum = lax.fori_loop(jb * steps, q // bn, row_step, init)
        xf = xj.astype(jnp.float32)
        d = D_ref[hi, :][None, :] if d_per_channel else D_ref[hi]
        dYj = dY_ref[bi, cols, hi, :].astype(jnp.float32)
        dx = dx_acc * w_j[:, None] + dYj * d
        if dD_ref:  # this block's part of dD = sum_t dY_t x_t (per channel)
            dD_ref[0][bi, ci, jb, hi, :] = jnp.sum(dYj * xf, axis=0)
        dx_ref[bi, cols, hi, :] = dx.astype(dx_ref.dtype)
        ddt_ref[bi, ci, hi, sub_j] = jnp.sum(dx_acc * xf, axis=1)
        colsum_ref[bi, ci, hi, sub_j] = colsum
        T_ref[bi, ci, hi, sub_j] = jnp.sum(dx_state * xf, axis=1) * w_j
        return dB_acc

    dB_ref[bi, cols, hk, :] = lax.fori_loop(0, hb, head, jnp.zeros((bm, n), jnp.float32))


def _dC_kernel(x_ref, B_ref, C_ref, dY_ref, dt_ref, acum_ref, first_ref, index_ref, h0_ref,
               end_ref, dC_ref, inter_ref, *, q, bm, bn, hb, heads_per_group, fp32):
    hk, ib, bc = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nc = end_ref.shape[1]
    bi, ci = bc // nc, bc % nc
    gi = hk * hb // heads_per_group
    rows = pl.ds(ci * q + ib * bm, bm)
    n, p = B_ref.shape[-1], x_ref.shape[-1]
    Ci = C_ref[bi, rows, gi, :].astype(jnp.float32)

    def head(k, acc):
        hi = hk * hb + k
        dYi = dY_ref[bi, rows, hi, :]  # [bm, p]
        dtype = operand_dtype(dYi.dtype)  # of float32 intermediates fed to matmuls
        acum_i = acum_ref[bi, ci, hi, pl.ds(ib * bm, bm)]
        S = _entering_state(first_ref, index_ref, h0_ref, end_ref, bi, ci, hi, pl.ds(0, p))
        dYs = (dYi.astype(jnp.float32) * jnp.exp(acum_i)[:, None]).astype(dtype)
        dC_inter = _dot(dYs, S.astype(dtype), fp32=fp32)  # exp(acum_i) dY_i S: [bm, n]
        inter_ref[bi, ci, hi, pl.ds(ib * bm, bm)] = jnp.sum(dC_inter * Ci, axis=1)
        acc = acc + dC_inter

        def col_block(jb, acc):  # bn columns a step, up to the diagonal
            cols = pl.ds(ci * q + jb * bn, bn)
            sub_j = pl.ds(jb * bn, bn)
            L = _causal_decay(acum_i, acum_ref[bi, ci, hi, sub_j], ib * bm, jb * bn, bm, bn)
            s = _dot(dYi, x_ref[bi, cols, hi, :], trans_b=True, fp32=fp32) * L
            s = s * dt_ref[bi, ci, hi, sub_j][None, :]
            return acc + _dot(s.astype(dtype), B_ref[bi, cols, gi, :], fp32=fp32)

        return lax.fori_loop(0, (ib + 1) * (bm // bn), col_block, acc)

    dC_ref[bi, rows, hk, :] = lax.fori_loop(0, hb, head, jnp.zeros((bm, n), jnp.float32))


def heads_per_program(h: int, g: int, most: int) -> int:
    """The largest divisor of the heads per group that is <= ``most``."""
    r = h // g
    return max(d for d in range(1, min(most, r) + 1) if r % d == 0)


def _gate_backward(dy, x, D, z, y_pre, with_dD=True):
    """Undo ``y = (y_ssd + D x) * silu(z)`` in XLA: (dY of y_ssd, dz, dD or None)."""
    f32 = jnp.float32
    dyf = dy.astype(f32)
    dz = None
    if z is not None:
        zf = z.astype(f32)
        sig = jax.nn.sigmoid(zf)
        dz = (dyf * y_pre.astype(f32) * sig * (1.0 + zf * (1.0 - sig))).astype(z.dtype)
        dyf = dyf * zf * sig
    if not with_dD:
        return dyf, dz, None
    return dyf, dz, _dD_like(jnp.sum(dyf * x.astype(f32), axis=(0, 1)), D)


def _dD_like(per_channel, D):
    """dD in D's shape from its per-channel sums [h, p] (summed over p when D is [h])."""
    return jnp.sum(per_channel, axis=-1) if D.ndim == 1 else per_channel


def _first_chunk_gradient(K, G, total, is_first, init_index, m):
    """d h0[s] = K_c + exp(total_c) G_c at the first chunk c of sequence s (0 if it has none)."""
    flat = lambda v: v.reshape((-1,) + v.shape[2:])
    hit = (is_first.reshape(-1)[None, :] != 0) & (
        init_index.reshape(-1)[None, :] == jnp.arange(m, dtype=jnp.int32)[:, None])
    pos = jnp.argmax(hit, axis=1)
    has = jnp.any(hit, axis=1)[:, None, None, None]
    dh0 = flat(K)[pos] + jnp.exp(flat(total)[pos])[..., None, None] * flat(G)[pos]
    return jnp.where(has, dh0, 0.0)


def gradient_states(dY, C, dec, is_first, init_index, h0, end, dfinal, dchunks=None, *,
                    chunk_size, block_k=32, pass_block_p=None, num_warps=4, num_stages=2,
                    interpret=False):
    """Kernels 1 and 2: (K, G [b, c, h, p, n], exp(total) <S, G> [b, c, h]) float32, from the
    cotangents of the final states ``dfinal [m, h, p, n]`` and (None: zero) of every chunk's
    state ``dchunks [b, c, h, p, n]``; ``pass_block_p`` head-dim rows per program of the
    reverse pass (None: all p)."""
    rows, L, h, p = dY.shape
    n = C.shape[-1]
    pp = step_size(pass_block_p, p)
    K = local_states(dY, C, jnp.exp(dec.acum), chunk_size=chunk_size, block_k=block_k,
                     num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    states = jax.ShapeDtypeStruct((rows, L // chunk_size, h, p, n), jnp.float32)
    with_dchunks = dchunks is not None
    G, sg = launcher(interpret, num_warps, num_stages)(
        functools.partial(_reverse_pass_kernel, bp=pp, with_dchunks=with_dchunks),
        out_shape=(states, jax.ShapeDtypeStruct(states.shape[:3] + (p // pp,), jnp.float32)),
        grid=(rows, h, p // pp), name="ssd_bwd_state_passing")(
        K, dfinal.astype(jnp.float32), dec.total, is_first, init_index, h0, end,
        *((dchunks.astype(jnp.float32),) if with_dchunks else ()))
    return K, G, jnp.sum(sg, axis=-1)  # <S, G> summed over the programs' row blocks


def _blocks(x, B, chunk_size, block_m, block_n, heads):
    """(rows, L, h, g, n, bm, bn, hb) of a dx/dB or dC launch: the block and its step clamped
    to the chunk, the heads per program."""
    rows, L, h, _ = x.shape
    g, n = B.shape[-2:]
    bm = min(block_m, chunk_size)
    return rows, L, h, g, n, bm, step_size(block_n, bm), heads_per_program(h, g, heads)


def dx_dB(x, B, C, dY, dec, G, D, *, chunk_size, block_m=64, block_n=None, heads=4,
          with_dD=False, num_warps=4, num_stages=2, interpret=False):
    """Kernel 3: (dx, dB partials [b, c*q, h / hb, n], ddt, colsum, rowsum partials, T) and with
    ``with_dD`` the partial sums of ``dY x`` per column block ``[b, c, q / bm, h, p]`` (their
    sum is dD when dY is the output's cotangent: no gate); each program steps over the rows
    ``block_n`` (default block_m) at a time."""
    rows, L, h, g, n, bm, bn, hb = _blocks(x, B, chunk_size, block_m, block_n, heads)
    q = chunk_size
    per_token = jax.ShapeDtypeStruct((rows, L // q, h, q), jnp.float32)
    kernel = functools.partial(_dx_dB_kernel, q=q, bm=bm, bn=bn, hb=hb,
                               heads_per_group=h // g, fp32=x.dtype == jnp.float32,
                               d_per_channel=D.ndim == 2)
    rows_per_block = jax.ShapeDtypeStruct((rows, L // q, h, q // bm, q), jnp.float32)
    dD_parts = (jax.ShapeDtypeStruct((rows, L // q, q // bm, h, x.shape[-1]), jnp.float32),)
    return launcher(interpret, num_warps, num_stages)(
        kernel, out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                           jax.ShapeDtypeStruct((rows, L, h // hb, n), jnp.float32), per_token,
                           per_token, rows_per_block, per_token) + (dD_parts if with_dD else ()),
        grid=(h // hb, q // bm, rows * (L // q)), name="ssd_bwd_dx_dB")(
        x, B, C, dY, dec.dt, dec.acum, dec.to_end, G, D.astype(jnp.float32))


def dC_partials(x, B, C, dY, dec, is_first, init_index, h0, end, *, chunk_size, block_m=64,
                block_n=None, heads=4, num_warps=4, num_stages=2, interpret=False):
    """Kernel 4: (dC partials [b, c*q, h / hb, n], dY_i . y_inter_i [b, c, h, q]); each
    program steps over the columns ``block_n`` (default block_m) at a time."""
    rows, L, h, g, n, bm, bn, hb = _blocks(x, B, chunk_size, block_m, block_n, heads)
    q = chunk_size
    kernel = functools.partial(_dC_kernel, q=q, bm=bm, bn=bn, hb=hb, heads_per_group=h // g,
                               fp32=x.dtype == jnp.float32)
    return launcher(interpret, num_warps, num_stages)(
        kernel, out_shape=(jax.ShapeDtypeStruct((rows, L, h // hb, n), jnp.float32),
                           jax.ShapeDtypeStruct((rows, L // q, h, q), jnp.float32)),
        grid=(h // hb, q // bm, rows * (L // q)), name="ssd_bwd_dC")(
        x, B, C, dY, dec.dt, dec.acum, is_first, init_index, h0, end)


def which_dc_kernel(choice, x, B, chunk_size, dense, interpret=False) -> str:
    """The dC kernel that runs (``kernel_choice`` of ``mgpu_dc_unsupported``)."""
    return kernel_choice("dc_kernel", choice, lambda: mgpu_dc_unsupported(
        x, B, chunk_size, varlen=not dense, interpret=interpret))


@functools.partial(jax.jit, static_argnames=(
    "chunk_size", "block_m", "dx_block_n", "dc_block_n", "block_k", "heads", "pass_block_p",
    "fused_dD", "num_warps", "num_stages", "decays", "decays_launch", "dc_kernel", "dc_heads",
    "dense", "interpret"))
def ssd_backward_chunked(x, dt, A, B, C, D, z, h0, is_first, init_index, y_pre, end, dy,
                         dfinal, dchunks=None, dec=None, end_operand=None, *, chunk_size: int,
                         block_m: int = 64, dx_block_n: int | None = None,
                         dc_block_n: int | None = None, block_k: int = 32, heads: int = 4,
                         pass_block_p: int | None = None, fused_dD: bool = True,
                         num_warps: int = 4, num_stages: int = 1, decays: str = "pallas",
                         decays_launch: tuple = DECAYS_LAUNCH, dc_kernel: str = "triton",
                         dc_heads: int = 8, dense: bool = False, interpret: bool = False):
    """Cotangents of :func:`ssd_forward_chunked`'s inputs (x, dt, A, B, C, D, z, h0).

    Arguments as the forward's, plus ``y_pre`` (its output before the gate; None without z),
    its end states ``end``, and the cotangents ``dy`` [b, c*q, h, p], ``dfinal`` of the final
    states [m, h, p, n] and ``dchunks`` of every chunk's end state [b, c, h, p, n] (None: zero);
    ``dec``: the forward's decay terms (:class:`Decays` of dt and A; None: computed here).
    ``heads``: at most this many heads of one group per dx/dB and Triton dC program;
    ``dx_block_n`` / ``dc_block_n``: rows per step of the dx/dB kernel / columns per step of the
    dC kernel (None: block_m); ``pass_block_p``: head-dim rows per program of the reverse state
    pass (None: all p); ``fused_dD``: without a gate, dD from partial sums in the dx/dB kernel
    (which reads dY and x anyway) instead of an XLA reduction over them; ``decays`` /
    ``decays_launch``: as the forward's; ``dc_kernel``: "mgpu" runs the Mosaic GPU dC kernel
    (``mgpu_dc.py``) on the calls it takes (``dense`` ones: row r one sequence from h0[r]),
    reading ``end_operand`` (the end states in bf16; None: ``end`` cast here), at most
    ``dc_heads`` heads of one group per program, else Triton's (``heads``).
    """
    rows, L, h, _ = x.shape
    g, n = B.shape[-2:]
    q = chunk_size
    hb = heads_per_program(h, g, heads)
    launch = dict(num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    blocks = dict(chunk_size=q, block_m=block_m, heads=heads, **launch)
    first, index = is_first.astype(jnp.int32), init_index.astype(jnp.int32)

    if dec is None:
        dec = decays_for(decays, dt, A, q, launch=decays_launch, interpret=interpret)
    fuse = fused_dD and z is None
    dY, dz, dD = _gate_backward(dy, x, D, z, y_pre, with_dD=not fuse)
    dY = dY.astype(x.dtype)
    K, G, sg = gradient_states(dY, C, dec, first, index, h0, end, dfinal, dchunks, chunk_size=q,
                               block_k=block_k, pass_block_p=pass_block_p, **launch)
    dx, dB, ddt, colsum, rowsum, T, *dD_parts = dx_dB(x, B, C, dY, dec, G, D,
                                                      block_n=dx_block_n, with_dD=fuse, **blocks)
    if fuse:
        dD = _dD_like(jnp.sum(dD_parts[0], axis=(0, 1, 2)), D)
    hb_dc = hb
    if which_dc_kernel(dc_kernel, x, B, q, dense, interpret) == "mgpu":
        hb_dc = heads_per_program(h, g, dc_heads)
        dC, inter = dC_partials_mgpu(
            x, B, C, dY, dec.acum, dec.dt, h0, end if end_operand is None else end_operand,
            chunk_size=q, heads_per_program=hb_dc, interpret=interpret)
    else:
        dC, inter = dC_partials(x, B, C, dY, dec, first, index, h0, end, block_n=dc_block_n,
                                **blocks)

    # d a_t = sum_{i >= t} (rowsum_i - colsum_i + inter_i) + sum_{j < t} T_j + sg: the row and
    # column sums (off M's diagonal) come from the same blocks, so their roundings cancel in the
    # reverse cumsum; T enters as its exclusive cumsum (not sum(T) - sum_{j >= t} T_j, which
    # cancels where the chunk's last tokens dominate, as under strong decay).
    dacum = jnp.sum(rowsum, axis=3) + inter - colsum
    T_before = jnp.concatenate([jnp.zeros_like(T[..., :1]), jnp.cumsum(T[..., :-1], axis=-1)],
                               axis=-1)
    da = jnp.cumsum(dacum[..., ::-1], axis=-1)[..., ::-1] + T_before + sg[..., None]
    ddt = ddt + A[None, None, :, None] * da
    dA = jnp.sum(dec.dt * da, axis=(0, 1, 3))
    ddt = jnp.moveaxis(ddt, 3, 2).reshape(rows, L, h)

    group_sum = lambda v, hb: v.reshape(rows, L, g, h // hb // g, n).sum(axis=3).astype(
        B.dtype)
    dh0 = _first_chunk_gradient(K, G, dec.total, first, index, h0.shape[0])
    return dx, ddt, dA, group_sum(dB, hb), group_sum(dC, hb_dc), dD, dz, dh0
