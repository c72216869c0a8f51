"""The per-chunk decay terms of ``a = dt * A`` that every SSD kernel reads: XLA and Pallas.

For a chunk of q tokens (padding tokens carry dt = 0, so a = 0) and each head:
    acum_i   = a_0 + ... + a_i          (inclusive cumsum)
    to_end_j = a_{j+1} + ... + a_{q-1}  (exclusive reverse cumsum)
    total    = a_0 + ... + a_{q-1}
    w_j      = exp(to_end_j) dt_j       (the weight of token j in its chunk's state)
All are sums of same-sign terms (dt >= 0, A < 0 in use), formed directly, never as a
difference of two sums (``total - acum_j`` would cancel where the chunk's last tokens
dominate). Float32 throughout.

``chunk_decays`` is the XLA version (the reference twin); ``chunk_decays_pallas`` computes all
of them in one Triton launch, one program per chunk and block of heads: it reads a
[q, heads] tile of dt (rows are tokens, contiguous over heads), forms the reverse sums as
forward cumsums over the tile read bottom-up (a load through reversed row indices; Triton
has no reverse cumsum), and writes each term transposed to [b, c, h, q] (tokens along the
fastest axis of the stored tile: contiguous stores).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


class Decays(NamedTuple):
    """Per-chunk decay terms of ``a = dt * A`` (float32, [b, c, h, q] unless noted)."""

    acum: jax.Array  # a_0 + ... + a_i (inclusive cumsum inside the chunk)
    to_end: jax.Array  # a_{j+1} + ... + a_{q-1} (exclusive reverse cumsum: no cancellation)
    total: jax.Array  # [b, c, h] sum over the chunk
    dt: jax.Array  # dt itself, laid out per chunk
    w: jax.Array  # exp(to_end) dt: the weight of token j in its chunk's state


def chunk_decays(dt, A, chunk_size) -> Decays:
    """The decay terms in XLA: dt [b, c*q, h] (processed, float32), A [h]."""
    b, L, h = dt.shape
    q = chunk_size
    a = jnp.moveaxis((dt * A[None, None, :]).reshape(b, L // q, q, h), 2, 3)  # [b, c, h, q]
    rev = jnp.cumsum(a[..., ::-1], axis=-1)[..., ::-1]  # a_j + ... + a_{q-1}
    to_end = jnp.concatenate([rev[..., 1:], jnp.zeros_like(rev[..., :1])], axis=-1)
    dtc = jnp.moveaxis(dt.reshape(b, L // q, q, h), 2, 3)
    return Decays(jnp.cumsum(a, axis=-1), to_end, jnp.sum(a, axis=-1), dtc,
                  jnp.exp(to_end) * dtc)


def heads_per_block(h: int, cap: int = 32) -> int:
    """The largest power of two <= cap dividing h: the heads of one decays program."""
    hb = 1
    while hb < cap and h % (2 * hb) == 0:
        hb *= 2
    return hb


def _decays_kernel(dt_ref, A_ref, acum_ref, to_end_ref, total_ref, dtc_ref, w_ref, *, q, hb):
    bc, hg = pl.program_id(0), pl.program_id(1)
    nc = acum_ref.shape[1]
    bi, ci = bc // nc, bc % nc
    heads = pl.ds(hg * hb, hb)
    m = lax.broadcasted_iota(jnp.int32, (q,), 0)
    A = A_ref[heads][None, :]  # [1, hb]
    dt = dt_ref[bi, pl.ds(ci * q, q), heads]  # [q, hb]: token m of the chunk in row m
    # Bottom-up: row m holds token q-1-m; shifted one row down (token q-m, zero in row 0) its
    # cumsum is the exclusive reverse cumsum to_end of token q-1-m.
    dt_rev = dt_ref[bi, ci * q + (q - 1) - m, heads]
    dt_next = jnp.where(m[:, None] == 0, 0.0, dt_ref[bi, ci * q + (q - m) % q, heads])
    a = dt * A
    to_end = jnp.cumsum(dt_next * A, axis=0)  # [q, hb], bottom-up rows
    # Written transposed, [hb, q] with tokens along the last (fastest) axis, so that a warp's
    # stores are contiguous; the bottom-up terms through reversed token indices.
    acum_ref[bi, ci, heads, :] = jnp.cumsum(a, axis=0).T
    dtc_ref[bi, ci, heads, :] = dt.T
    head_ix = hg * hb + lax.broadcasted_iota(jnp.int32, (hb, 1), 0)
    rev_tok = (q - 1) - lax.broadcasted_iota(jnp.int32, (1, q), 1)
    to_end_ref[bi, ci, head_ix, rev_tok] = to_end.T
    w_ref[bi, ci, head_ix, rev_tok] = (jnp.exp(to_end) * dt_rev).T
    total_ref[bi, ci, heads] = jnp.sum(a, axis=0)


DECAYS_LAUNCH = (8, 4)  # the Pallas kernel's (max_heads, num_warps); H200 fwd ms with 8 vs 32
#                         heads: 0.381 vs 0.381, 0.714 vs 0.716, 0.581 vs 0.594


def chunk_decays_pallas(dt, A, chunk_size, *, max_heads=DECAYS_LAUNCH[0],
                        num_warps=DECAYS_LAUNCH[1], interpret=False) -> Decays:
    """The decay terms from one Pallas launch: dt [b, c*q, h] (processed, float32), A [h];
    each program takes ``heads_per_block(h, max_heads)`` heads of one chunk."""
    b, L, h = dt.shape
    q = chunk_size
    c = L // q
    hb = heads_per_block(h, max_heads)
    per_token = jax.ShapeDtypeStruct((b, c, h, q), jnp.float32)
    acum, to_end, total, dtc, w = pl.pallas_call(
        functools.partial(_decays_kernel, q=q, hb=hb),
        out_shape=(per_token, per_token, jax.ShapeDtypeStruct((b, c, h), jnp.float32),
                   per_token, per_token),
        grid=(b * c, h // hb), interpret=interpret, name="ssd_chunk_decays",
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
    )(dt.astype(jnp.float32), A.astype(jnp.float32))
    return Decays(acum, to_end, total, dtc, w)


def decays_for(impl: str, dt, A, chunk_size, *, launch=DECAYS_LAUNCH, interpret=False) -> Decays:
    """``chunk_decays`` ("xla") or ``chunk_decays_pallas`` ("pallas", with ``launch`` =
    (max_heads, num_warps))."""
    if impl == "pallas":
        max_heads, num_warps = launch
        return chunk_decays_pallas(dt, A, chunk_size, max_heads=max_heads, num_warps=num_warps,
                                   interpret=interpret)
    if impl == "xla":
        return chunk_decays(dt, A, chunk_size)
    raise ValueError(f"decays must be 'pallas' or 'xla', got {impl!r}")
