"""Pallas (Triton backend) SSD forward: chunk states, a state pass, chunk outputs.

Inputs are laid out in chunks of q tokens (``[b, c*q, ...]``; padding tokens carry dt = 0).
With ``a = dt * A``:

0. ``decays.py`` (one Pallas launch, or XLA with ``decays="xla"``): ``acum`` (the cumsum of a
   inside each chunk), ``to_end`` (the sum of the later a's, a reverse cumsum), the chunk
   ``total`` and the state weights ``w = exp(to_end) dt`` (float32). (Forming them inside the
   chunk-state kernel instead, one launch less, measured slower on every benchmark shape on an
   H200: 0.386 / 0.742 / 0.602 against 0.381 / 0.716 / 0.594 ms; removed.)
1. ``_local_state_kernel``, grid (h, p / bp, b*c): every chunk's own state
   ``sum_j w_j x_j B_j^T`` in parallel; then ``_pass_kernel``, grid (b, h, p / pp),
   sequential over chunks:
       S <- h0[init_index[c]]  if is_first[c];   S <- exp(total_c) S + local_c
   writing the state leaving every chunk (float32, or a copy in the matmul operand dtype when
   only the output kernel reads it) and each sequence's final state (float32).
2. ``_output_kernel``, grid (h, q / (bm * row_blocks), b*c), fully parallel (flash-attention shaped; heads
   vary fastest so programs running together share one chunk's B, C and x in L2):
       y_i = exp(acum_i) C_i S_prev + sum_{j <= i} (C_i . B_j) exp(acum_i - acum_j) dt_j x_j
             + D x_i,   then y_i *= silu(z_i)
   with ``S_prev`` = h0 at a sequence's first chunk, else ``end[c - 1]``.

   On Hopper the Mosaic GPU twin of this kernel (``mgpu_output.py``: TMA, wgmma) takes the
   bf16 dense calls (``out_kernel="mgpu"``, the default), measured faster on an H200.

Exponents are always differences ``acum_i - acum_j <= 0`` taken before ``exp`` (masked to
-inf above the diagonal), never a product ``exp(acum_i) * exp(-acum_j)``.
Dtype policy: matmul operands in the input dtype (bf16 or fp32; fp32 dots at HIGHEST
precision; the entering state is rounded to it before its dot, so a state copy in that dtype
changes no result), float32 accumulation and states, ``y`` in ``x.dtype``.
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mamba2_jax.kernels.ssd.decays import DECAYS_LAUNCH, Decays, decays_for
from mamba2_jax.kernels.ssd.mgpu_output import chunk_outputs_mgpu, mgpu_unsupported

log = logging.getLogger("mamba2_jax")
OUTPUT_KERNELS = ("triton", "mgpu")  # the output kernel: Pallas on Triton, or on Mosaic GPU


def operand_dtype(dtype):
    """The dtype a float32 intermediate (a state, a cotangent product) takes as a matmul operand
    beside ``dtype`` inputs: ``dtype`` itself, except float16, whose range (65504) states and
    cotangents can exceed: float32 there."""
    return jnp.float32 if dtype == jnp.float16 else dtype


def step_size(size, whole: int) -> int:
    """A block or step size clamped to what it divides: ``whole`` when ``size`` is None."""
    return whole if size is None else min(size, whole)


def _dot(a, b, *, trans_a=False, trans_b=False, fp32=False):
    """A 2-D matmul with float32 accumulation; operands of two dtypes are both taken in float32
    (at HIGHEST precision, as are float32 operands when ``fp32``)."""
    if a.dtype != b.dtype:
        a, b, fp32 = a.astype(jnp.float32), b.astype(jnp.float32), True
    dims = (((0,) if trans_a else (1,)), ((1,) if trans_b else (0,)))
    precision = lax.Precision.HIGHEST if fp32 else None
    return lax.dot_general(a, b, (dims, ((), ())), precision=precision,
                           preferred_element_type=jnp.float32)


def _causal_decay(acum_i, acum_j, row0, col0, bm, bn=None):
    """``exp(acum_i - acum_j)`` on and below the diagonal, 0 above: [bm, bn] float32."""
    shape = (bm, bm if bn is None else bn)
    row = row0 + lax.broadcasted_iota(jnp.int32, shape, 0)
    col = col0 + lax.broadcasted_iota(jnp.int32, shape, 1)
    return jnp.exp(jnp.where(col <= row, acum_i[:, None] - acum_j[None, :], -jnp.inf))


def _entering_state(first_ref, index_ref, h0_ref, end_ref, bi, ci, hi, ps):
    """The state entering chunk ci: h0 at a sequence's first chunk, else the previous end."""
    return jnp.where(first_ref[bi, ci] != 0, h0_ref[index_ref[bi, ci], hi, ps, :],
                     end_ref[bi, jnp.maximum(ci - 1, 0), hi, ps, :])


def _last_of_sequence(index_ref, bi, c, nc):
    """Whether chunk c ends its sequence: the row's last chunk, or one whose successor belongs
    to another sequence (each sequence's final state is the state leaving that chunk)."""
    return (c == nc - 1) | (index_ref[bi, jnp.minimum(c + 1, nc - 1)] != index_ref[bi, c])


def _local_state(x_ref, B_ref, w_ref, bi, ci, hi, gi, pb, *, q, bk, bp, fp32):
    """sum_j w_j x_j B_j^T over chunk ci, in sub-blocks of bk tokens: [bp, n] float32.

    The forward uses ``w = exp(to_end) dt`` (a chunk's own state); the backward passes
    ``x = dY``, ``B = C`` and ``w = exp(acum)`` (a chunk's own gradient of its entering state).
    """

    def body(kb, acc):
        tok = pl.ds(ci * q + kb * bk, bk)
        x = x_ref[bi, tok, hi, ps]  # [bk, bp]
        Bk = B_ref[bi, tok, gi, :]  # [bk, n]
        w = w_ref[bi, ci, hi, pl.ds(kb * bk, bk)]
        xw = (x.astype(jnp.float32) * w[:, None]).astype(x.dtype)
        return acc + _dot(xw, Bk, trans_a=True, fp32=fp32)

    ps = pl.ds(pb * bp, bp)
    return lax.fori_loop(0, q // bk, body, jnp.zeros((bp, B_ref.shape[-1]), jnp.float32))


def _local_state_kernel(x_ref, B_ref, w_ref, loc_ref, *, q, bk, bp, heads_per_group, fp32):
    """Each chunk's own state contribution, all chunks in parallel (grid h, p / bp, b*c)."""
    hi, pb, bc = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nc = loc_ref.shape[1]
    bi, ci = bc // nc, bc % nc
    loc_ref[bi, ci, hi, pl.ds(pb * bp, bp), :] = _local_state(
        x_ref, B_ref, w_ref, bi, ci, hi, hi // heads_per_group, pb, q=q, bk=bk, bp=bp, fp32=fp32)


def _pass_kernel(loc_ref, total_ref, first_ref, index_ref, h0_ref, end_ref, final_ref,
                 *copy_ref, bp):
    """S_c = exp(total_c) S_{c-1} + loc_c (reset to h0 at first chunks); grid (b, h, p / bp).

    Writes S_c for every chunk (in ``end_ref``'s dtype, and in ``copy_ref``'s when given) and
    ``final [m, h, p, n]``: S at the last chunk of each sequence (``_last_of_sequence``).
    """
    bi, hi, pb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nc = end_ref.shape[1]
    ps = pl.ds(pb * bp, bp)

    def body(c, S):
        S = jnp.where(first_ref[bi, c] != 0, h0_ref[index_ref[bi, c], hi, ps, :], S)
        S = jnp.exp(total_ref[bi, c, hi]) * S + loc_ref[bi, c, hi, ps, :]
        end_ref[bi, c, hi, ps, :] = S.astype(end_ref.dtype)
        if copy_ref:
            copy_ref[0][bi, c, hi, ps, :] = S.astype(copy_ref[0].dtype)

        @pl.when(_last_of_sequence(index_ref, bi, c, nc))
        def _():
            final_ref[index_ref[bi, c], hi, ps, :] = S

        return S

    lax.fori_loop(0, nc, body, jnp.zeros((bp, h0_ref.shape[-1]), jnp.float32))


def _output_kernel(x_ref, C_ref, B_ref, dt_ref, acum_ref, first_ref, index_ref, h0_ref, end_ref,
                   D_ref, z_ref, y_ref, *pre_ref, q, bm, bn, row_blocks, heads_per_group, fp32,
                   has_z, d_per_channel):
    hi, mg, bc = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    nc = end_ref.shape[1]
    bi, ci = bc // nc, bc % nc
    gi = hi // heads_per_group
    # The state entering this chunk (h0 at a sequence start), loaded once per program.
    prev = _entering_state(first_ref, index_ref, h0_ref, end_ref, bi, ci, hi,
                           pl.ds(0, x_ref.shape[-1]))  # [p, n] float32
    prev = prev.astype(operand_dtype(C_ref.dtype))
    d = D_ref[hi, :] if d_per_channel else D_ref[hi]

    def row_block(r, carry):
        mb = mg * row_blocks + r
        rows = pl.ds(ci * q + mb * bm, bm)
        Ci = C_ref[bi, rows, gi, :]  # [bm, n]
        acum_i = acum_ref[bi, ci, hi, pl.ds(mb * bm, bm)]  # [bm]
        # Inter-chunk term: the entering state decayed to each row, read by C_i.
        Cs = (Ci.astype(jnp.float32) * jnp.exp(acum_i)[:, None]).astype(Ci.dtype)
        acc = _dot(Cs, prev, trans_b=True, fp32=fp32)  # [bm, p]

        def col_block(jb, acc):  # intra-chunk term, bn columns a step up to the diagonal
            cols = pl.ds(ci * q + jb * bn, bn)
            sub_j = pl.ds(jb * bn, bn)
            xj = x_ref[bi, cols, hi, :]  # [bn, p]
            L = _causal_decay(acum_i, acum_ref[bi, ci, hi, sub_j], mb * bm, jb * bn, bm, bn)
            cb = _dot(Ci, B_ref[bi, cols, gi, :], trans_b=True, fp32=fp32)  # C_i . B_j
            s = cb * L * dt_ref[bi, ci, hi, sub_j][None, :]
            return acc + _dot(s.astype(xj.dtype), xj, fp32=fp32)

        acc = lax.fori_loop(0, (mb + 1) * (bm // bn), col_block, acc)
        y = acc + x_ref[bi, rows, hi, :].astype(jnp.float32) * d
        if pre_ref:  # the output before the gate, kept for the backward
            pre_ref[0][bi, rows, hi, :] = y.astype(pre_ref[0].dtype)
        if has_z:
            y = y * jax.nn.silu(z_ref[bi, rows, hi, :].astype(jnp.float32))
        y_ref[bi, rows, hi, :] = y.astype(y_ref.dtype)
        return carry

    lax.fori_loop(0, row_blocks, row_block, 0)


def launcher(interpret, num_warps, num_stages):
    """``pl.pallas_call`` on the Triton backend with these launch settings."""
    return functools.partial(pl.pallas_call, interpret=interpret, compiler_params=plt.CompilerParams(
        num_warps=num_warps, num_stages=num_stages))


def local_states(x, B, w, *, chunk_size, block_k=32, block_p=None, num_warps=4, num_stages=3,
                 interpret=False):
    """``sum_j w_j x_j B_j^T`` of every chunk, in parallel: [b, c, h, p, n] float32.

    x [b, c*q, h, p], B [b, c*q, g, n] (head j reads group j // (h / g)), w [b, c, h, q] float32.
    """
    b, L, h, p = x.shape
    g, n = B.shape[-2:]
    q, c = chunk_size, L // chunk_size
    bk, bp = min(block_k, q), p if block_p is None else block_p
    kernel = functools.partial(_local_state_kernel, q=q, bk=bk, bp=bp, heads_per_group=h // g,
                               fp32=x.dtype == jnp.float32)
    return launcher(interpret, num_warps, num_stages)(
        kernel, out_shape=jax.ShapeDtypeStruct((b, c, h, p, n), jnp.float32),
        grid=(h, p // bp, b * c), name="ssd_chunk_state")(x, B, w)


def state_pass(loc, total, is_first, init_index, h0, dtype, *, pass_block_p=None,
               full_states=True, operand_copy=False, num_warps=4, num_stages=3,
               interpret=False):
    """Kernel 1b: the states leaving every chunk and each sequence's final state, from the
    chunks' own states ``loc`` and decays ``total``.

    Returns ``(end, final)``: ``end [b, c, h, p, n]`` in float32 with ``full_states``, else in
    the matmul operand dtype of ``dtype`` (the inputs'; all the output kernel reads); ``final``
    [m, h, p, n] float32 (h0's leading size m; a sequence with no chunk keeps an unwritten row).
    ``pass_block_p``: head-dim rows per program (None: all p). ``operand_copy`` (with
    ``full_states``): also return the states in the operand dtype, third (the Mosaic GPU output
    kernel's operand beside the float32 states the backward reads).
    """
    b, c, h, p, n = loc.shape
    pp = step_size(pass_block_p, p)
    end_dtype = jnp.float32 if full_states else operand_dtype(dtype)
    copies = (jax.ShapeDtypeStruct((b, c, h, p, n), operand_dtype(dtype)),) if (
        full_states and operand_copy) else ()
    return launcher(interpret, num_warps, num_stages)(
        functools.partial(_pass_kernel, bp=pp),
        out_shape=(jax.ShapeDtypeStruct((b, c, h, p, n), end_dtype),
                   jax.ShapeDtypeStruct(h0.shape, jnp.float32), *copies),
        grid=(b, h, p // pp), name="ssd_state_passing")(
        loc, total, is_first.astype(jnp.int32), init_index.astype(jnp.int32), h0)


def chunk_outputs(x, B, C, dec: Decays, is_first, init_index, h0, end, D, z, *, chunk_size,
                  block_m=64, block_n=None, row_blocks=4, return_pre_gate=False, num_warps=4,
                  num_stages=3, interpret=False):
    """y [b, c*q, h, p] from the chunk end states (kernel 2); each program writes
    ``row_blocks`` blocks of ``block_m`` rows of one chunk and head, stepping over the columns
    ``block_n`` (default block_m) at a time. ``return_pre_gate``: also return y before the
    gate (``y_ssd + D x``, in x.dtype: the backward's residual for dz)."""
    b, L, h, p = x.shape
    g = B.shape[-2]
    q = chunk_size
    bm = min(block_m, q)
    bn = step_size(block_n, bm)
    row_blocks = min(row_blocks, q // bm)
    has_z = z is not None
    kernel = functools.partial(
        _output_kernel, q=q, bm=bm, bn=bn, row_blocks=row_blocks, heads_per_group=h // g,
        fp32=x.dtype == jnp.float32, has_z=has_z, d_per_channel=D.ndim == 2)
    y = jax.ShapeDtypeStruct(x.shape, x.dtype)
    return launcher(interpret, num_warps, num_stages)(
        kernel, out_shape=(y, y) if return_pre_gate else y,
        grid=(h, q // bm // row_blocks, b * (L // q)), name="ssd_chunk_output")(
        x, C, B, dec.dt, dec.acum, is_first.astype(jnp.int32), init_index.astype(jnp.int32),
        h0, end, D.astype(jnp.float32), z if has_z else x)


def kernel_choice(name: str, choice: str, why_not) -> str:
    """The kernel that runs for option ``name``: "mgpu" where ``choice`` asks for it and
    ``why_not()`` (the Mosaic GPU kernel's reason to refuse the call) is None, else "triton"
    (with a debug log saying why)."""
    if choice not in OUTPUT_KERNELS:
        raise ValueError(f"{name} must be one of {OUTPUT_KERNELS}, got {choice!r}")
    if choice == "triton":
        return "triton"
    why = why_not()
    if why is not None:
        log.debug("SSD %s: Triton, not Mosaic GPU: %s", name, why)
        return "triton"
    return "mgpu"


def output_kernel(choice, x, B, chunk_size, dense, interpret=False) -> str:
    """The output kernel that runs (:func:`kernel_choice` of ``mgpu_unsupported``)."""
    return kernel_choice("out_kernel", choice, lambda: mgpu_unsupported(
        x, B, chunk_size, varlen=not dense, interpret=interpret))


@functools.partial(jax.jit, static_argnames=(
    "chunk_size", "block_m", "block_n", "block_k", "block_p", "pass_block_p", "row_blocks",
    "num_warps", "num_stages", "out_num_warps", "out_num_stages", "full_states",
    "return_pre_gate", "return_decays", "return_operand_states", "decays", "decays_launch",
    "out_kernel", "dense", "interpret"))
def ssd_forward_chunked(x, dt, A, B, C, D, z, h0, is_first, init_index, *, chunk_size: int,
                        block_m: int = 64, block_n: int | None = None, block_k: int = 32,
                        block_p: int | None = None, pass_block_p: int | None = None,
                        row_blocks: int = 4, num_warps: int = 4, num_stages: int = 3,
                        out_num_warps: int | None = None, out_num_stages: int | None = None,
                        full_states: bool = True, return_pre_gate: bool = False,
                        return_decays: bool = False, return_operand_states: bool = False,
                        decays: str = "pallas",
                        decays_launch: tuple = DECAYS_LAUNCH, out_kernel: str = "triton",
                        dense: bool = False, interpret: bool = False):
    """Run the kernels on chunk-aligned inputs.

    x [b, c*q, h, p], dt [b, c*q, h] (processed, float32, 0 on padding), A [h], B/C
    [b, c*q, g, n], D [h] or [h, p] (zeros when absent), z [b, c*q, h, p] or None, h0
    [m, h, p, n] float32, is_first / init_index [b, c] int32. Returns (y [b, c*q, h, p], end
    states [b, c, h, p, n], final states [m, h, p, n] float32), and with ``return_pre_gate`` y
    before the gate as a fourth, with ``return_decays`` the decay terms (:class:`Decays`) next
    (the backward reuses them), with ``return_operand_states`` the end states in the operand
    dtype last (the Mosaic GPU dC kernel's operand). ``full_states``: end states in float32
    (else in the operand dtype: see :func:`state_pass`); ``pass_block_p``: head-dim rows per
    program of the state pass; ``block_n``: see :func:`chunk_outputs`; ``out_num_warps`` /
    ``out_num_stages``: the output kernel's launch (None: ``num_warps`` / ``num_stages``);
    ``decays``: the decay terms from their Pallas kernel ("pallas") or from XLA ("xla");
    ``decays_launch``: that kernel's (max heads per program, num_warps); ``out_kernel``: "mgpu"
    runs the Mosaic GPU output kernel (``mgpu_output.py``) on the calls it takes (else, and with
    "triton", the Triton one); ``dense``: row r of the batch is one sequence starting from h0[r]
    (no packed varlen input).
    """
    q = chunk_size
    launch = dict(num_warps=num_warps, num_stages=num_stages, interpret=interpret)
    out_launch = dict(num_warps=num_warps if out_num_warps is None else out_num_warps,
                      num_stages=num_stages if out_num_stages is None else out_num_stages,
                      interpret=interpret)
    dec = decays_for(decays, dt, A, q, launch=decays_launch, interpret=interpret)
    loc = local_states(x, B, dec.w, chunk_size=q, block_k=block_k, block_p=block_p, **launch)
    mgpu = output_kernel(out_kernel, x, B, q, dense, interpret) == "mgpu"
    end, final, *copy = state_pass(loc, dec.total, is_first, init_index, h0, x.dtype,
                                   pass_block_p=pass_block_p, full_states=full_states,
                                   operand_copy=mgpu or return_operand_states, **launch)
    if mgpu:  # the states in bf16: end itself, or its copy when end is float32
        out = chunk_outputs_mgpu(x, B, C, dec.acum, dec.dt, h0, copy[0] if copy else end, D,
                                 z, chunk_size=q, return_pre_gate=return_pre_gate,
                                 interpret=interpret)
    else:
        out = chunk_outputs(x, B, C, dec, is_first, init_index, h0, end, D, z, chunk_size=q,
                            block_m=block_m, block_n=block_n, row_blocks=row_blocks,
                            return_pre_gate=return_pre_gate, **out_launch)
    outs = (out[0], end, final, out[1]) if return_pre_gate else (out, end, final)
    outs = outs + (dec,) if return_decays else outs
    return outs + (copy[0] if copy else end,) if return_operand_states else outs
