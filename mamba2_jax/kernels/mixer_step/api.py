"""Public fused mixer decode step: validation + dispatch.

``mixer_step(zxbcdt, conv_state, conv_weight, conv_bias, ssm_state, A, D, dt_bias, ...)`` ->
``(gated y [b, h p] float32, new conv state, new ssm state)`` for a dense batch (row r owns
state row r); the math and the dtype policy are ``reference.mixer_step_ref``'s.
``impl="pallas"``: the Triton kernel (``pallas_step.py``; ``interpret=True`` runs it on the
CPU); ``"xla"``: the reference; ``"auto"``: the kernel on a GPU, else the reference.
"""

from __future__ import annotations

import jax.numpy as jnp

from mamba2_jax.kernels.common import check_dt_limit, resolve_impl
from mamba2_jax.kernels.mixer_step.pallas_step import mixer_step_pallas
from mamba2_jax.kernels.mixer_step.reference import mixer_step_ref


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def mixer_step_unsupported(*, heads: int, head_dim: int, groups: int, state_size: int,
                           conv_kernel: int) -> str | None:
    """Why the fused kernel cannot take this mixer shape (None when it can)."""
    if not (_pow2(head_dim) and _pow2(state_size)):
        return f"head_dim {head_dim} / state_size {state_size} are not both powers of two"
    if heads % groups:
        return f"heads {heads} are not a multiple of groups {groups}"
    if not 2 <= conv_kernel <= 8:
        return f"conv kernel {conv_kernel} is not 2..8"
    return None


def mixer_step(zxbcdt, conv_state, conv_weight, conv_bias, ssm_state, A, D, dt_bias, *,
               heads: int, head_dim: int, groups: int, state_size: int,
               dt_limit=(0.0, float("inf")), a_is_log: bool = False, zx_dtype=None,
               block_p=None, num_warps=None, sum_squares: bool = False, in_ss=None,
               in_count=None, in_eps=None, norm_weight=None, loads_first: bool = False,
               impl: str = "auto", interpret: bool = False):
    """See the module docstring. ``a_is_log``: ``A`` holds A_log (A = -exp(A_log), taken in
    the kernel); ``block_p`` / ``num_warps``: the kernel's launch (None: its defaults);
    ``loads_first``: the kernel issues every load before any compute (blocks of at most 16
    rows; ``pallas_step.py``).
    ``zxbcdt`` may be [S, b, N] float32: the in_proj GEMV's split-K partials
    (``gemv(..., partials=True)``), summed in the kernel and rounded to ``zx_dtype``.
    ``sum_squares``: a fourth output, float32 [b, slots] (slots a multiple of heads, head-major),
    sums of squares of the gated y whose sum over a group's slots is its gated norm's
    statistic (for the decode step with the norms folded). ``in_ss`` [b, slots] float32 with ``in_count`` and
    ``in_eps`` (partials only): the partials' sum is scaled by the in_proj input's 1 / RMS
    before its rounding (``gemv.residual_gemv`` left it out); ``norm_weight`` [i]: the output
    is ``gated y * norm_weight`` in norm_weight's dtype (the gated norm, its 1 / RMS left to
    the consumer). zxbcdt [b, i + c + h] (i = heads * head_dim,
    c = i + 2 groups state_size), conv_state [b, c, k-1], conv_weight [c, k], conv_bias [c] or
    None, ssm_state [b, heads, head_dim, state_size], A / dt_bias [heads], D [heads] or
    [heads, head_dim]."""
    op = "mixer_step"
    h, p, g, n = heads, head_dim, groups, state_size
    i, c = h * p, h * p + 2 * g * n
    if zxbcdt.ndim not in (2, 3):
        raise ValueError(f"{op}: zxbcdt must be [b, N] (or partials [S, b, N]), got "
                         f"{tuple(zxbcdt.shape)}")
    if zxbcdt.ndim == 3 and (zxbcdt.dtype != jnp.float32 or zx_dtype is None):
        raise ValueError(f"{op}: partials zxbcdt [S, b, N] must be float32 and come with "
                         f"zx_dtype, got {zxbcdt.dtype} and zx_dtype={zx_dtype}")
    if zxbcdt.ndim == 2 and zx_dtype is not None and jnp.dtype(zx_dtype) != zxbcdt.dtype:
        raise ValueError(f"{op}: zx_dtype ({jnp.dtype(zx_dtype).name}) is for partials; a [b, N] "
                         f"zxbcdt is taken in its own dtype {zxbcdt.dtype}")
    b = zxbcdt.shape[-2]
    k = conv_weight.shape[-1]
    want = dict(zxbcdt=zxbcdt.shape[:-2] + (b, i + c + h), conv_state=(b, c, k - 1), conv_weight=(c, k),
                ssm_state=(b, h, p, n), A=(h,), dt_bias=(h,))
    got = dict(zxbcdt=zxbcdt, conv_state=conv_state, conv_weight=conv_weight,
               ssm_state=ssm_state, A=A, dt_bias=dt_bias)
    for name, shape in want.items():
        if tuple(got[name].shape) != shape:
            raise ValueError(f"{op}: {name} must be {shape}, got {tuple(got[name].shape)}")
    if conv_bias is not None and tuple(conv_bias.shape) != (c,):
        raise ValueError(f"{op}: conv_bias must be ({c},) or None, got {tuple(conv_bias.shape)}")
    if tuple(D.shape) not in ((h,), (h, p)):
        raise ValueError(f"{op}: D must be ({h},) or ({h}, {p}), got {tuple(D.shape)}")
    for name, a in dict(got, D=D).items():
        if not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{op}: {name} must be floating point, got {a.dtype}")
    if in_ss is not None and (zxbcdt.ndim != 3 or in_ss.ndim != 2 or in_ss.shape[0] != b
                              or in_ss.dtype != jnp.float32 or not in_count or in_count < 1
                              or in_eps is None or in_eps < 0):
        raise ValueError(f"{op}: in_ss must be float32 [b={b}, slots] with partials zxbcdt, "
                         f"in_count >= 1 and in_eps >= 0, got "
                         f"{getattr(in_ss, 'dtype', None)} {tuple(in_ss.shape)}, zxbcdt ndim "
                         f"{zxbcdt.ndim}, {in_count!r}, {in_eps!r}")
    if norm_weight is not None and (tuple(norm_weight.shape) != (i,) or not jnp.issubdtype(
            norm_weight.dtype, jnp.floating)):
        raise ValueError(f"{op}: norm_weight must be a float ({i},) array, got "
                         f"{getattr(norm_weight, 'dtype', None)} {tuple(norm_weight.shape)}")
    lo, hi = check_dt_limit(op, dt_limit)
    why = mixer_step_unsupported(heads=h, head_dim=p, groups=g, state_size=n, conv_kernel=k)
    backend = resolve_impl(impl, op=op, pallas_available=why is None, interpret=interpret)
    shape = dict(heads=h, head_dim=p, groups=g, state_size=n)
    if backend == "xla":
        if a_is_log:
            A = -jnp.exp(A.astype(jnp.float32))
        return mixer_step_ref(zxbcdt, conv_state, conv_weight, conv_bias, ssm_state, A, D,
                              dt_bias, dt_limit=(lo, hi), zx_dtype=zx_dtype,
                              sum_squares=sum_squares, in_ss=in_ss, in_count=in_count,
                              in_eps=in_eps, norm_weight=norm_weight, **shape)
    if block_p is not None and (not _pow2(block_p) or block_p > p):
        raise ValueError(f"{op}: block_p must be a power of two <= head_dim {p}, got {block_p}")
    limit = None if (lo, hi) == (0.0, float("inf")) else (lo, hi)
    launch = dict(block_p=block_p, loads_first=bool(loads_first),
                  **({} if num_warps is None else dict(num_warps=num_warps)))
    return mixer_step_pallas(zxbcdt, conv_state, conv_weight, conv_bias, ssm_state, A, D,
                             dt_bias, in_ss, norm_weight, limit=limit, a_is_log=a_is_log,
                             interpret=interpret, sum_squares=sum_squares,
                             in_count=None if in_ss is None else float(in_count),
                             in_eps=None if in_ss is None else float(in_eps),
                             zx_dtype=None if zx_dtype is None else jnp.dtype(zx_dtype).name,
                             **launch, **shape)
