"""Chunk layout shared by every SSD backend: ``[b, l]`` tokens -> chunk-aligned rows ``[b', c*q]``.

Batched input is padded to a multiple of q. Packed input (``cu_seqlens``, b == 1) is cut into
chunks that never straddle a sequence (vLLM's layout): chunk k of sequence s holds tokens
``[cu[s] + k q, min(cu[s] + (k+1) q, cu[s+1]))``, gathered into one row of ``c_max`` chunks.
Padding positions hold zeros; with ``dt = 0`` they are exact identity steps of the recurrence.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class VarlenChunks(NamedTuple):
    """Sequence-aligned chunk layout of a packed batch (see :func:`varlen_chunk_layout`)."""

    seq: jax.Array
    start: jax.Array
    end: jax.Array
    is_first: jax.Array
    valid: jax.Array
    first_chunk: jax.Array


def varlen_chunk_layout(cu_seqlens, chunk_size: int, num_tokens: int) -> VarlenChunks:
    """Chunks that never straddle a sequence, for packed tokens ``[cu[s], cu[s+1])``.

    Returns per-chunk arrays of the static length ``max((t + nseq (q - 1)) // q, 1)`` (an upper bound
    on ``sum_s ceil(len_s / q)``): ``seq`` (owning sequence), ``start``/``end`` (token range),
    ``is_first`` (first chunk of its sequence), ``valid`` (a real chunk, not trailing padding),
    and ``first_chunk [nseq + 1]`` (index of each sequence's first chunk; the last entry is
    the number of real chunks). Works on traced ``cu_seqlens``.
    """
    q = chunk_size
    cu = cu_seqlens.astype(jnp.int32)
    nseq = cu.shape[0] - 1
    n_chunks = (cu[1:] - cu[:-1] + q - 1) // q
    first_chunk = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(n_chunks)])
    bound = max((num_tokens + nseq * (q - 1)) // q, 1)
    k = jnp.arange(bound, dtype=jnp.int32)
    valid = k < first_chunk[-1]
    seq = jnp.minimum(jnp.searchsorted(first_chunk[1:], k, side="right"), nseq - 1)
    seq = seq.astype(jnp.int32)
    start = cu[seq] + (k - first_chunk[seq]) * q
    end = jnp.minimum(start + q, cu[seq + 1])
    is_first = (k == first_chunk[seq]) & valid
    return VarlenChunks(seq, start, end, is_first, valid, first_chunk)


class ChunkPlan:
    """Maps ``[b, l, ...]`` arrays to chunk-aligned ``[rows, c*q, ...]`` and back.

    ``is_first [rows, c]`` marks chunks where the state restarts from ``h0[init_index]``
    (``h0`` is [b, ...] batched or [nseq, ...] packed); numpy arrays for batched input (they
    depend on the shapes only), traced ones for packed input.
    """

    def __init__(self, b: int, l: int, chunk_size: int, cu_seqlens=None):
        q = self.q = chunk_size
        self.b, self.l = b, l
        self.packed = cu_seqlens is not None
        if not self.packed:
            self.c = max(-(-l // q), 1)
            self.rows = b
            # numpy: static, so they enter the program as constants (no device work per call)
            self.is_first = np.zeros((b, self.c), bool)
            self.is_first[:, 0] = True
            self.init_index = np.broadcast_to(np.arange(b, dtype=np.int32)[:, None], (b, self.c))
            return
        lay = self.varlen = varlen_chunk_layout(cu_seqlens, q, l)
        self.c, self.rows = lay.seq.shape[0], 1
        self.is_first, self.init_index = lay.is_first[None], lay.seq[None]
        tok = lay.start[:, None] + jnp.arange(q)[None, :]  # [c, q]
        self._mask = ((tok < lay.end[:, None]) & lay.valid[:, None]).reshape(-1)
        self._tok = jnp.where(self._mask, tok.reshape(-1), 0)
        cu = cu_seqlens.astype(jnp.int32)
        t = jnp.arange(l)
        seq_t = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), cu.shape[0] - 2)
        local = t - cu[seq_t]
        self._slot = (lay.first_chunk[seq_t] + local // q) * q + local % q  # token -> position

    def to_chunks(self, v):
        """``[b, l, ...] -> [rows, c*q, ...]`` with zeros at padding positions."""
        if not self.packed:
            pad = self.c * self.q - self.l
            return jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2)) if pad else v
        g = v[0][self._tok]
        m = self._mask.reshape(self._mask.shape + (1,) * (g.ndim - 1))
        return jnp.where(m, g, jnp.zeros((), v.dtype))[None]

    def from_chunks(self, v):
        """``[rows, c*q, ...] -> [b, l, ...]``."""
        if not self.packed:
            return v[:, : self.l]
        return v[0][self._slot][None]

    def final_states(self, end, h0):
        """State after each sequence from the per-chunk end states ``[rows, c, ...]``."""
        if not self.packed:
            return self.final_or_initial(end[:, -1], h0)
        last = jnp.maximum(self.varlen.first_chunk[1:] - 1, 0)
        return self.final_or_initial(end[0][last], h0)

    def final_or_initial(self, final, h0):
        """``final [m, ...]`` (each sequence's state after its last chunk), with h0 for the
        sequences that have no chunk (whatever ``final`` holds there)."""
        if not self.packed:
            return final if self.l else h0
        first = self.varlen.first_chunk
        has_chunks = (first[1:] > first[:-1]).reshape((-1,) + (1,) * (h0.ndim - 1))
        return jnp.where(has_chunks, final, h0)

    def chunk_states(self, end):
        """Per-chunk end states, zeroed past the real chunks of a packed batch."""
        if not self.packed:
            return end
        valid = self.varlen.valid.reshape((1, -1) + (1,) * (end.ndim - 2))
        return jnp.where(valid, end, 0.0)
