"""Backend selection shared by every op in ``mamba2_jax.kernels``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

IMPLS = ("auto", "xla", "pallas")


def resolve_impl(impl: str, *, op: str, pallas_available: bool = False,
                 interpret: bool = False) -> str:
    """Turn ``impl`` into the backend that runs: ``"xla"`` or ``"pallas"``.

    ``"auto"`` picks Pallas on a GPU when the op has a Pallas kernel, XLA otherwise.
    Asking for ``"pallas"`` on an op without a kernel, or off a GPU without ``interpret``, is an
    error, never a silent fallback.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    on_gpu = jax.default_backend() == "gpu"
    if impl == "auto":
        return "pallas" if (pallas_available and on_gpu) else "xla"
    if impl == "pallas":
        if not pallas_available:
            raise NotImplementedError(f"{op}: no Pallas kernel yet; use impl='xla' or 'auto'")
        if not (on_gpu or interpret):
            raise ValueError(f"{op}: impl='pallas' needs a GPU (backend here: "
                             f"{jax.default_backend()}); pass interpret=True to run it on the CPU")
    return impl


MODEL_IMPLS = ("auto", "xla", "pallas", "interpret")


def op_kwargs(impl: str) -> dict:
    """A model-level ``impl`` -> the ``impl`` / ``interpret`` keywords for one op.

    ``"auto"``, ``"xla"`` and ``"pallas"`` pass through; ``"interpret"`` is ``"pallas"`` with the
    kernels in interpret mode (runs on the CPU, for tests).
    """
    if impl not in MODEL_IMPLS:
        raise ValueError(f"impl must be one of {MODEL_IMPLS}, got {impl!r}")
    if impl == "interpret":
        return dict(impl="pallas", interpret=True)
    return dict(impl=impl)


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): Triton block shapes must be powers of two."""
    return 1 << max(n - 1, 0).bit_length()


def check_pow2(name: str, v, *, op: str | None = None) -> int:
    """``v`` if it is a positive power of two (a block size), else a ValueError naming it."""
    if isinstance(v, bool) or not isinstance(v, int) or v < 1 or v & (v - 1):
        raise ValueError(f"{op + ': ' if op else ''}{name} must be a positive power of two, "
                         f"got {v!r}")
    return v


def pick_warps(elements: int, num_warps: int) -> int:
    """A power of two <= ``num_warps`` (at least 1) with at most ``elements / 32`` warps, so a
    block of ``elements`` covers every thread (no element replicated across warps)."""
    w = max(1, min(num_warps, elements // 32))
    return 1 << (w.bit_length() - 1)


def static_index(i: int):
    """A static index as an int32 scalar: Pallas interpret mode's masked load/store rules do not
    take bare Python ints next to slices or index arrays."""
    return jnp.int32(i)


def with_reference_gradient(forward, reference):
    """``forward(static, *args, cu_seqlens)`` (a Pallas forward) made differentiable with the
    gradient of ``reference(static, *args, cu_seqlens)`` (``jax.vjp`` of the pure-JAX twin, a
    recompute: the named XLA backward of the kernels that have no Pallas backward).

    ``static`` is hashable and not differentiated; ``cu_seqlens`` (integer, may be None) gets
    no cotangent.
    """
    fn = jax.custom_vjp(forward, nondiff_argnums=(0,))

    def fwd(static, *args):
        return forward(static, *args), args

    def bwd(static, args, cotangent):
        *diff_args, cu_seqlens = args
        _, vjp = jax.vjp(lambda *a: reference(static, *a, cu_seqlens), *diff_args)
        return (*vjp(cotangent), None)

    fn.defvjp(fwd, bwd)
    return fn


def process_dt(dt, dt_bias=None, dt_softplus: bool = False, dt_limit=(0.0, float("inf"))):
    """The time step as every Mamba-2 op sees it, in float32.

    ``dt = dt + dt_bias``; ``softplus`` when asked; then ``clip(dt, *dt_limit)`` unless
    ``dt_limit`` is the default ``(0, inf)`` (mamba_ssm's rule: the default limit is a no-op,
    so a raw negative ``dt`` without softplus is left alone).
    """
    dt = dt.astype(jnp.float32)
    if dt_bias is not None:
        dt = dt + dt_bias.astype(jnp.float32)
    if dt_softplus:
        dt = jax.nn.softplus(dt)
    lo, hi = float(dt_limit[0]), float(dt_limit[1])
    if (lo, hi) != (0.0, float("inf")):
        dt = jnp.clip(dt, lo, hi)
    return dt


def check_dt_limit(op: str, dt_limit) -> tuple[float, float]:
    """Validate ``dt_limit`` = (lo, hi) with lo <= hi; returns it as floats."""
    try:
        lo, hi = (float(v) for v in dt_limit)
    except (TypeError, ValueError):
        raise ValueError(f"{op}: dt_limit must be a pair (lo, hi), got {dt_limit!r}") from None
    if not lo <= hi:
        raise ValueError(f"{op}: dt_limit must have lo <= hi, got {dt_limit!r}")
    return lo, hi


def check_cu_seqlens(op: str, cu_seqlens, num_tokens: int) -> None:
    """``cu_seqlens`` must be integer offsets [nseq + 1] from 0 to ``num_tokens``, non-decreasing.

    The values are checked when they are concrete; under ``jax.jit`` (traced) only dtype and
    shape can be, and the caller is responsible for the values.
    """
    if not jnp.issubdtype(cu_seqlens.dtype, jnp.integer):
        raise ValueError(f"{op}: cu_seqlens must be an integer array, got dtype {cu_seqlens.dtype}")
    if cu_seqlens.ndim != 1 or cu_seqlens.shape[0] < 2:
        raise ValueError(f"{op}: cu_seqlens must be [nseq + 1] with nseq >= 1, got shape "
                         f"{tuple(cu_seqlens.shape)}")
    if isinstance(cu_seqlens, jax.core.Tracer):
        return
    cu = np.asarray(cu_seqlens)
    if cu[0] != 0 or cu[-1] != num_tokens or np.any(np.diff(cu) < 0):
        raise ValueError(f"{op}: cu_seqlens must rise from 0 to the {num_tokens} packed tokens "
                         f"without decreasing, got {cu.tolist()}")


def check_chunk_size(op: str, chunk_size) -> int:
    """A positive power of two (Python or numpy integer, not bool)."""
    if isinstance(chunk_size, (bool, np.bool_)) or not isinstance(chunk_size, (int, np.integer)):
        raise ValueError(f"{op}: chunk_size must be a positive power of two, got {chunk_size!r}")
    q = int(chunk_size)
    if q < 1 or q & (q - 1):
        raise ValueError(f"{op}: chunk_size must be a positive power of two, got {chunk_size!r}")
    return q


def read_slots(pool, indices):
    """Rows ``pool[indices[r]]`` in float32 (the whole pool when ``indices`` is None).

    A row whose index is outside ``[0, slots)`` (vLLM marks padding with -1) reads zeros.
    """
    if indices is None:
        return pool.astype(jnp.float32)
    idx = indices.astype(jnp.int32)
    valid = (idx >= 0) & (idx < pool.shape[0])
    rows = pool[jnp.where(valid, idx, 0)]
    return jnp.where(valid.reshape((-1,) + (1,) * (rows.ndim - 1)), rows, 0).astype(jnp.float32)


def write_slots(pool, indices, rows):
    """``pool`` with ``rows`` (cast to the pool dtype) stored at ``indices``; rows whose index is
    outside ``[0, slots)`` are dropped. ``indices`` None: ``rows`` is the new pool."""
    rows = rows.astype(pool.dtype)
    if indices is None:
        return rows
    idx = indices.astype(jnp.int32)
    slots = pool.shape[0]
    target = jnp.where((idx >= 0) & (idx < slots), idx, slots)  # out of range: write dropped
    return pool.at[target].set(rows, mode="drop")
