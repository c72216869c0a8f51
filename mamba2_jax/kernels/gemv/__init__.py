"""Small-batch GEMV ``x @ w (+ bias)`` for decode projections (split-K Pallas kernel + XLA),
and ``residual_gemv``: a decode block's residual add + norm + in_proj in one launch, the norm's
1 / RMS row scale left to the consumer."""

from mamba2_jax.kernels.gemv.api import gemv, residual_gemv
from mamba2_jax.kernels.gemv.reference import gemv_ref, residual_gemv_ref

__all__ = ["gemv", "gemv_ref", "residual_gemv", "residual_gemv_ref"]
