"""Pure-JAX fused mixer decode step (conv update + state update + gate): the kernel's oracle.

For one token per row, from the in_proj output ``zxbcdt [b, i + c + h]`` (z, xBC, dt side by
side, c = i + 2 g n, i = h p) of a dense batch (row r owns state row r):

    xBC', conv' = causal_conv1d_update(xBC, conv_state, weight, bias, silu)
    x, B, C     = split(xBC')                                    (in xBC's dtype)
    y, ssm'     = selective_state_update(ssm_state, x, dt, A, B, C, D, dt_bias, softplus, limit)
    out         = float32(y) * silu(float32(z))                  (y in x's dtype first)

``out [b, i]`` float32 is what the mixer's gated group norm normalises next: the unfused path
(``causal_conv1d_update_ref`` then ``selective_state_update_ref`` then the norm's gate) step for
step, with every rounding to the activations' dtype where that path has one, so the kernel agrees
with it to float32 rounding (its sums run in another order).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mamba2_jax.kernels.conv1d.reference import causal_conv1d_update_ref
from mamba2_jax.kernels.gemv.reference import inv_rms
from mamba2_jax.kernels.state_update.reference import selective_state_update_ref


def split_zxbcdt(zxbcdt, heads: int, head_dim: int, groups: int, state_size: int):
    """(z [.., i], xBC [.., c], dt [.., h]) of an in_proj output."""
    i, c = heads * head_dim, heads * head_dim + 2 * groups * state_size
    return zxbcdt[..., :i], zxbcdt[..., i:i + c], zxbcdt[..., i + c:i + c + heads]


def mixer_step_ref(zxbcdt, conv_state, conv_weight, conv_bias, ssm_state, A, D, dt_bias, *,
                   heads: int, head_dim: int, groups: int, state_size: int,
                   dt_limit=(0.0, float("inf")), zx_dtype=None, sum_squares: bool = False,
                   in_ss=None, in_count=None, in_eps=None, norm_weight=None):
    """``(gated y [b, h p] float32, new conv state, new ssm state)``; see the module docstring.
    ``sum_squares``: also the sums of squares of each head's gated y, [b, h] float32 (the gated
    norm's statistics, for the decode step with the norms folded).
    conv_state [b, c, k-1], conv_weight [c, k], conv_bias [c] or None, ssm_state [b, h, p, n],
    A / dt_bias [h], D [h] or [h, p]. ``zxbcdt`` [S, b, N] float32: split-K partial products
    of in_proj, whose sum rounded to ``zx_dtype`` is the in_proj output; with ``in_ss``
    [b, slots] the sum is first scaled by ``1 / sqrt(sum(in_ss) / in_count + in_eps)`` (the
    in_proj input's norm, ``gemv.residual_gemv``). ``norm_weight`` [i]: the output is
    ``out * norm_weight`` in norm_weight's dtype (the gated norm without its 1 / RMS)."""
    if zxbcdt.ndim == 3:
        zxbcdt = jnp.sum(zxbcdt, axis=0)
        if in_ss is not None:
            zxbcdt = zxbcdt * inv_rms(in_ss, in_count, in_eps)
        zxbcdt = zxbcdt.astype(zx_dtype)
    b = zxbcdt.shape[0]
    i, gn = heads * head_dim, groups * state_size
    z, xbc, dt = split_zxbcdt(zxbcdt, heads, head_dim, groups, state_size)
    xbc, conv = causal_conv1d_update_ref(xbc, conv_state, conv_weight, conv_bias,
                                         activation="silu")
    x = xbc[:, :i].reshape(b, heads, head_dim)
    B = xbc[:, i:i + gn].reshape(b, groups, state_size)
    C = xbc[:, i + gn:].reshape(b, groups, state_size)
    y, ssm = selective_state_update_ref(ssm_state, x, dt, A, B, C, D=D, dt_bias=dt_bias,
                                        dt_softplus=True, dt_limit=dt_limit)
    out = y.reshape(b, i).astype(jnp.float32) * jax.nn.silu(z.astype(jnp.float32))
    result = (out, conv, ssm)
    if norm_weight is not None:
        result = ((out * norm_weight.astype(jnp.float32)).astype(norm_weight.dtype), conv, ssm)
    if sum_squares:  # (of the gated y before the weight: the norm's statistics)
        result += (jnp.sum(jnp.square(out).reshape(b, heads, head_dim), axis=-1),)
    return result
