"""Public decode-step RMS norm: validation + dispatch (``reference.py`` for the math).

``rms_norm(x, weight, *, eps, groups=1, delta=None, in_dtype=None, norm_dtype=None)`` -> out
(and the sum ``x + delta`` when delta is given). ``impl="pallas"``: the Triton kernel
(``interpret=True`` on the CPU); ``"xla"``: the reference; ``"auto"``: the kernel on a GPU.
"""

from __future__ import annotations

import jax.numpy as jnp

from mamba2_jax.kernels.common import resolve_impl
from mamba2_jax.kernels.rms_norm.pallas_norm import rms_norm_pallas
from mamba2_jax.kernels.rms_norm.reference import rms_norm_ref


def rms_norm(x, weight, *, eps: float, groups: int = 1, delta=None, in_dtype=None,
             norm_dtype=None, impl: str = "auto", interpret: bool = False):
    """See the module docstring; x and delta [m, D], weight [D], D divisible by groups."""
    op = "rms_norm"
    if x.ndim != 2:
        raise ValueError(f"{op}: x must be [m, D], got {tuple(x.shape)}")
    m, D = x.shape
    if tuple(weight.shape) != (D,):
        raise ValueError(f"{op}: weight must be ({D},), got {tuple(weight.shape)}")
    if delta is not None and tuple(delta.shape) != (m, D):
        raise ValueError(f"{op}: delta must be ({m}, {D}), got {tuple(delta.shape)}")
    if not isinstance(groups, int) or groups < 1 or D % groups:
        raise ValueError(f"{op}: groups must be a positive divisor of D={D}, got {groups!r}")
    for name, a in (("x", x), ("weight", weight), ("delta", delta)):
        if a is not None and not jnp.issubdtype(a.dtype, jnp.floating):
            raise ValueError(f"{op}: {name} must be floating point, got {a.dtype}")
    kw = dict(eps=float(eps), groups=groups, delta=delta, in_dtype=in_dtype,
              norm_dtype=norm_dtype)
    if resolve_impl(impl, op=op, pallas_available=True, interpret=interpret) == "xla":
        return rms_norm_ref(x, weight, **kw)
    kw = {**kw, "in_dtype": None if in_dtype is None else jnp.dtype(in_dtype).name,
          "norm_dtype": None if norm_dtype is None else jnp.dtype(norm_dtype).name}
    return rms_norm_pallas(x, weight, interpret=interpret, **kw)
