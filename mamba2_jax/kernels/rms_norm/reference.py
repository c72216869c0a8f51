"""Pure-JAX row RMS norm of the decode step (optionally after a residual add): the kernel's oracle.

    s   = x + delta                    (when delta is given; float32 math, dtype promoted)
    r   = float32(s rounded to in_dtype)          (in_dtype None: s's dtype)
    y_G = r_G / sqrt(mean(r_G^2) + eps)           per group G of D / groups channels
    out = weight * y.astype(norm_dtype)           (norm_dtype None: in_dtype)

With ``groups=1, in_dtype=param dtype`` this is the block's ``RMSNorm(h.astype(param dtype))``;
with ``groups=n_groups`` on the gated y (float32) and ``norm_dtype`` the activations' dtype it is
``GatedGroupRMSNorm.normalize``. Returns ``out`` (and ``s`` when delta is given).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rms_norm_ref(x, weight, *, eps: float, groups: int = 1, delta=None, in_dtype=None,
                 norm_dtype=None):
    """See the module docstring. x [.., D] (D divisible by groups), weight [D], delta like x
    (the modules of ``nn/norm.py`` are this function)."""
    s = x
    if delta is not None:
        dtype = jnp.promote_types(x.dtype, delta.dtype)
        s = (x.astype(jnp.float32) + delta.astype(jnp.float32)).astype(dtype)
    in_dtype = s.dtype if in_dtype is None else jnp.dtype(in_dtype)
    r = s.astype(in_dtype).astype(jnp.float32)
    g = r if groups == 1 else r.reshape(*r.shape[:-1], groups, r.shape[-1] // groups)
    y = (g * jax.lax.rsqrt(jnp.mean(jnp.square(g), axis=-1, keepdims=True) + eps)).reshape(r.shape)
    out = weight * y.astype(in_dtype if norm_dtype is None else norm_dtype)
    return out if delta is None else (out, s)
