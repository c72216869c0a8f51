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


def op_kwargs(impl: str, *, has_kernel: bool) -> dict:
    """A model-level ``impl`` -> the ``impl`` / ``interpret`` keywords for one op.

    ``"auto"`` and ``"xla"`` pass through; ``"pallas"`` uses the op's Pallas kernel where it has
    one and XLA otherwise; ``"interpret"`` is ``"pallas"`` with the kernels in interpret mode
    (runs on the CPU, for tests).
    """
    if impl not in MODEL_IMPLS:
        raise ValueError(f"impl must be one of {MODEL_IMPLS}, got {impl!r}")
    if impl in ("pallas", "interpret"):
        return dict(impl="pallas", interpret=impl == "interpret") if has_kernel else dict(impl="xla")
    return dict(impl=impl)


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
