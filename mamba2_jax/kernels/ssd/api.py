"""Public SSD chunk scan: validation and backend dispatch.

``y = SSD(x, dt, A, B, C) + D x``, gated by ``silu(z)`` when given; see ``reference.py`` for the
recurrence and the chunked algorithm. Dtype policy: float32 arithmetic, ``y`` in ``x.dtype``,
states in float32.
"""

from __future__ import annotations

import logging

from mamba2_jax.kernels.common import (check_chunk_size, check_cu_seqlens, check_dt_limit,
                                       resolve_impl)
from mamba2_jax.kernels.ssd.pallas import SSDKernelConfig, pallas_unsupported, ssd_pallas
from mamba2_jax.kernels.ssd.reference import ssd_chunk_scan_ref

_OP = "ssd_chunk_scan"
log = logging.getLogger("mamba2_jax")


def _expect(name, arr, shape):
    if arr is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(f"{_OP}: {name} must have shape {tuple(shape)}, got {tuple(arr.shape)}")


def _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens):
    if x.ndim != 4:
        raise ValueError(f"{_OP}: x must be [b, l, h, p], got shape {tuple(x.shape)}")
    b, l, h, p = x.shape
    if B.ndim != 4:
        raise ValueError(f"{_OP}: B must be [b, l, g, n], got shape {tuple(B.shape)}")
    g, n = B.shape[-2:]
    if g < 1 or h % g:
        raise ValueError(f"{_OP}: the number of heads h={h} must be a multiple of the groups g={g}")
    _expect("dt", dt, (b, l, h))
    _expect("A", A, (h,))
    _expect("B", B, (b, l, g, n))
    _expect("C", C, (b, l, g, n))
    _expect("z", z, (b, l, h, p))
    _expect("dt_bias", dt_bias, (h,))
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"{_OP}: D must have shape ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    if cu_seqlens is None:
        _expect("initial_states", initial_states, (b, h, p, n))
        return
    if b != 1:
        raise ValueError(f"{_OP}: packed input (cu_seqlens) needs batch 1, got x of shape {tuple(x.shape)}")
    check_cu_seqlens(_OP, cu_seqlens, l)
    _expect("initial_states", initial_states, (cu_seqlens.shape[0] - 1, h, p, n))


def ssd_chunk_scan(
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
    impl: str = "auto",
    interpret: bool = False,
):
    """Mamba-2 SSD over a batch or a packed set of sequences.

    Args:
      x: [b, l, h, p] inputs (packed: b == 1 and l == t).
      dt: [b, l, h] raw time steps; A: [h] (negative) decay rates; B, C: [b, l, g, n], head j
        reads group j // (h // g).
      chunk_size: q, a power of two; any l is accepted (the tail chunk is padded).
      D: [h] or [h, p] skip; z: [b, l, h, p] gate (y *= silu(z)); dt_bias: [h];
        dt_softplus / dt_limit: ``dt = clip(softplus(dt + dt_bias), *dt_limit)``.
      initial_states: [b, h, p, n], or [nseq, h, p, n] with ``cu_seqlens``.
      cu_seqlens: [nseq + 1] int offsets of packed sequences, from 0 to l, non-decreasing
        (checked when concrete); the state resets at each start.
      return_final_states / return_chunk_states: also return the state after each sequence and
        after every chunk (see ``ssd_chunk_scan_ref``).
      impl: "auto" | "xla" | "pallas" (auto: Pallas on a GPU, XLA elsewhere; shapes the kernel
        cannot take fall back to XLA with a logged reason); interpret: run the Pallas kernel in
        interpret mode (CPU). The Pallas path is differentiable through Pallas backward
        kernels (``mamba2_jax.kernels.ssd.pallas_bwd``); gradients for x, dt, A, B, C, D, z,
        dt_bias and initial_states.
    """
    chunk_size = check_chunk_size(_OP, chunk_size)
    _validate(x, dt, A, B, C, chunk_size, D, z, dt_bias, initial_states, cu_seqlens)
    dt_limit = check_dt_limit(_OP, dt_limit)
    backend = resolve_impl(impl, op=_OP, pallas_available=True, interpret=interpret)
    if backend == "pallas":
        reason = pallas_unsupported(x, B, chunk_size)
        if reason is None:
            cfg = SSDKernelConfig(chunk_size=chunk_size, dt_softplus=bool(dt_softplus),
                                  dt_limit=dt_limit, chunk_states=bool(return_chunk_states),
                                  interpret=bool(interpret))
            y, final, chunks = ssd_pallas(cfg, x, dt, A, B, C, D, z, dt_bias, initial_states,
                                          cu_seqlens)
            out = (y,) + ((final,) if return_final_states else ()) + (
                (chunks,) if return_chunk_states else ())
            return out[0] if len(out) == 1 else out
        log.warning("%s: Pallas kernel cannot take this input (%s); using the XLA reference",
                    _OP, reason)
    return ssd_chunk_scan_ref(
        x, dt, A, B, C, chunk_size=chunk_size, D=D, z=z, dt_bias=dt_bias,
        dt_softplus=dt_softplus, dt_limit=dt_limit, initial_states=initial_states,
        cu_seqlens=cu_seqlens, return_final_states=return_final_states,
        return_chunk_states=return_chunk_states)
