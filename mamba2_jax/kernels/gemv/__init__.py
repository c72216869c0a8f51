"""Small-batch GEMV ``x @ w (+ bias)`` for decode projections (split-K Pallas kernel + XLA),
and ``normed_gemv``: the same product of an RMS-normalised input, the norm in its prologue."""

from mamba2_jax.kernels.gemv.api import gemv, normed_gemv
from mamba2_jax.kernels.gemv.reference import gemv_ref, normed_gemv_ref

__all__ = ["gemv", "gemv_ref", "normed_gemv", "normed_gemv_ref"]
