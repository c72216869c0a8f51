"""Small-batch GEMV ``x @ w (+ bias)`` for decode projections (split-K Pallas kernel + XLA)."""

from mamba2_jax.kernels.gemv.api import gemv
from mamba2_jax.kernels.gemv.reference import gemv_ref

__all__ = ["gemv", "gemv_ref"]
