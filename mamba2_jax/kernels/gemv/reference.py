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


def residual_gemv_ref(h, norm_weight, w, delta=None, delta_ss=None, *, delta_count=None,
                      delta_eps=None, in_dtype=None):
    """A decode block's residual add + RMS norm + projection, the norm's 1 / RMS left out:

        h'      = h + delta / sqrt(sum(delta_ss) / delta_count + delta_eps)   (float32; in
                  promote(h, delta); no delta: h' = h)
        v       = h'.astype(in_dtype)                      (the norm's input)
        ss      = sum(v^2)                                 [m, 1] (the norm's statistics)
        partials = (norm_weight * v).astype(w.dtype) @ w   [1, m, N] float32

    so that ``partials.sum(0) / sqrt(ss / K + eps)`` is the normalised input's product (the
    consumer applies the row scale: ``mixer_step(in_ss=...)``). ``delta`` [m, K] is the
    previous block's unscaled out_proj output and ``delta_ss`` [m, slots] its gated norm's
    sums of squares (``mixer_step(sum_squares=True)``) over ``delta_count`` channels."""
    h_new = h if delta is None else add_scaled_delta(h, delta, delta_ss,
                                                     delta_count=delta_count,
                                                     delta_eps=delta_eps)
    v = h_new.astype(h.dtype if in_dtype is None else in_dtype).astype(jnp.float32)
    x = (norm_weight.astype(jnp.float32) * v).astype(norm_weight.dtype).astype(w.dtype)
    partials = jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)[None]
    return partials, h_new, jnp.sum(v * v, axis=-1, keepdims=True)


def inv_rms(ss, count, eps):
    """A norm's row scale from its sums of squares: ``1 / sqrt(sum(ss, -1) / count + eps)``
    (kept as a trailing axis of 1)."""
    return jax.lax.rsqrt(jnp.sum(ss, axis=-1, keepdims=True) / count + eps)


def add_scaled_delta(h, delta, delta_ss, *, delta_count, delta_eps):
    """``h + delta * inv_rms(delta_ss)`` in float32, in promote(h, delta): a block's output
    added to the residual stream with its gated norm's 1 / RMS."""
    hf = h.astype(jnp.float32) + inv_rms(delta_ss, delta_count, delta_eps) * delta.astype(
        jnp.float32)
    return hf.astype(jnp.promote_types(h.dtype, delta.dtype))
