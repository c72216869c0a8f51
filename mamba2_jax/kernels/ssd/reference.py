"""Pure-JAX SSD (state-space duality) chunk scan: the ground truth for the Pallas kernels.

The recurrence, per head j (group ``j // (h // g)``) and token t of one sequence::

    a_t   = dt_t * A_j                                   (log decay, <= 0 for A < 0)
    s_t   = exp(a_t) * s_{t-1} + dt_t * x_t B_t^T       s: [p, n], s_{-1} = initial state
    y_t   = s_t C_t + D_j * x_t ;   y_t *= silu(z_t) when z is given

Chunked evaluation (chunk q): inside a chunk the decay between tokens i >= j is
``exp(segsum(a)[i, j])`` with ``segsum[i, j] = a_{j+1} + ... + a_i`` built by a masked cumsum,
so no ``exp(x) * exp(-y)`` factoring can overflow; chunk states are passed between chunks
by a scan over chunks. Packed variable-length input (``cu_seqlens``) is cut into chunks that
never straddle a sequence (vLLM's layout): chunk k of sequence s covers tokens
``[cu[s] + k q, min(cu[s] + (k+1) q, cu[s+1]))``, and the state is reset to the sequence's own
initial state at its first chunk. Padding tokens carry ``dt = 0`` and ``x = 0``, an exact
identity step.

Dtype policy: everything is computed in float32 (einsums at HIGHEST precision); ``y`` is cast
to ``x.dtype``; states are float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mamba2_jax.kernels.common import process_dt
from mamba2_jax.kernels.ssd.layout import ChunkPlan

_HI = lax.Precision.HIGHEST


def _einsum(spec, *ops):
    return jnp.einsum(spec, *ops, precision=_HI, preferred_element_type=jnp.float32)


def segsum(a):
    """``out[..., i, j] = sum(a[..., j+1 : i+1])`` for ``j <= i`` and ``-inf`` above the diagonal.

    Built as a cumsum of a strictly-lower-masked matrix (exact for any magnitude of ``a``).
    """
    q = a.shape[-1]
    i = jnp.arange(q)[:, None]
    j = jnp.arange(q)[None, :]
    lower = jnp.where(j < i, a[..., :, None], 0.0)  # [.., i, j] = a_i for j < i
    out = jnp.cumsum(lower, axis=-2)
    return jnp.where(j <= i, out, -jnp.inf)


def _chunked_core(x, dt, A, B, C, h0, is_first, init_index):
    """SSD over chunked float32 inputs.

    x [b, c, q, h, p], dt [b, c, q, h] (processed; 0 on padding), A [h], B/C [b, c, q, g, n],
    h0 [m, h, p, n] table of initial states, is_first [b, c] (reset to h0[init_index] before
    this chunk), init_index [b, c]. Returns y [b, c, q, h, p], the state entering each chunk and
    the state leaving it, both [b, c, h, p, n].
    """
    b, c, q, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    a = jnp.moveaxis(dt * A, -1, -2)  # [b, c, h, q]
    decay = jnp.exp(segsum(a))  # [b, c, h, q(i), q(j)], 0 above the diagonal
    a_cum = jnp.cumsum(a, axis=-1)  # [b, c, h, q]

    xg = x.reshape(b, c, q, g, r, p)
    dtg = dt.reshape(b, c, q, g, r)
    decay_g = decay.reshape(b, c, g, r, q, q)

    # Diagonal blocks: y_i += sum_{j<=i} (C_i . B_j) exp(segsum[i, j]) dt_j x_j.
    cb = _einsum("bcign,bcjgn->bcgij", C, B)
    y = _einsum("bcgij,bcgrij,bcjgr,bcjgrp->bcigrp", cb, decay_g, dtg, xg)

    # State each chunk adds on its own: sum_j exp(segsum[q-1, j]) dt_j x_j B_j^T.
    to_end = decay_g[..., -1, :]  # [b, c, g, r, q]
    local = _einsum("bcjgn,bcgrj,bcjgr,bcjgrp->bcgrpn", B, to_end, dtg, xg)
    local = local.reshape(b, c, h, p, n)
    chunk_decay = jnp.exp(a_cum[..., -1])  # [b, c, h]

    def pass_state(carry, inp):
        dec, loc, first, idx = inp
        prev = jnp.where(first[:, None, None, None], h0[idx], carry)
        new = dec[..., None, None] * prev + loc
        return new, (prev, new)

    xs = tuple(jnp.moveaxis(v, 1, 0) for v in (chunk_decay, local, is_first, init_index))
    _, (prev, end) = lax.scan(pass_state, jnp.zeros((b, h, p, n), jnp.float32), xs)
    prev, end = jnp.moveaxis(prev, 0, 1), jnp.moveaxis(end, 0, 1)

    # Off-diagonal: the state entering the chunk, decayed to token i, read by C_i.
    decay_in = jnp.exp(a_cum).reshape(b, c, g, r, q)
    prev_g = prev.reshape(b, c, g, r, p, n)
    y = y + _einsum("bcign,bcgri,bcgrpn->bcigrp", C, decay_in, prev_g)
    return y.reshape(b, c, q, h, p), prev, end


def _skip_and_gate(y, x, D, z):
    if D is not None:
        d = D.astype(jnp.float32)
        y = y + x * (d[:, None] if d.ndim == 1 else d)
    if z is not None:
        y = y * jax.nn.silu(z.astype(jnp.float32))
    return y


def ssd_chunk_scan_ref(
    x,
    dt,
    A,
    B,
    C,
    *,
    chunk_size: int,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    dt_limit=(0.0, float("inf")),
    initial_states=None,
    cu_seqlens=None,
    return_final_states: bool = False,
    return_chunk_states: bool = False,
):
    """Chunked SSD. Shapes as :func:`mamba2_jax.kernels.ssd.ssd_chunk_scan` (inputs validated there).

    Returns ``y`` and, when asked, ``final_states`` ([b, h, p, n], or [nseq, h, p, n] with
    ``cu_seqlens``) and ``chunk_states``: the state leaving every chunk, [b, c, h, p, n]
    (with ``cu_seqlens``: [1, c_max, h, p, n] in :func:`varlen_chunk_layout` order, zeros past
    the real chunks).
    """
    q = chunk_size
    b, l, h, p = x.shape
    n = B.shape[-1]
    xf = x.astype(jnp.float32)
    dtf = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    Af, Bf, Cf = (v.astype(jnp.float32) for v in (A, B, C))

    m = b if cu_seqlens is None else cu_seqlens.shape[0] - 1
    h0 = (jnp.zeros((m, h, p, n), jnp.float32) if initial_states is None
          else initial_states.astype(jnp.float32))
    plan = ChunkPlan(b, l, q, cu_seqlens)

    def chunk(v):
        v = plan.to_chunks(v)
        return v.reshape(plan.rows, plan.c, q, *v.shape[2:])

    yc, _, end = _chunked_core(chunk(xf), chunk(dtf), Af, chunk(Bf), chunk(Cf), h0,
                               plan.is_first, plan.init_index)
    y = plan.from_chunks(yc.reshape(plan.rows, plan.c * q, h, p))
    final, chunk_states = plan.final_states(end, h0), plan.chunk_states(end)
    y = _skip_and_gate(y, xf, D, z).astype(x.dtype)
    out = (y,)
    if return_final_states:
        out += (final,)
    if return_chunk_states:
        out += (chunk_states,)
    return out[0] if len(out) == 1 else out


def ssd_sequential_ref(
    x,
    dt,
    A,
    B,
    C,
    *,
    D=None,
    z=None,
    dt_bias=None,
    dt_softplus: bool = False,
    dt_limit=(0.0, float("inf")),
    initial_states=None,
    cu_seqlens=None,
):
    """Token-by-token ``lax.scan`` of the recurrence: the oracle the chunked forms are tested on.

    Returns ``(y, final_states)`` with the shapes of :func:`ssd_chunk_scan_ref`.
    """
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    xf = x.astype(jnp.float32)
    dtf = process_dt(dt, dt_bias, dt_softplus, dt_limit)
    Af = A.astype(jnp.float32)
    Bh = jnp.repeat(B.astype(jnp.float32), r, axis=-2)  # [b, l, h, n], head j -> group j // r
    Ch = jnp.repeat(C.astype(jnp.float32), r, axis=-2)

    def token(s, dt_t, x_t, B_t, C_t):
        s = jnp.exp(dt_t * Af)[:, None, None] * s + (dt_t[:, None] * x_t)[:, :, None] * B_t[:, None, :]
        return s, jnp.einsum("hpn,hn->hp", s, C_t, precision=_HI)

    if cu_seqlens is None:
        h0 = (jnp.zeros((b, h, p, n), jnp.float32) if initial_states is None
              else initial_states.astype(jnp.float32))

        def one_sequence(s0, dt_s, x_s, B_s, C_s):
            return lax.scan(lambda s, v: token(s, *v), s0, (dt_s, x_s, B_s, C_s))

        final, y = jax.vmap(one_sequence)(h0, dtf, xf, Bh, Ch)
    else:
        cu = cu_seqlens.astype(jnp.int32)
        nseq = cu.shape[0] - 1
        h0 = (jnp.zeros((nseq, h, p, n), jnp.float32) if initial_states is None
              else initial_states.astype(jnp.float32))
        t = jnp.arange(l)
        seq_t = jnp.minimum(jnp.searchsorted(cu[1:], t, side="right"), nseq - 1)
        starts = t == cu[seq_t]
        inside = t < cu[-1]

        def step(carry, v):
            s, finals = carry
            start, seq, ok, dt_t, x_t, B_t, C_t = v
            s = jnp.where(start, h0[seq], s)
            s, y_t = token(s, dt_t, x_t, B_t, C_t)
            finals = jnp.where(ok, finals.at[seq].set(s), finals)
            return (s, finals), jnp.where(ok, y_t, 0.0)

        init = (jnp.zeros((h, p, n), jnp.float32), h0)
        (_, final), y = lax.scan(step, init, (starts, seq_t, inside, dtf[0], xf[0], Bh[0], Ch[0]))
        y = y[None]
    y = _skip_and_gate(y, xf, D, z).astype(x.dtype)
    return y, final
