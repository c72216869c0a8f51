"""Pallas (Triton backend) selective state update, in place on a slot-indexed state pool.

Grid (b, h, p / bp): program (r, j, pb) reads slot ``idx[r]`` rows ``pb*bp : (pb+1)*bp`` of head
j, applies ``s' = exp(dt A_j) s + dt x B^T``, writes ``y = s' C + D x`` (gated by silu(z)) and
stores ``s'`` back into the same slot. The pool is aliased input -> output
(``input_output_aliases``), so under ``jax.jit`` with the pool donated no copy is made and slots
no row names keep their contents. A negative slot (or one >= slots) is a padding row: it reads a
zero state and stores nothing, as in the reference. Dtype policy as the reference: float32
arithmetic, ``y`` in ``x.dtype``, the pool keeps its dtype.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt


def _softplus(v):
    return jnp.where(v > 20.0, v, jnp.log1p(jnp.exp(jnp.minimum(v, 20.0))))


def _ssu_kernel(idx_ref, state_ref, x_ref, dt_ref, A_ref, B_ref, C_ref, D_ref, bias_ref, z_ref,
                y_ref, out_ref, *, bp, heads_per_group, softplus, limit, has_z, d_per_channel):
    r, j, pb = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    g = j // heads_per_group
    ps = pl.ds(pb * bp, bp)
    slot = idx_ref[r]
    valid = (slot >= 0) & (slot < state_ref.shape[0])
    s = state_ref[jnp.where(valid, slot, 0), j, ps, :].astype(jnp.float32)  # [bp, n]
    s = jnp.where(valid, s, 0.0)
    dt = dt_ref[r, j] + bias_ref[j]
    if softplus:
        dt = _softplus(dt)
    if limit is not None:
        dt = jnp.minimum(jnp.maximum(dt, limit[0]), limit[1])
    x = x_ref[r, j, ps].astype(jnp.float32)  # [bp]
    Bg = B_ref[r, g, :].astype(jnp.float32)  # [n]
    s = s * jnp.exp(dt * A_ref[j]) + (dt * x)[:, None] * Bg[None, :]
    y = jnp.sum(s * C_ref[r, g, :].astype(jnp.float32)[None, :], axis=1)
    y = y + x * (D_ref[j, ps] if d_per_channel else D_ref[j])
    if has_z:
        zv = z_ref[r, j, ps].astype(jnp.float32)
        y = y * zv * jax.nn.sigmoid(zv)
    y_ref[r, j, ps] = y.astype(y_ref.dtype)

    @pl.when(valid)
    def _():
        out_ref[slot, j, ps, :] = s.astype(out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("softplus", "limit", "block_p", "num_warps",
                                             "interpret"))
def selective_state_update_pallas(state, x, dt, A, B, C, D, dt_bias, z, idx, *, softplus: bool,
                                  limit=None, block_p: int = 64, num_warps: int | None = None,
                                  interpret: bool = False):
    """``(y, new pool)``; D [h] or [h, p] (zeros when absent), dt_bias [h] (zeros when absent),
    z or None, idx [b] int32. ``limit``: (lo, hi) clip of dt, or None. ``num_warps`` None: 8 at
    batch >= 64 (H200, float32 pool, b 64 / 256: 79.6-83.1 % of the copy bandwidth with 4 warps,
    83.5-86.5 % with 8; ``scripts/bench_decode.py --ssu-sweep``), else 4."""
    b, h, p = x.shape
    if num_warps is None:
        num_warps = 8 if b >= 64 else 4
    g = B.shape[1]
    bp = min(block_p, p)
    kernel = functools.partial(_ssu_kernel, bp=bp, heads_per_group=h // g, softplus=softplus,
                               limit=limit, has_z=z is not None, d_per_channel=D.ndim == 2)
    return pl.pallas_call(
        kernel,
        out_shape=(jax.ShapeDtypeStruct(x.shape, x.dtype),
                   jax.ShapeDtypeStruct(state.shape, state.dtype)),
        grid=(b, h, p // bp),
        input_output_aliases={1: 1},
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret, name="selective_state_update",
    )(idx, state, x, dt.astype(jnp.float32), A.astype(jnp.float32), B, C,
      D.astype(jnp.float32), dt_bias.astype(jnp.float32), x if z is None else z)
