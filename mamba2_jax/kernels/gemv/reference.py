"""XLA reference of the small-batch GEMV: ``out = x @ w (+ bias)``.

x [m, K] and w [K, N] (or [N, K] with ``w_layout="out_in"``) share one float dtype; the
product accumulates in float32 (``preferred_element_type``), the bias is added in float32, and
the result is cast to ``x.dtype`` (or ``out_dtype``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gemv_ref(x, w, bias=None, *, w_layout="in_out", out_dtype=None):
    """``x @ w`` (w [K, N]), or ``x @ w.T`` with ``w_layout="out_in"`` (w [N, K]), in
    ``out_dtype`` (None: x.dtype)."""
    dims = ((x.ndim - 1,), (1 if w_layout == "out_in" else 0,))
    out = jax.lax.dot_general(x, w, (dims, ((), ())), preferred_element_type=jnp.float32)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype if out_dtype is None else out_dtype)
