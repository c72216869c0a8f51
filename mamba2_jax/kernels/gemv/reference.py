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


def normed_gemv_ref(x, ss, norm_weight, w, residual=None, *, eps: float, groups: int = 1,
                    in_dtype=None, norm_dtype=None, res_in_dtype=None):
    """``rms_norm(x) @ w`` with the norm's statistics given, optionally plus a residual.

    x [m, K] is the norm's input, ss [m, groups * spg] the sums of squares of
    ``x.astype(in_dtype)`` (any split into ``spg`` slots per group: their sum is what counts):
        y   = x.astype(in_dtype) / sqrt(sum_group(ss) / (K / groups) + eps)   per group
        xn  = (norm_weight * y.astype(norm_dtype)).astype(w.dtype)            (rms_norm_ref's)
        out = xn @ w                                                          (gemv_ref, w.dtype)
    With ``residual`` [m, N] returns ``(h, ss_h)``: ``h = residual + out`` (float32 sum, in
    promote(residual, w)) and ss_h [m, 1] the sums of squares of ``h.astype(res_in_dtype)``
    (the next norm's ss)."""
    m, K = x.shape
    in_dtype = jnp.dtype(x.dtype if in_dtype is None else in_dtype)
    norm_dtype = in_dtype if norm_dtype is None else jnp.dtype(norm_dtype)
    total = jnp.sum(ss.astype(jnp.float32).reshape(m, groups, -1), axis=-1, keepdims=True)
    rstd = jax.lax.rsqrt(total / (K // groups) + eps)
    r = x.astype(in_dtype).astype(jnp.float32).reshape(m, groups, K // groups)
    y = (r * rstd).reshape(m, K).astype(norm_dtype)
    out = gemv_ref((norm_weight * y).astype(w.dtype), w)
    if residual is None:
        return out
    h = (residual.astype(jnp.float32) + out.astype(jnp.float32)).astype(
        jnp.promote_types(residual.dtype, w.dtype))
    r = h.astype(residual.dtype if res_in_dtype is None else res_in_dtype).astype(jnp.float32)
    return h, jnp.sum(r * r, axis=-1, keepdims=True)
