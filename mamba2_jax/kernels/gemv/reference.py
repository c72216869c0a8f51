"""XLA reference of the small-batch GEMV: ``out = x @ w (+ bias)``.

x [m, K] and w [K, N] share one float dtype; the product accumulates in float32
(``preferred_element_type``), the bias is added in float32, and the result is cast to
``x.dtype``.
"""

from __future__ import annotations

import jax.numpy as jnp


def gemv_ref(x, w, bias=None):
    out = jnp.dot(x, w, preferred_element_type=jnp.float32)
    if bias is not None:
        out = out + bias.astype(jnp.float32)
    return out.astype(x.dtype)
