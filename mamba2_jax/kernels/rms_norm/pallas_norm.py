"""Pallas (Triton backend) row RMS norm for the decode step: one launch where XLA takes two or
three (residual add, the mean-square reduction, the scaling).

Grid (m, groups): program (r, G) loads group G of row r (``D / groups`` channels, a power-of-two
block, masked past the group), adds ``delta`` and stores the sum (when given), rounds to
``in_dtype``, divides by the group's RMS, rounds to ``norm_dtype`` and multiplies by the weight;
the math is ``reference.rms_norm_ref``'s. At decode sizes (m <= 64 rows of 2560 or 5120) every
program is a single block; the kernel is launch-bound, which is the point (H200 profile of the
2.7B step: ~1.3-1.6 µs a launch).
Dtype policy: float32 arithmetic; ``out`` in promote(weight, norm_dtype), the sum in
promote(x, delta).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from mamba2_jax.kernels.common import next_pow2, pick_warps

NUM_WARPS = 4


def _norm_kernel(*refs, size, block, eps, has_delta, in_dtype, norm_dtype):
    if has_delta:
        x_ref, d_ref, w_ref, out_ref, sum_ref = refs
    else:
        (x_ref, w_ref, out_ref), d_ref = refs, None
    r, G = pl.program_id(0), pl.program_id(1)
    cols = pl.ds(G * size, block)
    mask = jnp.arange(block, dtype=jnp.int32) < size
    load = lambda ref: plt.load(ref, mask=mask, other=0).astype(jnp.float32)
    s = load(x_ref.at[r, cols])
    if has_delta:
        s = (s + load(d_ref.at[r, cols])).astype(sum_ref.dtype)
        plt.store(sum_ref.at[r, cols], s, mask=mask)
    v = s.astype(in_dtype).astype(jnp.float32)
    y = v * jax.lax.rsqrt(jnp.sum(v * v) / size + eps)
    out = load(w_ref.at[cols]) * y.astype(norm_dtype).astype(jnp.float32)
    plt.store(out_ref.at[r, cols], out.astype(out_ref.dtype), mask=mask)


@functools.partial(jax.jit, static_argnames=("eps", "groups", "in_dtype", "norm_dtype",
                                             "num_warps", "interpret"))
def rms_norm_pallas(x, weight, delta=None, *, eps: float, groups: int = 1, in_dtype=None,
                    norm_dtype=None, num_warps: int = NUM_WARPS, interpret: bool = False):
    """``rms_norm_ref``'s contract (the caller checks shapes); x [m, D]."""
    m, D = x.shape
    size = D // groups
    block = next_pow2(size)
    sum_dtype = x.dtype if delta is None else jnp.promote_types(x.dtype, delta.dtype)
    in_dtype = jnp.dtype(sum_dtype if in_dtype is None else in_dtype)
    norm_dtype = in_dtype if norm_dtype is None else jnp.dtype(norm_dtype)
    out_dtype = jnp.promote_types(weight.dtype, norm_dtype)
    kernel = functools.partial(_norm_kernel, size=size, block=block, eps=eps,
                               has_delta=delta is not None, in_dtype=in_dtype,
                               norm_dtype=norm_dtype)
    out_shape = [jax.ShapeDtypeStruct((m, D), out_dtype)]
    if delta is not None:
        out_shape.append(jax.ShapeDtypeStruct((m, D), sum_dtype))
    outs = pl.pallas_call(
        kernel, out_shape=tuple(out_shape), grid=(m, groups),
        compiler_params=plt.CompilerParams(num_warps=pick_warps(block, num_warps),
                                           num_stages=1),
        interpret=interpret, name="rms_norm",
    )(x, *(() if delta is None else (delta,)), weight)
    return outs[0] if delta is None else tuple(outs)
