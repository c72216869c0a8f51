"""Row RMS norm of the decode step (optionally after a residual add), one launch."""

from mamba2_jax.kernels.rms_norm.api import rms_norm
from mamba2_jax.kernels.rms_norm.reference import rms_norm_ref

__all__ = ["rms_norm", "rms_norm_ref"]
