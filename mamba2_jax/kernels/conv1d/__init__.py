"""Causal depthwise conv1d: prefill (batched or packed varlen, with states) and decode update."""

from mamba2_jax.kernels.conv1d.api import causal_conv1d, causal_conv1d_update
from mamba2_jax.kernels.conv1d.reference import causal_conv1d_ref, causal_conv1d_update_ref

__all__ = ["causal_conv1d", "causal_conv1d_ref", "causal_conv1d_update",
           "causal_conv1d_update_ref"]
