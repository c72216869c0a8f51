"""Pallas (Triton backend) causal depthwise conv1d for prefill: dense or packed varlen, with
initial conv states and (outside the kernel) final conv states.

Both layouts run through one kernel over a packed token axis: dense ``x [b, l, c]`` is viewed
as ``[b*l, c]`` (a free reshape) whose sequence starts are the static multiples of ``l``;
packed ``x [t, c]`` comes with a per-token ``start`` (first token of its sequence) and ``seq``
(its sequence number), two int32 vectors computed in XLA from ``cu_seqlens`` (so traced
``cu_seqlens`` work).

Grid (cdiv(t, bt), cdiv(c, bc)): program (i, j) computes the ``[bt, bc]`` output tile of tokens
``i*bt ..`` and channels ``j*bc ..``. Tap ``w`` (tap k-1 multiplies the current token) reads
source token ``src = tok - (k-1) + w`` of every row:

* ``src >= start``: the input row ``x[src]``;
* ``src < start``: the token's left context, column ``(k-1) + (src - start)`` of its sequence's
  initial state. The states are handed in transposed, ``hist [nseq*(k-1), c]`` (row
  ``seq*(k-1) + col``; a tiny XLA transpose), so this is one more row gather; without initial
  states it is zero and no load is emitted.

Every access is a masked gather ``ref.at[rows[:, None], cols[None, :]]`` with int32 index arrays
(no ``pl.ds``): Triton turns it into plain pointer arithmetic (channels stay contiguous per
row), and interpret mode needs all-array indices for a masked gather. Masked lanes get an
out-of-range row index (``t``) on stores, so interpret mode's scatter drops them instead of
racing a clamped duplicate; on the GPU they are masked off. The k shifted tiles overlap in all
but k-1 rows, so the repeated reads hit L1/L2 and DRAM sees ``x`` about once.

Final states (the last k-1 inputs of each sequence, from the initial state for sequences
shorter than k-1, the initial state itself for empty ones) are ``[nseq, c, k-1]``: a small XLA
gather after the kernel (``final_states``), not worth a kernel.

Every array in the kernel is ``[bt]``, ``[bc]`` or ``[bt, bc]`` with ``bt``, ``bc`` powers of
two (the Triton lowering needs that); ragged ends of the token and channel axes are masked.
Dtype policy as the reference: float32 arithmetic, ``y`` in ``x.dtype``, final states in the
dtype of the initial states (``x.dtype`` without them).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mamba2_jax.kernels.common import check_pow2, next_pow2, pick_warps, static_index
from mamba2_jax.kernels.conv1d.reference import packed_final_states

BLOCK_T = 32
BLOCK_C = 256
NUM_WARPS = 4

_F32 = jnp.float32


def pick_blocks(t: int, c: int, block_t: int = BLOCK_T, block_c: int = BLOCK_C):
    """(bt, bc): powers of two, at most the requested blocks and at most next_pow2 of the axis."""
    check_pow2("block_t", block_t)
    check_pow2("block_c", block_c)
    return min(block_t, next_pow2(t)), min(block_c, next_pow2(c))


def _conv_prefill_kernel(*refs, bt, bc, t, c, k, seqlen, has_init, silu):
    if seqlen is None:  # packed varlen: per-token start / sequence number
        start_ref, seq_ref, *refs = refs
    x_ref, w_ref, bias_ref, *refs = refs
    if has_init:
        hist_ref, *refs = refs
    (y_ref,) = refs

    i, j = pl.program_id(0), pl.program_id(1)
    tok = i * bt + jnp.arange(bt, dtype=jnp.int32)  # [bt]
    cols = j * bc + jnp.arange(bc, dtype=jnp.int32)  # [bc]
    tok_ok = tok < t
    # Channel mask only for a ragged last channel block (static): exact blocks load unmasked
    # along channels, so the masks stay constant along the vectorized axis.
    col_ok = cols < c if c % bc else None
    safe_tok = jnp.where(tok_ok, tok, 0)
    if seqlen is None:
        start = plt.load(start_ref.at[safe_tok], mask=tok_ok, other=0)
        seq = plt.load(seq_ref.at[safe_tok], mask=tok_ok, other=0)
    else:
        seq = safe_tok // seqlen
        start = seq * seqlen
    cols2 = cols[None, :]

    def mask2(rows_ok):  # [bt] -> [bt, bc]
        m = jnp.broadcast_to(rows_ok[:, None], (bt, bc))
        return m if col_ok is None else m & col_ok[None, :]

    def load_c(ref):  # a [bc] channel vector
        if col_ok is None:
            return plt.load(ref).astype(_F32)
        return plt.load(ref, mask=col_ok, other=0).astype(_F32)

    acc = jnp.broadcast_to(load_c(bias_ref.at[cols])[None, :], (bt, bc))
    for w in range(k):
        src = tok - (k - 1) + w
        in_x = tok_ok & (src >= start)
        rows = jnp.where(in_x, src, 0)[:, None]
        v = plt.load(x_ref.at[rows, cols2], mask=mask2(in_x), other=0).astype(_F32)
        if has_init and w < k - 1:  # tap k-1 is the token itself: never in the left context
            in_h = tok_ok & (src < start)
            hrow = jnp.where(in_h, seq * (k - 1) + (k - 1) + (src - start), 0)[:, None]
            v = v + plt.load(hist_ref.at[hrow, cols2], mask=mask2(in_h), other=0).astype(_F32)
        wv = load_c(w_ref.at[cols, static_index(w)])
        acc = acc + wv[None, :] * v
    if silu:
        acc = acc * jax.nn.sigmoid(acc)
    out_rows = jnp.where(tok_ok, tok, t)[:, None]  # masked rows out of range (dropped)
    plt.store(y_ref.at[out_rows, cols2], acc.astype(y_ref.dtype), mask=mask2(tok_ok))


@functools.partial(jax.jit, static_argnames=("silu", "return_final_states", "block_t",
                                             "block_c", "num_warps", "interpret"))
def causal_conv1d_pallas(x, weight, bias, initial_states, cu_seqlens, *, silu: bool,
                         return_final_states: bool, block_t: int = BLOCK_T,
                         block_c: int = BLOCK_C, num_warps: int = NUM_WARPS,
                         interpret: bool = False):
    """``y`` like ``x`` [, final states ``[b|nseq, c, k-1]``].

    x [b, l, c] (``cu_seqlens`` None) or packed [t, c] with ``cu_seqlens [nseq+1]`` (int,
    may be traced); weight [c, k]; bias [c] or None; initial_states [b|nseq, c, k-1] or None.
    ``silu``: apply silu, else identity. Inputs must be non-empty (the API falls back to the
    reference for empty ones).
    """
    k = weight.shape[1]
    c = x.shape[-1]
    if cu_seqlens is None:
        b, l, _ = x.shape
        x2 = x.reshape(b * l, c)
        nseq, seqlen = b, l
    else:
        x2 = x
        nseq, seqlen = cu_seqlens.shape[0] - 1, None
    t = x2.shape[0]
    bt, bc = pick_blocks(t, c, block_t, block_c)
    if bias is None:
        bias = jnp.zeros((c,), _F32)
    operands = []
    if seqlen is None:
        cu = cu_seqlens.astype(jnp.int32)
        tok = jnp.arange(t, dtype=jnp.int32)
        seq = jnp.clip(jnp.searchsorted(cu[1:], tok, side="right"), 0, nseq - 1)
        seq = seq.astype(jnp.int32)
        operands += [cu[seq], seq]
    operands += [x2, weight, bias]
    has_init = initial_states is not None
    if has_init:  # [nseq, c, k-1] -> rows seq*(k-1) + col of [nseq*(k-1), c]
        operands.append(jnp.swapaxes(initial_states, 1, 2).reshape(nseq * (k - 1), c))
    kernel = functools.partial(_conv_prefill_kernel, bt=bt, bc=bc, t=t, c=c, k=k, seqlen=seqlen,
                               has_init=has_init, silu=silu)
    y2 = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(x2.shape, x.dtype),
        grid=(pl.cdiv(t, bt), pl.cdiv(c, bc)),
        compiler_params=plt.CompilerParams(num_warps=pick_warps(bt * bc, num_warps),
                                           num_stages=1),
        interpret=interpret, name="causal_conv1d_prefill",
    )(*operands)
    y = y2.reshape(x.shape)
    if not return_final_states:
        return y
    if seqlen is not None:
        cu = jnp.arange(nseq + 1, dtype=jnp.int32) * seqlen
    state_dtype = x.dtype if initial_states is None else initial_states.dtype
    return y, packed_final_states(x2, initial_states, cu, k).astype(state_dtype)
