"""Pallas (Triton backend) causal conv1d update, in place on a slot-indexed conv-state pool.

Grid (b, cdiv(c, bc)): program (r, j) handles channels ``j*bc : (j+1)*bc`` of row ``r``. It reads
the k-1 state columns of slot ``idx[r]`` and the new token ``x[r]``, writes
``y = act(sum_w weight[:, w] * window[:, w] + bias)`` with ``window = [state, x]`` (tap k-1
multiplies the new token), and stores ``window[:, 1:]`` back into the same slot. The pool is
aliased input -> output (``input_output_aliases``), so under ``jax.jit`` with the pool donated no
copy is made and slots no row names keep their contents. A slot outside ``[0, slots)`` is a
padding row: it reads a zero state and stores nothing, as in the reference.

Layout: the pool is ``[slots, c, k-1]`` (oldest input first), so one channel's k-1 inputs are
contiguous and a ``[bc, k-1]`` tile is not a power-of-two array for k = 4 (Triton needs every
array to be one). The kernel therefore works tap by tap: tap ``w`` is the strided ``[bc]`` vector
``pool[slot, c0:c0+bc, w]`` (and ``weight[c0:c0+bc, w]``), loaded and stored on its own; every
array in the kernel is ``[bc]`` with ``bc`` a power of two, whatever k is. The taps of one channel
share cache lines, so the k-1 strided accesses cost no more DRAM traffic than one tile.

In-place ordering: every program loads all its state columns before it stores any. A channel's
loads and stores are issued by the same thread when the ``[bc]`` layout is not replicated
across warps, which ``bc >= 32 * num_warps`` guarantees (``pick_warps`` keeps to that). The
same pattern (load the slot, store it back through the aliased output ref) is what the state
update kernel does; it relies on the compiler not treating the aliased in/out pointers as
``noalias`` (not verified on a GPU for this kernel yet: the ``gpu`` test checks it against the
reference).

Channels: ``bc = min(block_c, next_pow2(c))``; when ``c % bc != 0`` the last block is masked
(static ``ragged``). Real Mamba-2 channel counts (5376, 8448, 1792) are multiples of 256 and run
unmasked. Dtype policy as the reference: float32 arithmetic, ``y`` in ``x.dtype``, the pool keeps
its dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mamba2_jax.kernels.common import check_pow2, next_pow2, pick_warps, static_index

BLOCK_C = 256
NUM_WARPS = 4


def pick_block_c(c: int, block_c: int = BLOCK_C) -> int:
    """Channels per program: a power of two, at most ``block_c`` and at most next_pow2(c)."""
    return min(check_pow2("block_c", block_c), next_pow2(c))


def _conv_update_kernel(idx_ref, state_ref, x_ref, w_ref, bias_ref, y_ref, out_ref, *, bc, k,
                        c, silu, ragged):
    r, j = pl.program_id(0), pl.program_id(1)
    c0 = pl.multiple_of(j * bc, bc)
    cs = pl.ds(c0, bc)
    slot = idx_ref[r]
    valid = (slot >= 0) & (slot < state_ref.shape[0])
    safe = jnp.where(valid, slot, 0)  # never address outside the pool

    if ragged:
        mask = c0 + jnp.arange(bc, dtype=jnp.int32) < c
        load = lambda ref: plt.load(ref, mask=mask, other=0)
    else:
        load = lambda ref: ref[...]

    # Every load before any store (the stores overwrite the columns read here).
    taps = [jnp.where(valid, load(state_ref.at[safe, cs, static_index(w)]).astype(jnp.float32), 0.0)
            for w in range(k - 1)]
    xv = load(x_ref.at[r, cs]).astype(jnp.float32)
    taps.append(xv)
    acc = load(bias_ref.at[cs]).astype(jnp.float32)
    for w in range(k):
        acc = acc + load(w_ref.at[cs, static_index(w)]).astype(jnp.float32) * taps[w]
    if silu:
        acc = acc * jax.nn.sigmoid(acc)

    def store(ref, v):
        if ragged:
            plt.store(ref, v.astype(ref.dtype), mask=mask)
        else:
            ref[...] = v.astype(ref.dtype)

    store(y_ref.at[r, cs], acc)

    @pl.when(valid)
    def _():
        for w in range(k - 1):  # the window shifted left by one: column w gets tap w + 1
            store(out_ref.at[slot, cs, static_index(w)], taps[w + 1])


@functools.partial(jax.jit, static_argnames=("silu", "block_c", "num_warps", "interpret"))
def causal_conv1d_update_pallas(x, conv_state, weight, bias, idx, *, silu: bool,
                                block_c: int = BLOCK_C, num_warps: int = NUM_WARPS,
                                interpret: bool = False):
    """``(y [b, c] in x.dtype, new pool [slots, c, k-1] in conv_state.dtype)``.

    x [b, c]; conv_state [slots, c, k-1]; weight [c, k]; bias [c] or None; idx [b] int32 slot
    of each row (outside ``[0, slots)``: padding row). ``silu``: apply silu, else identity.
    The pool (argument 1 of the pallas_call) is aliased to output 1.
    """
    b, c = x.shape
    k = weight.shape[1]
    bc = pick_block_c(c, block_c)
    kernel = functools.partial(_conv_update_kernel, bc=bc, k=k, c=c, silu=silu,
                               ragged=c % bc != 0)
    if bias is None:
        bias = jnp.zeros((c,), jnp.float32)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct(conv_state.shape, conv_state.dtype)),
        grid=(b, pl.cdiv(c, bc)),
        input_output_aliases={1: 1},
        compiler_params=plt.CompilerParams(num_warps=pick_warps(bc, num_warps), num_stages=1),
        interpret=interpret, name="causal_conv1d_update",
    )(idx.astype(jnp.int32), conv_state, x, weight, bias)
