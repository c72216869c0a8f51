"""RMS norms: the block norm and the mixer's grouped gated norm (vLLM ``Mixer2RMSNormGated``).

Dtype policy: statistics in float32; the normalised value is cast back to the input dtype and
then multiplied by the weight (so the result takes the promoted dtype of weight and input, as in
HF transformers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mamba2_jax.kernels.common import op_kwargs
from mamba2_jax.kernels.rms_norm import rms_norm, rms_norm_ref
from mamba2_jax.sharding.params import logical_param


class RMSNorm(nnx.Module):
    """``y = weight * x / sqrt(mean(x^2) + eps)`` over the last axis."""

    def __init__(self, dim: int, *, eps: float = 1e-5, param_dtype=jnp.float32,
                 axis_name: str | None = "embed"):
        self.eps = eps
        self.weight = logical_param(jnp.ones((dim,), param_dtype), (axis_name,))

    def __call__(self, x):
        return rms_norm_ref(x, self.weight[...], eps=self.eps)


class GatedGroupRMSNorm(nnx.Module):
    """Gate, then RMS-normalise per group: vLLM's ``Mixer2RMSNormGated`` (norm_before_gate=False).

    ``y = x * silu(gate)``; ``y`` [.., i] is viewed as ``n_groups`` groups of ``i / n_groups``
    channels, each divided by its own RMS, then multiplied by ``weight`` [i]. ``n_groups`` is the
    checkpoint's ORIGINAL group count (never the TP-duplicated one). ``use_rms_norm=False``
    returns ``x * silu(gate)`` with no weight.
    """

    def __init__(self, dim: int, n_groups: int, *, eps: float = 1e-5, use_rms_norm: bool = True,
                 param_dtype=jnp.float32, axis_name: str | None = "ssm_heads"):
        if dim % n_groups:
            raise ValueError(f"GatedGroupRMSNorm: dim={dim} is not a multiple of n_groups={n_groups}")
        self.n_groups = n_groups
        self.eps = eps
        self.use_rms_norm = use_rms_norm
        self.weight = (logical_param(jnp.ones((dim,), param_dtype), (axis_name,))
                       if use_rms_norm else None)

    def __call__(self, x, gate):
        return self.normalize(x.astype(jnp.float32) * jax.nn.silu(gate.astype(jnp.float32)),
                              x.dtype)

    def normalize(self, y, dtype, *, impl=None):
        """The norm after the gate: ``y = x * silu(gate)`` (float32) -> normalised, cast to
        ``dtype`` (x's), times the weight (the fused decode step gates in its kernel).
        ``impl`` (a decode step's ``[b, i]``): through ``kernels.rms_norm``'s dispatch, one
        launch on a GPU; None: the reference."""
        if not self.use_rms_norm:
            return y.astype(dtype)
        kw = dict(eps=self.eps, groups=self.n_groups, norm_dtype=dtype)
        if impl is None:
            return rms_norm_ref(y, self.weight[...], **kw)
        return rms_norm(y, self.weight[...], **kw, **op_kwargs(impl))
