"""Public selective state update (Mamba-2 decode): validation + dispatch.

Per row and head ``j`` (B/C group ``j // (h // g)``)::

    dt = clip(softplus(dt + dt_bias), *dt_limit);  s' = exp(dt A_j) s + dt x B^T
    y  = s' C + D_j x;  y *= silu(z) when z is given

Dtype policy: float32 arithmetic; ``y`` (from the float32 ``s'``) in ``x.dtype``; the state
pool keeps its dtype (float32 or bfloat16).
"""

from __future__ import annotations

import logging

import jax.numpy as jnp

from mamba2_jax.kernels.common import check_dt_limit, resolve_impl
from mamba2_jax.kernels.ssd.pallas_fwd import kernel_choice
from mamba2_jax.kernels.state_update.mgpu_ssu import (mgpu_ssu_unsupported,
                                                      selective_state_update_mgpu)
from mamba2_jax.kernels.state_update.pallas_ssu import selective_state_update_pallas
from mamba2_jax.kernels.state_update.reference import selective_state_update_ref
from mamba2_jax.typing import Array

_OP = "selective_state_update"
log = logging.getLogger("mamba2_jax")
KERNELS = ("auto", "mgpu", "triton")


def _check_kernel(kernel) -> None:
    if kernel not in KERNELS:
        raise ValueError(f"{_OP}: kernel must be one of {KERNELS}, got {kernel!r}")


MGPU_AUTO_ROWS = 64


def which_kernel(kernel: str, state, x, B, interpret: bool = False) -> str:
    """The Pallas kernel that runs: "mgpu" (``mgpu_ssu.py``) where asked for and it can take
    the call, else "triton" (``pallas_ssu.py``). "auto" is "mgpu" from MGPU_AUTO_ROWS rows on,
    Triton below: in place on an H200 (jax 0.11.2, float32 pool, one run,
    benchmarks/BENCHMARKS.md) the Mosaic GPU kernel took 94.7 / 351.4 µs against Triton's
    94.3 / 361.5 at b = 64 / 256 for (h, p, g, n) = (80, 64, 1, 128) and 145.7 / 554.3 against
    148.3 / 579.1 for (128, 64, 8, 128); at b = 1 5.7 / 8.8 µs against 6.7 / 5.9."""
    _check_kernel(kernel)
    if kernel == "auto":
        kernel = "mgpu" if x.shape[0] >= MGPU_AUTO_ROWS else "triton"
    return kernel_choice("kernel", kernel,
                         lambda: mgpu_ssu_unsupported(state, x, B, interpret=interpret))


def _pallas_unsupported(state, x, B) -> str | None:
    p, n = x.shape[-1], B.shape[-1]
    if p < 1 or n < 1 or p & (p - 1) or n & (n - 1):
        return f"head_dim p={p} and state size n={n} must be powers of two"
    return None


def _expect(name, a, shape, letters):
    if a is not None and tuple(a.shape) != tuple(shape):
        raise ValueError(f"{_OP}: {name} must be [{letters}] == {tuple(shape)}, "
                         f"got {tuple(a.shape)}")


def _validate(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices):
    for name, a in (("state", state), ("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C),
                    ("D", D), ("z", z), ("dt_bias", dt_bias)):
        if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{_OP}: {name} must be a floating-point array, got dtype {a.dtype}")
    if state.ndim != 4:
        raise ValueError(f"{_OP}: state must be [slots, h, p, n], got {tuple(state.shape)}")
    slots, h, p, n = state.shape
    if x.ndim != 3 or x.shape[1:] != (h, p):
        raise ValueError(f"{_OP}: x must be [b, h, p] with (h, p) == {(h, p)} from state, "
                         f"got {tuple(x.shape)}")
    b = x.shape[0]
    if B.ndim != 3 or B.shape[0] != b or B.shape[2] != n:
        raise ValueError(f"{_OP}: B must be [b, g, n] with b == {b}, n == {n}, "
                         f"got {tuple(B.shape)}")
    g = B.shape[1]
    if g < 1 or h % g:
        raise ValueError(f"{_OP}: the number of heads h={h} must be a multiple of the groups "
                         f"g={g}")
    _expect("dt", dt, (b, h), "b, h")
    _expect("A", A, (h,), "h")
    _expect("C", C, (b, g, n), "b, g, n")
    _expect("z", z, (b, h, p), "b, h, p")
    _expect("dt_bias", dt_bias, (h,), "h")
    if D is not None and tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"{_OP}: D must be [h] == ({h},) or [h, p] == {(h, p)}, "
                         f"got {tuple(D.shape)}")
    if state_batch_indices is None:
        if slots != b:
            raise ValueError(f"{_OP}: without state_batch_indices, state must hold one slot per "
                             f"row (slots == b == {b}), got {tuple(state.shape)}")
        return
    if state_batch_indices.ndim != 1 or state_batch_indices.shape[0] != b:
        raise ValueError(f"{_OP}: state_batch_indices must be [b] == ({b},), "
                         f"got {tuple(state_batch_indices.shape)}")
    if not jnp.issubdtype(state_batch_indices.dtype, jnp.integer):
        raise ValueError(f"{_OP}: state_batch_indices must be an integer array, "
                         f"got dtype {state_batch_indices.dtype}")


def selective_state_update(
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
    impl: str = "auto",
    interpret: bool = False,
    kernel: str = "auto",
):
    """One Mamba-2 decode step against a pool of SSM states.

    Args:
      state: [slots, h, p, n] pool (float32 or bfloat16).
      x: [b, h, p]; dt: [b, h] raw time steps; A: [h] (negative, float32).
      B, C: [b, g, n], h % g == 0; head j reads group j // (h // g).
      D: [h] or [h, p] skip, or None; z: [b, h, p] gate (y *= silu(z)), or None.
      dt_bias: [h] or None; dt_softplus / dt_limit: ``dt = clip(softplus(dt + dt_bias),
        *dt_limit)``, the clip skipped for the default (0, inf).
      state_batch_indices: [b] int slot of each row, or None (then slots == b, identity).
        A negative index marks a padding row: it reads a zero state (finite output) and writes
        nothing (indices >= slots likewise). Repeated valid indices are undefined.
      impl: "auto" | "xla" | "pallas" (auto: the Pallas kernel on a GPU for a slot-indexed pool,
        XLA for a dense batch or off a GPU); interpret: run the Pallas kernel in interpret
        mode. The Pallas kernel updates the pool in place when the caller donates it
        (``jax.jit(..., donate_argnums=...)``).
      kernel: which Pallas kernel: "triton" (``pallas_ssu.py``), "mgpu" (Mosaic GPU,
        ``mgpu_ssu.py``; Triton where it cannot take the call) or "auto" (Mosaic GPU from 64
        rows on, Triton below: :func:`which_kernel`).

    Returns:
      ``(y [b, h, p] in x.dtype, new pool [slots, h, p, n] in state.dtype)``; slots no row
      names are unchanged.
    """
    _validate(state, x, dt, A, B, C, D, z, dt_bias, state_batch_indices)
    _check_kernel(kernel)
    dt_limit = check_dt_limit(_OP, dt_limit)
    backend = resolve_impl(impl, op=_OP, pallas_available=True, interpret=interpret)
    if impl == "auto" and state_batch_indices is None:
        # A dense batch is an elementwise update XLA fuses with its neighbours: measured faster
        # than the kernel inside the compiled decode step (benchmarks/BENCHMARKS.md). The kernel
        # wins on slot-indexed pools (1.6-1.9x over XLA's gather/scatter at b >= 64).
        backend = "xla"
    if backend == "pallas":
        reason = _pallas_unsupported(state, x, B)
        if reason is None:
            b, h = dt.shape
            idx = (jnp.arange(b, dtype=jnp.int32) if state_batch_indices is None
                   else state_batch_indices.astype(jnp.int32))
            limit = None if dt_limit == (0.0, float("inf")) else dt_limit
            run = (selective_state_update_mgpu
                   if which_kernel(kernel, state, x, B, interpret) == "mgpu"
                   else selective_state_update_pallas)
            return run(
                state, x, dt, A, B, C, jnp.zeros((h,), jnp.float32) if D is None else D,
                jnp.zeros((h,), jnp.float32) if dt_bias is None else dt_bias, z, idx,
                softplus=dt_softplus, limit=limit, interpret=interpret)
        log.warning("%s: Pallas kernel cannot take this input (%s); using the XLA reference",
                    _OP, reason)
    return selective_state_update_ref(
        state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
        dt_limit=dt_limit, state_batch_indices=state_batch_indices)
