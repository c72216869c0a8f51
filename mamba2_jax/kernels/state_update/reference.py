"""Pure-JAX selective state update (one Mamba-2 decode step): the ground truth for the kernels.

Per row (sequence) and head ``j``, reading B/C group ``j // (h // g)``::

    dt  = clip(softplus(dt + dt_bias), *dt_limit)        (each part optional, see process_dt)
    s'  = exp(dt * A_j) * s + dt * x B^T                 s: [p, n]
    y   = s' C + D_j * x ;   y *= silu(z) when z is given

Dtype policy: float32 arithmetic; ``y`` is computed from the float32 ``s'`` and cast to
``x.dtype``; the pool rows written back are cast to ``state.dtype``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from mamba2_jax.kernels.common import process_dt, read_slots, write_slots
from mamba2_jax.typing import Array

_F32 = jnp.float32


def selective_state_update_ref(
    state: Array,
    x: Array,
    dt: Array,
    A: Array,
    B: Array,
    C: Array,
    *,
    D: Array | None = None,
    z: Array | None = None,
    dt_bias: Array | None = None,
    dt_softplus: bool = False,
    dt_limit=(0.0, float("inf")),
    state_batch_indices: Array | None = None,
):
    """One step for ``x [b, h, p]`` against the pool ``state [slots, h, p, n]``.

    ``dt [b, h]``, ``A [h]``, ``B``/``C [b, g, n]``, ``D [h] | [h, p]``, ``z [b, h, p]``,
    ``dt_bias [h]``. Row ``r`` uses slot ``state_batch_indices[r]`` (identity when ``None``);
    a row whose index is outside ``[0, slots)`` (padding, e.g. -1) reads a zero state and writes
    nothing. Returns ``(y [b, h, p] in x.dtype, new pool in state.dtype)``. Inputs are not
    validated here; see ``selective_state_update``.
    """
    b, h, p = x.shape
    g, n = B.shape[-2:]
    r = h // g
    s = read_slots(state, state_batch_indices)

    dt = process_dt(dt, dt_bias, dt_softplus, dt_limit)  # [b, h]
    dA = jnp.exp(dt * A.astype(_F32))  # [b, h]
    xf = x.astype(_F32)

    # Heads as (g, r): head j = group j // r, member j % r; B/C broadcast over r, never repeated.
    sg = s.reshape(b, g, r, p, n)
    dBx = (dt[..., None] * xf).reshape(b, g, r, p)[..., None] * B.astype(_F32)[:, :, None, None]
    sg = sg * dA.reshape(b, g, r)[..., None, None] + dBx  # [b, g, r, p, n]
    y = jnp.einsum("bgrpn,bgn->bgrp", sg, C.astype(_F32), precision=lax.Precision.HIGHEST,
                   preferred_element_type=_F32).reshape(b, h, p)
    if D is not None:
        Df = D.astype(_F32)
        y = y + xf * (Df[:, None] if Df.ndim == 1 else Df)
    if z is not None:
        y = y * jax.nn.silu(z.astype(_F32))

    return y.astype(x.dtype), write_slots(state, state_batch_indices, sg.reshape(b, h, p, n))
