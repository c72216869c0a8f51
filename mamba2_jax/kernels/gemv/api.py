"""Public small-batch GEMV: ``out = x @ w (+ bias)``, validation + dispatch.

x [m, K] (or [..., K]: leading axes are flattened into m and restored), w [K, N] in the
Flax orientation ([in, out], row-major) or, with ``w_layout="out_in"``, [N, K] (a tied
embedding matrix [vocab, d] as the LM head: ``x @ w.T``), bias [N] or None. x and w share one
float dtype (bfloat16, float16 or float32); products accumulate in float32; the output is in
``x.dtype`` (or ``out_dtype``).
This matches ``nnx.Linear`` (``dot_general`` in the param dtype, float32 accumulation on GPU)
within one rounding of the output.

Backends: ``impl="pallas"`` is a Pallas kernel, made for small m, where XLA's GEMV does not
reach the memory bandwidth: ``kernel="triton"`` the split-K Triton kernel (``pallas_gemv.py``),
``kernel="mgpu"`` the Mosaic GPU one (``mgpu_gemv.py``: TMA ring + wgmma, Hopper, bf16 / f16;
a call outside its scope is an error), ``kernel="auto"`` the Triton kernel (see
``AUTO_KERNEL``); ``impl="xla"`` is ``reference.py``.
``impl="auto"`` takes the kernel on a GPU when ``m <= MAX_AUTO_ROWS`` (16), XLA otherwise.
``block_n`` / ``block_k`` / ``splits`` (and ``method``, ``num_warps``, ``num_stages``)
override the kernel's launch parameters (for sweeps); they are ignored by XLA.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

from mamba2_jax.kernels.common import resolve_impl
from mamba2_jax.kernels.gemv.pallas_gemv import (METHODS, NUM_STAGES, NUM_WARPS, SM_COUNT,
                                                 check_layout, gemv_partials, gemv_pallas,
                                                 plan, residual_gemv_call)
from mamba2_jax.kernels.gemv.mgpu_gemv import gemv_mgpu, mgpu_gemv_unsupported
from mamba2_jax.kernels.gemv.reference import gemv_ref, residual_gemv_ref

MAX_AUTO_ROWS = 16
KERNELS = ("auto", "triton", "mgpu")
AUTO_KERNEL = "triton"
DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
log = logging.getLogger("mamba2_jax")


def _sm_count() -> int:
    dev = jax.devices()[0]
    return int(getattr(dev, "core_count", 0) or SM_COUNT) if dev.platform == "gpu" else SM_COUNT


def _check_block(name, v):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1
                          or (name not in ("splits", "stages") and v & (v - 1))):
        what = ("a positive integer" if name in ("splits", "stages")
                else "a positive power of two")
        raise ValueError(f"gemv: {name} must be {what} or None, got {v!r}")


def decode_takes_kernel(impl, rows: int, *, mesh=None, auto: bool = False) -> bool:
    """Whether a model's decode-step product of ``rows`` rows runs through the kernel: never
    under a mesh (the product is sharded outside ``shard_map``) or past MAX_AUTO_ROWS; always
    when ``impl`` asks for the kernels ("pallas" / "interpret"); under "auto" only on a GPU and
    when ``auto`` (the caller's product was measured faster there)."""
    if mesh is not None or rows > MAX_AUTO_ROWS:
        return False
    return impl in ("pallas", "interpret") or (
        impl == "auto" and auto and jax.default_backend() == "gpu")


def gemv(x, w, bias=None, *, w_layout: str = "in_out", out_dtype=None, impl: str = "auto",
         interpret: bool = False, block_n=None, block_k=None, splits=None, method=None,
         num_warps: int = NUM_WARPS, num_stages: int = NUM_STAGES, kernel: str = "auto",
         stages=None, partials: bool = False):
    """``x @ w (+ bias)`` with float32 accumulation, in ``out_dtype`` (None: x.dtype; float32
    keeps the accumulator's precision, e.g. for logits); see the module docstring.
    ``w_layout="out_in"``: w is [N, K] and the product is ``x @ w.T``. ``kernel``: which
    Pallas kernel ``impl="pallas"`` runs (``stages``: the Mosaic GPU kernel's ring depth;
    ``method`` / ``num_warps`` / ``num_stages``: the Triton kernel's). ``partials``: return
    float32 partial products ``[S, m, N]`` whose sum over axis 0 is the product (the Triton
    kernel's split-K slabs, unsummed, for a consumer that sums them itself; S = 1 from the
    other backends); x must be [m, K], no bias, no out_dtype."""
    op = "gemv"
    if kernel not in KERNELS:
        raise ValueError(f"{op}: kernel must be one of {KERNELS}, got {kernel!r}")
    for name, a in (("x", x), ("w", w)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise ValueError(f"{op}: {name} must be an array, got {type(a).__name__}")
    if x.ndim < 1:
        raise ValueError(f"{op}: x must be [m, K] (or [..., K]), got a scalar")
    out_in = check_layout(w_layout)
    if w.ndim != 2:
        raise ValueError(f"{op}: w must be {'[N, K]' if out_in else '[K, N]'}, got shape "
                         f"{tuple(w.shape)}")
    N, K = w.shape if out_in else w.shape[::-1]
    if x.shape[-1] != K:
        raise ValueError(f"{op}: x.shape[-1] must equal w.shape[{int(out_in)}] == {K}, got x "
                         f"{tuple(x.shape)} and w {tuple(w.shape)} (w_layout={w_layout!r})")
    if x.dtype not in DTYPES:
        raise ValueError(f"{op}: x must be bfloat16, float16 or float32, got {x.dtype}")
    if w.dtype != x.dtype:
        raise ValueError(f"{op}: w must have x's dtype {x.dtype}, got {w.dtype} (cast one first)")
    if bias is not None:
        if not hasattr(bias, "shape") or tuple(bias.shape) != (N,):
            raise ValueError(f"{op}: bias must be [N] == ({N},), got "
                             f"{getattr(bias, 'shape', type(bias).__name__)}")
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(f"{op}: bias must be a floating-point array, got {bias.dtype}")
    for name, v in (("block_n", block_n), ("block_k", block_k), ("splits", splits),
                    ("stages", stages)):
        _check_block(name, v)
    if out_dtype is not None and jnp.dtype(out_dtype) not in DTYPES:
        raise ValueError(f"{op}: out_dtype must be bfloat16, float16, float32 or None, got "
                         f"{out_dtype}")
    if method is not None and method not in METHODS:
        raise ValueError(f"{op}: method must be one of {METHODS} or None, got {method!r}")
    if method in (None, "dot") and any(v is not None and v < 16 for v in (block_n, block_k)):
        raise ValueError(f"{op}: method='dot' (the default) needs block_n and block_k >= 16; "
                         f"method='fma' takes smaller blocks")

    if partials and (x.ndim != 2 or bias is not None or out_dtype is not None):
        raise ValueError(f"{op}: partials=True takes x [m, K] without bias or out_dtype")
    lead = x.shape[:-1]
    m = 1
    for d in lead:
        m *= d
    backend = resolve_impl(impl, op=op, pallas_available=True, interpret=interpret)
    if impl == "auto" and m > MAX_AUTO_ROWS:
        backend = "xla"
    if backend == "pallas" and 0 in (m, K, N):
        log.warning("%s: empty input (x %s, w %s): using the XLA reference", op,
                    tuple(x.shape), tuple(w.shape))
        backend = "xla"
    chosen = AUTO_KERNEL if kernel == "auto" else kernel
    out_dtype = jnp.float32 if partials else (None if out_dtype is None else jnp.dtype(out_dtype))
    if backend == "xla":
        out = gemv_ref(x, w, bias, w_layout=w_layout, out_dtype=out_dtype)
        return out[None] if partials else out
    if partials and chosen == "triton":
        p = plan(m, K, N, block_n=block_n, block_k=block_k, splits=splits, method=method,
                 sm_count=_sm_count())
        return gemv_partials(x, w, p=p, w_layout=w_layout, num_warps=num_warps,
                             num_stages=num_stages, interpret=interpret)
    if chosen == "mgpu":
        why = mgpu_gemv_unsupported(m, K, N, x.dtype, w_layout=w_layout, block_n=block_n,
                                    block_k=block_k, splits=splits, interpret=interpret)
        if why is not None:
            raise ValueError(f"{op}: kernel='mgpu' cannot take this call: {why}")
        out = gemv_mgpu(x.reshape(m, K), w, bias, w_layout=w_layout, block_n=block_n,
                        block_k=block_k, splits=splits, stages=stages, sm_count=_sm_count(),
                        interpret=interpret, out_dtype=out_dtype)
        return out[None] if partials else out.reshape(*lead, N)
    out = gemv_pallas(x.reshape(m, K), w, bias, block_n=block_n, block_k=block_k, splits=splits,
                      method=method, w_layout=w_layout, out_dtype=out_dtype,
                      num_warps=num_warps, num_stages=num_stages, sm_count=_sm_count(),
                      interpret=interpret)
    return out.reshape(*lead, N)


def residual_gemv(h, norm_weight, w, delta=None, delta_ss=None, *, delta_count=None,
                  delta_eps=None, in_dtype=None, impl: str = "auto", interpret: bool = False,
                  block_n=None, block_k=None, splits=None, num_warps: int = NUM_WARPS,
                  num_stages: int = NUM_STAGES):
    """A decode block's residual add, norm and in_proj in one launch, the norm's 1 / RMS row
    scale left to the consumer: ``(partials [S, m, N] float32, h' [m, K], ss [m, S] float32)``
    (``reference.residual_gemv_ref`` states the math; its S is 1). h [m, K] the residual
    stream, norm_weight [K], w [K, N] (bf16 / f16 / f32); ``delta`` [m, K] (the previous
    block's unscaled out_proj output) with ``delta_ss`` [m, slots] float32 (its gated norm's
    sums of squares over ``delta_count`` channels, epsilon ``delta_eps``), or neither.
    ``impl="pallas"`` (``interpret`` on the CPU) the Triton kernel, "xla" the reference,
    "auto" the kernel on a GPU."""
    op = "residual_gemv"
    for name, a in (("h", h), ("norm_weight", norm_weight), ("w", w), ("delta", delta),
                    ("delta_ss", delta_ss)):
        if a is not None and (not hasattr(a, "dtype") or not jnp.issubdtype(a.dtype,
                                                                            jnp.floating)):
            raise ValueError(f"{op}: {name} must be a floating-point array")
    if h.ndim != 2 or w.ndim != 2 or h.shape[1] != w.shape[0]:
        raise ValueError(f"{op}: h must be [m, K] and w [K, N], got {tuple(h.shape)} and "
                         f"{tuple(w.shape)}")
    (m, K), N = h.shape, w.shape[1]
    if w.dtype not in DTYPES:
        raise ValueError(f"{op}: w must be bfloat16, float16 or float32, got {w.dtype}")
    if tuple(norm_weight.shape) != (K,):
        raise ValueError(f"{op}: norm_weight must be ({K},), got {tuple(norm_weight.shape)}")
    if (delta is None) != (delta_ss is None):
        raise ValueError(f"{op}: delta and delta_ss come together")
    if delta is not None:
        if tuple(delta.shape) != (m, K):
            raise ValueError(f"{op}: delta must be [m, K] == ({m}, {K}), got "
                             f"{tuple(delta.shape)}")
        if delta_ss.ndim != 2 or delta_ss.shape[0] != m or delta_ss.dtype != jnp.float32:
            raise ValueError(f"{op}: delta_ss must be float32 [m={m}, slots], got "
                             f"{delta_ss.dtype} {tuple(delta_ss.shape)}")
        if not delta_count or delta_count < 1 or delta_eps is None or delta_eps < 0:
            raise ValueError(f"{op}: a delta needs delta_count >= 1 and delta_eps >= 0, got "
                             f"{delta_count!r}, {delta_eps!r}")
    for name, v in (("block_n", block_n), ("block_k", block_k), ("splits", splits)):
        _check_block(name, v)
    in_dtype = jnp.dtype(h.dtype if in_dtype is None else in_dtype)
    kw = dict(delta_count=delta_count, delta_eps=delta_eps, in_dtype=in_dtype)
    if resolve_impl(impl, op=op, pallas_available=True, interpret=interpret) == "xla":
        return residual_gemv_ref(h, norm_weight, w, delta, delta_ss, **kw)
    p = plan(m, K, N, block_n=block_n, block_k=block_k, splits=splits, method="dot",
             sm_count=_sm_count())
    return residual_gemv_call(h, norm_weight, w, delta, delta_ss, p=p, num_warps=num_warps,
                              num_stages=num_stages, interpret=interpret, **kw)
